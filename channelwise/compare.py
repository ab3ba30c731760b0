"""Run several recipes on one model and protocol, measured in the same run as the baseline."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from channelwise.adapters import adapter_for, linear_weight
from channelwise.compress import CompressionResult, needs_calibration, plan, quantize
from channelwise.engine import model_device
from channelwise.errors import ChannelwiseError, RecipeError
from channelwise.evaluate import perplexity
from channelwise.kvcache import chunked_perplexity, kv_bytes
from channelwise.memory import PeakMemory
from channelwise.methods import build_method
from channelwise.models import load_model
from channelwise.protocol import Protocol
from channelwise.quant.grid import stored_bits
from channelwise.recipe import Recipe, load_recipe

log = logging.getLogger(__name__)

#: What ``channelwise compare`` (and ``make demo``) measures by default: each scheme twice,
#: round-to-nearest and a calibrated method that runs in minutes on a 2-core CPU (QuaRot's
#: rotation in seconds, AWQ's search in about 4 minutes).
DEMO_RECIPES = (
    "fp",
    "rtn-w8a8",
    "quarot-rtn-w8a8",
    "rtn-w6a6",
    "quarot-rtn-w6a6",
    "rtn-w4a16-g64",
    "awq-w4a16-g64",
)

#: Bits per weight counted for a recipe that leaves the weights float (fp16/bf16 storage).
FLOAT_WEIGHT_BITS = 16.0


@dataclass
class ComparisonRow:
    """One recipe's outcome; ``delta_pct`` is relative to the ``fp`` perplexity of the same run."""

    recipe: str
    bits: str
    ppl: float
    delta_pct: float
    calib_s: float
    eval_s: float
    calib_peak_mb: float = 0.0  # peak memory calibration added (see channelwise.memory)
    kv_ratio: float | None = None  # KV-cache bytes held / a float16 cache's (kv_cache recipes)
    weight_bits: float = FLOAT_WEIGHT_BITS  # stored bits per block-linear weight (weight_bits())

    def as_dict(self) -> dict:
        return asdict(self)


OnRow = Callable[[ComparisonRow, CompressionResult | None], None]


def bits_label(recipe: Recipe) -> str:
    """The recipe's bit-width label, or a step's own (:meth:`Method.bits_label`)."""
    for step in recipe.steps:
        own = build_method(step, recipe).bits_label()
        if own is not None:
            return own
    return recipe.bits_label()


def weight_bits(recipe: Recipe, model: nn.Module) -> float:
    """Bits a packed checkpoint stores per weight of the block linears under ``recipe``'s weight
    spec (:func:`~channelwise.quant.grid.stored_bits`), averaged over the linears of one block,
    or a step's own count (:meth:`Method.weight_bits`; a mixed-precision step reads the grids
    of ``model`` once it is compressed). A recipe that leaves the weights float counts
    :data:`FLOAT_WEIGHT_BITS` (the 16-bit checkpoints other toolkits compare against)."""
    adapter = adapter_for(model)
    for step in recipe.steps:
        own = build_method(step, recipe).weight_bits(model, adapter)
        if own is not None:
            return own
    if recipe.weights is None:
        return FLOAT_WEIGHT_BITS
    spec = recipe.weights.spec("weight")
    weights = bits = 0
    for module in adapter.block_linears(adapter.block_list(model)[0]).values():
        rows, cols = linear_weight(module, adapter.transposed_weights).shape
        weights += rows * cols
        bits += stored_bits(rows, cols, spec)
    return bits / weights


def recipes_fp_first(recipes: list[str | Path | Recipe]) -> list[Recipe]:
    """Every recipe loaded and validated before any work, a name given twice refused, ``fp``
    added if missing and moved first (the baseline of every row)."""
    loaded = [load_recipe(name) for name in recipes]
    names = [recipe.name for recipe in loaded]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise RecipeError(
            f"recipe name{'s' if len(repeated) > 1 else ''} {', '.join(repeated)} given more "
            "than once: each row (and its JSON key) is one recipe; rename or drop the repeats"
        )
    if not any(recipe.is_float for recipe in loaded):
        loaded.insert(0, load_recipe("fp"))
    loaded.sort(key=lambda recipe: not recipe.is_float)
    return loaded


def compare(
    recipes: list[str | Path | Recipe],
    model: str | None = None,
    protocol: Protocol | None = None,
    batch_size: int = 4,
    progress: bool = True,
    device: str = "auto",
    on_row: OnRow | None = None,
    kv_chunk: int = 32,
    kv_tokens: int = 2048,
) -> list[ComparisonRow]:
    """Quantize a fresh copy of ``model`` with each recipe and evaluate it on ``protocol``.

    ``recipes`` are preset names, YAML paths or ``Recipe`` objects (e.g. variants built in code).
    ``fp`` is always measured first (added if missing), so every Δ% is within one run.
    ``on_row(row, result)`` is called as each row is measured (``result`` is ``None`` for a float
    recipe), e.g. to print progress or a method's diagnostics from ``result.methods``.

    A recipe with a ``kv_cache`` is evaluated through its compressed cache, prefilled in chunks
    of ``kv_chunk`` tokens (``channelwise.kvcache.evaluate``), and its ``kv_ratio`` is the bytes
    its cache holds after the first ``kv_tokens`` evaluation tokens against a float16 cache.
    """
    protocol = protocol or Protocol()
    for name, value in (
        ("batch_size", batch_size),
        ("kv_chunk", kv_chunk),
        ("kv_tokens", kv_tokens),
    ):
        if value < 1:
            raise ChannelwiseError(f"{name} must be at least 1, got {value}")
    loaded = recipes_fp_first(recipes)
    reference, tokenizer = load_model(model, device=device)
    for recipe in loaded:
        plan(reference, recipe)
    windows = protocol.eval_tokens(tokenizer)
    calibration = None
    rows: list[ComparisonRow] = []
    baseline = None
    for recipe in loaded:
        fresh, _ = load_model(model, device=device)
        calib_s, peak_mb, result = 0.0, 0.0, None
        if not recipe.is_float:
            if calibration is None and needs_calibration(recipe):
                calibration = protocol.calibration_tokens(tokenizer)
            with PeakMemory(model_device(fresh)) as peak:
                result = quantize(fresh, recipe, calibration, progress=progress)
            calib_s, peak_mb = result.calib_seconds, peak.added_mb
        start = time.perf_counter()
        kv_ratio = None
        if recipe.kv_cache is not None:
            ppl = chunked_perplexity(
                fresh, windows, chunk=kv_chunk, batch_size=batch_size, progress=progress
            )
            held, fp16 = kv_bytes(fresh, windows.reshape(1, -1)[:, :kv_tokens], chunk=kv_chunk)
            kv_ratio = held / fp16
        else:
            ppl = perplexity(fresh, windows, batch_size=batch_size, progress=progress)
        eval_s = time.perf_counter() - start
        baseline = baseline if baseline is not None else ppl
        row = ComparisonRow(
            recipe.name,
            bits_label(recipe),
            ppl,
            100.0 * (ppl / baseline - 1.0),
            calib_s,
            eval_s,
            peak_mb,
            kv_ratio,
            weight_bits(recipe, reference),
        )
        rows.append(row)
        log.info("%s: ppl %.3f", recipe.name, ppl)
        if on_row is not None:
            on_row(row, result)
        del fresh
    return rows
