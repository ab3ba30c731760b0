"""Block-sparse linears on the CPU: skip the weight blocks that pruning zeroed.

A linear whose weight has all-zero ``bh × bw`` blocks (LPViT's block pruning) becomes a
:class:`BlockSparseLinear`: each block row keeps its runs of consecutive non-zero blocks as
dense ``bh × (k·bw)`` tiles, and the product is computed transposed, ``yᵀ[rows] += tile ·
xᵀ[cols]``, one BLAS call per tile into contiguous rows of ``yᵀ``. The work is proportional to
the kept blocks; with ~50% of the blocks kept it runs faster than the dense product
(``benchmarks/vision_lpvit.py`` measures it in the same run as the dense model). Outputs equal
the dense masked product up to float summation order.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from channelwise.errors import PackingError


class BlockSparseLinear(nn.Module):
    """``y = x Wᵀ + b`` over the non-zero ``block`` tiles of ``W`` only."""

    def __init__(self, linear: nn.Linear, block: tuple[int, int]) -> None:
        super().__init__()
        out_features, in_features = linear.weight.shape
        bh, bw = block
        if out_features % bh or in_features % bw:
            raise PackingError(
                f"a {out_features}×{in_features} weight does not split into {bh}×{bw} blocks"
            )
        self.in_features, self.out_features, self.block = in_features, out_features, (bh, bw)
        weight = linear.weight.detach()
        kept = weight.reshape(out_features // bh, bh, in_features // bw, bw).ne(0).any(3).any(1)
        self.runs: list[tuple[int, int, int]] = []  # (block row, first block column, end)
        tiles = []
        for row, flags in enumerate(kept.tolist()):
            column = 0
            while column < len(flags):
                if not flags[column]:
                    column += 1
                    continue
                end = column
                while end < len(flags) and flags[end]:
                    end += 1
                self.runs.append((row, column, end))
                tiles.append(weight[row * bh : (row + 1) * bh, column * bw : end * bw].clone())
                column = end
        for index, tile in enumerate(tiles):
            self.register_buffer(f"tile{index}", tile.contiguous())
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.kept_fraction = float(kept.float().mean())

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        xt = rows.t().contiguous()
        if self.bias is not None:
            yt = self.bias[:, None].expand(self.out_features, rows.shape[0]).contiguous()
        else:
            yt = torch.zeros(self.out_features, rows.shape[0], dtype=x.dtype, device=x.device)
        bh, bw = self.block
        for index, (row, column, end) in enumerate(self.runs):
            tile = getattr(self, f"tile{index}")
            yt[row * bh : (row + 1) * bh].addmm_(tile, xt[column * bw : end * bw])
        return yt.t().reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"block={self.block}, kept={self.kept_fraction:.2f}"
        )


def block_sparse_model(model: nn.Module, names: list[str], block: tuple[int, int]) -> list[str]:
    """Replace the named float ``nn.Linear`` modules of ``model`` that have at least one zero
    block by :class:`BlockSparseLinear` (in place); returns the names replaced."""
    replaced = []
    for name in names:
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            raise PackingError(f"{name} is a {type(module).__name__}, not a float nn.Linear")
        sparse = BlockSparseLinear(module, block)
        if sparse.kept_fraction >= 1.0:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, sparse)
        replaced.append(name)
    return replaced
