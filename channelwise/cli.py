"""The ``channelwise`` command: a thin layer over the Python API.

Every error a user can cause prints one line (``error: …``) and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from channelwise.errors import ChannelwiseError
from channelwise.paths import check_output_file, check_parent_writable, check_replaceable

JSON_SUFFIXES = (".json",)

DEFAULT_PLOT = "results/compare.png"
DEFAULT_VISION_PLOT = "results/vision.png"


def image_suffixes() -> tuple[str, ...]:
    """The file endings matplotlib can write a figure to (``.png``, ``.pdf``, ``.svg``, …)."""
    from matplotlib.figure import Figure

    return tuple(f".{kind}" for kind in Figure().canvas.get_supported_filetypes())


def _protocol(args):
    from channelwise.protocol import Protocol

    return Protocol().with_(
        calib_data=getattr(args, "calib_data", None),
        eval_data=getattr(args, "eval_data", None),
        windows=getattr(args, "windows", None),
        seqlen=getattr(args, "seqlen", None),
        start=getattr(args, "start", None),
        calib_samples=getattr(args, "calib_samples", None),
    )


def cmd_quantize(args) -> None:
    """Under ``torchrun --nproc_per_node N`` every process calibrates its share of the samples
    (:mod:`channelwise.distributed`); process 0 writes the output."""
    from channelwise.distributed import process_device, process_group
    from channelwise.models import resolve_device

    device = resolve_device(args.device)
    with process_group(device) as group:
        _quantize(args, process_device(device), group)


def _quantize(args, device, group) -> None:
    import torch

    from channelwise import load_recipe, quantize, save_quantized
    from channelwise.compress import needs_calibration
    from channelwise.deploy import pack_model
    from channelwise.deploy.packed import round_float_tensors_
    from channelwise.methods.registry import quantizes_weights
    from channelwise.vision import is_vision_model, load_vision_model

    recipe = load_recipe(args.recipe)
    if args.format is None:
        args.format = "packed"
    if args.offload and args.format not in ("packed", "fake"):
        raise ChannelwiseError(
            f"--offload saves --format packed or fake; --format {args.format} needs the whole "
            "model in memory"
        )
    if args.float_dtype != "float32" and args.format != "packed":
        raise ChannelwiseError("--float-dtype needs --format packed")
    if args.gguf_float != "F32" and args.format != "gguf":
        raise ChannelwiseError("--gguf-float needs --format gguf")
    exports = args.format in ("compressed-tensors", "gguf")
    if exports and not any(quantizes_weights(step.method) for step in recipe.steps):
        raise ChannelwiseError(
            f"recipe '{recipe.name}' quantizes no linear weights: --format {args.format} has "
            "nothing to export (use --format packed or fake)"
        )
    vision = is_vision_model(args.model)
    if vision and exports:
        raise ChannelwiseError(
            f"--format {args.format} holds language models; save a Vision Transformer with "
            "--format packed (default) or fake"
        )
    if exports and recipe.weights is not None:  # the format's refusal, before calibration
        spec, where = recipe.weights.spec("weight"), f"recipe '{recipe.name}' weights"
        if args.format == "gguf":
            from channelwise.deploy.gguf import gguf_type

            gguf_type(spec, where)
        else:
            from channelwise.deploy.compressed_tensors import weight_args

            weight_args(spec, where)
    protocol = _vision_protocol(args) if vision else None
    out = Path(args.out)
    if args.format == "gguf":
        from channelwise.deploy.gguf import gguf_path

        out = gguf_path(out, recipe.name)  # a .gguf file, or <recipe>.gguf in a folder
    out = out.expanduser().resolve()
    check_replaceable(out, args.force, kind="gguf" if args.format == "gguf" else "folder")
    check_parent_writable(out)
    if group is not None and args.offload:
        raise ChannelwiseError("--offload runs in one process; launch it without torchrun")
    if vision and args.offload:
        raise ChannelwiseError("--offload supports causal language models only")
    if vision:
        model, tokenizer = load_vision_model(args.model, device), None
        calibration = protocol.calibration_pixels() if needs_calibration(recipe) else None
    else:
        model, tokenizer = _load_text_model(args.model, device, args.offload)
        calibration = (
            _protocol(args).calibration_tokens(tokenizer) if needs_calibration(recipe) else None
        )
    result = quantize(model, recipe, calibration, progress=not args.quiet)
    if group is not None and not group.main:
        return
    packed = pack_model(model) if args.format != "fake" else []
    if args.float_dtype != "float32":
        if not packed:
            raise ChannelwiseError(f"--float-dtype: recipe '{recipe.name}' packs no weights")
        round_float_tensors_(model, getattr(torch, args.float_dtype))
    if args.format == "compressed-tensors":
        from channelwise.deploy.compressed_tensors import (
            export_compressed_tensors,
            verify_compressed_tensors,
        )

        path = export_compressed_tensors(model, tokenizer, out, force=args.force)
        worst = verify_compressed_tensors(path, model)
        how = f"compressed-tensors; reloaded by the package, weights differ by at most {worst:g}"
    elif args.format == "gguf":
        from channelwise.deploy.gguf import export_gguf, verify_gguf

        path = export_gguf(
            model, out, tokenizer, _source_gguf(args.model), args.gguf_float, force=args.force
        )
        worst = verify_gguf(path, model)
        how = f"GGUF; read back by gguf.GGUFReader, weights differ by at most {worst:g}"
    else:
        path = save_quantized(model, tokenizer, out, force=args.force)
        how = (
            f"{len(packed)} modules packed"
            if packed
            else "float weights on the quantized grid"
            if recipe.weights is not None
            else "float weights: the recipe quantizes none"
        )
    print(
        f"{recipe.name}: calibrated in {result.calib_seconds:.1f} s; wrote {path} ({how}; "
        f"{_written_bytes(Path(path)) / 1e6:.1f} MB)"
    )
    if args.offload:
        print(_peak_rss_line(model))


def _load_text_model(spec, device, offload: bool):
    """``load_model``, or :func:`channelwise.offload.load_offloaded` with ``--offload``."""
    from channelwise import load_model
    from channelwise.offload import load_offloaded

    return load_offloaded(spec, device=device) if offload else load_model(spec, device=device)


def _peak_rss_line(model) -> str:
    """The process's peak resident memory beside what the model would take whole in memory."""
    from channelwise.memory import peak_resident_bytes
    from channelwise.offload import offloaded_bytes

    return (
        f"peak resident memory {peak_resident_bytes() / 2**20:,.0f} MiB; the model whole in "
        f"memory would take {offloaded_bytes(model) / 2**20:,.0f} MiB"
    )


