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
from channelwise.errors import NonFiniteError


def window_nll(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> torch.Tensor:
    """Summed next-token NLL of each window, ``(n_windows, seq)`` → ``(n_windows,)`` float64."""
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
            logits = model(batch, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
            ).view(batch.shape[0], -1)
            totals.append(nll.double().sum(dim=1).cpu())
    return torch.cat(totals)


def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> float:
    """Perplexity over all predicted tokens of ``windows`` ``(n_windows, seq)``."""
    nll = window_nll(model, windows, batch_size, progress)
    if not torch.isfinite(nll).all():
        raise NonFiniteError(
            "the model produced NaN/inf logits on the evaluation windows; "
            "the recipe overflows (try wider bits or an outlier method)"
        )
    return math.exp(nll.sum().item() / (windows.shape[0] * (windows.shape[1] - 1)))
