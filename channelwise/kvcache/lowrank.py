"""Low-rank key/value projections: the channel-shrinking part of CSKV.

CSKV (Wang et al., "CSKV: Training-Efficient Channel Shrinking for KV Cache in Long-Context
Scenarios", arXiv 2409.10593) replaces a key (or value) projection ``k = x·Wᵀ`` — ``x`` one
token's input ``(1, hidden)``, ``W`` the ``nn.Linear`` weight ``(kv_dim, hidden)`` — by two
factors ``A (hidden, r)`` and ``B (r, kv_dim)``: the cache stores ``c = x·A`` (``r`` features per
token instead of ``kv_dim``) and attention reads ``k̂ = c·B``.

* **Rank**: ``r = floor(density · head_dim) · kv_heads`` (:func:`rank_for`), one global SVD per
  projection per layer, not per head (density 0.5 on SmolLM2's 3 × 64 gives r = 96).
* **ASVD initialisation** (:func:`act_scale`, :func:`asvd_factors`): ``s_j = mean_t |x_tj|^α``
  (α = 0.5), ``S = diag(s)``, ``S·Wᵀ = U Σ Vᵀ``, ``A = S⁻¹ U_r √Σ_r``, ``B = √Σ_r V_rᵀ``. ``S·A·B``
  is the best rank-r approximation of ``S·Wᵀ``, so ``A·B`` minimises ``‖S (Wᵀ − A·B)‖_F``.
* **Fine-tuning** (:func:`finetune_factors`): only ``A`` and ``B`` train, on the relative MSE
  ``‖K − Q(x·A)·B‖² / ‖K‖²`` with ``K = x·Wᵀ``. RoPE rotates each (i, i + d/2) channel pair of a
  head by an angle that depends only on the position, an orthogonal map applied identically to
  ``K`` and ``K̂``, so this MSE before RoPE equals the paper's MSE after RoPE. Attention uses the
  original K/V while training, so layers are independent and train one by one on that layer's
  recorded inputs. ``Q`` (QAT, optional) is fake quantization with a straight-through estimator;
  keys: per channel over 32-token windows (``GroupQuantCodec(bits, 32, "token").spec``, KIVI),
  values: per token over groups of ``r / kv_heads`` channels
  (``GroupQuantCodec(bits, r // kv_heads, "channel").spec``).

Deviations from the paper and its code (wln20/CSKV):

* Optimisation: the paper runs the whole model through one epoch of 1024-token sequences with
  Adam at lr 5e-5 (bf16). We train each projection alone for ``steps`` Adam steps (default 300)
  on random windows of ``batch_tokens`` of its recorded inputs. ``lr`` is relative: each factor's
  step size is ``lr`` × its initial RMS, and ``A`` is trained as ``diag(mean|x|)·A`` on inputs
  divided by ``mean|x|`` (the same product, better conditioned: Adam would otherwise move the rows
  of outlier channels, whose inputs are ~100× larger, ~100× too far). The full-data loss is
  checked every ``eval_every`` steps and the best factors are kept, the ASVD ones included, so
  fine-tuning never makes the loss worse.
* STE: the gradient passes for values inside their block's clip range ``[m, m + s·(2^b − 1)]``
  (min-max ranges, so all values except those cut by float16 rounding of ``s`` and ``m``); the
  official quantizer also zeroes it at each block's minimum and maximum. The scales and
  minimums get no gradient (as in the official code). Levels are ``2^b − 1`` with a float
  minimum and float16 scales, the project's KIVI quantizer, not the official integer zero point.
* ASVD statistic: the mean of ``|x|`` over all calibration tokens (the official code sums
  per-batch means, the same up to a constant factor, which ASVD is invariant to); a channel
  never active gets ``s_j = 10⁻⁶ · max(s)`` instead of the official ``+10⁻⁶`` on every channel.
* Calibration text is the project's calibration set (Emma), not the Pile subset.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from channelwise.errors import KVCacheError, QuantConfigError
from channelwise.quant.core import QParams, QuantSpec, compute_qparams, fake_quantize
from channelwise.quant.granularity import PerGroup

ASVD_ALPHA = 0.5
_SCALE_FLOOR = 1e-6  # an inactive channel's ASVD scale, relative to the largest


def act_scale(x: Tensor, alpha: float = ASVD_ALPHA) -> Tensor:
    """ASVD input-channel scale ``s_j = (mean_t |x_tj|)^alpha``: ``(..., hidden)`` → ``(hidden,)``.

    float32, on ``x``'s device. To pool several batches, concatenate them (or average the
    per-batch ``mean|x|`` weighted by token count, then raise to ``alpha``).
    """
    _check_tensor("x", x, min_dim=2)
    mean_abs = x.detach().float().reshape(-1, x.shape[-1]).abs().mean(dim=0)
    return mean_abs.pow(alpha)


def rank_for(density: float, head_dim: int, kv_heads: int) -> int:
    """Total rank ``floor(density · head_dim) · kv_heads`` (CSKV's per-head compressed width).

    Rounding per head keeps ``r`` a multiple of ``kv_heads``, so per-token value groups of
    ``r / kv_heads`` channels divide it. SmolLM2 (3 × 64): density 0.5 → 96.
    """
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise KVCacheError(f"density must be in (0, 1], got {density!r}")
    for name, value in (("head_dim", head_dim), ("kv_heads", kv_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KVCacheError(f"{name} must be a positive integer, got {value!r}")
    per_head = math.floor(density * head_dim + 1e-9)
    if per_head < 1:
        raise KVCacheError(
            f"density {density} keeps no channel of a {head_dim}-channel head; "
            f"use a density of at least {1 / head_dim:.4g}"
        )
    return per_head * kv_heads


def asvd_factors(weight: Tensor, scale: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Activation-aware SVD factors of ``weight`` ``(out, hidden)``: ``A (hidden, rank)``,
    ``B (rank, out)`` with ``x·A·B ≈ x·weightᵀ``, float32 on ``weight``'s device.

    ``scale`` ``(hidden,)`` is :func:`act_scale` of the calibration inputs (all ones gives the
    plain truncated SVD). ``A·B`` minimises ``‖diag(scale)·(weightᵀ − A·B)‖_F`` over rank
    ``rank``; the SVD runs in float64 so full rank reproduces ``weightᵀ`` to float32 rounding.
    """
    _check_tensor("weight", weight, min_dim=2, max_dim=2)
    out_dim, hidden = weight.shape
    _check_tensor("scale", scale, min_dim=1, max_dim=1)
    if scale.shape[0] != hidden:
        raise KVCacheError(
            f"scale has {scale.shape[0]} channels but weight {tuple(weight.shape)} has "
            f"{hidden} inputs; compute it with act_scale on this projection's inputs"
        )
    _check_rank(rank, out_dim, hidden)
    s = scale.detach().to(device=weight.device, dtype=torch.float64)
    if bool((s < 0).any()):
        raise KVCacheError("ASVD scales must be non-negative; use act_scale(x)")
    if not bool((s > 0).any()):
        raise KVCacheError("every ASVD scale is 0 (all-zero calibration inputs?)")
    s = torch.clamp(s, min=_SCALE_FLOOR * s.max().item())
    u, sigma, vh = torch.linalg.svd(s[:, None] * weight.detach().double().T, full_matrices=False)
    root = sigma[:rank].sqrt()
    a = u[:, :rank] * root / s[:, None]
    b = root[:, None] * vh[:rank]
    return a.float(), b.float()


def fake_quantize_ste(c: Tensor, spec: QuantSpec) -> Tensor:
    """``fake_quantize(c, spec)`` whose gradient passes unchanged to the values inside their
    block's clip range and is 0 outside it (straight-through estimator); ranges get none.

    ``c`` is the compressed cache ``(tokens, r)``.
    """
    if c.ndim != 2:
        raise KVCacheError(f"compressed features are (tokens, rank), got shape {tuple(c.shape)}")
    with torch.no_grad():
        qparams = compute_qparams(c, spec)
        quantized = fake_quantize(c, spec, qparams)
        lo, hi = _clip_range(qparams, spec, c.shape)
        inside = ((c >= lo) & (c <= hi)).to(c.dtype)
    return quantized + (c - c.detach()) * inside


def relative_mse(
    x: Tensor, weight: Tensor, a: Tensor, b: Tensor, quant: QuantSpec | None = None
) -> float:
    """``‖K − Q(x·A)·B‖² / ‖K‖²`` with ``K = x·weightᵀ``, over all tokens of ``x``."""
    x, weight = _check_problem(x, weight, a, b, quant)
    with torch.no_grad():
        target = x @ weight.T
        return _relative_mse(x, target, a.float(), b.float(), quant)


def finetune_factors(
    x: Tensor,
    weight: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    quant: QuantSpec | None = None,
    steps: int = 300,
    lr: float = 1e-2,
    batch_tokens: int = 1024,
    eval_every: int = 50,
    seed: int = 0,
) -> tuple[Tensor, Tensor, dict]:
    """Train ``A (hidden, r)`` and ``B (r, out)`` so that ``Q(x·A)·B`` matches ``x·weightᵀ``.

    ``x`` ``(tokens, hidden)`` are the projection's recorded inputs in sequence order; each
    step draws ``batch_tokens`` of them as whole windows (of the key quantizer's token group
    under token-window QAT, so the token count must be a multiple of it, and windows never
    straddle ``x``'s aligned groups). Adam with relative ``lr`` (see the module docstring);
    the best full-data loss seen (every ``eval_every`` steps and at the end, the initial one
    included) wins. Returns float32 factors on ``x``'s device and ``{"loss_init", "loss_final",
    "best_step", "steps", "seconds"}`` with the losses as relative MSE (under ``quant`` if given).
    """
    x, weight = _check_problem(x, weight, a, b, quant)
    for name, value, low in (("steps", steps, 0), ("batch_tokens", batch_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise KVCacheError(f"{name} must be an integer ≥ {low}, got {value!r}")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise KVCacheError(f"eval_every must be a positive integer, got {eval_every!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise KVCacheError(f"lr must be a positive number, got {lr!r}")
    start = time.perf_counter()
    window = _token_window(quant)
    tokens = x.shape[0]
    per_batch = max(1, min(batch_tokens, tokens) // window)
    n_windows = tokens // window

    # Train diag(d)·A on x / d, d = mean|x|: the same product, with every input channel at
    # unit scale, so Adam's per-element steps suit outlier and quiet channels alike.
    d = x.abs().mean(dim=0)
    d = torch.where(d > 0, d, torch.ones_like(d))
    xn = x / d
    target = x @ weight.T
    a_n = (a.detach().float().to(x.device) * d[:, None]).requires_grad_(True)
    b_t = b.detach().float().to(x.device).clone().requires_grad_(True)
    groups = [
        {"params": [p], "lr": lr * max(p.detach().square().mean().sqrt().item(), 1e-12)}
        for p in (a_n, b_t)
    ]
    optimizer = torch.optim.Adam(groups)
    generator = torch.Generator(device="cpu").manual_seed(seed)

    with torch.no_grad():
        loss_init = _relative_mse(xn, target, a_n, b_t, quant)
    best = (loss_init, 0, a_n.detach().clone(), b_t.detach().clone())
    for step in range(1, steps + 1):
        picks = torch.randperm(n_windows, generator=generator)[:per_batch].to(x.device)
        rows = (picks[:, None] * window + torch.arange(window, device=x.device)).reshape(-1)
        xb, kb = xn[rows], target[rows]
        c = xb @ a_n
        if quant is not None:
            c = fake_quantize_ste(c, quant)
        loss = (c @ b_t - kb).square().sum() / kb.square().sum().clamp_min(1e-30)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                full = _relative_mse(xn, target, a_n, b_t, quant)
            if full < best[0]:
                best = (full, step, a_n.detach().clone(), b_t.detach().clone())
    loss_final, best_step, a_best, b_best = best
    report = {
        "loss_init": loss_init,
        "loss_final": loss_final,
        "best_step": best_step,
        "steps": steps,
        "seconds": time.perf_counter() - start,
    }
    if best_step == 0:  # the ASVD factors themselves, not a rounded round trip through d
        return a.detach().float().to(x.device), b.detach().float().to(x.device), report
    return a_best / d[:, None], b_best, report


def _relative_mse(
    x: Tensor, target: Tensor, a: Tensor, b: Tensor, quant: QuantSpec | None
) -> float:
    c = x @ a
    if quant is not None:
        c = fake_quantize(c, quant)
    err = (c @ b - target).square().sum().item()
    norm = target.square().sum().item()
    if not math.isfinite(err):
        return math.inf
    return err / norm if norm > 0 else err


def _clip_range(qparams: QParams, spec: QuantSpec, shape: torch.Size) -> tuple[Tensor, Tensor]:
    """Per-element lowest and highest representable value of a ``(rows, cols)`` tensor."""
    rows, cols = shape[0], shape[-1]
    br, bc = spec.granularity.block_shape(rows, cols)

    def expand(t: Tensor) -> Tensor:
        return t.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)

    scale, zero = expand(qparams.scale), expand(qparams.zero_point)
    if spec.float_zero:
        return zero + spec.qmin * scale, zero + spec.qmax * scale
    return (spec.qmin - zero) * scale, (spec.qmax - zero) * scale


def _token_window(quant: QuantSpec | None) -> int:
    """Tokens that must be drawn together: the token group of a per-channel quantizer, else 1."""
    g = quant.granularity if quant is not None else None
    return g.size if isinstance(g, PerGroup) and g.along == "output" else 1


def _check_tensor(name: str, t: Tensor, min_dim: int, max_dim: int | None = None) -> None:
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise KVCacheError(f"{name} must be a floating-point tensor, got {type(t).__name__}")
    if t.ndim < min_dim or (max_dim is not None and t.ndim > max_dim) or t.numel() == 0:
        raise KVCacheError(f"{name} has shape {tuple(t.shape)}; expected {_SHAPES[name]}")
    if not bool(torch.isfinite(t).all()):
        raise KVCacheError(f"{name} contains NaN or inf values; check the recorded tensors")


_SHAPES = {
    "x": "(tokens, hidden), non-empty",
    "weight": "(out, hidden), the nn.Linear weight",
    "scale": "(hidden,)",
    "a": "(hidden, rank)",
    "b": "(rank, out)",
}


def _check_rank(rank: int, out_dim: int, hidden: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(out_dim, hidden):
        raise KVCacheError(
            f"rank must be an integer in 1..{min(out_dim, hidden)} for a ({out_dim}, {hidden}) "
            f"weight, got {rank!r}; see rank_for(density, head_dim, kv_heads)"
        )


def _check_problem(
    x: Tensor, weight: Tensor, a: Tensor, b: Tensor, quant: QuantSpec | None
) -> tuple[Tensor, Tensor]:
    """Validate shapes and values; ``x`` ``(tokens, hidden)`` and ``weight`` as float32."""
    for name, t, dims in (("x", x, 2), ("weight", weight, 2), ("a", a, 2), ("b", b, 2)):
        _check_tensor(name, t, min_dim=dims, max_dim=dims)
    out_dim, hidden = weight.shape
    if x.shape[1] != hidden or a.shape[0] != hidden or b.shape[1] != out_dim:
        raise KVCacheError(
            f"shapes do not chain: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"a {tuple(a.shape)}, b {tuple(b.shape)}; expected x (tokens, hidden), weight "
            f"(out, hidden), a (hidden, rank), b (rank, out)"
        )
    if a.shape[1] != b.shape[0]:
        raise KVCacheError(f"a has rank {a.shape[1]} but b has rank {b.shape[0]}")
    _check_rank(a.shape[1], out_dim, hidden)
    if quant is not None:
        if not isinstance(quant, QuantSpec):
            raise KVCacheError(f"quant must be a QuantSpec or None, got {type(quant).__name__}")
        window = _token_window(quant)
        if x.shape[0] % window:
            raise KVCacheError(
                f"token-window quantization groups {window} tokens, but x has {x.shape[0]}; "
                f"record whole windows (drop the last {x.shape[0] % window} tokens)"
            )
        try:
            quant.granularity.block_shape(window, a.shape[1])
        except QuantConfigError as exc:
            raise KVCacheError(
                f"quantizer does not fit the rank-{a.shape[1]} features: {exc}"
            ) from None
    return x.detach().float(), weight.detach().float().to(x.device)
