"""Block-sparse linears on the CPU: skip the weight blocks that pruning zeroed.

A linear whose weight has all-zero ``bh × bw`` blocks (LPViT's block pruning) becomes a
:class:`BlockSparseLinear`: the weight is kept as strips of 16 output rows cut into segments of
``bw`` input columns, only the segments that hold a nonzero stored
(:class:`~channelwise.kernels.sparse.BlockSparseWeight`), and the product runs over those only,
in the extension's AVX-512 kernel (:func:`~channelwise.kernels.sparse.block_sparse_linear`). With
``bh`` a multiple of 16 the stored segments are exactly the kept blocks; with a smaller ``bh`` a
strip stores the union of its block rows' kept blocks, so less of the sparsity is used. Outputs
equal the dense masked product up to float summation order. ``benchmarks/vision_lpvit.py``
measures the speed in the same run as the dense model, and the same kernel with every block
kept.
"""

from __future__ import annotations

from torch import Tensor, nn

from channelwise.deploy.packed import _set_submodule
from channelwise.errors import PackingError
from channelwise.kernels.sparse import BlockSparseWeight, block_sparse_linear


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
        weight = linear.weight.detach().float()
        kept = weight.reshape(out_features // bh, bh, in_features // bw, bw).ne(0).any(3).any(1)
        self.kept_fraction = float(kept.float().mean())
        packed = BlockSparseWeight.from_dense(weight, bw)
        self.register_buffer("blocks", packed.blocks)
        self.register_buffer("starts", packed.starts)
        self.register_buffer("columns", packed.columns)
        bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    @property
    def sparse_weight(self) -> BlockSparseWeight:
        return BlockSparseWeight(
            self.blocks, self.starts, self.columns, self.out_features, self.in_features
        )

    def forward(self, x: Tensor) -> Tensor:
        return block_sparse_linear(x, self.sparse_weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"block={self.block}, kept={self.kept_fraction:.2f}, "
            f"multiplied={self.sparse_weight.stored_fraction:.2f}"
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
        _set_submodule(model, name, sparse)
        replaced.append(name)
    return replaced
