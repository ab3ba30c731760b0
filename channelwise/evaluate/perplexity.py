"""Token perplexity on fixed windows: ``exp(mean negative log-likelihood)``.

Each window is scored on its own (no context carried across windows): every token but the first
of a window is predicted from the tokens before it in that window.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from channelwise.engine import model_device
from channelwise.errors import DataSourceError, NonFiniteError, UnsupportedModelError
from channelwise.state import RECIPE_ATTR


def window_nll(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> torch.Tensor:
    """Summed next-token NLL of each window, ``(n_windows, seq)`` → ``(n_windows,)`` float64."""
    if not has_lm_head(model):
        raise UnsupportedModelError(
            f"perplexity needs a language model with its output head; got {type(model).__name__}"
        )
    check_token_ids(windows, model, "evaluation windows", min_length=2)
    if batch_size < 1:
        raise DataSourceError(f"batch_size must be at least 1, got {batch_size}")
    check_window_length(model, windows.shape[-1])
    windows = windows.long()
    device = model_device(model)
    totals = []
    with torch.no_grad():
        for start in tqdm(
            range(0, windows.shape[0], batch_size),
            desc="perplexity",
            disable=not progress,
            leave=False,
        ):
            batch = windows[start : start + batch_size].to(device)
            totals.append(next_token_nll(model(batch, use_cache=False).logits, batch))
    return torch.cat(totals)


def has_lm_head(model: nn.Module) -> bool:
    """Whether ``model`` is a language model with its output head (a vision backbone, or a
    bare ``LlamaModel``, has none)."""
    head = getattr(model, "get_output_embeddings", None)
    return callable(head) and head() is not None


def check_token_ids(ids: object, model: nn.Module, what: str, min_length: int = 1) -> None:
    """Refuse anything but integer token ids ``(n, seq)`` with ``n ≥ 1``, ``seq ≥ min_length``
    and every id inside ``model``'s vocabulary (its input embedding's rows), in one line naming
    ``what``: not a traceback from the embedding lookup or the loss."""
    if (
        not isinstance(ids, torch.Tensor)
        or ids.dim() != 2
        or ids.is_floating_point()
        or (ids.dtype in (torch.bool, torch.complex64, torch.complex128))
    ):
        got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids)
        raise DataSourceError(f"{what} must be integer token ids (n, seq_len); got {got}")
    if ids.shape[0] == 0 or ids.shape[1] < min_length:
        raise DataSourceError(
            f"{what} {tuple(ids.shape)}: need at least one sequence of {min_length} or more tokens"
        )
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        bad = low if low < 0 else high
        raise DataSourceError(
            f"{what} hold token id {bad}, outside the model's vocabulary 0..{vocab - 1}"
            if vocab is not None
            else f"{what} hold the negative token id {bad}"
        )


def check_window_length(model: nn.Module, length: int) -> None:
    """Refuse evaluation windows longer than the positions ``model`` was trained on."""
    check_positions(model, length, f"windows of {length} tokens", "--seqlen")


def check_positions(model: nn.Module, length: int, what: str, option: str) -> None:
    """Refuse ``length`` tokens beyond the positions ``model`` was trained on (its config's
    ``max_position_embeddings`` / GPT-2's ``n_positions``, where it has one): learned position
    tables (GPT-2, OPT) would index past their end, rotary ones leave their trained range.
    ``what`` and ``option`` word the error (``"calibration samples of 600 tokens"``,
    ``"--seqlen"``)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and length > limit:
        raise DataSourceError(
            f"{what} exceed the model's {limit} positions (max_position_embeddings); "
            f"use {option} so that at most {limit} tokens are needed"
        )


def next_token_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Summed NLL of each row's tokens 1… given ``logits`` ``(rows, seq, vocab)`` → float64 CPU."""
    logits = logits[:, :-1].float()
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
    ).view(batch.shape[0], -1)
    return nll.double().sum(dim=1).cpu()


def perplexity_from_nll(nll: torch.Tensor, windows: torch.Tensor, what: str) -> float:
    """``exp(mean NLL)`` over the predicted tokens of ``windows``; NaN/inf names ``what``."""
    if not torch.isfinite(nll).all():
        raise NonFiniteError(f"the model produced NaN/inf logits {what}")
    return math.exp(nll.sum().item() / (windows.shape[0] * (windows.shape[1] - 1)))


def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> float:
    """Perplexity over all predicted tokens of ``windows`` ``(n_windows, seq)``."""
    nll = window_nll(model, windows, batch_size, progress)
    return perplexity_from_nll(nll, windows, f"on the evaluation windows; {overflow_hint(model)}")


def overflow_hint(model: nn.Module, remedy: str = "wider bits or an outlier method") -> str:
    """Why a model's outputs are NaN/inf: its recipe overflows, or (a model no recipe
    compressed) its own weights or activations are broken."""
    if getattr(model, RECIPE_ATTR, None) is None:
        return (
            "the model carries no recipe: its own weights hold NaN/inf or its activations overflow"
        )
    return f"the recipe overflows (try {remedy})"
