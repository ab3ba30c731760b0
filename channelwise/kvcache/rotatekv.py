"""RotateKV (Su et al., "RotateKV: Accurate and Robust 2-Bit KV Cache Quantization for LLMs via
Outlier-Aware Adaptive Rotations", arXiv 2501.16383, IJCAI'25).

* **Values**: a per-head Hadamard ``H_d`` folded into v_proj's output rows and o_proj's input
  columns (``transforms.rotate.rotate_heads_vo``) — exact, nothing at run time.
* **Keys, before RoPE**: the keys of ``G`` KV heads are rotated jointly by a Hadamard of size
  ``G·d`` and their channels reordered by a calibrated permutation ``P``; the stored key is
  ``k′ = P·H_{Gd}·k_pre``. Reading undoes ``P``, then ``H``, then applies RoPE. The official code
  folds ``P·H`` into k_proj and patches the attention to undo them before RoPE; here the cache
  does both ends: it takes the post-RoPE key transformers hands it, removes RoPE (an exact
  rotation, undone to float rounding), applies ``P·H``, and on reading undoes them and
  re-applies RoPE at the token's position — the same stored keys with an unmodified model.
* **Reorder calibration** (``k_reordering_calibration.py``): per layer, the signed sum over
  calibration tokens of each rotated pre-RoPE key channel, sorted ascending. The official code
  calibrates on WikiText-2 test; we use the recipe's calibration set (Emma), never the
  evaluation text.
* **Quantization**: per token, asymmetric, groups of ``group_size`` channels (the paper's 128;
  the default is the largest divisor of the KV width ≤ 128, 96 for SmolLM2's 3 × 64), clipped
  by 0.8 at 2 bits and 1.0 above; ``2^b − 1`` levels (the official ``bit**2 − 1`` is wrong at
  3 bits). Scales and minimums in float16.
* **Attention sinks**: in the prefill, the tokens holding the 20 largest ``|x|`` of the layer's
  input (tokens × channels) keep their keys and values in float; decode tokens are always
  quantized. In the chunked evaluation the first chunk is the prefill.

SmolLM2 has 3 KV heads of 64 channels, so ``G ∈ {1, 3}``; the presets use ``G = 3`` (one
192-point Hadamard, ``H12 ⊗ H16`` — the closest to the paper's grouping of all heads of a GQA
group).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import rotate_half

from channelwise.errors import RecipeError, UnsupportedModelError
from channelwise.kvcache.cache import KVCacheConfig, kv_geometry
from channelwise.kvcache.codecs import GroupQuantCodec
from channelwise.kvcache.methods import KVMethod, register_kv
from channelwise.transforms.hadamard import hadamard_matrix
from channelwise.transforms.rotate import rotate_heads_vo


def apply_rope(x: Tensor, rotary: nn.Module, positions: Tensor, inverse: bool = False) -> Tensor:
    """RoPE (or its inverse) at ``positions`` ``(n,)`` on ``x`` ``(heads, n, head_dim)``, in
    float32, with the model's own rotary module (so its scaling and frequencies)."""
    probe = torch.zeros(1, device=x.device, dtype=torch.float32)
    cos, sin = rotary(probe, positions.to(x.device)[None])
    cos, sin = cos[0].float(), sin[0].float()
    x = x.float()
    return x * cos - rotate_half(x) * sin if inverse else x * cos + rotate_half(x) * sin


class PreRopeRotation:
    """Key transform ``k′ = P·H·RoPE⁻¹(k)`` per layer (a ``KeyTransform``); ``hadamard`` spans
    the grouped heads' channels."""

    def __init__(self, rotary: nn.Module, hadamard: Tensor, orders: list[Tensor]):
        self.rotary = rotary
        self.hadamard = hadamard.float()
        self.orders = orders  # each (kv_heads·head_dim,), long
        self.inverses = [o.argsort() for o in orders]

    def _rotate(self, rows: Tensor, inverse: bool) -> Tensor:
        n, width = rows.shape
        h = self.hadamard.to(rows.device)
        grouped = rows.reshape(n, -1, h.shape[0])
        return (grouped @ (h if inverse else h.T)).reshape(n, width)

    def to_stored(self, keys: Tensor, layer: int, positions: Tensor) -> Tensor:
        heads, n, d = keys.shape
        pre = apply_rope(keys, self.rotary, positions, inverse=True)
        rows = self._rotate(pre.transpose(0, 1).reshape(n, heads * d), inverse=False)
        rows = rows[:, self.orders[layer].to(keys.device)]
        return rows.reshape(n, heads, d).transpose(0, 1).to(keys.dtype)

    def from_stored(self, keys: Tensor, layer: int, positions: Tensor) -> Tensor:
        heads, n, d = keys.shape
        rows = keys.float().transpose(0, 1).reshape(n, heads * d)
        rows = self._rotate(rows[:, self.inverses[layer].to(keys.device)], inverse=True)
        pre = rows.reshape(n, heads, d).transpose(0, 1)
        return apply_rope(pre, self.rotary, positions).to(keys.dtype)


def default_group_size(width: int, limit: int = 128) -> int:
    """The largest divisor of ``width`` not above ``limit`` (the paper's 128-channel groups)."""
    return max(g for g in range(1, min(width, limit) + 1) if width % g == 0)


class RotateKVArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(ge=2, le=8)
    group_heads: int | None = Field(default=None, ge=1)  # None: all KV heads
    group_size: int | None = Field(default=None, ge=1)  # None: largest divisor ≤ 128
    clip_ratio: float | None = Field(default=None, gt=0, le=1)  # None: 0.8 at 2 bits, else 1
    sinks: int = Field(default=20, ge=0)
    reorder: bool = True


@register_kv
class RotateKV(KVMethod):
    name = "rotatekv"
    needs_calibration = True
    Args = RotateKVArgs

    def __init__(self, recipe_name: str, args: RotateKVArgs) -> None:
        super().__init__(recipe_name, args)
        self.orders: list[Tensor] | None = None

    def _geometry(self, model: nn.Module) -> tuple[int, int, int, int, int]:
        layers, kv_heads, head_dim = kv_geometry(model)
        g = self.args.group_heads or kv_heads
        width = kv_heads * head_dim
        return layers, kv_heads, head_dim, g, self.args.group_size or default_group_size(width)

    def check(self, model: nn.Module, adapter) -> None:
        _, kv_heads, head_dim, g, group = self._geometry(model)
        adapter.require_kv_transforms(f"{self._where()}: the pre-RoPE key rotation")
        if adapter.family != "llama" or rotary_embedding(model) is None:
            raise RecipeError(
                f"{self._where()}: the pre-RoPE key rotation needs a Llama-family model with "
                f"rotary embeddings; {adapter.family} is not supported"
            )
        if kv_heads % g:
            raise RecipeError(
                f"{self._where()}: group_heads {g} does not divide the {kv_heads} KV heads"
            )
        for size, what in ((head_dim, "per-head value"), (g * head_dim, "grouped key")):
            try:
                hadamard_matrix(size)
            except UnsupportedModelError:
                raise RecipeError(
                    f"{self._where()}: no Hadamard matrix of size {size} for the {what} "
                    f"rotation (sizes m·2^k with a known order m, e.g. 64, 96, 192)"
                ) from None
        if (kv_heads * head_dim) % group:
            raise RecipeError(
                f"{self._where()}: group_size {group} does not divide the "
                f"{kv_heads * head_dim} KV channels of a token"
            )

    def prepare_model(
        self, model: nn.Module, adapter, calibration: Tensor | None, progress: bool = True
    ) -> None:
        layers, kv_heads, head_dim, g, _ = self._geometry(model)
        h_d = hadamard_matrix(head_dim)
        for block in adapter.block_list(model):
            rotate_heads_vo(block, adapter, h_d)
        if self.args.reorder:
            if calibration is None:
                raise RecipeError(f"{self._where()}: the key reordering needs calibration data")
            self.orders = reorder_from_calibration(model, adapter, calibration, g * head_dim)
        else:
            self.orders = [torch.arange(kv_heads * head_dim) for _ in range(layers)]

    def cache_config(self, model: nn.Module, adapter) -> KVCacheConfig:
        if self.orders is None:
            raise RecipeError(f"{self._where()}: not prepared (no key order)")
        _, _, head_dim, g, group = self._geometry(model)
        a = self.args
        clip = a.clip_ratio if a.clip_ratio is not None else (0.8 if a.bits == 2 else 1.0)
        codec = GroupQuantCodec(a.bits, group, "channel", clip_ratio=clip)
        transform = PreRopeRotation(
            rotary_embedding(model), hadamard_matrix(g * head_dim), self.orders
        )
        return KVCacheConfig(codec, codec, residual=0, key_transform=transform, sinks=a.sinks)

    def saved_state(self) -> dict[str, Tensor]:
        return {f"order.{i}": order for i, order in enumerate(self.orders or [])}

    def restore(self, model: nn.Module, adapter, state: dict[str, Tensor]) -> None:
        layers = kv_geometry(model)[0]
        try:
            self.orders = [state[f"order.{i}"].long() for i in range(layers)]
        except KeyError as exc:
            raise RecipeError(
                f"{self._where()}: the checkpoint lacks the key order {exc}"
            ) from None

    def label(self) -> str:
        return f"KV{self.args.bits}"


def rotary_embedding(model: nn.Module) -> nn.Module | None:
    """The model's rotary-embedding module (Llama family: ``model.model.rotary_emb``), or None."""
    inner = getattr(model, "model", None)
    return getattr(inner, "rotary_emb", None)


@torch.no_grad()
def reorder_from_calibration(
    model: nn.Module, adapter, calibration: Tensor, group_width: int, batch_size: int = 8
) -> list[Tensor]:
    """Per layer, the order of the rotated pre-RoPE key channels by their signed sum over the
    calibration tokens, ascending (``(kv_heads·head_dim,)`` each)."""
    h = hadamard_matrix(group_width).float()
    blocks = adapter.block_list(model)
    sums: list[Tensor | None] = [None] * len(blocks)

    def hook(index: int):
        def record(module, args, output):
            rows = output.reshape(-1, output.shape[-1]).float()
            rotated = rows.reshape(rows.shape[0], -1, group_width) @ h.to(rows.device).T
            total = rotated.reshape(rows.shape).sum(dim=0)
            sums[index] = total if sums[index] is None else sums[index] + total

        return record

    handles = [
        block.get_submodule(adapter.attention["k"]).register_forward_hook(hook(i))
        for i, block in enumerate(blocks)
    ]
    device = next(model.parameters()).device
    try:
        for start in range(0, calibration.shape[0], batch_size):
            model(calibration[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [s.argsort(stable=True).cpu() for s in sums]
