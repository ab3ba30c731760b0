"""The benchmark protocol every method reports on.

Calibrate on *Emma* (128 samples × 512 tokens, seeded), evaluate perplexity on *Pride and
Prejudice*: 16 non-overlapping windows of 512 tokens from token 5000. Calibrating on the
evaluation text is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from channelwise.data import calibration_samples, eval_windows, load_text, tokenize_text
from channelwise.data.sources import source_identity
from channelwise.errors import DataSourceError


@dataclass(frozen=True)
class Protocol:
    """Where calibration and evaluation tokens come from, and how many."""

    calib_data: str = "emma"
    eval_data: str = "prideprejudice"
    seqlen: int = 512
    windows: int = 16
    start: int = 5000
    calib_samples: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.seqlen < 2:
            raise DataSourceError(
                f"seqlen must be at least 2 (a window predicts its tokens after the first), "
                f"got {self.seqlen}"
            )
        shared = source_identity(self.calib_data, "train") & source_identity(self.eval_data, "test")
        if shared:
            raise DataSourceError(
                f"calibration ('{self.calib_data}') and evaluation ('{self.eval_data}') both "
                f"read {sorted(shared)[0]}; never calibrate on the evaluation text: pick "
                "another source"
            )

    def with_(self, **changes) -> Protocol:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def eval_tokens(self, tokenizer) -> torch.Tensor:
        """Evaluation windows ``(windows, seqlen)``."""
        ids = tokenize_text(tokenizer, load_text(self.eval_data, split="test"))
        return eval_windows(ids, self.seqlen, self.windows, self.start)

    def calibration_tokens(self, tokenizer) -> torch.Tensor:
        """Calibration samples ``(calib_samples, seqlen)``, drawn reproducibly."""
        ids = tokenize_text(tokenizer, load_text(self.calib_data, split="train"))
        return calibration_samples(ids, self.calib_samples, self.seqlen, self.seed)
