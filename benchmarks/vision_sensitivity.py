"""Where 4-bit quantization hurts DINOv2-S: one part quantized at a time (an analysis, one run).

Each row quantizes one thing and leaves the rest in float, and reports top-1 through the frozen
probe with fp in the same run: the weights alone (INT4 per output channel, MSE range); the
inputs of one kind of linear alone (INT4 static per tensor, MSE range), with and without
RepQ-ViT's reparameterization where it applies (the post-LayerNorm inputs of q/k/v and fc1);
the attention matmul inputs alone (q/k/v uniform, softmax uniform or log√2). The protocol is
``VisionProtocol``'s; ``--eval-images`` (default 2000 of the 10,000 test images) keeps it short.

    .venv/bin/python benchmarks/vision_sensitivity.py [--bits 4] [--eval-images 2000]
        [--threads 2] [--json docs/runs/vision-dinov2-sensitivity.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from channelwise.adapters import adapter_for
from channelwise.compress import quantize
from channelwise.evaluate.top1 import score
from channelwise.paths import write_atomic
from channelwise.quant.activation import remove_input_quantizer
from channelwise.recipe import Recipe
from channelwise.vision import VisionProtocol, cached_probe, load_vision_model

# Row names are recipe names too (letters, digits, spaces, + - _ . only).
LINEARS = {
    "qkv input": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    "o_proj input": ("attention.o_proj",),
    "fc1 input": ("mlp.fc1",),
    "fc2 input post-GELU": ("mlp.fc2",),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    b = args.bits
    act = {"bits": b, "symmetric": False, "granularity": "tensor", "dynamic": False, "range": "mse"}
    weights = {"bits": b, "symmetric": False, "granularity": "channel", "range": "mse"}
    protocol = VisionProtocol(eval_images=args.eval_images)
    probe = cached_probe(None, protocol, progress=False)
    images = protocol.eval_set()
    calibration = protocol.calibration_pixels()
    reference = protocol.features(load_vision_model(None), images, progress=False)
    rows = {"fp": score(reference, images.labels, probe).__dict__}
    print(f"{'fp':<40} top-1 {rows['fp']['top1']:6.2f}", flush=True)

    def measure(name: str, recipe: dict, keep: tuple[str, ...] | None = None) -> None:
        start = time.perf_counter()
        model = load_vision_model(None)
        quantize(model, Recipe.from_dict({"name": name, **recipe}), calibration, progress=False)
        if keep is not None:  # only these linears keep their input quantizer
            adapter = adapter_for(model)
            for block in adapter.block_list(model):
                for linear_name, linear in adapter.block_linears(block).items():
                    if linear_name not in keep:
                        remove_input_quantizer(linear)
        result = score(protocol.features(model, images, progress=False), images.labels, probe,
                       reference)  # fmt: skip
        rows[name] = {**result.__dict__, "seconds": time.perf_counter() - start}
        print(f"{name:<40} top-1 {result.top1:6.2f}  agree {result.agreement:6.2f}  "
              f"cos {result.feature_cosine:.4f}", flush=True)  # fmt: skip

    measure(f"W{b} weights only", {"weights": weights, "steps": [{"method": "rtn"}]})
    for label, keep in LINEARS.items():
        measure(f"A{b} {label}", {"activations": act}, keep)
        if label in ("qkv input", "fc1 input"):
            repq = [{"method": "repq_vit", "args": {"softmax": "none"}}]
            measure(f"A{b} {label}, RepQ reparam", {"activations": act, "steps": repq}, keep)
    qkv = {"q": act, "k": act, "v": act}
    measure(f"A{b} qkv + softmax uniform", {"attention": {**qkv, "probs": act}})
    log2 = [{"method": "repq_vit", "args": {"reparam": False}}]
    measure(
        f"A{b} qkv + softmax log-sqrt2",
        {"attention": qkv, "activations": dict(act, bits=8), "steps": log2},
        keep=(),
    )
    meta = {"bits": b, "eval_images": len(images), "threads": torch.get_num_threads()}
    if args.json:
        print(f"wrote {write_atomic(args.json, json.dumps({**rows, '_meta': meta}, indent=2))}")


if __name__ == "__main__":
    main()