def _written_bytes(path: Path) -> int:
    """Bytes of a written file, or of every file in a written folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _source_gguf(spec: str | None) -> Path | None:
    """The GGUF file a model spec loads from (embedded name or ``.gguf`` path), else None: its
    tokenizer section is copied into a GGUF export."""
    from channelwise.models import DEFAULT_MODEL, embedded_gguf, embedded_names

    if spec is None or spec in embedded_names():
        return embedded_gguf(spec or DEFAULT_MODEL)
    path = Path(spec).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def cmd_eval(args) -> None:
    from channelwise import perplexity
    from channelwise.kvcache import chunked_perplexity
    from channelwise.kvcache.cache import KV_CONFIG_ATTR
    from channelwise.report import write_atomic

    if args.tasks and args.offload:
        raise ChannelwiseError("--offload evaluates the perplexity protocol; it takes no --tasks")
    if args.tasks:
        return _eval_tasks(args)
    for flag in ("limit", "batch_size"):
        if getattr(args, flag) is not None:
            raise ChannelwiseError(
                f"--{flag.replace('_', '-')} applies to lm-eval tasks; it needs --tasks"
            )
    protocol = _protocol(args)
    if args.json:
        check_output_file(args.json, JSON_SUFFIXES, *_inputs(args))
    model, tokenizer = _load_text_model(args.model, args.device, args.offload)
    windows = protocol.eval_tokens(tokenizer)
    start = time.perf_counter()
    kv = getattr(model, KV_CONFIG_ATTR, None)
    if kv is None:
        ppl = perplexity(model, windows, progress=not args.quiet)
    else:  # a kv_cache recipe: every token reads keys and values through the compressed cache
        ppl = chunked_perplexity(model, windows, progress=not args.quiet)
    result = {
        "ppl": ppl,
        "model": str(args.model or "smollm2-135m"),
        "data": protocol.eval_data,
        "windows": protocol.windows,
        "seqlen": protocol.seqlen,
        "start": protocol.start,
        "eval_s": time.perf_counter() - start,
    }
    print(
        f"perplexity {ppl:.3f} on {protocol.eval_data} "
        f"({protocol.windows}×{protocol.seqlen} tokens from {protocol.start}"
        + (", through the compressed KV cache in 32-token chunks)" if kv is not None else ")")
    )
    if args.offload:
        print(_peak_rss_line(model))
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=2))


def _eval_tasks(args) -> None:
    """``channelwise eval --tasks``: lm-eval tasks through :mod:`channelwise.evaluate.harness`."""
    from channelwise import load_model
    from channelwise.evaluate.harness import run_tasks
    from channelwise.report import write_atomic

    for flag in ("eval_data", "windows", "start", "seqlen"):
        if getattr(args, flag) is not None:
            raise ChannelwiseError(
                f"--{flag.replace('eval_data', 'data')} sets the perplexity protocol; "
                "--tasks runs lm-eval tasks instead (drop one of them)"
            )
    if args.json:
        check_output_file(args.json, JSON_SUFFIXES, *_inputs(args))
    model, tokenizer = load_model(args.model, device=args.device)
    start = time.perf_counter()
    results = run_tasks(
        model,
        tokenizer,
        args.tasks.split(","),
        limit=args.limit,
        batch_size=8 if args.batch_size is None else args.batch_size,
        progress=not args.quiet,
    )
    for task, metrics in results.items():
        shown = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        print(f"{task}: {shown}")
    if args.json:
        payload = {
            "model": str(args.model or "smollm2-135m"),
            "tasks": results,
            "limit": args.limit,
            "eval_s": time.perf_counter() - start,
        }
        write_atomic(args.json, json.dumps(payload, indent=2))


def _inputs(args) -> list[str]:
    """The paths a command reads (model, recipe files, data sources): outputs stay off them."""
    named = [getattr(args, "model", None), getattr(args, "recipe", None)]
    named += [getattr(args, flag, None) for flag in ("eval_data", "calib_data")]
    named += (getattr(args, "recipes", None) or "").split(",")
    return [name.strip() for name in named if name and Path(name.strip()).expanduser().exists()]


def cmd_generate(args) -> None:
    from channelwise import load_model
    from channelwise.deploy import generate_text

    model, tokenizer = load_model(args.model, device=args.device)
    result = generate_text(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        chat=not args.no_chat,
        compiled=args.compile,
        cpp_wrapper=args.cpp_wrapper,
    )
    print(result.text)
    seconds = result.compile_seconds
    compiled = "" if seconds is None else f"; compiled in {seconds:.1f} s"
    print(
        f"{result.new_tokens} new tokens after a {result.prompt_tokens}-token prompt in "
        f"{result.seconds:.2f} s: {result.tokens_per_second:.1f} tok/s{compiled}",
        file=sys.stderr,
    )


def cmd_compare(args) -> None:
    from channelwise.compare import DEMO_RECIPES, compare
    from channelwise.report import format_table, plot_comparison, write_json

    protocol = _protocol(args)
    if args.json:
        check_output_file(args.json, JSON_SUFFIXES, *_inputs(args))
    check_output_file(args.plot, image_suffixes(), *_inputs(args))
    given = args.recipes if args.recipes is not None else ",".join(DEMO_RECIPES)
    recipes = [name.strip() for name in given.split(",") if name.strip()]
    if not recipes:
        raise ChannelwiseError(f"--recipes {given!r} names no recipe (comma-separated presets)")
    rows = compare(recipes, args.model, protocol, progress=not args.quiet, device=args.device)
    print(format_table(rows))
    meta = {
        "model": args.model or "smollm2-135m",
        "calib_data": protocol.calib_data,
        "eval_data": protocol.eval_data,
        "windows": protocol.windows,
        "seqlen": protocol.seqlen,
        "start": protocol.start,
        "calib_samples": protocol.calib_samples,
    }
    if args.json:
        print(f"wrote {write_json(rows, args.json, meta)}")
    print(f"wrote {plot_comparison(rows, args.plot)}")


def cmd_vision(args) -> None:
    from channelwise.report import format_vision_markdown, plot_vision, write_json
    from channelwise.vision import VISION_DEMO_RECIPES, compare_vision, vision_protocol

    protocol = vision_protocol(
        args.model,
        calib_data=args.calib_data,
        eval_data=args.eval_data,
        calib_images=args.calib_images,
        probe_images=args.probe_images,
        eval_images=args.eval_images,
        resolution=args.resolution,
    )
    if args.json:
        check_output_file(args.json, JSON_SUFFIXES, *_inputs(args))
    check_output_file(args.plot, image_suffixes(), *_inputs(args))
    given = args.recipes if args.recipes is not None else ",".join(VISION_DEMO_RECIPES)
    recipes = [name.strip() for name in given.split(",") if name.strip()]
    if not recipes:
        raise ChannelwiseError(f"--recipes {given!r} names no recipe (comma-separated presets)")
    rows = compare_vision(recipes, args.model, protocol, args.device, progress=not args.quiet)
    print(format_vision_markdown(rows))
    print(f"wrote {plot_vision(rows, args.plot)}")
    if args.json:
        meta = {"model": args.model or "dinov2-small", "protocol": vars(protocol)}
        print(f"wrote {write_json(rows, args.json, meta)}")


def cmd_inspect(args) -> None:
    from channelwise.inspect import inspect_channels
    from channelwise.report import outlier_change_summary, outlier_summary, plot_channel_heatmap
    from channelwise.vision import is_vision_model

    check_output_file(args.out, image_suffixes(), *_inputs(args))
    if is_vision_model(args.model):
        _inspect_vision(args)
        return
    protocol = _protocol(args)
    found = inspect_channels(
        args.model, protocol, args.recipe, device=args.device, progress=not args.quiet
    )
    title = f"{args.model or 'smollm2-135m'} on {protocol.calib_data}"
    print(outlier_summary(found.before))
    if found.after is None:
        print(f"wrote {plot_channel_heatmap(found.before, args.out, title)}")
        return
    print(f"\nafter {found.recipe.name} (activation quantizers off):")
    print(outlier_change_summary(found.before, found.after))
    columns = [("before", found.before), (f"after {found.recipe.name}", found.after)]
    print(f"wrote {plot_channel_heatmap(columns, args.out, title)}")


def _vision_protocol(args):
    """The ViT protocol of ``quantize``/``inspect``: calibration images from ``--calib-data``
    and ``--calib-samples``; ``--seqlen`` (a text option) is refused."""
    from channelwise.vision import vision_protocol

    if args.seqlen is not None:
        raise ChannelwiseError("--seqlen is for text models; a ViT takes --calib-samples images")
    return vision_protocol(args.model, calib_data=args.calib_data, calib_images=args.calib_samples)


def _inspect_vision(args) -> None:
    """``inspect`` for a ViT: the channel heat map (before | after a recipe) and, beside it
    (``<out>-softmax.png``), the post-softmax distribution against the 4-bit grids."""
    from channelwise.report import (
        outlier_change_summary,
        outlier_summary,
        plot_channel_heatmap,
        plot_softmax_distribution,
    )
    from channelwise.vision import inspect_vision

    protocol = _vision_protocol(args)
    out = Path(args.out)
    softmax_out = out.with_name(f"{out.stem}-softmax{out.suffix}")
    check_output_file(softmax_out, image_suffixes(), *_inputs(args))
    found = inspect_vision(args.model, protocol, args.recipe, args.device, not args.quiet)
    title = f"{args.model} on {protocol.calib_images} {protocol.calib_data} images"
    print(outlier_summary(found.channels.before))
    columns = [("before", found.channels.before)]
    if found.channels.after is not None:
        print(f"\nafter {found.channels.recipe.name} (activation quantizers off):")
        print(outlier_change_summary(found.channels.before, found.channels.after))
        columns.append((f"after {found.channels.recipe.name}", found.channels.after))
    print(
        f"wrote {plot_channel_heatmap(columns if len(columns) > 1 else columns[0][1], out, title)}"
    )
    print(f"wrote {plot_softmax_distribution(found.probs, softmax_out, title=title)}")


def cmd_prepare(args) -> None:
    from channelwise.data import ensure_austen
    from channelwise.models import resolve_model
    from channelwise.vision import is_vision_model, resolve_vision_model

    if is_vision_model(args.model):
        from channelwise.data.images import ensure_fashion_mnist

        print(f"model ready at {resolve_vision_model(args.model)}")
        print(f"Fashion-MNIST ready at {ensure_fashion_mnist()}")
        return
    print(f"model ready at {resolve_model(args.model)}")
    print(f"Austen novels ready at {ensure_austen()}")


def cmd_recipes(args) -> None:
    from channelwise.recipe import load_recipe, preset_names

    names = preset_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {load_recipe(name).description}")


#: What ``quantize --offload`` runs (a test keeps it equal to the registries' flags).
_OFFLOADABLE = "awq, gptq, rtn, smoothquant; KV caches kivi, kv_bfp"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="channelwise", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:1, … (default: cuda when present, else cpu)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def data_options(p, calib=True, evaluation=True):
        if calib:
            p.add_argument("--calib-data", help="calibration source (default: emma)")
            p.add_argument("--calib-samples", type=int, help="calibration samples (default: 128)")
        if evaluation:
            p.add_argument("--eval-data", help="evaluation source (default: prideprejudice)")
            p.add_argument("--windows", type=int, help="evaluation windows (default: 16)")
            p.add_argument("--start", type=int, help="first evaluation token (default: 5000)")
        p.add_argument("--seqlen", type=int, help="tokens per window/sample (default: 512)")

    p = sub.add_parser("quantize", help="compress a model with a recipe and save it")
    p.add_argument(
        "model",
        nargs="?",
        help="embedded name (an LLM, or dinov2-small: calibrated on --calib-samples images, "
        "default 32), checkpoint dir, .gguf or hub id",
    )
    p.add_argument("--recipe", required=True, help="preset name or YAML file")
    p.add_argument(
        "--out",
        required=True,
        help="output folder (must not exist); with --format gguf a .gguf file, or a folder "
        "that gets <recipe>.gguf",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument(
        "--format",
        choices=("packed", "fake", "compressed-tensors", "gguf"),
        help="packed: integer codes at their bit width (default); fake: "
        "float weights on the grid; compressed-tensors: the format vLLM loads; gguf: one "
        "llama.cpp file (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3; weights in groups of "
        "32 with float16 scales, e.g. presets rtn-w4a16-q4_0, rtn-w4a16-q4_1, rtn-w8a16-q8_0 "
        "→ Q4_0, Q4_1, Q8_0)",
    )
    p.add_argument(
        "--gguf-float",
        choices=("F32", "F16"),
        default="F32",
        help="--format gguf: storage of an unquantized embedding / LM head (norms stay F32)",
    )
    p.add_argument(
        "--float-dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="storage of the tensors left unquantized (embedding, norms): float16 halves them, "
        "as llama.cpp and the other toolkits store them, at a rounding the eval then includes",
    )
    p.add_argument(
        "--offload",
        action="store_true",
        help="leave the decoder blocks' weights on disk and read one block at a time: for a "
        "model larger than memory (steps that work block by block: " + _OFFLOADABLE + ")",
    )
    data_options(p, evaluation=False)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="perplexity of a model (or a quantized output folder)")
    p.add_argument("model", nargs="?")
    p.add_argument("--data", dest="eval_data", help="evaluation source (default: prideprejudice)")
    p.add_argument("--windows", type=int)
    p.add_argument("--start", type=int)
    p.add_argument("--seqlen", type=int)
    p.add_argument(
        "--tasks",
        help="comma-separated lm-evaluation-harness tasks instead of the perplexity protocol; "
        "local, no network: austen_pride_perplexity, austen_pride_next_word",
    )
    p.add_argument("--limit", type=int, help="with --tasks: the first N documents of each task")
    p.add_argument("--batch-size", type=int, help="with --tasks: lm-eval batch size (default 8)")
    p.add_argument("--json", help="write {'ppl': …} (or the tasks' metrics) here")
    p.add_argument(
        "--offload",
        action="store_true",
        help="an uncompressed checkpoint larger than memory: each block read from disk as it runs",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="greedy text from a model (or a quantized folder), timed")
    p.add_argument("model", nargs="?", help="embedded name, checkpoint dir, .gguf or hub id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-chat", action="store_true", help="skip the tokenizer's chat template")
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode through the compiled static-cache loop (compiles first, ~30 s)",
    )
    p.add_argument(
        "--cpp-wrapper",
        action="store_true",
        help="with --compile: call the step's kernels from generated C++ (faster decode; the "
        "first compilation takes minutes)",
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("compare", help="several recipes side by side, against fp")
    p.add_argument(
        "--recipes",
        help="comma-separated presets or YAML files (default: W8A8, W6A6 and W4A16 g64, each "
        "as RTN and as a calibrated method that runs in minutes: compare.DEMO_RECIPES)",
    )
    p.add_argument("--model")
    p.add_argument("--json", help="write {recipe: {ppl, calib_s, …}} here")
    p.add_argument("--plot", default=DEFAULT_PLOT, help=f"chart path (default: {DEFAULT_PLOT})")
    data_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "vision", help="recipes on a Vision Transformer: top-1 through a frozen probe, vs fp"
    )
    p.add_argument("--recipes", help="comma-separated presets (default: the vit-rtn presets)")
    p.add_argument("--model", help="dinov2-small (default) or a local Hugging Face folder")
    p.add_argument("--calib-data", help="fashion-mnist (train split; default) or a class folder")
    p.add_argument("--eval-data", help="fashion-mnist (test split; default) or a class folder")
    p.add_argument("--calib-images", type=int, help="calibration images (default: 32)")
    p.add_argument("--probe-images", type=int, help="images the probe is fitted on (10000)")
    p.add_argument("--eval-images", type=int, help="test images (default: all)")
    p.add_argument(
        "--resolution",
        type=int,
        help="square input size in pixels (default: a ViT's, DeiT's or Swin's own image_size; "
        "112 for DINOv2)",
    )
    p.add_argument("--json", help="write {recipe: {top1, agreement, …}} here")
    p.add_argument(
        "--plot",
        default=DEFAULT_VISION_PLOT,
        help=f"top-1 against bits per weight (default: {DEFAULT_VISION_PLOT})",
    )
    p.set_defaults(func=cmd_vision)

    p = sub.add_parser("inspect", help="per-channel activation outliers: heat map and summary")
    p.add_argument("model", nargs="?")
    p.add_argument("--out", default="results/inspect.png", help="heat map PNG path")
    p.add_argument(
        "--recipe", help="also show the activations after this recipe's transforms, side by side"
    )
    data_options(p, evaluation=False)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser(
        "prepare", help="fetch and cache the embedded model and data (once; dinov2-small: images)"
    )
    p.add_argument("model", nargs="?")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("recipes", help="list the preset recipes")
    p.set_defaults(func=cmd_recipes)
    for name, command in sub.choices.items():  # --device after the command works too
        if name not in ("recipes", "prepare"):
            command.add_argument(
                "--device", default=argparse.SUPPRESS, help="as the global --device"
            )
    return parser


def _check_launch(command: str) -> None:
    from channelwise.distributed import launched_world_size

    if launched_world_size() > 1 and command != "quantize":
        raise ChannelwiseError(
            f"'channelwise {command}' runs as one process; only 'channelwise quantize' "
            "calibrates across the processes torchrun starts"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "inspect" and args.calib_samples is None:
        args.calib_samples = 16
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        _check_launch(args.command)
        args.func(args)
    except ChannelwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written to the output path", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader (`| head`) left: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
