"""LPViT block pruning on the embedded DINOv2-S/14: top-1 and block-sparse images/s, one run.

Top-1 (through the frozen probe, ``channelwise.vision`` protocol) of fp and of LPViT at each
``--flops`` share of the block linears' FLOPs kept, with the paper's curve allocation and the
uniform ablation; then the images/s of the float model against the same model pruned at the
first ``--flops`` with its pruned linears turned block-sparse
(``channelwise.deploy.block_sparse``), and against the float model with every block linear
through the same kernel with all blocks kept (the kernel's own speed against ``F.linear``, apart
from the sparsity), on one batch of test images, the median of ``--repeats`` forwards after a
warm-up, rounds interleaved. ``--speed-only`` skips the top-1 rows. ``--finetune-steps N`` adds
LPViT at the first ``--flops`` with N steps of whole-backbone distillation after pruning
(``finetune_steps``; ``--finetune-targets blocks``: every block's output distilled too, ``both``:
each in the same run); the timed model is the one without fine-tuning (same sparsity pattern).

    .venv/bin/python benchmarks/vision_lpvit.py [--flops 0.5,0.9] [--block 16]
        [--reconstruct-iters 100] [--finetune-steps 200] [--finetune-targets blocks]
        [--eval-images N] [--batch 32]
        [--repeats 5] [--rounds 2] [--threads 2] [--speed-only] [--json out]
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from vision_speed import images_per_second  # this folder is on sys.path as a script

from channelwise.adapters import adapter_for
from channelwise.compress import quantize
from channelwise.deploy.block_sparse import BlockSparseLinear, block_sparse_model
from channelwise.paths import write_atomic
from channelwise.recipe import Recipe
from channelwise.vision import VisionProtocol, compare_vision, load_vision_model


def lpvit(
    flops: float,
    block: int,
    allocation: str = "curves",
    iters: int = 0,
    finetune: int = 0,
    targets: str = "output",
) -> Recipe:
    args = {"flops": flops, "block": [block, block], "allocation": allocation}
    name = f"lpvit-{round(flops * 100)}" + ("" if allocation == "curves" else "-uniform")
    if iters:
        args["reconstruct_iters"] = iters
        name += f"-reconstructed-i{iters}"
    if finetune:
        args["finetune_steps"] = finetune
        args["finetune_targets"] = targets
        name += f"-finetuned-{finetune}" + ("" if targets == "output" else f"-{targets}")
    return Recipe.from_dict({"name": name, "steps": [{"method": "lpvit", "args": args}]})


def block_linear_names(model: torch.nn.Module) -> list[str]:
    adapter = adapter_for(model)
    return [f"{adapter.block_path(i)}.{n}" for i, b in enumerate(adapter.block_list(model))
            for n in adapter.block_linears(b)]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flops", default="0.5,0.9", help="kept FLOPs shares (the first is timed)")
    p.add_argument("--block", type=int, default=16)
    p.add_argument(
        "--reconstruct-iters", type=int, default=0,
        help="also LPViT at the first --flops with block reconstruction of this many iterations",
    )  # fmt: skip
    p.add_argument(
        "--finetune-steps", type=int, default=0,
        help="also LPViT at the first --flops fine-tuned by distillation for this many steps",
    )  # fmt: skip
    p.add_argument(
        "--finetune-targets", default="output", choices=["output", "blocks", "both"],
        help="distil the last hidden state, every block's output too, or run both (one run)",
    )  # fmt: skip
    p.add_argument("--calib-images", type=int)
    p.add_argument("--eval-images", type=int)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int)
    p.add_argument("--speed-only", action="store_true", help="skip the top-1 rows")
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shares = [float(f) for f in args.flops.split(",") if f.strip()]
    protocol = VisionProtocol().with_(calib_images=args.calib_images, eval_images=args.eval_images)
    recipes = ["fp"] + [lpvit(f, args.block, a) for f in shares for a in ("curves", "uniform")]
    if args.reconstruct_iters:
        recipes.append(lpvit(shares[0], args.block, iters=args.reconstruct_iters))
    if args.finetune_steps:
        kinds = ["output", "blocks"] if args.finetune_targets == "both" else [args.finetune_targets]
        for kind in kinds:
            recipes.append(lpvit(shares[0], args.block, finetune=args.finetune_steps, targets=kind))
    rows = []
    if not args.speed_only:
        rows = compare_vision(recipes, None, protocol, device="cpu", progress=False)
    out = {}
    for row in rows:
        print(f"{row.recipe:<20} top-1 {row.top1:6.2f}  Δ {row.delta_pt:+6.2f} pt  "
              f"agree {row.agreement:6.2f}  calib {row.calib_s:5.1f}s", flush=True)  # fmt: skip
        out[row.recipe] = row.as_dict()
    pruned = load_vision_model(None, "cpu")
    result = quantize(pruned, lpvit(shares[0], args.block, "curves"),
                      protocol.calibration_pixels(), progress=False)  # fmt: skip
    timed = VisionProtocol(resolution=protocol.size, eval_images=args.batch)
    images = timed.eval_set()
    pixels = images.pixels(0, len(images), timed.size, timed.mean, timed.std)
    with torch.no_grad():
        expected = pruned(pixel_values=pixels).last_hidden_state
    replaced = block_sparse_model(pruned, block_linear_names(pruned), (args.block, args.block))
    with torch.no_grad():
        got = pruned(pixel_values=pixels).last_hidden_state
    diff = float((got - expected).abs().max() / expected.abs().max())
    dense_kernel = load_vision_model(None, "cpu")
    for name in block_linear_names(dense_kernel):
        every_block = BlockSparseLinear(dense_kernel.get_submodule(name), (args.block,) * 2)
        dense_kernel.set_submodule(name, every_block)
    models = {"fp32": load_vision_model(None, "cpu"), "block-sparse": pruned,
              "all-blocks-kept": dense_kernel}  # fmt: skip
    rates = images_per_second(models, pixels, args.repeats, args.rounds)
    speedup = rates["block-sparse"] / rates["fp32"]
    own = rates["block-sparse"] / rates["all-blocks-kept"]
    kept = result.methods[0].kept_flops
    print(f"\nfp32 {rates['fp32']:.1f} images/s; LPViT at {kept:.2f} of the block-linear FLOPs, "
          f"{len(replaced)} linears block-sparse: {rates['block-sparse']:.1f} images/s = "
          f"{speedup:.2f}× fp32, {own:.2f}× the same kernel with every block kept "
          f"({rates['all-blocks-kept']:.1f} images/s); max relative difference to the pruned "
          f"float model {diff:.1e} (batch {args.batch}, "
          f"threads {torch.get_num_threads()})")  # fmt: skip
    out["_speed"] = {"fp32_images_per_s": rates["fp32"],
                     "block_sparse_images_per_s": rates["block-sparse"],
                     "all_blocks_kept_images_per_s": rates["all-blocks-kept"],
                     "speedup": speedup, "speedup_over_all_blocks_kept": own,
                     "max_rel_diff_to_pruned_float": diff, "kept_flops": kept,
                     "block": args.block, "batch": args.batch,
                     "block_sparse_linears": len(replaced)}  # fmt: skip
    out["_meta"] = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "protocol": vars(protocol),
    }
    if args.json:
        write_atomic(args.json, json.dumps(out, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
