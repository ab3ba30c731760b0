"""Fake-quantization of a linear's input, installed as a forward pre-hook.

A hook (rather than a wrapper module) keeps the model's module tree and state-dict keys exactly
those of the original architecture, for every family (``nn.Linear`` and GPT-2's ``Conv1D`` alike).
Dynamic quantizers compute their ranges per call (per token); static ones carry ranges calibrated
once on calibration data.
"""

from __future__ import annotations

from torch import Tensor, nn

from channelwise.quant.core import QParams, QuantSpec, fake_quantize

_HOOK_ATTR = "_channelwise_input_quantizer"


class InputQuantizer:
    """Callable pre-hook: ``x → fake_quantize(x, spec, qparams)``; ``qparams=None`` is dynamic."""

    def __init__(self, spec: QuantSpec, qparams: QParams | None = None) -> None:
        self.spec = spec
        self.qparams = qparams

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        takes_over = getattr(module, "quantizes_input", None)
        if takes_over is not None and takes_over(self, args[0]):
            return None  # the module quantizes its input itself, to these codes (integer GEMM)
        x: Tensor = args[0]
        return (fake_quantize(x, self.spec, self.qparams), *args[1:])

    def __repr__(self) -> str:
        kind = "dynamic" if self.qparams is None else "static"
        return f"InputQuantizer({kind}, {self.spec})"


def install_input_quantizer(module: nn.Module, quantizer: InputQuantizer) -> None:
    """Quantize ``module``'s input from now on, replacing any quantizer installed before."""
    remove_input_quantizer(module)
    handle = module.register_forward_pre_hook(quantizer)
    setattr(module, _HOOK_ATTR, (quantizer, handle))


def remove_input_quantizer(module: nn.Module) -> None:
    installed = getattr(module, _HOOK_ATTR, None)
    if installed is not None:
        installed[1].remove()
        delattr(module, _HOOK_ATTR)


def input_quantizer(module: nn.Module) -> InputQuantizer | None:
    installed = module.__dict__.get(_HOOK_ATTR)  # not getattr: a miss costs a raised error
    return installed[0] if installed is not None else None
