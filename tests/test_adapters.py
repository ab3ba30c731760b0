"""Specification of the architecture adapters: where blocks, linears and norms live per family."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel
from transformers.pytorch_utils import Conv1D

from channelwise.adapters import adapter_for, linear_weight, supported_model_types
from channelwise.errors import UnsupportedModelError

EXPECTED_FAMILY = {
    "llama": "llama",
    "qwen2": "llama",
    "mistral": "llama",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "opt": "opt",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
}

# (out_features, in_features) of every block linear in the tiny configs (hidden 64, MLP 128,
# 4 heads of 16; the Llama family has 2 KV heads, so k/v project to 32).
LLAMA_SHAPES = {
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (32, 64),
    "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (128, 64),
    "mlp.up_proj": (128, 64),
    "mlp.down_proj": (64, 128),
}
EXPECTED_SHAPES = {
    "llama": LLAMA_SHAPES,
    "qwen2": LLAMA_SHAPES,
    "mistral": LLAMA_SHAPES,
    "qwen3": LLAMA_SHAPES,
    "gemma2": LLAMA_SHAPES,
    "gemma3_text": LLAMA_SHAPES,
    "phi3": {
        name.replace("self_attn.", "self_attn.qkv_proj.").replace("mlp.", "mlp.gate_up_proj.")
        if name not in ("self_attn.o_proj", "mlp.down_proj")
        else name: shape
        for name, shape in LLAMA_SHAPES.items()
    },
    "opt": {
        "self_attn.q_proj": (64, 64),
        "self_attn.k_proj": (64, 64),
        "self_attn.v_proj": (64, 64),
        "self_attn.out_proj": (64, 64),
        "fc1": (128, 64),
        "fc2": (64, 128),
    },
    "gpt2": {
        "attn.c_attn": (192, 64),
        "attn.c_proj": (64, 64),
        "mlp.c_fc": (128, 64),
        "mlp.c_proj": (64, 128),
    },
    "gpt_neox": {
        "attention.query_key_value": (192, 64),
        "attention.dense": (64, 64),
        "mlp.dense_h_to_4h": (128, 64),
        "mlp.dense_4h_to_h": (64, 128),
    },
}


def resolve(model: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path``, or None where the path is missing or holds None."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def module_out_in(module: nn.Module) -> tuple[int, int]:
    """A linear's (out_features, in_features) as the module itself states them."""
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


def norm_width(module: nn.Module) -> int:
    return module.weight.numel()


def test_adapter_for_names_the_family(tiny_model: nn.Module, family: str) -> None:
    assert adapter_for(tiny_model).family == EXPECTED_FAMILY[family]


def test_supported_model_types_are_the_registered_families() -> None:
    vision = {"dinov2", "vit", "deit", "swin"}  # tests/test_vision.py, tests/test_swin.py
    moe = {"mixtral"}  # tests/test_families.py
    assert set(supported_model_types()) == set(EXPECTED_FAMILY) | vision | moe


def test_blocks_path_holds_every_decoder_block(tiny_model: nn.Module) -> None:
    blocks = adapter_for(tiny_model).block_list(tiny_model)
    assert isinstance(blocks, nn.ModuleList)
    assert len(blocks) == tiny_model.config.num_hidden_layers == 2


def test_declared_linears_exist_in_every_block(tiny_model: nn.Module) -> None:
    adapter = adapter_for(tiny_model)
    names = adapter.linear_names()
    assert len(names) == len(set(names)), "a linear is declared in two subsets"
    for block in adapter.block_list(tiny_model):
        linears = adapter.block_linears(block)
        assert tuple(linears) == names
        for name, module in linears.items():
            assert isinstance(module, nn.Linear | Conv1D), f"{name} is {type(module).__name__}"


