"""Images/s of the embedded DINOv2-S/14 packed with integer kernels against fp32, in one run.

Each variant is quantized (no calibration: the weight-only and dynamic-activation presets),
packed (``channelwise.deploy.pack_model``: integer codes behind the CPU kernels; W8A8 runs
oneDNN's int8 linear with per-token int8 activations) and timed on the same batch of
Fashion-MNIST test images at the protocol's resolution: the median of ``--repeats`` forwards
after a warm-up, rounds interleaved across variants. Ratios are against fp32 in the same run.
Top-1 is not measured here (``benchmarks/vision_dinov2.py``); the packed outputs equal the
fake-quant ones (tests/test_vision.py).

    .venv/bin/python benchmarks/vision_speed.py [--variants fp32,w8a8,w8a16,w4a16]
        [--batch 32] [--resolution 112] [--repeats 5] [--rounds 2] [--threads 2] [--json out]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from channelwise.compress import quantize
from channelwise.deploy import pack_model
from channelwise.paths import write_atomic
from channelwise.vision import VisionProtocol, load_vision_model

PRESETS = {"fp32": None, "w8a8": "rtn-w8a8", "w8a16": "rtn-w8a16", "w4a16": "rtn-w4a16-g64"}


def build(variant: str):
    model = load_vision_model(None, "cpu")
    preset = PRESETS[variant]
    if preset is not None:
        quantize(model, preset, None, progress=False)
        pack_model(model)
    return model


def images_per_second(models: dict, pixels: torch.Tensor, repeats: int, rounds: int) -> dict:
    """Each model's images/s on ``pixels``: the median of ``repeats`` forwards after a warm-up,
    ``rounds`` interleaved across the models."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(rounds):
            for name, model in models.items():
                model(pixel_values=pixels)  # warm-up (kernel operands built once)
                for _ in range(repeats):
                    start = time.perf_counter()
                    model(pixel_values=pixels)
                    times[name].append(time.perf_counter() - start)
    return {name: pixels.shape[0] / statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(PRESETS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--resolution", type=int, default=112)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    args = p.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := set(variants) - set(PRESETS):
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(PRESETS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = VisionProtocol(resolution=args.resolution, eval_images=args.batch)
    images = protocol.eval_set()
    pixels = images.pixels(0, len(images), protocol.resolution, protocol.mean, protocol.std)
    models = {variant: build(variant) for variant in variants}
    rates = images_per_second(models, pixels, args.repeats, args.rounds)
    rows = {}
    base = None
    for variant in variants:
        rate = rates[variant]
        base = base if base is not None else rate
        rows[variant] = {"images_per_s": rate, "vs_first": rate / base, "preset": PRESETS[variant]}
        print(f"{variant:<8} {rate:8.1f} images/s  {rate / base:5.2f}× {variants[0]}", flush=True)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "resolution": args.resolution,
        "repeats": args.repeats,
        "rounds": args.rounds,
    }
    print(meta)
    if args.json:
        print(f"wrote {write_atomic(args.json, json.dumps({**rows, '_meta': meta}, indent=2))}")


if __name__ == "__main__":
    main()
