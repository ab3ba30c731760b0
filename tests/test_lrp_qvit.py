"""LRP-QViT: the bit allocation against brute force, conservation of the relevance, and the
``lrp_qvit`` method on tiny random DINOv2 models (RepQ-ViT as its one-candidate case, per-layer
bits on weights and inputs, save and reload)."""

from __future__ import annotations

import itertools
from copy import deepcopy

import pytest
import torch
import transformers
from helpers import ATTENTION4, STATIC4, WEIGHTS4, tiny_dinov2_config
from torch import nn

from channelwise.adapters import adapter_for
from channelwise.compare import bits_label, weight_bits
from channelwise.compress import plan, quantize, save_quantized
from channelwise.deploy import pack_model
from channelwise.deploy.packed import use_kernels
from channelwise.engine import hidden_state
from channelwise.errors import NonFiniteError, RecipeError, UnsupportedModelError
from channelwise.methods.lrp_qvit import allocate_bits, input_relevance
from channelwise.quant.activation import input_quantizer
from channelwise.quant.attention import attention_quantizers
from channelwise.quant.grid import stored_bits, weight_grid
from channelwise.recipe import Recipe
from channelwise.vision import load_vision_model


def _noise(scores, bits) -> float:
    return sum(scores[layer] * 4.0 ** -bits[layer] for layer in scores)


