"""Turn text into token ids and cut the ids into evaluation and calibration windows."""

from typing import Any

import torch

from channelwise.errors import DataSourceError


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize the whole ``text`` without special tokens; return 1-D long ids."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors=None)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(
    ids: torch.Tensor, seqlen: int = 512, n_windows: int = 16, start: int = 5000
) -> torch.Tensor:
    """Return ``n_windows`` consecutive non-overlapping ``seqlen``-id windows from ``start``."""
    _check_stream(ids)
    _check_positive(seqlen=seqlen, n_windows=n_windows)
    if start < 0:
        raise DataSourceError(f"start must be non-negative, got {start}")
    needed = start + n_windows * seqlen
    if ids.numel() < needed:
        raise DataSourceError(
            f"evaluation needs {needed} tokens ({start} skipped + {n_windows} windows x {seqlen}) "
            f"but the text has {ids.numel()}; use a longer text, fewer windows, or a smaller start"
        )
    return ids[start:needed].reshape(n_windows, seqlen).clone()


def calibration_samples(
    ids: torch.Tensor, n_samples: int = 128, seqlen: int = 512, seed: int = 0
) -> torch.Tensor:
    """Return ``n_samples`` windows of ``seqlen`` ids at reproducible random offsets."""
    _check_stream(ids)
    _check_positive(n_samples=n_samples, seqlen=seqlen)
    if ids.numel() < seqlen:
        raise DataSourceError(
            f"calibration needs at least {seqlen} tokens per sample but the text has "
            f"{ids.numel()}; use a longer text or a shorter seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n_samples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def _check_stream(ids: torch.Tensor) -> None:
    """Reject anything but a 1-D integer tensor of token ids."""
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
        raise DataSourceError(
            f"token ids must be a 1-D integer tensor, got shape {tuple(ids.shape)} of {ids.dtype}"
        )


def _check_positive(**values: int) -> None:
    """Reject non-positive sizes."""
    for name, value in values.items():
        if value <= 0:
            raise DataSourceError(f"{name} must be positive, got {value}")
