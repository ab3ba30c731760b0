"""Fake-quantization of the attention matmul inputs: q, k, v and the attention probabilities.

Installed through transformers' attention interface: the model runs a registered ``channelwise``
attention function, which quantizes what the block's attention module has asked for and then
computes scaled dot-product attention. ``k`` and ``v`` are quantized as the attention reads them,
after RoPE and after the cache update — this is the simulated KV-cache hook point (every cached
key/value goes through the quantizer). Tensors are ``(batch, heads, tokens, head_dim)``, so on the
quantizer's 2-D view a row is one head's vector for one token: ``token`` granularity is per token
per head; ``group`` runs along ``head_dim``.

An entry is a :class:`QuantSpec` (dynamic: ranges computed per call) or a *static* quantizer
calibrated once on calibration data (:class:`StaticQuantizer`, or the log√2 quantizer of
post-softmax probabilities, :class:`LogSqrt2Quantizer`, or I&S-ViT's shift-uniform-log2 one,
:class:`ShiftLog2Quantizer`): :func:`calibrate_attention_quantizers`
fills every uncalibrated static entry of a block from its calibration batches. Until then a
static entry passes values through (the block's earlier calibration forwards run in float
there); ``compress.quantize`` checks that none is left uncalibrated. A module's
``is_causal`` (False in Vision Transformers) decides whether a causal mask applies.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from channelwise.errors import KernelInputError
from channelwise.quant.core import (
    QParams,
    QuantSpec,
    _check_finite,
    calibration_rows,
    calibration_sample,
    fake_quantize,
    spec_from_dict,
    spec_to_dict,
    static_qparams,
    straight_through,
)

ATTENTION_IMPLEMENTATION = "channelwise"
_ATTR = "_channelwise_attention_quantizers"
_RECORD_ATTR = "_channelwise_attention_record"


#: The attention inputs a quantizer can sit on, in the order they are calibrated.
ATTENTION_INPUTS = ("q", "k", "v", "probs")


@dataclass
class StaticQuantizer:
    """Uniform fake-quantization with ranges calibrated once by ``spec``'s range method, per
    tensor over the calibration values (an MSE search over a seeded sample of them, extremes
    kept: :func:`~channelwise.quant.core.static_qparams`)."""

    spec: QuantSpec
    qparams: QParams | None = None

    @property
    def calibrated(self) -> bool:
        return self.qparams is not None

    def calibrate(self, samples: list[Tensor]) -> None:
        self.qparams = static_qparams(calibration_rows(samples), self.spec)

    def __call__(self, x: Tensor) -> Tensor:
        if self.qparams is None:  # calibration of earlier parts of the block: float
            return x
        return fake_quantize(x, self.spec, self.qparams)

    def describe(self) -> dict:
        return {"kind": "uniform", "spec": spec_to_dict(self.spec)}

    def tensors(self) -> dict[str, Tensor]:
        return {"scale": self.qparams.scale, "zero_point": self.qparams.zero_point}


@dataclass
class LogSqrt2Quantizer:
    """RepQ-ViT's log√2 quantizer of post-softmax probabilities (arXiv 2212.08254, §3.3):
    ``q = clamp(round(−2·log2(A/Δ)), 0, 2^b − 1)``, ``Â = Δ·2^(−q/2)``; a value whose code would
    reach ``2^b`` (or an exact zero) becomes 0. ``Δ`` is picked by squared error among the
    ``percentiles`` of the calibration probabilities (and their maximum)."""

    bits: int
    delta: float | None = None
    percentiles: tuple[float, ...] = field(default=(0.999, 0.9999, 0.99999))

    @property
    def calibrated(self) -> bool:
        return self.delta is not None

    def calibrate(self, samples: list[Tensor]) -> None:
        values = _sampled_values(samples)
        levels = torch.tensor(self.percentiles, device=values.device, dtype=values.dtype)
        candidates = torch.quantile(values, levels).tolist()
        candidates.append(values.max().item())
        candidates = [c for c in candidates if c > 0] or [1.0]
        self.delta = min(candidates, key=lambda d: (log_sqrt2(values, self.bits, d) - values)
                         .square().mean().item())  # fmt: skip

    def __call__(self, x: Tensor) -> Tensor:
        if self.delta is None:  # calibration of earlier parts of the block: float
            return x
        return log_sqrt2(x, self.bits, self.delta)

    def describe(self) -> dict:
        return {"kind": "log_sqrt2", "bits": self.bits}

    def tensors(self) -> dict[str, Tensor]:
        return {"delta": torch.tensor([self.delta], dtype=torch.float64)}


def log_sqrt2(x: Tensor, bits: int, delta: float) -> Tensor:
    """Fake-quantize non-negative ``x`` on the grid ``Δ·2^(−q/2)``, q in [0, 2^bits − 1]."""
    with torch.no_grad():
        codes, zero = _log_sqrt2_grid(x, bits, delta)
        out = (delta * torch.exp2(-codes / 2)).masked_fill_(zero, 0.0)
    return straight_through(x, out.to(x.dtype))


def log_sqrt2_codes(x: Tensor, bits: int, delta: float) -> Tensor:
    """The log√2 codes of non-negative ``x`` (``int64``): ``q`` in [0, 2^bits − 1], or ``2^bits``
    for a value that rounds below the grid (or is 0), which stands for 0."""
    codes, zero = _log_sqrt2_grid(x, bits, delta)
    return codes.long().masked_fill_(zero, 2**bits)


def _log_sqrt2_grid(x: Tensor, bits: int, delta: float) -> tuple[Tensor, Tensor]:
    """Float codes clamped to [0, 2^bits − 1], and where the value is 0 instead."""
    _check_finite(x)
    raw = torch.round(-2.0 * torch.log2(x.detach().float() / delta))  # +inf at 0
    zero = (raw >= 2**bits) | (x.detach() <= 0)
    return raw.clamp_(0, 2**bits - 1), zero


#: The widest log√2 codes :func:`log2_shift_matmul` multiplies in int64.
LOG2_SHIFT_MAX_BITS = 6


def log2_shift_matmul(codes: Tensor, values: Tensor, bits: int) -> Tensor:
    """``(Δ·2^(−q/2)) @ values / Δ`` from log√2 ``codes`` and integer ``values``, in integers
    (on the CPU: torch has no int64 matmul on CUDA).

    RepQ-ViT's reparameterization of the log√2 quantizer to log2 (arXiv 2212.08254, §3.3):
    ``2^(−q/2) = 2^(−⌈q/2⌉)·(√2 if q is odd else 1)``, so the product is two integer sums of
    shifted values, ``E = Σ_{q even} v·2^(S−⌈q/2⌉)`` and ``O`` alike over odd ``q`` with
    ``S = 2^(bits−1)`` the largest shift, and ``(E + √2·O)·2^(−S)`` at the end (float64). Left
    shifts keep every bit, so the result equals the float product to rounding; codes ``2^bits``
    (zeros) add nothing. Inputs whose sums could overflow int64 (wider codes than
    :data:`LOG2_SHIFT_MAX_BITS` bits, or values too large for their count) are refused."""
    where = "log2 shift product"
    if not 1 <= bits <= LOG2_SHIFT_MAX_BITS:
        raise KernelInputError(
            f"{where}: {bits}-bit codes are not supported (1 to {LOG2_SHIFT_MAX_BITS} bits; "
            "wider grids would overflow int64)"
        )
    for name, t in (("codes", codes), ("values", values)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise KernelInputError(f"{where}: {name} must be integers, not {t.dtype}")
        if t.device.type != "cpu":
            raise KernelInputError(f"{where}: {name} are on {t.device}; it runs on the CPU")
    if codes.dim() < 1 or values.dim() < 2 or codes.shape[-1] != values.shape[-2]:
        raise KernelInputError(
            f"{where}: codes {tuple(codes.shape)} and values {tuple(values.shape)} do not "
            "multiply (values need at least 2 dimensions)"
        )
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 2**bits):
        raise KernelInputError(
            f"{where}: codes must lie in [0, 2^{bits}] (2^{bits} stands for 0), got "
            f"[{int(codes.min())}, {int(codes.max())}]"
        )
    top = 2 ** (bits - 1)
    largest = int(values.abs().max()) if values.numel() else 0
    if largest * codes.shape[-1] >= 2 ** (63 - top):
        raise KernelInputError(
            f"{where}: values up to {largest} over {codes.shape[-1]} terms could overflow int64 "
            f"at {bits} bits (keep their sum below 2^{63 - top})"
        )
    codes = codes.long()
    nonzero = codes != 2**bits
    scaled = torch.bitwise_left_shift(torch.ones_like(codes), top - (codes + 1) // 2) * nonzero
    odd = codes % 2 == 1
    values = values.long()
    even_sum = (scaled * ~odd) @ values
    odd_sum = (scaled * odd) @ values
    return (even_sum.double() + 2.0**0.5 * odd_sum.double()) * 2.0**-top


@dataclass
class ShiftLog2Quantizer:
    """I&S-ViT's shift-uniform-log2 quantizer (SULQ) of post-softmax probabilities
    (arXiv 2311.10126, §4.1): ``y = log2(A + η)`` is quantized uniformly over
    ``[lo, hi]`` (the calibration minimum and maximum of ``y``) with ``2^b`` levels, and
    ``Â = 2^round(q·Δ + lo) − η``. The shift ``η`` keeps small probabilities inside the grid
    (a plain log2 grid clamps them all to one code). ``η`` is picked by squared error among
    ``etas``, as the official code (``zysxmu/IaS-ViT``) does.

    Deviations: the official forward pass divides the range by ``2^b`` levels and clamps codes to
    ``[0, 2^b]`` (``2^b + 1`` codes, one more than ``b`` bits hold) while its calibration uses
    ``2^b − 1``; here both use ``2^b − 1``. The dequantized exponent is rounded to an integer
    as in that code (a power of two: a shift in integer hardware)."""

    bits: int
    eta: float | None = None
    lo: float = 0.0
    hi: float = 0.0
    etas: tuple[float, ...] = field(
        default=(0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)
    )

    @property
    def calibrated(self) -> bool:
        return self.eta is not None

    def calibrate(self, samples: list[Tensor]) -> None:
        values = _sampled_values(samples)
        _check_finite(values)
        best = None
        for eta in self.etas:
            shifted = torch.log2(values.clamp_min(0) + eta)
            lo, hi = shifted.min().item(), shifted.max().item()
            error = (shift_uniform_log2(values, self.bits, eta, lo, hi) - values).square().mean()
            if best is None or error.item() < best[0]:
                best = (error.item(), eta, lo, hi)
        _, self.eta, self.lo, self.hi = best

    def __call__(self, x: Tensor) -> Tensor:
        if self.eta is None:  # calibration of earlier parts of the block: float
            return x
        return shift_uniform_log2(x, self.bits, self.eta, self.lo, self.hi)

    def describe(self) -> dict:
        return {"kind": "shift_log2", "bits": self.bits}

    def tensors(self) -> dict[str, Tensor]:
        values = {"eta": self.eta, "lo": self.lo, "hi": self.hi}
        return {k: torch.tensor([v], dtype=torch.float64) for k, v in values.items()}


def shift_uniform_log2(x: Tensor, bits: int, eta: float, lo: float, hi: float) -> Tensor:
    """SULQ fake quantization of non-negative ``x`` (see :class:`ShiftLog2Quantizer`); a
    constant calibration (``hi == lo``) keeps the single value ``2^round(lo) − η``."""
    _check_finite(x)
    levels = 2**bits - 1
    step = (hi - lo) / levels if hi > lo else 1.0
    with torch.no_grad():
        shifted = torch.log2(x.float().clamp_min(0) + eta)
        codes = torch.round((shifted - lo) / step).clamp(0, levels)
        out = torch.exp2(torch.round(codes * step + lo)) - eta
    return straight_through(x, out.to(x.dtype))


def _sampled_values(samples: list[Tensor]) -> Tensor:
    """About 2^20 of the calibration values, flat, every column's extremes kept (what the log
    softmax quantizers search: torch.quantile takes at most 2^24)."""
    return calibration_sample(calibration_rows(samples), min_rows=1).reshape(-1)


#: A quantizer entry: dynamic (a spec) or static (calibrated once).
AttentionQuantizer = QuantSpec | StaticQuantizer | LogSqrt2Quantizer | ShiftLog2Quantizer


@dataclass(frozen=True)
class AttentionQuantizers:
    """Which attention inputs to quantize; ``None`` leaves that input in float."""

    q: AttentionQuantizer | None = None
    k: AttentionQuantizer | None = None
    v: AttentionQuantizer | None = None
    probs: AttentionQuantizer | None = None

    def merged_over(self, other: AttentionQuantizers | None) -> AttentionQuantizers:
        """These entries where ``other`` (e.g. a method's own) has none."""
        if other is None:
            return self
        return replace(
            other,
            **{
                name: getattr(self, name)
                for name in ATTENTION_INPUTS
                if getattr(other, name) is None
            },
        )

    def static(self) -> dict[str, StaticEntry]:
        """The calibrated entries a checkpoint stores (not those a method re-installs)."""
        return {
            name: entry
            for name in ATTENTION_INPUTS
            if (entry := getattr(self, name)) is not None
            and not isinstance(entry, QuantSpec)
            and not getattr(entry, "restored_by_method", False)
        }


StaticEntry = StaticQuantizer | LogSqrt2Quantizer | ShiftLog2Quantizer

#: What each static kind keeps in a saved folder (float64 scalars where the quantizer holds a
#: Python float, so a loaded model computes the same values).
_STATIC_TENSORS = {
    "uniform": ("scale", "zero_point"),
    "log_sqrt2": ("delta",),
    "shift_log2": ("eta", "lo", "hi"),
}


def static_entry(description: dict, tensors: dict[str, Tensor]) -> StaticEntry:
    """Rebuild a calibrated static entry from its ``describe()`` and ``tensors()``; a malformed
    description or a missing tensor raises ``ValueError`` (naming what is wrong)."""
    kind = description.get("kind") if isinstance(description, dict) else None
    if kind not in _STATIC_TENSORS:
        raise ValueError(f"unknown static attention quantizer {description!r}")
    missing = [name for name in _STATIC_TENSORS[kind] if name not in tensors]
    if missing:
        raise ValueError(f"{kind} quantizer without its {', '.join(missing)}")
    if kind == "uniform":
        spec = spec_from_dict(description.get("spec"))
        return StaticQuantizer(spec, QParams(tensors["scale"], tensors["zero_point"]))
    bits = description.get("bits")
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{kind} quantizer with bits {bits!r}")
    if kind == "log_sqrt2":
        return LogSqrt2Quantizer(bits, float(tensors["delta"].reshape(-1)[0]))
    eta, lo, hi = (float(tensors[name].reshape(-1)[0]) for name in ("eta", "lo", "hi"))
    return ShiftLog2Quantizer(bits, eta, lo, hi)


def _apply(entry: AttentionQuantizer, x: Tensor) -> Tensor:
    return fake_quantize(x, entry) if isinstance(entry, QuantSpec) else entry(x)


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def channelwise_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """Attention with the module's quantizers applied; same contract as transformers' sdpa."""
    quant: AttentionQuantizers = getattr(module, _ATTR, None) or AttentionQuantizers()
    recorder = getattr(module, _RECORD_ATTR, None)
    if recorder is not None:
        for name, tensor in (("q", query), ("k", key), ("v", value)):
            if name in recorder:
                recorder[name].append(tensor.detach())
    if quant.q is not None:
        query = _apply(quant.q, query)
    if quant.k is not None:
        key = _apply(quant.k, key)
    if quant.v is not None:
        value = _apply(quant.v, value)
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    causal = getattr(module, "is_causal", True)
    softcap = kwargs.get("softcap")
    if quant.probs is None and softcap is None and (recorder is None or "probs" not in recorder):
        causal = causal and attention_mask is None and query.shape[2] > 1
        out = torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=_align(attention_mask, query, key),
            dropout_p=dropout,
            scale=scaling,
            is_causal=causal and key.shape[2] == query.shape[2],
        )
        return out.transpose(1, 2).contiguous(), None
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:  # Gemma 2's logit soft-capping, as its eager attention does it
        scores = torch.tanh(scores / softcap) * softcap
    # The most negative finite value, as eager attention does: a fully masked (padding) row gets
    # uniform probabilities instead of NaN.
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        scores = scores + attention_mask  # an additive mask or bias (Swin's relative positions)
    elif causal or attention_mask is not None:
        scores = scores.masked_fill(
            ~_keep_mask(attention_mask, query, key), torch.finfo(scores.dtype).min
        )
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if recorder is not None and "probs" in recorder:
        recorder["probs"].append(probs.detach())
    if quant.probs is not None:
        probs = _apply(quant.probs, probs)
    out = torch.matmul(probs, value)
    return out.transpose(1, 2).contiguous(), probs