def _brute_force(scores, sizes, candidates, budget):
    allowed = budget * sum(sizes.values())
    best = None
    for choice in itertools.product(candidates, repeat=len(scores)):
        bits = dict(zip(scores, choice, strict=True))
        if sum(sizes[k] * bits[k] for k in sizes) <= allowed + 1e-9:
            if best is None or _noise(scores, bits) < _noise(scores, best):
                best = bits
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_optimal_for_equal_layers_and_meets_the_budget_for_any(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = {(0, str(i)): float(s) for i, s in enumerate(torch.rand(5, generator=generator))}
    candidates = (3, 4, 5, 6)
    equal = dict.fromkeys(scores, 64)
    bits = allocate_bits(scores, equal, candidates, 4.4)
    assert sum(equal[k] * bits[k] for k in bits) <= 4.4 * sum(equal.values())
    best = _brute_force(scores, equal, candidates, 4.4)
    assert _noise(scores, bits) == pytest.approx(_noise(scores, best), rel=1e-12)
    ranked = sorted(scores, key=scores.get)
    assert [bits[k] for k in ranked] == sorted(bits[k] for k in ranked), "more relevance, more bits"
    counts = torch.randint(16, 256, (5,), generator=generator).tolist()
    sizes = dict(zip(scores, counts, strict=True))
    mixed = allocate_bits(scores, sizes, candidates, 4.4)
    assert sum(sizes[k] * mixed[k] for k in mixed) <= 4.4 * sum(sizes.values())
    assert set(mixed.values()) <= set(candidates)


def test_allocation_edges():
    scores = {(0, "a"): 0.7, (0, "b"): 0.3}
    sizes = {(0, "a"): 10, (0, "b"): 30}
    assert allocate_bits(scores, sizes, (4, 6), 4) == {(0, "a"): 4, (0, "b"): 4}
    assert allocate_bits(scores, sizes, (4, 6), 6) == {(0, "a"): 6, (0, "b"): 6}
    assert allocate_bits(scores, sizes, (4, 6), 4.5) == {(0, "a"): 6, (0, "b"): 4}
    assert allocate_bits(dict.fromkeys(scores, 0.0), sizes, (3, 4, 5), 4.5) == dict.fromkeys(
        scores, 4
    )
    with pytest.raises(RecipeError, match="below every candidate"):
        allocate_bits(scores, sizes, (4, 6), 3)


def _linearised_dinov2() -> nn.Module:
    """A tiny DINOv2 without biases and with an identity MLP activation: under conservative
    propagation every block is then linear in its input."""
    torch.manual_seed(0)
    model = transformers.Dinov2Model(tiny_dinov2_config(hidden_act="linear")).eval()
    with torch.no_grad():
        for module in model.encoder.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                module.bias.zero_()
    return model


def test_relevance_is_conserved_from_the_output_to_every_block_input():
    model = _linearised_dinov2()
    adapter = adapter_for(model)
    pixels = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    blocks = list(model.encoder.layer)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    energy = out.double().square().sum().item()
    at_inputs = input_relevance(model, adapter, blocks, pixels, batch_size=4, absolute=False)
    for relevance in at_inputs:
        assert relevance == pytest.approx(energy, rel=1e-4)
    assert all(attention_quantizers(b.attention) is None for b in blocks), "entries restored"
    assert all("forward" not in vars(m) for m in model.modules()), "LayerNorms restored"
    # Plain gradient × input (nothing held constant) does not conserve it: LayerNorm is scale
    # invariant and softmax is not linear.
    x = model.embeddings(pixels).detach().requires_grad_(True)
    f = x
    for block in blocks:
        f = hidden_state(block(f))
    plain = (x * torch.autograd.grad(0.5 * f.square().sum(), x)[0]).sum().item()
    assert abs(plain - energy) > 1e-3 * energy


def _lrp(**args) -> Recipe:
    return Recipe.from_dict({
        "name": "lrp-test", "weights": WEIGHTS4, "activations": STATIC4, "attention": ATTENTION4,
        "steps": [{"method": "lrp_qvit", "args": {"batch_size": 8, **args}}],
    })  # fmt: skip


def test_a_layer_that_cannot_reach_the_output_scores_zero_and_gets_the_fewest_bits(tiny_dinov2):
    with torch.no_grad():
        tiny_dinov2.encoder.layer[0].mlp.fc2.weight.zero_()
    pixels = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    method = quantize(tiny_dinov2, _lrp(), pixels, progress=False).methods[0]
    assert method.scores[(0, "mlp_in")] == 0 and method.scores[(0, "mlp_out")] == 0
    assert all(s > 0 for k, s in method.scores.items() if k not in {(0, "mlp_in"), (0, "mlp_out")})
    assert sum(method.scores.values()) == pytest.approx(1.0)
    assert method.bits[(0, "mlp_in")] == method.bits[(0, "mlp_out")] == 3
    assert max(method.bits.values()) > 4


def test_with_one_candidate_and_no_clipping_it_is_repq_vit(tiny_dinov2):
    pixels = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    outputs = []
    for recipe in (_lrp(candidates=[4], clip=None), "repq-vit-w4a4"):
        model = deepcopy(tiny_dinov2)
        quantize(model, recipe, pixels, progress=False)
        with torch.no_grad():
            outputs.append(model(pixel_values=pixels).last_hidden_state)
    assert torch.equal(outputs[0], outputs[1])
    assert bits_label(_lrp(candidates=[4], clip=None)) == "W4A4"


def test_every_layer_is_rounded_and_read_at_its_bits_and_saves_and_loads_back(
    tiny_dinov2, tmp_path
):
    pixels = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    recipe = _lrp(budget=4.5)
    method = quantize(tiny_dinov2, recipe, pixels, progress=False).methods[0]
    adapter = adapter_for(tiny_dinov2)
    assert len(set(method.bits.values())) > 1, method.bits
    assert bits_label(recipe) == "W4.5A4.5 mixed"
    weights = code_bits = stored = 0
    for index, block in enumerate(tiny_dinov2.encoder.layer):
        for subset in adapter.subsets:
            bits = method.bits[(index, subset.name)]
            for name in subset.linears:
                linear = block.get_submodule(name)
                assert weight_grid(linear).spec.bits == bits
                assert input_quantizer(linear).spec.bits == bits
                weights += linear.weight.numel()
                code_bits += bits * linear.weight.numel()
                stored += stored_bits(*linear.weight.shape, weight_grid(linear).spec)
    assert code_bits <= 4.5 * weights
    assert weight_bits(recipe, tiny_dinov2) == pytest.approx(stored / weights)
    with torch.no_grad():
        expected = tiny_dinov2(pixel_values=pixels).last_hidden_state
    loaded = load_vision_model(save_quantized(tiny_dinov2, None, tmp_path / "fake"), "cpu")
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).last_hidden_state, expected)
    packed = pack_model(tiny_dinov2)  # every layer's codes at its own width
    assert {tiny_dinov2.get_submodule(n).spec.bits for n in packed} == set(method.bits.values())
    before = use_kernels(False)  # the reference path: bit-identical to fake-quant
    try:
        saved = save_quantized(tiny_dinov2, None, tmp_path / "packed")
        with torch.no_grad():
            got = load_vision_model(saved, "cpu")(pixel_values=pixels).last_hidden_state
        assert torch.equal(got, expected)
    finally:
        use_kernels(before)
    with torch.no_grad():  # the kernels' path (3-, 5- and 6-bit codes de-quantized)
        got = load_vision_model(saved, "cpu")(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_fixed_activations_keep_the_recipes_input_bits(tiny_dinov2):
    pixels = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    method = quantize(tiny_dinov2, _lrp(activations="fixed"), pixels, progress=False).methods[0]
    assert len(set(method.bits.values())) > 1
    assert method.bits_label() == "W4A4 mixed W"
    for block in tiny_dinov2.encoder.layer:
        for linear in adapter_for(tiny_dinov2).block_linears(block).values():
            assert input_quantizer(linear).spec.bits == 4


def test_lrp_qvit_recipe_errors_are_clear(tiny_dinov2, make_tiny_model):
    with pytest.raises(RecipeError, match="outside the candidates"):
        plan(tiny_dinov2, _lrp(budget=7, candidates=[3, 4]))
    with pytest.raises(RecipeError, match="candidates"):
        plan(tiny_dinov2, _lrp(candidates=[4, 9]))
    with pytest.raises(RecipeError, match="last step"):
        plan(tiny_dinov2, Recipe.from_dict({
            "weights": WEIGHTS4, "activations": STATIC4,
            "steps": [{"method": "lrp_qvit"}, {"method": "rtn"}],
        }))  # fmt: skip
    with pytest.raises(RecipeError, match="log√2"):
        plan(tiny_dinov2, Recipe.from_dict({
            "weights": WEIGHTS4, "activations": STATIC4,
            "attention": {**ATTENTION4, "probs": STATIC4}, "steps": [{"method": "lrp_qvit"}],
        }))  # fmt: skip
    with pytest.raises(RecipeError, match="static asymmetric"):
        plan(tiny_dinov2, Recipe.from_dict({
            "weights": WEIGHTS4, "activations": {**STATIC4, "dynamic": True},
            "steps": [{"method": "lrp_qvit"}],
        }))  # fmt: skip
    with pytest.raises(RecipeError, match="needs a 'weights' quantizer"):
        plan(tiny_dinov2, Recipe.from_dict({
            "activations": STATIC4, "steps": [{"method": "lrp_qvit"}]}))  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="allocates bits over Vision Transformer"):
        plan(make_tiny_model("llama"), _lrp())


def test_non_finite_relevance_is_refused_in_one_line(tiny_dinov2):
    with torch.no_grad():
        tiny_dinov2.encoder.layer[1].mlp.fc1.weight[0, 0] = float("inf")
    pixels = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with pytest.raises(NonFiniteError, match="relevance is NaN/inf"):
        quantize(tiny_dinov2, _lrp(), pixels, progress=False)