def test_declared_linears_are_every_linear_of_a_block(tiny_model: nn.Module) -> None:
    adapter = adapter_for(tiny_model)
    block = adapter.block_list(tiny_model)[0]
    present = {
        name for name, module in block.named_modules() if isinstance(module, nn.Linear | Conv1D)
    }
    assert present == set(adapter.linear_names())


def test_linear_shapes_match_the_config(tiny_model: nn.Module, family: str) -> None:
    adapter = adapter_for(tiny_model)
    for block in adapter.block_list(tiny_model):
        shapes = {
            name: tuple(linear_weight(module, adapter.transposed_weights).shape)
            for name, module in adapter.block_linears(block).items()
        }
        assert shapes == EXPECTED_SHAPES[family]
        for name, module in adapter.block_linears(block).items():
            assert shapes[name] == module_out_in(module), name


def test_linears_of_a_subset_share_their_input_width(tiny_model: nn.Module) -> None:
    adapter = adapter_for(tiny_model)
    block = adapter.block_list(tiny_model)[0]
    for subset in adapter.subsets:
        widths = {
            linear_weight(block.get_submodule(name), adapter.transposed_weights).shape[1]
            for name in subset.linears
        }
        assert len(widths) == 1, f"subset {subset.name} reads inputs of widths {widths}"


def test_subset_prev_modules_exist_in_every_block(tiny_model: nn.Module) -> None:
    adapter = adapter_for(tiny_model)
    hidden = tiny_model.config.hidden_size
    for block in adapter.block_list(tiny_model):
        for subset in adapter.subsets:
            assert subset.prev_kind in (None, "norm", "linear", "grouped_heads")
            if subset.prev is None:
                assert subset.prev_kind is None
                continue
            prev = resolve(block, subset.prev)
            assert prev is not None, f"subset {subset.name}: prev {subset.prev} is missing"
            if subset.prev_kind == "norm":
                assert norm_width(prev) == hidden
                assert not isinstance(prev, nn.Linear | Conv1D)
            if subset.prev_kind == "linear":
                assert isinstance(prev, nn.Linear | Conv1D)


@pytest.mark.parametrize(
    "family",
    [
        "llama",
        "qwen2",
        "mistral",
        "opt",
        "gpt2",
        "gpt_neox",
    ],
)
def test_foldable_prev_has_one_output_per_subset_input_channel(tiny_model: nn.Module) -> None:
    """A channel transform folds one factor per input channel into ``prev``'s outputs."""
    adapter = adapter_for(tiny_model)
    block = adapter.block_list(tiny_model)[0]
    for subset in adapter.subsets:
        if subset.prev_kind is None:
            continue
        prev = block.get_submodule(subset.prev)
        prev_out = (
            norm_width(prev)
            if subset.prev_kind == "norm"
            else linear_weight(prev, adapter.transposed_weights).shape[0]
        )
        if subset.prev_kind == "grouped_heads":
            config = tiny_model.config
            assert config.num_key_value_heads < config.num_attention_heads
            prev_out *= config.num_attention_heads // config.num_key_value_heads
        for name in subset.linears:
            width = linear_weight(block.get_submodule(name), adapter.transposed_weights).shape[1]
            assert prev_out == width, (
                f"{subset.name}: {subset.prev} gives {prev_out} channels, {name} reads {width}"
            )


def test_attention_paths_name_declared_linears(tiny_model: nn.Module) -> None:
    adapter = adapter_for(tiny_model)
    assert adapter.attention
    assert set(adapter.attention.values()) <= set(adapter.linear_names())


def test_embeddings_exist(tiny_model: nn.Module) -> None:
    adapter = adapter_for(tiny_model)
    assert adapter.embeddings
    assert resolve(tiny_model, adapter.embeddings[0]) is tiny_model.get_input_embeddings()
    for path in adapter.embeddings:
        assert isinstance(resolve(tiny_model, path), nn.Embedding), path


