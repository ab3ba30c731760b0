"""Outlier Suppression+ (OS+): channel-wise shifting and scaling before quantization.

Wei et al., "Outlier Suppression+: Accurate quantization of large language models by equivalent
and effective shifting and scaling", EMNLP 2023, arXiv 2304.09145. Activation outliers are
*asymmetric* (a channel sits far from zero) and *concentrated* (few channels). OS+ first centres
every channel, ``X̃ = X − z`` with ``z_j = (max_j + min_j)/2`` over a migration batch, then scales
down the channels still wider than a threshold ``t``: ``s_j = max(1, max X̃_j / t, min X̃_j / −t)``.
Both fold exactly (:mod:`channelwise.transforms.shift`, :mod:`channelwise.transforms.smooth`):
``β ← (β − z)/s``, ``γ ← γ/s``, ``b ← b + W·z`` (unscaled ``W``), ``W ← W·diag(s)``.

``t`` is found by a grid search from ``T = max|X̃|`` down to ``lower_bound`` in ``num`` steps,
``num = max(100, int(max(X̃)/0.5))``; each candidate is scored by the squared error of the
subset's real output with fake-quantized weights ``Q_w(W·s)`` and activations ``Q_a(X̃/s)`` against
the float output: the attention output before the output projection (softmax(qkᵀ)·v with RoPE,
GQA, masks, run through the model's own attention module) for the QKV subset; ``act(gate)·up``
for a Llama MLP; the subset's own linear output otherwise (OPT fc1, GPT-2, GPT-NeoX). During the
search the activation quantizer is per tensor with its range fixed to ``[−t, t]``, as in the
paper; afterwards the recipe's activation quantizer applies. A transform step: put it first,
``steps: [{method: osplus}, {method: rtn}]``.

Arguments: ``shift`` (default true), ``migration_samples`` (16: the paper's code uses the first
batch of 16 of 128 samples), ``search_tokens`` (512), ``lower_bound`` (0.1 for gated-MLP families,
1.0 otherwise, as in the paper's code), ``max_grid`` (200), ``scale_down_proj`` (default: on
where the block has an up_proj → down_proj pair, i.e. the Llama family, as the paper's Llama code
migrates the down_proj input unless down_proj is left unquantized; scale only — a shift is not
exact there, since down_proj reads ``act(gate)·up``; ``1/s`` folds into up_proj's rows; the loss
is down_proj's output).

Deviations and choices:

- Llama family (RMSNorm, no bias): the paper's code only scales. Here ``shift: true`` (default)
  shifts too: the RMSNorm output is shifted by a runtime hook (saved with the checkpoint), its
  consumers get biases (Llama: ``attention_bias``/``mlp_bias`` set, missing biases zero; Qwen2
  MLP and Mistral: biases saved in the step state). ``shift: false`` is the paper's Llama setting.
- The loss is measured on a subsample, to be fast on a 2-core CPU: the attention loss on the first
  ``ceil(search_tokens / seq_len)`` migration sequences (attention needs whole sequences), the
  MLP/fc1 loss on ``search_tokens`` rows drawn with a fixed seed. The grid has at most
  ``max_grid`` candidates (the paper's ``num`` grows with the range and can reach thousands).
- Weights in the loss use the recipe's weight quantizer (none: activations only).
- Statistics are taken block by block on inputs from previous blocks already compressed (the
  paper also calibrates layers in order with fake quantization on).
- Post-LN models (OPT-350m) are refused (the paper adds a residual-path op there).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from channelwise.adapters import ModelAdapter, Subset, linear_weight
from channelwise.engine import BlockContext, run_until
from channelwise.errors import RecipeError
from channelwise.methods.migration import (
    ShiftMigration,
    batch_slice,
    capture_subset_inputs,
)
from channelwise.methods.registry import register
from channelwise.quant import PerTensor, QParams, QuantSpec, fake_quantize
from channelwise.transforms.shift import (
    shift_norm_output,
)
from channelwise.transforms.smooth import fold_scales_between_linears, fold_scales_into_norm

# --- pure pieces --------------------------------------------------------------------------------


def threshold_grid(x_max: float, x_min: float, lower: float, max_grid: int) -> Tensor:
    """Candidates ``t`` from ``T = max(|x_min|, x_max)`` downwards, step ``(T − lower)/num``."""
    T = max(abs(x_min), abs(x_max))
    if T <= lower:
        return torch.tensor([T], dtype=torch.float64)
    num = min(max(100, int(max(x_max, 0.0) / 0.5)), max_grid)
    step = (T - lower) / num
    return torch.tensor([T - i * step for i in range(num)], dtype=torch.float64)


def osplus_scales(cmx: Tensor, cmn: Tensor, t: float) -> Tensor:
    """``s_j = max(1, cmx_j / t, cmn_j / −t)``, ``(C,)`` float32; always ≥ 1."""
    ones = torch.ones_like(cmx, dtype=torch.float32)
    return torch.maximum(ones, torch.maximum(cmx.float() / t, cmn.float() / -t))


def search_threshold(candidates: Tensor, loss) -> tuple[float, Tensor]:
    """The candidate with the lowest ``loss(t)`` (first on ties) and every loss, ``(num,)``."""
    losses = torch.tensor([float(loss(float(t))) for t in candidates], dtype=torch.float64)
    return float(candidates[int(torch.argmin(losses))]), losses


def per_tensor_range(bits: int, t: float) -> tuple[QuantSpec, QParams]:
    """A symmetric per-tensor quantizer whose range is fixed to ``[−t, t]``."""
    spec = QuantSpec(bits=bits, symmetric=True, granularity=PerTensor())
    scale = torch.full((1, 1), max(t, 1e-12) / spec.qmax)
    return spec, QParams(scale, torch.zeros(1, 1))


# --- the method -----------------------------------------------------------------------------------


class OSPlusArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    shift: bool = True
    migration_samples: int = Field(default=16, ge=1)
    search_tokens: int = Field(default=512, ge=1)
    lower_bound: float | None = Field(default=None, gt=0.0)
    max_grid: int = Field(default=200, ge=1)
    scale_down_proj: bool | None = None


@register
class OSPlus(ShiftMigration):
    """Shift (``z``) and scale (``s`` from a threshold search) folded into norms and linears."""

    name = "osplus"
    needs_calibration = True
    quantizes_weights = False
    Args: ClassVar[type[BaseModel]] = OSPlusArgs

    def __init__(self, recipe, args) -> None:
        super().__init__(recipe, args)
        self.lower = 1.0
        #: ``(block, subset) → (t*, candidates, losses, s)`` on the CPU (diagnostics, tests).
        self.searches: dict[tuple[int, str], tuple[float, Tensor, Tensor, Tensor]] = {}

    def check(self, model, adapter: ModelAdapter) -> None:
        super().check(model, adapter)  # step order, norm → linear subsets
        up_down = [s for s in adapter.subsets if s.role == "mlp_out" and s.prev_kind == "linear"]
        if self.args.scale_down_proj is None:
            self.subsets = (*self.subsets, *up_down)  # the paper's Llama code: on by default
        elif self.args.scale_down_proj:
            if not up_down:
                raise RecipeError(
                    f"recipe '{self.recipe.name}', step 'osplus': scale_down_proj needs an "
                    f"up_proj → down_proj pair (Llama family); {adapter.family} has none"
                )
            self.subsets = (*self.subsets, *up_down)
        default = 0.1 if adapter.mlp_act else 1.0  # the paper's Llama code; OPT 1.0
        self.lower = self.args.lower_bound if self.args.lower_bound is not None else default

    def _migrate(self, ctx: BlockContext, subset: Subset) -> None:
        transposed = ctx.adapter.transposed_weights
        prev = ctx.block.get_submodule(subset.prev)  # a norm, or up_proj for down_proj
        linears = [ctx.block.get_submodule(name) for name in subset.linears]
        shift = self.args.shift and subset.prev_kind == "norm"
        xs, call = capture_subset_inputs(ctx, subset, self.args.migration_samples)
        rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).float()
        cmx, cmn = rows.amax(dim=0), rows.amin(dim=0)
        z = (cmx + cmn) / 2 if shift else torch.zeros_like(cmx)
        is_attention = subset.linears[0] in _attention_inputs(ctx.adapter)
        reference = self._loss_inputs(ctx, subset, xs, call, is_attention)
        if shift:
            shift_norm_output(prev, linears, z, transposed)
            self.state.record(ctx, subset)
        cmx, cmn = cmx - z, cmn - z
        candidates = threshold_grid(
            cmx.max().item(), cmn.min().item(), self.lower, self.args.max_grid
        )
        loss = self._loss_fn(ctx, subset, linears, reference, z, cmx, cmn, is_attention)
        t, losses = search_threshold(candidates, loss)
        s = osplus_scales(cmx, cmn, t)
        if subset.prev_kind == "norm":
            fold_scales_into_norm(prev, linears, s, transposed)
        else:
            fold_scales_between_linears(prev, linears, s, transposed)
        self.searches[(ctx.index, subset.name)] = (t, candidates, losses, s.cpu())

    def _loss_inputs(self, ctx, subset, xs, call, is_attention):
        """The float input ``X`` ``(n, seq, C)`` or ``(tokens, C)`` and the float output."""
        if is_attention:
            seq = xs[0].shape[1]
            n = max(1, math.ceil(self.args.search_tokens / seq))
            x = xs[0][:n]
            args, kwargs = call
            kwargs = batch_slice(kwargs, xs[0].shape[0], x.shape[0])
            return x, (args, kwargs), _attention_output(ctx, x, args, kwargs)
        rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
        generator = torch.Generator().manual_seed(ctx.index)
        if rows.shape[0] > self.args.search_tokens:
            pick = torch.randperm(rows.shape[0], generator=generator)[: self.args.search_tokens]
            rows = rows[pick.to(rows.device)]
        return rows, None, _mlp_output(ctx, subset, rows)

    def _loss_fn(self, ctx, subset, linears, reference, z, cmx, cmn, is_attention):
        x, call, y = reference
        x_shifted = x.float() - z.to(x.device)
        transposed = ctx.adapter.transposed_weights
        weights = [linear_weight(m, transposed).clone() for m in linears]
        wspec = self.recipe.weights.spec("weight") if self.recipe.weights is not None else None
        bits = self.recipe.activations.bits if self.recipe.activations is not None else None

        def loss(t: float) -> float:
            s = osplus_scales(cmx, cmn, t).to(x.device)
            x_in = x_shifted / s
            if bits is not None:
                x_in = fake_quantize(x_in, *per_tensor_range(bits, t))
            try:
                for module, w in zip(linears, weights, strict=True):
                    ws = w.float() * s
                    view = linear_weight(module, transposed)
                    view.copy_(fake_quantize(ws, wspec) if wspec is not None else ws)
                if is_attention:
                    out = _attention_output(ctx, x_in.to(x.dtype), *call)
                else:
                    out = _mlp_output(ctx, subset, x_in.to(x.dtype))
            finally:
                for module, w in zip(linears, weights, strict=True):
                    linear_weight(module, transposed).copy_(w)
            return (out.float() - y.float()).pow(2).sum(-1).mean().item()

        return loss


def _attention_inputs(adapter: ModelAdapter) -> set[str]:
    return {adapter.attention.get(k) for k in ("q", "qkv") if adapter.attention.get(k)}


def _attention_output(ctx: BlockContext, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
    """The attention module's output before its output projection, ``(n, seq, heads·d)``."""
    o_proj = ctx.block.get_submodule(ctx.adapter.attention["o"])
    attention = ctx.block.get_submodule(ctx.adapter.attention_module)
    if args:
        return run_until(o_proj, "input", lambda: attention(x, *args[1:], **kwargs))
    return run_until(o_proj, "input", lambda: attention(**{**kwargs, "hidden_states": x}))


def _mlp_output(ctx: BlockContext, subset: Subset, rows: Tensor) -> Tensor:
    """``act(gate)·up`` for a Llama MLP, else the subset's linear outputs side by side."""
    modules = [ctx.block.get_submodule(name) for name in subset.linears]
    if ctx.adapter.mlp_act and len(modules) == 2:
        act = ctx.block.get_submodule(ctx.adapter.mlp_act)
        return act(modules[0](rows)) * modules[1](rows)
    return torch.cat([m(rows) for m in modules], dim=-1)
