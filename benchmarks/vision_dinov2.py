"""Vision Transformer PTQ on the embedded DINOv2-S/14 (Fashion-MNIST, top-1 through a frozen probe).

The protocol of ``channelwise.vision.VisionProtocol``: images at 112 px, a ridge probe fitted once
on the float model's features of 10,000 seeded training images, 32 seeded training images for
calibration, top-1 on the 10,000 test images; fp measured first in the same run, so every Δ is
against it. Not ImageNet: the figures are this protocol's, not the papers'. Raw rows:
``--json docs/runs/vision-dinov2.json``.

    .venv/bin/python benchmarks/vision_dinov2.py [--recipes fp,vit-rtn-w8a8,...]
        [--calib-images 32] [--probe-images 10000] [--eval-images N] [--resolution 112]
        [--ablation 4] [--lrp-ablation 4] [--ias-ablation 4] [--median-target 4]
        [--recon-iters 200 --recon-batch 32]
        [--threads 2]
        [--device cpu]
        [--json out.json]

``--recon-iters``/``--recon-batch`` (alias ``--ias-iters``/``--ias-batch``) run the training
presets (I&S-ViT, RepQuant, BiViT) with fewer iterations per stage or a smaller batch than
their defaults (1000 or 200 at batch 64 take hours on a CPU); the rows are then named e.g.
``ias-vit-w4a4-i200-b32``.
"""

from __future__ import annotations

import argparse
import platform

import torch

from channelwise.models import resolve_device
from channelwise.recipe import Recipe, load_recipe
from channelwise.report import format_vision_markdown, write_json
from channelwise.vision import compare_vision, vision_protocol

RECIPES = "fp,vit-rtn-w8a8,vit-rtn-w6a6,repq-vit-w6a6,vit-rtn-w4a4,repq-vit-w4a4"


def repq_ablation(bits: int) -> list[Recipe]:
    """RepQ-ViT's two parts one at a time (the paper's ablation): reparameterization only
    (softmax on the baseline's uniform quantizer) and log√2 softmax only."""
    base = load_recipe(f"vit-rtn-w{bits}a{bits}").model_dump(mode="json")
    variants = []
    for name, args in (("reparam-only", {"softmax": "none"}), ("log2-only", {"reparam": False})):
        recipe = dict(base, name=f"repq-{name}-w{bits}a{bits}")
        if name == "log2-only":
            recipe["attention"] = {k: v for k, v in base["attention"].items() if k != "probs"}
        recipe["steps"] = [{"method": "repq_vit", "args": args}, {"method": "rtn"}]
        variants.append(Recipe.from_dict(recipe))
    return variants


def median_target(bits: int) -> list[Recipe]:
    """RepQ-ViT with DopQ-ViT's median target scale and zero point (MOSF) instead of the mean."""
    data = load_recipe(f"repq-vit-w{bits}a{bits}").model_dump(mode="json")
    data["name"] = f"repq-vit-median-w{bits}a{bits}"
    data["steps"] = [{"method": "repq_vit", "args": {"target": "median"}}, {"method": "rtn"}]
    return [Recipe.from_dict(data)]


#: Training steps and the argument holding their iteration count.
RECONSTRUCTING = {"ias_vit": "iters", "repquant": "iters", "bivit": "steps"}


def repquant_ablation(bits: int) -> list[Recipe]:
    """RepQuant without its learned clipping (the weight reconstruction alone)."""
    data = load_recipe(f"repquant-w{bits}a{bits}").model_dump(mode="json")
    data["name"] = f"repquant-noclip-w{bits}a{bits}"
    data["steps"] = [{"method": "repquant", "args": {"clipping": False}}]
    return [Recipe.from_dict(data)]


def ias_ablation(bits: int) -> list[Recipe]:
    """I&S-ViT's two parts one at a time (the paper's ablation of SULQ and SOS): the softmax on
    the baseline's uniform per-tensor quantizer instead of SULQ, and SULQ with the per-channel
    reparameterization but no block reconstruction."""
    data = load_recipe(f"ias-vit-w{bits}a{bits}").model_dump(mode="json")
    uniform = load_recipe(f"vit-rtn-w{bits}a{bits}").model_dump(mode="json")["attention"]["probs"]
    no_sulq = dict(data, name=f"ias-vit-uniform-softmax-w{bits}a{bits}")
    no_sulq["attention"] = {**data["attention"], "probs": uniform}
    no_sulq["steps"] = [{"method": "ias_vit", "args": {"softmax": "none"}}]
    no_sos = dict(data, name=f"ias-vit-no-reconstruction-w{bits}a{bits}")
    no_sos["steps"] = [{"method": "ias_vit", "args": {"reconstruct": False}}]
    return [Recipe.from_dict(no_sulq), Recipe.from_dict(no_sos)]


