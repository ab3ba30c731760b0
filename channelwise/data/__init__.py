"""Calibration and evaluation text: sources, the embedded Austen novels, and token windows."""

from channelwise.data.austen import AUSTEN_NOVELS, austen_text, ensure_austen
from channelwise.data.sources import describe_sources, load_text
from channelwise.data.tokens import calibration_samples, eval_windows, tokenize_text

__all__ = [
    "AUSTEN_NOVELS",
    "austen_text",
    "calibration_samples",
    "describe_sources",
    "ensure_austen",
    "eval_windows",
    "load_text",
    "tokenize_text",
]
