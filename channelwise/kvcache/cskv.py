"""CSKV (Wang et al., "CSKV: Training-Efficient Channel Shrinking for KV Cache in Long-Context
Scenarios", arXiv 2409.10593): a bi-branch cache — the newest tokens (an unfilled window of
``window`` tokens) keep their full keys and values from the original projections; older tokens
keep only low-rank features ``c = x·A`` of the attention input ``x`` (optionally quantized), and
their keys and values are rebuilt as ``c·B`` (RoPE re-applied to the keys at their positions).

The factors come from ``kvcache.lowrank``: ASVD initialisation from the calibration inputs'
per-channel mean ``|x|``, then a short reconstruction fine-tune of only ``A`` and ``B`` per
layer (with quantization-aware training when the features are quantized: keys per channel over
32-token windows, values per token over groups of ``r / n_kv`` channels, as the official code
does). Ranks: ``density_k`` and ``density_v`` of ``head_dim · n_kv`` (``lowrank.rank_for``);
the paper reports 0.5/0.5, the official ``train.py`` defaults to 0.25/0.75. The calibration
inputs are a capped sample of the recipe's calibration set (``calib_tokens``), not the paper's
1024-token training sequences.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from channelwise.adapters import linear_weight
from channelwise.errors import RecipeError
from channelwise.kvcache.cache import KVCacheConfig, kv_geometry
from channelwise.kvcache.codecs import Float16Codec, GroupQuantCodec, KVCodec
from channelwise.kvcache.lowrank import act_scale, asvd_factors, finetune_factors, rank_for
from channelwise.kvcache.methods import KVMethod, register_kv
from channelwise.kvcache.rotatekv import apply_rope, rotary_embedding

KEY_WINDOW = 32  # tokens per key-feature quantization group (KIVI-style)


class LowRankShrink:
    """The ``Shrink`` of a CSKV cache: per layer ``A_k, B_k, A_v, B_v`` (and k/v biases)."""

    def __init__(self, factors: list[dict[str, Tensor]], rotary: nn.Module, kv_heads: int):
        self.factors = factors
        self.rotary = rotary
        self.kv_heads = kv_heads

    def features(self, inputs: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        f = self.factors[layer]
        x = inputs.float()
        return (x @ f["a_k"].to(x.device))[None], (x @ f["a_v"].to(x.device))[None]

    def _rebuild(self, features: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
        rows = features[0].float() @ b.to(features.device)
        if bias is not None:
            rows = rows + bias.to(rows.device)
        return rows.reshape(rows.shape[0], self.kv_heads, -1).transpose(0, 1)

    def keys(self, features: Tensor, layer: int, positions: Tensor) -> Tensor:
        f = self.factors[layer]
        return apply_rope(
            self._rebuild(features, f["b_k"], f.get("bias_k")), self.rotary, positions
        )

    def values(self, features: Tensor, layer: int) -> Tensor:
        f = self.factors[layer]
        return self._rebuild(features, f["b_v"], f.get("bias_v"))


class CskvArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    density_k: float = Field(default=0.5, gt=0, le=1)
    density_v: float = Field(default=0.5, gt=0, le=1)
    bits: int | None = Field(default=None, ge=2, le=8)  # None: features in float16
    window: int = Field(default=32, ge=KEY_WINDOW, multiple_of=KEY_WINDOW)
    calib_tokens: int = Field(default=8192, ge=KEY_WINDOW)
    steps: int = Field(default=300, ge=0)


@register_kv
class Cskv(KVMethod):
    name = "cskv"
    needs_calibration = True
    Args = CskvArgs

    def __init__(self, recipe_name: str, args: CskvArgs) -> None:
        super().__init__(recipe_name, args)
        self.factors: list[dict[str, Tensor]] | None = None
        self.reports: list[dict] = []

    def _ranks(self, model: nn.Module) -> tuple[int, int, int]:
        """Key rank, value rank, KV heads."""
        _, kv_heads, head_dim = kv_geometry(model)
        a = self.args
        return (
            rank_for(a.density_k, head_dim, kv_heads),
            rank_for(a.density_v, head_dim, kv_heads),
            kv_heads,
        )

    def check(self, model: nn.Module, adapter) -> None:
        adapter.require_kv_transforms(f"{self._where()}: low-rank keys")
        if adapter.family != "llama" or rotary_embedding(model) is None:
            raise RecipeError(
                f"{self._where()}: rebuilding keys re-applies RoPE; only the Llama family is "
                f"supported, not {adapter.family}"
            )
        self._ranks(model)  # rank_for refuses a density that keeps no channel

    def _codecs(self, rank_v: int, kv_heads: int) -> tuple[KVCodec, KVCodec]:
        if self.args.bits is None:
            return Float16Codec(), Float16Codec()
        return (
            GroupQuantCodec(self.args.bits, KEY_WINDOW, "token"),
            GroupQuantCodec(self.args.bits, rank_v // kv_heads, "channel"),
        )

    def prepare_model(
        self, model: nn.Module, adapter, calibration: Tensor | None, progress: bool = True
    ) -> None:
        if calibration is None:
            raise RecipeError(f"{self._where()}: the factors need calibration data")
        rank_k, rank_v, kv_heads = self._ranks(model)
        key_codec, value_codec = self._codecs(rank_v, kv_heads)
        ranks = {"k": rank_k, "v": rank_v}
        inputs = record_attention_inputs(model, adapter, calibration, self.args.calib_tokens)
        self.factors, self.reports = [], []
        blocks = adapter.block_list(model)
        for index in tqdm(
            range(len(blocks)), desc="cskv factors", leave=False, disable=not progress
        ):
            x = inputs[index]
            scale = act_scale(x)
            layer: dict[str, Tensor] = {}
            for name, codec in (("k", key_codec), ("v", value_codec)):
                proj = blocks[index].get_submodule(adapter.attention[name])
                weight = linear_weight(proj, adapter.transposed_weights).detach().float()
                bias = getattr(proj, "bias", None)
                a, b = asvd_factors(weight, scale, ranks[name])
                quant = codec.spec if isinstance(codec, GroupQuantCodec) else None
                with torch.enable_grad():  # quantize() runs methods under no_grad
                    a, b, report = finetune_factors(
                        x, weight, a, b, quant=quant, steps=self.args.steps
                    )
                layer[f"a_{name}"], layer[f"b_{name}"] = a.cpu(), b.cpu()
                if bias is not None:
                    layer[f"bias_{name}"] = bias.detach().float().cpu()
                self.reports.append({"layer": index, "proj": name, **report})
            self.factors.append(layer)

    def cache_config(self, model: nn.Module, adapter) -> KVCacheConfig:
        if self.factors is None:
            raise RecipeError(f"{self._where()}: not prepared (no factors)")
        _, rank_v, kv_heads = self._ranks(model)
        key_codec, value_codec = self._codecs(rank_v, kv_heads)
        shrink = LowRankShrink(self.factors, rotary_embedding(model), kv_heads)
        return KVCacheConfig(key_codec, value_codec, residual=self.args.window, shrink=shrink)

    def saved_state(self) -> dict[str, Tensor]:
        return {
            f"{i}.{key}": tensor
            for i, layer in enumerate(self.factors or [])
            for key, tensor in layer.items()
        }

    def restore(self, model: nn.Module, adapter, state: dict[str, Tensor]) -> None:
        layers = kv_geometry(model)[0]
        factors = [{} for _ in range(layers)]
        for key, tensor in state.items():
            index, name = key.split(".", 1)
            factors[int(index)][name] = tensor.float()
        if any(not {"a_k", "b_k", "a_v", "b_v"} <= set(f) for f in factors):
            raise RecipeError(f"{self._where()}: the checkpoint lacks some low-rank factors")
        self.factors = factors

    def label(self) -> str:
        return f"KV{self.args.bits}" if self.args.bits else "KV16"


@torch.no_grad()
def record_attention_inputs(
    model: nn.Module, adapter, calibration: Tensor, max_tokens: int, batch_size: int = 4
) -> list[Tensor]:
    """Per block, the inputs ``(tokens, hidden)`` of k_proj over the first calibration samples
    (whole samples, at most ``max_tokens`` tokens, a multiple of the key window)."""
    seq = calibration.shape[1]
    samples = max(1, min(calibration.shape[0], max_tokens // seq))
    blocks = adapter.block_list(model)
    seen: list[list[Tensor]] = [[] for _ in blocks]

    def hook(index: int):
        def record(module, args):
            seen[index].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())

        return record

    handles = [
        block.get_submodule(adapter.attention["k"]).register_forward_pre_hook(hook(i))
        for i, block in enumerate(blocks)
    ]
    device = next(model.parameters()).device
    try:
        for start in range(0, samples, batch_size):
            model(calibration[start : min(start + batch_size, samples)].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    out = []
    for chunks in seen:
        x = torch.cat(chunks)
        out.append(x[: (x.shape[0] // KEY_WINDOW) * KEY_WINDOW])
    return out