def lrp_ablation(bits: int) -> list[Recipe]:
    """LRP-QViT's parts one at a time: the clipped reparameterization alone (every layer at
    ``bits``), the mixed precision without clipping, mixed weight bits with every input at
    ``bits``, and mixed weight bits alone (no clipping, inputs at ``bits``)."""
    data = load_recipe(f"lrp-qvit-w{bits}a{bits}").model_dump(mode="json")
    fixed = {"activations": "fixed"}
    parts = {
        "clip-only": {"candidates": [bits]},
        "no-clip": {"clip": None},
        "fixed-act": fixed,
        "weights-only": {**fixed, "clip": None},
    }
    return [
        Recipe.from_dict(
            dict(
                data,
                name=f"lrp-qvit-{name}-w{bits}a{bits}",
                steps=[{"method": "lrp_qvit", "args": args}],
            )
        )  # fmt: skip
        for name, args in parts.items()
    ]


def shortened(recipe: str | Recipe, iters: int | None, batch: int | None) -> str | Recipe:
    """Preset (or recipe) ``recipe``, with its reconstructing step's iterations and batch
    replaced where given."""
    loaded = load_recipe(recipe) if isinstance(recipe, str) else recipe
    if (iters is None and batch is None) or not any(
        step.method in RECONSTRUCTING for step in loaded.steps
    ):
        return recipe
    data = loaded.model_dump(mode="json")
    name = loaded.name
    for step in data["steps"]:
        if step["method"] in RECONSTRUCTING:
            count = RECONSTRUCTING[step["method"]]
            changes = {k: v for k, v in ((count, iters), ("batch_size", batch)) if v is not None}
            step["args"] = {**(step.get("args") or {}), **changes}
    data["name"] = name + "".join(
        f"-{tag}{value}" for tag, value in (("i", iters), ("b", batch)) if value is not None
    )
    return Recipe.from_dict(data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=RECIPES, help="comma-separated presets")
    p.add_argument("--model", default=None, help="embedded name or local folder (dinov2-small)")
    p.add_argument("--calib-images", type=int)
    p.add_argument("--probe-images", type=int)
    p.add_argument("--eval-images", type=int, help="fewer test images: smoke checks only")
    p.add_argument("--resolution", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--ablation", type=int, help="add RepQ-ViT's ablation rows at these bits (4)")
    p.add_argument("--repquant-ablation", type=int, help="add RepQuant without clipping (4)")
    p.add_argument("--lrp-ablation", type=int, help="add LRP-QViT's ablation rows at these bits")
    p.add_argument("--ias-ablation", type=int, help="add I&S-ViT's ablation rows at these bits")
    p.add_argument(
        "--median-target", type=int, help="add RepQ-ViT with DopQ-ViT's median target at these bits"
    )
    p.add_argument("--recon-iters", "--ias-iters", type=int, help="iterations per stage")
    p.add_argument("--recon-batch", "--ias-batch", type=int, help="reconstruction batch size")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = vision_protocol(
        args.model,
        calib_images=args.calib_images,
        probe_images=args.probe_images,
        eval_images=args.eval_images,
        resolution=args.resolution,
    )

    def show(row) -> None:
        print(
            f"{row.recipe:<20} {row.bits:<8} top-1 {row.top1:6.2f}  Δ {row.delta_pt:+6.2f} pt  "
            f"agree {row.agreement:6.2f}  cos {row.feature_cosine:.4f}  "
            f"calib {row.calib_s:6.1f}s  eval {row.eval_s:6.1f}s",
            flush=True,
        )

    recipes = [
        shortened(name.strip(), args.recon_iters, args.recon_batch)
        for name in args.recipes.split(",")
        if name.strip()
    ]
    if args.ablation:
        recipes += repq_ablation(args.ablation)
    if args.repquant_ablation:
        recipes += [
            shortened(recipe, args.recon_iters, args.recon_batch)
            for recipe in repquant_ablation(args.repquant_ablation)
        ]
    if args.lrp_ablation:
        recipes += lrp_ablation(args.lrp_ablation)
    if args.median_target:
        recipes += median_target(args.median_target)
    if args.ias_ablation:
        recipes += [
            shortened(recipe, args.recon_iters, args.recon_batch)
            for recipe in ias_ablation(args.ias_ablation)
        ]
    rows = compare_vision(
        recipes, args.model, protocol, device=args.device, progress=False, on_row=show
    )
    device = resolve_device(args.device)
    print(
        f"\ndevice: {device} ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}\n{protocol}\n"
    )
    print(format_vision_markdown(rows))
    if args.json:
        meta = {
            "device": str(device),
            "model": args.model or "dinov2-small",
            "protocol": {k: v for k, v in vars(protocol).items()},
        }
        print(f"wrote {write_json(rows, args.json, meta)}")


if __name__ == "__main__":
    main()
