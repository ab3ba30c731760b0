"""Specification of the exact rotations: each leaves the float model's logits unchanged."""

import pytest
import torch
from helpers import logits, relative_error
from torch import nn

from channelwise.adapters import adapter_for
from channelwise.errors import ChannelwiseError, UnsupportedModelError
from channelwise.quant import QuantSpec
from channelwise.quant.activation import InputQuantizer, install_input_quantizer
from channelwise.quant.granularity import PerRow
from channelwise.transforms.hadamard import hadamard_matrix, random_hadamard, random_orthogonal
from channelwise.transforms.rotate import (
    fold_online_hadamard,
    fuse_norms,
    install_online_hadamard,
    online_hadamard,
    rotate_heads_vo,
    rotate_residual,
)

LLAMA_LIKE = ("llama", "qwen2", "mistral")
# Non-power-of-two widths: hidden 48 = 12·4, MLP 96 = 12·8, head_dim 12.
ODD = dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
VARIANTS = [(family, {}) for family in LLAMA_LIKE] + [
    ("llama", ODD),
    ("qwen2", ODD),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {**ODD, "tie_word_embeddings": True}),
]
TOL = 1e-5
SPEC = QuantSpec(bits=4, symmetric=True, granularity=PerRow())


def randomize_norms(model: nn.Module) -> None:
    """Tiny models start with γ = 1; give every norm a non-trivial scale so folding is tested."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("norm") and hasattr(module, "weight"):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))


def head_dim(model: nn.Module) -> int:
    config = model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@pytest.fixture(params=VARIANTS, ids=lambda v: f"{v[0]}-{'-'.join(map(str, v[1].values()))}")
def variant(request, make_tiny_model) -> nn.Module:
    family, overrides = request.param
    model = make_tiny_model(family, **overrides)
    randomize_norms(model)
    return model


def test_fuse_norms_keeps_the_model_and_sets_gamma_to_one(variant, token_ids) -> None:
    before = logits(variant, token_ids)
    adapter = adapter_for(variant)
    fuse_norms(variant, adapter)
    assert relative_error(logits(variant, token_ids), before) < TOL
    final = variant.get_submodule(adapter.final_norm)
    assert torch.all(final.weight == 1)
    assert variant.lm_head.weight is not variant.model.embed_tokens.weight
    assert variant.config.tie_word_embeddings is False


def test_rotate_residual_keeps_the_model(variant, token_ids) -> None:
    before = logits(variant, token_ids)
    adapter = adapter_for(variant)
    fuse_norms(variant, adapter)
    embeddings = variant.model.embed_tokens.weight.clone()
    rotate_residual(variant, adapter, random_hadamard(variant.config.hidden_size, seed=0))
    assert not torch.allclose(variant.model.embed_tokens.weight, embeddings)
    assert relative_error(logits(variant, token_ids), before) < TOL


def test_rotate_residual_refuses_unfused_norms_and_wrong_sizes(variant) -> None:
    adapter = adapter_for(variant)
    hidden = variant.config.hidden_size
    with pytest.raises(ChannelwiseError, match="fuse_norms"):
        rotate_residual(variant, adapter, random_orthogonal(hidden, 0))
    fuse_norms(variant, adapter)
    with pytest.raises(ChannelwiseError, match=f"must be {hidden}×{hidden}"):
        rotate_residual(variant, adapter, random_orthogonal(hidden + 1, 0))


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotate_heads_vo_keeps_the_model_under_gqa(variant, token_ids, kind) -> None:
    before = logits(variant, token_ids)
    adapter = adapter_for(variant)
    d = head_dim(variant)
    h_d = hadamard_matrix(d) if kind == "hadamard" else random_orthogonal(d, seed=1)
    v_before = variant.model.layers[0].self_attn.v_proj.weight.clone()
    for block in adapter.block_list(variant):
        rotate_heads_vo(block, adapter, h_d)
    assert not torch.allclose(variant.model.layers[0].self_attn.v_proj.weight, v_before)
    assert relative_error(logits(variant, token_ids), before) < TOL


def test_online_hadamard_on_down_and_o_proj_keeps_the_model(variant, token_ids) -> None:
    before = logits(variant, token_ids)
    for layer in variant.model.layers:
        fold_online_hadamard(layer.mlp.down_proj)
        fold_online_hadamard(layer.self_attn.o_proj)
    assert relative_error(logits(variant, token_ids), before) < TOL
    with pytest.raises(ChannelwiseError, match="already"):
        fold_online_hadamard(variant.model.layers[0].mlp.down_proj)


def test_online_hadamard_runs_before_an_input_quantizer_installed_earlier(make_tiny_model) -> None:
    model = make_tiny_model("llama")
    down = model.model.layers[0].mlp.down_proj
    seen = []
    install_input_quantizer(down, InputQuantizer(SPEC))
    down.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    install_online_hadamard(down)
    install_online_hadamard(down)  # idempotent: one hook
    x = torch.randn(2, 3, down.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        down(x)
    expected = InputQuantizer(SPEC)(down, (x @ hadamard_matrix(x.shape[-1]).float(),))
    assert torch.allclose(seen[0], expected[0], atol=1e-5)
    assert online_hadamard(down).n == down.in_features


def test_all_rotations_together_keep_the_model(variant, token_ids) -> None:
    before = logits(variant, token_ids)
    adapter = adapter_for(variant)
    fuse_norms(variant, adapter)
    rotate_residual(variant, adapter, random_hadamard(variant.config.hidden_size, seed=2))
    for block in adapter.block_list(variant):
        rotate_heads_vo(block, adapter, hadamard_matrix(head_dim(variant)))
        fold_online_hadamard(block.mlp.down_proj)
    assert relative_error(logits(variant, token_ids), before) < TOL


def test_rotated_untied_model_saves_and_reloads(make_tiny_model, token_ids, tmp_path) -> None:
    import transformers

    model = make_tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    randomize_norms(model)
    adapter = adapter_for(model)
    fuse_norms(model, adapter)
    rotate_residual(model, adapter, random_hadamard(model.config.hidden_size, seed=0))
    expected = logits(model, token_ids)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.allclose(logits(loaded, token_ids), expected, atol=1e-6)


@pytest.mark.parametrize("family", ["opt", "gpt2", "gpt_neox"])
def test_layernorm_families_are_refused(tiny_model, family) -> None:
    adapter = adapter_for(tiny_model)
    with pytest.raises(UnsupportedModelError, match="RMSNorm.*SliceGPT"):
        fuse_norms(tiny_model, adapter)
    with pytest.raises(UnsupportedModelError, match="layernorm"):
        rotate_residual(tiny_model, adapter, random_orthogonal(64, 0))