def _align(mask: Tensor | None, query: Tensor, key: Tensor) -> Tensor | None:
    """A causal mask for a query shorter than the keys (decoding with a cache)."""
    if mask is None and 1 < query.shape[2] < key.shape[2]:
        return _keep_mask(None, query, key)
    return mask


def _keep_mask(mask: Tensor | None, query: Tensor, key: Tensor) -> Tensor:
    """Boolean ``(…, q_len, kv_len)``: True where a query may attend to a key."""
    if mask is not None:
        return mask
    q_len, kv_len = query.shape[2], key.shape[2]
    rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
    return torch.arange(kv_len, device=query.device)[None, :] <= rows


def register_attention() -> None:
    """Make ``channelwise`` a valid attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, channelwise_attention)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def install_attention_quantizers(
    model: nn.Module, attention_modules: list[nn.Module], quantizers: AttentionQuantizers
) -> None:
    """Quantize the attention inputs of ``attention_modules`` from now on; entries a method
    already installed on a module (e.g. RepQ-ViT's log√2 probabilities) stay."""
    use_channelwise_attention(model)
    for module in attention_modules:
        setattr(module, _ATTR, quantizers.merged_over(attention_quantizers(module)))


def use_channelwise_attention(model: nn.Module) -> None:
    """Run ``model``'s attention through :func:`channelwise_attention`."""
    register_attention()
    if model.config._attn_implementation != ATTENTION_IMPLEMENTATION:
        model.set_attn_implementation(ATTENTION_IMPLEMENTATION)


def uncalibrated_attention(model: nn.Module) -> list[str]:
    """Names of the attention modules holding a static entry never calibrated."""
    return [
        name
        for name, module in model.named_modules()
        if (quant := attention_quantizers(module)) is not None
        and any(not entry.calibrated for entry in quant.static().values())
    ]


def calibrate_attention_quantizers(module: nn.Module, forward) -> None:
    """Calibrate ``module``'s uncalibrated static entries on what ``forward()`` (the block's
    calibration batches) feeds them: q, k and v first, then the probabilities, computed from
    the quantized q and k."""
    quant = attention_quantizers(module)
    if quant is None:
        return
    pending = {n: e for n, e in quant.static().items() if not e.calibrated}
    for stage in (("q", "k", "v"), ("probs",)):
        names = [name for name in stage if name in pending]
        if not names:
            continue
        with recording(module, names) as recorded:
            forward()
        for name in names:
            pending[name].calibrate(recorded[name])


@contextmanager
def recording(
    module: nn.Module, names: tuple[str, ...] | list[str] = ATTENTION_INPUTS
) -> Iterator[dict[str, list[Tensor]]]:
    """Record the named inputs ``module``'s attention reads while the block runs (through
    :func:`channelwise_attention`): ``{"q"|"k"|"v"|"probs": [tensor per call]}``, float values
    before any quantizer of the same input (the probabilities from the quantized q and k)."""
    recorded: dict[str, list[Tensor]] = {name: [] for name in names}
    setattr(module, _RECORD_ATTR, recorded)
    try:
        yield recorded
    finally:
        delattr(module, _RECORD_ATTR)


def attention_quantizers(module: nn.Module) -> AttentionQuantizers | None:
    return getattr(module, _ATTR, None)


class _DetachedProbabilities:
    """A probabilities entry that passes values on and stops their gradient."""

    calibrated = True
    restored_by_method = True

    def __call__(self, probs: Tensor) -> Tensor:
        return probs.detach()


@contextmanager
def probabilities_detached(model: nn.Module, modules: list[nn.Module]) -> Iterator[None]:
    """Inside, ``modules``' attention probabilities carry no gradient (constants to autograd,
    as conservative LRP treats them); on exit every module's entries are as they were."""
    use_channelwise_attention(model)
    before = {module: attention_quantizers(module) for module in modules}
    for module, quant in before.items():
        detached = replace(quant or AttentionQuantizers(), probs=_DetachedProbabilities())
        setattr(module, _ATTR, detached)
    try:
        yield
    finally:
        for module, quant in before.items():
            if quant is None:
                delattr(module, _ATTR)
            else:
                setattr(module, _ATTR, quant)