def test_final_norm_exists(tiny_model: nn.Module) -> None:
    adapter = adapter_for(tiny_model)
    assert adapter.final_norm is not None
    norm = resolve(tiny_model, adapter.final_norm)
    assert norm is not None, f"{adapter.final_norm} is missing"
    assert norm_width(norm) == tiny_model.config.hidden_size


@pytest.mark.parametrize(
    "family",
    [
        "llama",
        "qwen2",
        "mistral",
        "opt",
        "gpt2",
        "gpt_neox",
    ],
)
def test_lm_head_is_the_output_embedding(tiny_model: nn.Module) -> None:
    adapter = adapter_for(tiny_model)
    assert resolve(tiny_model, adapter.lm_head) is tiny_model.get_output_embeddings()


def test_post_ln_opt_declares_only_existing_final_norm(opt_post_ln: nn.Module) -> None:
    adapter = adapter_for(opt_post_ln)
    assert adapter.final_norm is None or resolve(opt_post_ln, adapter.final_norm) is not None


def test_linear_weight_is_an_out_in_view_of_the_module_weight(tiny_model: nn.Module) -> None:
    adapter = adapter_for(tiny_model)
    for name, module in adapter.block_linears(adapter.block_list(tiny_model)[0]).items():
        view = linear_weight(module, adapter.transposed_weights)
        assert view.data_ptr() == module.weight.data_ptr(), f"{name}: not a view"
        view[1, 2] = 123.0
        stored = module.weight[2, 1] if adapter.transposed_weights else module.weight[1, 2]
        assert stored.item() == 123.0, name


def test_gpt2_stores_transposed_conv1d_weights(make_tiny_model) -> None:
    model = make_tiny_model("gpt2")
    adapter = adapter_for(model)
    assert adapter.transposed_weights
    conv = adapter.block_list(model)[0].get_submodule("attn.c_attn")
    assert isinstance(conv, Conv1D)
    assert tuple(conv.weight.shape) == (64, 192)  # (in, out) as stored
    view = linear_weight(conv, adapter.transposed_weights)
    assert tuple(view.shape) == (192, 64)

    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(F.linear(x, view), conv(x) - conv.bias, rtol=1e-5, atol=1e-6)

        view.mul_(2.0)  # edited through the view: the Conv1D's own weight changes
        torch.testing.assert_close(conv.weight, view.t(), rtol=0, atol=0)
        torch.testing.assert_close(F.linear(x, view), conv(x) - conv.bias, rtol=1e-5, atol=1e-6)


def test_linear_weight_of_untransposed_linear_is_the_weight(make_tiny_model) -> None:
    model = make_tiny_model("llama")
    linear = model.model.layers[0].mlp.down_proj
    view = linear_weight(linear, transposed=False)
    assert view.shape == linear.weight.shape
    assert view.data_ptr() == linear.weight.data_ptr()


def test_post_ln_opt_refuses_folding_and_says_why(opt_post_ln: nn.Module) -> None:
    adapter = adapter_for(opt_post_ln)
    with pytest.raises(UnsupportedModelError, match="post-LN") as info:
        adapter.require_folding("smoothquant")
    assert "smoothquant" in str(info.value)


def test_pre_ln_models_allow_folding(tiny_model: nn.Module) -> None:
    adapter_for(tiny_model).require_folding("smoothquant")  # no error


def test_bert_is_unsupported_and_the_error_names_the_supported_types() -> None:
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=64,
    )
    with pytest.raises(UnsupportedModelError) as info:
        adapter_for(BertModel(config))
    message = str(info.value)
    assert "'bert'" in message
    for model_type in EXPECTED_FAMILY:
        assert model_type in message


def test_plain_module_is_unsupported_and_named() -> None:
    with pytest.raises(UnsupportedModelError) as info:
        adapter_for(nn.Sequential(nn.Linear(4, 4)))
    message = str(info.value)
    assert "Sequential" in message
    for model_type in supported_model_types():
        assert model_type in message
