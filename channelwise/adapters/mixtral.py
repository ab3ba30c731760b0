"""Mixtral: the Llama block with a routed mixture of gated-MLP experts.

transformers keeps a layer's experts as two 3-D parameters (``experts.gate_up_proj``
``(E, 2I, H)``, ``experts.down_proj`` ``(E, H, I)``). The adapter's ``prepare`` replaces them by
:class:`SplitExperts`, a list of :class:`ExpertMLP` with their own ``gate_proj``, ``up_proj`` and
``down_proj`` linears, which every weight method quantizes like any other linear; the router
(``mlp.gate``) stays in float. While every part is a plain ``nn.Linear`` the module saves and
loads under the fused names, so a float or fake-quantized Mixtral stays loadable by transformers.

Calibration: a rarely routed expert would see few or no calibration tokens (a GPTQ Hessian of
a handful of rows). While :func:`every_expert_sees_every_token` is on (``compress.quantize``
turns it on for the block-wise pass), each expert runs on every token, so its statistics and
Hessians come from all of them, as llm-compressor's ``calibrate_all_experts`` does; the layer's
output still uses only the routed experts' rows, so it equals the float model's.

The router (``mlp.gate``) reads the post-attention norm's output as the experts do, but is
neither quantized nor observed: ``prepare`` declares it a column-only reader of that norm
(:func:`~channelwise.adapters.add_column_readers`), so a channel scale folded into the norm
(SmoothQuant, AWQ), a fused norm gain or a residual rotation (QuaRot) reaches its columns too and
the routing is unchanged. Refused: shifting the norm's output (OS+, OutlierTune with ``shift``),
since the router has no bias to absorb it, and the gated-MLP activation sparsity of
CHESS/CATS/TEAL.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from channelwise.adapters.base import (
    ModelAdapter,
    Subset,
    add_column_readers,
    fused_on_save,
    register_adapter,
)
from channelwise.adapters.llama import gated_block_adapter

ROUTER_HAS_NO_BIAS = (
    "the router (mlp.gate) reads the post-attention norm's output too and has no bias to "
    "absorb a shift"
)


#: Mixtral's checkpoints (and transformers' ``save_pretrained``) name each expert's linears
#: ``block_sparse_moe.experts.N.w1/w3/w2``: the split experts' gate/up/down, one to one.
LEGACY_NAMES = (
    (r"\.block_sparse_moe\.", ".mlp."),
    (r"\.experts\.(\d+)\.w1\.", r".experts.\1.gate_proj."),
    (r"\.experts\.(\d+)\.w3\.", r".experts.\1.up_proj."),
    (r"\.experts\.(\d+)\.w2\.", r".experts.\1.down_proj."),
)


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) · up(x))``."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_fn):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SplitExperts(nn.ModuleList):
    """A layer's experts as separate modules, called as transformers' fused experts are:
    ``(hidden (tokens, H), top_k_index (tokens, k), top_k_weights (tokens, k)) → (tokens, H)``."""

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__(experts)
        self.calibrate_all = False
        self.register_state_dict_post_hook(_fused_state)
        self.register_load_state_dict_pre_hook(_split_state)

    @classmethod
    def of(cls, fused: nn.Module) -> SplitExperts:
        gate_up, down = fused.gate_up_proj.data, fused.down_proj.data
        n, two_i, hidden = gate_up.shape

        def linear(weight: torch.Tensor) -> nn.Linear:
            module = nn.Linear(
                weight.shape[1],
                weight.shape[0],
                bias=False,
                device=weight.device,
                dtype=weight.dtype,
            )
            module.weight.data.copy_(weight)
            return module

        half = two_i // 2
        experts = [
            ExpertMLP(
                linear(gate_up[e, :half]), linear(gate_up[e, half:]), linear(down[e]), fused.act_fn
            )
            for e in range(n)
        ]
        return cls(experts)

    def forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self):
            token, position = torch.where(top_k_index == e)
            if self.calibrate_all:
                y = expert(hidden)[token]  # every token reaches the expert's hooks
            elif token.numel():
                y = expert(hidden[token])
            else:
                continue
            weights = top_k_weights[token, position, None]
            out.index_add_(0, token, (y * weights).to(out.dtype))
        return out

    def plain(self) -> bool:
        return all(
            type(getattr(expert, name)) is nn.Linear
            for expert in self
            for name in ("gate_proj", "up_proj", "down_proj")
        )


def _fused_state(module: SplitExperts, state: dict, prefix: str, _metadata) -> None:
    if not fused_on_save(module.plain()):
        return
    parts = {
        name: [state.pop(f"{prefix}{e}.{name}.weight") for e in range(len(module))]
        for name in ("gate_proj", "up_proj", "down_proj")
    }
    gate_up = [torch.cat([g, u]) for g, u in zip(parts["gate_proj"], parts["up_proj"], strict=True)]
    state[prefix + "gate_up_proj"] = torch.stack(gate_up)
    state[prefix + "down_proj"] = torch.stack(parts["down_proj"])


def _split_state(module: SplitExperts, state: dict, prefix: str, *_args) -> None:
    gate_up, down = state.pop(prefix + "gate_up_proj", None), state.pop(prefix + "down_proj", None)
    if gate_up is None or down is None:
        return
    half = gate_up.shape[1] // 2
    for e in range(len(module)):
        state[f"{prefix}{e}.gate_proj.weight"] = gate_up[e, :half]
        state[f"{prefix}{e}.up_proj.weight"] = gate_up[e, half:]
        state[f"{prefix}{e}.down_proj.weight"] = down[e]


def split_experts(model: nn.Module) -> None:
    """Replace every layer's fused experts by :class:`SplitExperts` and declare its router a
    column-only reader of the post-attention norm (idempotent)."""
    for layer in model.model.layers:
        if not isinstance(layer.mlp.experts, SplitExperts):
            layer.mlp.experts = SplitExperts.of(layer.mlp.experts)
        add_column_readers(layer.post_attention_layernorm, [layer.mlp.gate])


@contextmanager
def every_expert_sees_every_token(model: nn.Module) -> Iterator[None]:
    """Within the block, run every expert on every token (outputs unchanged; see the module
    docstring); a model without :class:`SplitExperts` is left as it is."""
    experts = [m for m in model.modules() if isinstance(m, SplitExperts)]
    for module in experts:
        module.calibrate_all = True
    try:
        yield
    finally:
        for module in experts:
            module.calibrate_all = False


@register_adapter("mixtral")
def mixtral_adapter(config) -> ModelAdapter:
    base = gated_block_adapter(
        config,
        "mixtral",
        shift_unsupported=ROUTER_HAS_NO_BIAS,
        prepare=split_experts,
    )
    base = replace(base, checkpoint_renames=LEGACY_NAMES)
    experts = range(config.num_local_experts)
    attention = base.subsets[:2]
    mlp_in = Subset(
        "mlp_in",
        tuple(f"mlp.experts.{e}.{p}" for e in experts for p in ("gate_proj", "up_proj")),
        prev="post_attention_layernorm",
        prev_kind="norm",
    )
    mlp_out = tuple(
        Subset(
            f"mlp_out.{e}",
            (f"mlp.experts.{e}.down_proj",),
            prev=f"mlp.experts.{e}.up_proj",
            prev_kind="linear",
        )
        for e in experts
    )
    return replace(base, subsets=(*attention, mlp_in, *mlp_out), mlp_act=None)
