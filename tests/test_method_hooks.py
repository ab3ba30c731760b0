"""Specification of the method lifecycle: whole-model preparation, runtime state, restore on load,
and method-installed input quantizers that survive a save and load."""

from pathlib import Path

import pytest
import torch
from helpers import logits
from torch import Tensor

from channelwise.adapters import adapter_for
from channelwise.compress import STEP_STATE_FILE, quantize, save_quantized
from channelwise.methods import registry
from channelwise.methods.registry import Method
from channelwise.models import MARKER_FILE, load_model
from channelwise.quant import PerTensor, QParams, QuantSpec
from channelwise.quant.activation import InputQuantizer, input_quantizer, install_input_quantizer
from channelwise.recipe import QuantArgs, Recipe, Step

OWN_SPEC = QuantSpec(bits=4, symmetric=True, granularity=PerTensor())


class ShiftDownInput(Method):
    """Test method: subtracts ``offset`` from every down/fc2 input at run time (a runtime op),
    prepares the model once, and gives the first linear of each block its own static quantizer."""

    name = "test_shift_down_input"
    needs_calibration = True
    events: list[str] = []

    def __init__(self, recipe, args) -> None:
        super().__init__(recipe, args)
        self.offset = torch.tensor([0.25])

    def prepare_model(self, model, adapter, calibration, *, progress=False) -> None:
        ShiftDownInput.events.append(f"prepare {tuple(calibration.shape)}")
        self._install(model, adapter)

    def apply(self, ctx) -> None:
        ShiftDownInput.events.append(f"apply {ctx.index}")
        first = ctx.block.get_submodule(ctx.adapter.linear_names()[0])
        qparams = QParams(torch.full((1, 1), 0.05), torch.zeros(1, 1))
        install_input_quantizer(first, InputQuantizer(OWN_SPEC, qparams))

    def saved_state(self) -> dict[str, Tensor]:
        return {"offset": self.offset}

    def restore(self, model, adapter, state) -> None:
        ShiftDownInput.events.append("restore")
        self.offset = state["offset"]
        self._install(model, adapter)

    def _install(self, model, adapter) -> None:
        last = adapter.linear_names()[-1]
        for block in adapter.block_list(model):
            block.get_submodule(last).register_forward_pre_hook(
                lambda _m, args: (args[0] - self.offset, *args[1:])
            )


@pytest.fixture
def hook_method():
    registry.register(ShiftDownInput)
    ShiftDownInput.events = []
    yield ShiftDownInput
    registry._METHODS.pop(ShiftDownInput.name)


RECIPE = Recipe(
    name="hooks-w8a8",
    weights=QuantArgs(bits=8, symmetric=True, granularity="channel"),
    activations=QuantArgs(bits=8, symmetric=True, granularity="token", dynamic=True),
    steps=(Step(method="test_shift_down_input"), Step(method="rtn")),
)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_prepare_model_runs_once_before_the_block_loop(
    hook_method, tiny_model, calibration_ids
) -> None:
    quantize(tiny_model, RECIPE, calibration_ids, progress=False)
    assert hook_method.events == ["prepare (6, 16)", "apply 0", "apply 1"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_method_installed_quantizer_is_kept_and_the_others_get_the_recipes(
    hook_method, tiny_model, calibration_ids
) -> None:
    quantize(tiny_model, RECIPE, calibration_ids, progress=False)
    adapter = adapter_for(tiny_model)
    first, *rest = adapter.linear_names()
    for block in adapter.block_list(tiny_model):
        own = input_quantizer(block.get_submodule(first))
        assert own.spec == OWN_SPEC and own.qparams is not None
        for name in rest:
            quantizer = input_quantizer(block.get_submodule(name))
            assert quantizer.spec == RECIPE.activations.spec("activation")
            assert quantizer.qparams is None


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_runtime_state_and_own_quantizers_survive_save_and_load(
    hook_method, tiny_model, tiny_tokenizer, calibration_ids, token_ids, tmp_path: Path
) -> None:
    quantize(tiny_model, RECIPE, calibration_ids, progress=False)
    expected = logits(tiny_model, token_ids)
    out = save_quantized(tiny_model, tiny_tokenizer, tmp_path / "out")
    assert (out / STEP_STATE_FILE).is_file()
    hook_method.events = []
    loaded, _ = load_model(out)
    assert hook_method.events == ["restore"]
    torch.testing.assert_close(logits(loaded, token_ids), expected, rtol=0, atol=1e-5)
    first = adapter_for(loaded).linear_names()[0]
    own = input_quantizer(adapter_for(loaded).block_list(loaded)[1].get_submodule(first))
    assert own.spec == OWN_SPEC


@pytest.mark.parametrize("family", ["llama"])
def test_without_restore_the_runtime_op_would_be_missing(
    hook_method, monkeypatch, tiny_model, tiny_tokenizer, calibration_ids, token_ids, tmp_path: Path
) -> None:
    """Guards the test above: the offset hook really changes the logits."""
    quantize(tiny_model, RECIPE, calibration_ids, progress=False)
    expected = logits(tiny_model, token_ids)
    out = save_quantized(tiny_model, tiny_tokenizer, tmp_path / "out")
    monkeypatch.setattr(hook_method, "restore", lambda self, model, adapter, state: None)
    loaded, _ = load_model(out)
    assert (logits(loaded, token_ids) - expected).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llama"])
def test_a_malformed_quantizer_entry_is_refused_clearly(
    hook_method, tiny_model, calibration_ids, tmp_path: Path
) -> None:
    import json

    from channelwise.errors import ChannelwiseError

    quantize(tiny_model, RECIPE, calibration_ids, progress=False)
    out = save_quantized(tiny_model, None, tmp_path / "out")
    marker = json.loads((out / MARKER_FILE).read_text())
    key = next(iter(marker["input_quantizers"]))
    marker["input_quantizers"][key] = "int4"
    (out / MARKER_FILE).write_text(json.dumps(marker))
    with pytest.raises(ChannelwiseError, match="malformed"):
        load_model(out)
