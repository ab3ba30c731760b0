"""Where W4A4 loses on the embedded SmolLM2-135M: the same quantized model evaluated with its
4-bit activation quantizers widened to 8 bits on one group of linear inputs at a time.

Two models are quantized once each (fresh, same calibration): ``quarot-w4a4`` (QuaRot + GPTQ
INT4 weights, INT4 per-token activations) and the same rotation with round-to-nearest INT8
weights and INT4 activations (``quarot-rtn-w4a4`` with ``weights.bits = 8``: "W8A4"). Each is
then evaluated four ways, changing only the dynamic per-token activation quantizers (they hold
no calibrated state, so widening them needs no recalibration):

- ``a4``: as quantized;
- ``norm-fed a8``: the inputs read from the residual stream after a norm (q/k/v, gate/up) at 8
  bits, the others at 4;
- ``inner a8``: the other inputs (o_proj, down_proj) at 8 bits;
- ``weights only``: no activation quantization.

Perplexity is the protocol's (Pride and Prejudice, 16 × 512), with the float model's in the same
run; calibration is Emma (``--samples``, default the protocol's 128)::

    .venv/bin/python benchmarks/w4a4_diagnosis.py --samples 32 \
        --json docs/runs/cpu-w4a4-diagnosis-32-samples.json
"""

from __future__ import annotations

import time
from dataclasses import replace

import common  # benchmarks/common.py: this folder is on sys.path when run as a script
import torch

from channelwise.compress import quantize
from channelwise.evaluate import perplexity
from channelwise.models import load_model
from channelwise.quant.activation import InputQuantizer, input_quantizer, remove_input_quantizer
from channelwise.recipe import load_recipe

NORM_FED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
INNER = ("o_proj", "down_proj")
WIDENED = {"a4": (), "norm-fed a8": NORM_FED, "inner a8": INNER}


def w8a4_recipe():
    weights = load_recipe("quarot-rtn-w4a4").weights.model_copy(update={"bits": 8})
    return common.variant("quarot-rtn-w4a4", "quarot-rtn-w8a4", "quarot-rtn-w4a4 with INT8 weights",
                          weights=weights)  # fmt: skip


def activation_quantizers(model: torch.nn.Module) -> dict[str, InputQuantizer]:
    return {
        name: quantizer
        for name, module in model.named_modules()
        if (quantizer := input_quantizer(module)) is not None
    }


def widen(quantizers: dict[str, InputQuantizer], specs: dict, linears: tuple[str, ...]) -> int:
    """Every quantizer back to its recipe's spec, those of ``linears`` (name endings) at 8 bits;
    how many were widened."""
    widened = 0
    for name, quantizer in quantizers.items():
        quantizer.spec = specs[name]
        if name.rsplit(".", 1)[-1] in linears:
            quantizer.spec = replace(specs[name], bits=8)
            widened += 1
    return widened


def main() -> None:
    p = common.parser(__doc__)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = common.protocol(args)
    model, tokenizer = load_model(device=args.device)
    windows = protocol.eval_tokens(tokenizer)
    calibration = protocol.calibration_tokens(tokenizer)
    fp = perplexity(model, windows, progress=False)
    print(f"fp: {fp:.3f}", flush=True)
    rows = [{"model": "fp", "variant": "-", "ppl": fp, "delta_pct": 0.0}]
    for recipe in (load_recipe("quarot-w4a4"), w8a4_recipe()):
        model, _ = load_model(device=args.device)
        start = time.perf_counter()
        quantize(model, recipe, calibration, progress=False)
        calib_s = time.perf_counter() - start
        quantizers = activation_quantizers(model)
        specs = {name: quantizer.spec for name, quantizer in quantizers.items()}
        for variant in (*WIDENED, "weights only"):
            if variant == "weights only":
                for module in model.modules():
                    remove_input_quantizer(module)
                changed = len(quantizers)
            else:
                changed = widen(quantizers, specs, WIDENED[variant])
            ppl = perplexity(model, windows, progress=False)
            row = {"model": recipe.name, "variant": variant, "linears_changed": changed,
                   "ppl": ppl, "delta_pct": 100 * (ppl / fp - 1), "calib_s": calib_s}  # fmt: skip
            rows.append(row)
            print(f"{recipe.name:18s} {variant:13s} ({changed:3d} linears changed)  "
                  f"ppl {ppl:9.3f}  Δ {row['delta_pct']:+8.2f}%", flush=True)  # fmt: skip
    if args.json:
        common.write_raw(args.json, rows, samples=protocol.calib_samples,
                         windows=protocol.windows)  # fmt: skip


if __name__ == "__main__":
    main()
