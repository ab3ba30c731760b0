"""Phi-3: the Llama block with fused projections, split into separate linears on first use.

Phi-3 computes q, k and v with one ``qkv_proj`` and the MLP's gate and up with one
``gate_up_proj``. Channel-wise methods need each of them alone (v_proj's output channels fold
into o_proj, up_proj's into down_proj; GPTQ sees one Hessian per input either way), so the
adapter's ``prepare`` replaces each fused linear by a :class:`SplitLinear` whose children are the
parts, concatenated in the fused order: exact in float. While every part is a plain
``nn.Linear`` the module saves and loads under the fused names (``qkv_proj.weight``), so a float
or fake-quantized Phi-3 checkpoint stays loadable by transformers alone; once the parts are
packed they save under their own names and need channelwise to load.
"""

from __future__ import annotations

import torch
from torch import nn

from channelwise.adapters.base import ModelAdapter, fused_on_save, register_adapter
from channelwise.adapters.llama import gated_block_adapter


class SplitLinear(nn.Module):
    """Linears reading one input, their outputs concatenated: a fused linear, taken apart."""

    def __init__(self, parts: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, module in parts.items():
            self.add_module(name, module)
        self.register_state_dict_post_hook(_fused_state)
        self.register_load_state_dict_pre_hook(_split_state)

    @classmethod
    def of(cls, fused: nn.Linear, sizes: dict[str, int]) -> SplitLinear:
        """Split ``fused`` row-wise into parts of ``sizes`` output features (in order)."""
        if sum(sizes.values()) != fused.out_features:
            raise ValueError(f"parts {sizes} do not add up to {fused.out_features} outputs")
        parts, start = {}, 0
        for name, size in sizes.items():
            part = nn.Linear(
                fused.in_features,
                size,
                bias=fused.bias is not None,
                device=fused.weight.device,
                dtype=fused.weight.dtype,
            )
            part.weight.data.copy_(fused.weight.data[start : start + size])
            if fused.bias is not None:
                part.bias.data.copy_(fused.bias.data[start : start + size])
            part.requires_grad_(fused.weight.requires_grad)
            parts[name], start = part, start + size
        return cls(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.children()], dim=-1)

    def plain(self) -> bool:
        return all(type(part) is nn.Linear for part in self.children())


def _fused_state(module: SplitLinear, state: dict, prefix: str, _metadata) -> None:
    if not fused_on_save(module.plain()):
        return
    for key in ("weight", "bias"):
        names = [f"{prefix}{name}.{key}" for name, _ in module.named_children()]
        if all(name in state for name in names):
            state[prefix + key] = torch.cat([state.pop(name) for name in names])


def _split_state(module: SplitLinear, state: dict, prefix: str, *_args) -> None:
    for key in ("weight", "bias"):
        fused = state.pop(prefix + key, None)
        if fused is None:
            continue
        start = 0
        for name, part in module.named_children():
            size = part.weight.shape[0]
            state[f"{prefix}{name}.{key}"] = fused[start : start + size]
            start += size


def split_fused_projections(model: nn.Module) -> None:
    """Replace every Phi-3 ``qkv_proj`` and ``gate_up_proj`` by a :class:`SplitLinear`
    (idempotent)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_size = config.num_attention_heads * head_dim
    kv_size = config.num_key_value_heads * head_dim
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        if isinstance(attention.qkv_proj, nn.Linear):
            sizes = {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}
            attention.qkv_proj = SplitLinear.of(attention.qkv_proj, sizes)
        if isinstance(mlp.gate_up_proj, nn.Linear):
            sizes = {"gate_proj": config.intermediate_size, "up_proj": config.intermediate_size}
            mlp.gate_up_proj = SplitLinear.of(mlp.gate_up_proj, sizes)


@register_adapter("phi3")
def phi3_adapter(config) -> ModelAdapter:
    base = gated_block_adapter(
        config, "phi3", mlp_act="mlp.activation_fn", prepare=split_fused_projections
    )
    renamed = {
        "self_attn.q_proj": "self_attn.qkv_proj.q_proj",
        "self_attn.k_proj": "self_attn.qkv_proj.k_proj",
        "self_attn.v_proj": "self_attn.qkv_proj.v_proj",
        "mlp.gate_proj": "mlp.gate_up_proj.gate_proj",
        "mlp.up_proj": "mlp.gate_up_proj.up_proj",
    }
    return base.renamed(renamed)
