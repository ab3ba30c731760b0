"""Run several recipes on one model and protocol, measured in the same run as the baseline."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

from channelwise.compress import needs_calibration, plan, quantize
from channelwise.evaluate import perplexity
from channelwise.models import load_model
from channelwise.protocol import Protocol
from channelwise.recipe import load_recipe

log = logging.getLogger(__name__)


@dataclass
class ComparisonRow:
    """One recipe's outcome; ``delta_pct`` is relative to the ``fp`` perplexity of the same run."""

    recipe: str
    bits: str
    ppl: float
    delta_pct: float
    calib_s: float
    eval_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def compare(
    recipes: list[str],
    model: str | None = None,
    protocol: Protocol | None = None,
    batch_size: int = 4,
    progress: bool = True,
    device: str = "auto",
) -> list[ComparisonRow]:
    """Quantize a fresh copy of ``model`` with each recipe and evaluate it on ``protocol``.

    ``fp`` is always measured first (added if missing), so every Δ% is within one run.
    """
    protocol = protocol or Protocol()
    loaded = [load_recipe(name) for name in recipes]  # validate every recipe before any work
    if not any(recipe.is_float for recipe in loaded):
        loaded.insert(0, load_recipe("fp"))
    loaded.sort(key=lambda recipe: not recipe.is_float)
    reference, tokenizer = load_model(model, device=device)
    for recipe in loaded:
        plan(reference, recipe)
    windows = protocol.eval_tokens(tokenizer)
    calibration = None
    rows: list[ComparisonRow] = []
    baseline = None
    for recipe in loaded:
        fresh, _ = load_model(model, device=device)
        calib_s = 0.0
        if not recipe.is_float:
            if calibration is None and needs_calibration(recipe):
                calibration = protocol.calibration_tokens(tokenizer)
            calib_s = quantize(fresh, recipe, calibration, progress=progress).calib_seconds
        start = time.perf_counter()
        ppl = perplexity(fresh, windows, batch_size=batch_size, progress=progress)
        eval_s = time.perf_counter() - start
        baseline = baseline if baseline is not None else ppl
        rows.append(
            ComparisonRow(
                recipe.name,
                recipe.bits_label(),
                ppl,
                100.0 * (ppl / baseline - 1.0),
                calib_s,
                eval_s,
            )
        )
        log.info("%s: ppl %.3f", recipe.name, ppl)
    return rows
