"""Building and loading the AVX-512 extension behind the CPU kernels: ``csrc/weight_only.cpp``
(dense weight-only and W8A8), ``csrc/sparse.cpp`` (sparse decode) and ``csrc/block_sparse.cpp``
(block-sparse float products), sharing ``csrc/tiles.h``.

It is compiled on first use (~10 s of CPU; 15–40 s wall on the shared host) into
``$CHANNELWISE_HOME/kernels`` and reused (the folder name carries a hash of source and flags);
if it cannot be built or the CPU lacks AVX-512, one warning is logged and the pure-torch
de-quantize path serves every call. ``CHANNELWISE_KERNELS=0`` disables it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from channelwise.paths import channelwise_home

log = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = (_CSRC / "weight_only.cpp", _CSRC / "sparse.cpp", _CSRC / "block_sparse.cpp")
_HEADERS = (_CSRC / "tiles.h",)
# -fopenmp: ATen's parallel_for is a header template; without the flag its ``omp parallel``
# compiles away and every kernel runs on one thread (measured: no gain from 2 threads until it).
_FLAGS = [
    "-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma",
    "-fopenmp",
]  # fmt: skip

_state: dict[str, object] = {}


def kernel_available() -> bool:
    """Whether the compiled AVX-512 weight-only kernels can be used (builds them on first call)."""
    return load_ops() is not None


def load_ops():
    """The extension's ops (``torch.ops.channelwise_cpu``), built on the first call; None where
    they are unavailable (disabled, no AVX-512, a failed build: logged once)."""
    if "ops" in _state:
        return _state["ops"]
    ops, why = None, None
    if os.environ.get("CHANNELWISE_KERNELS", "1") == "0":
        why = "disabled by CHANNELWISE_KERNELS=0"
    elif torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        why = (
            f"CPU capability is {torch.backends.cpu.get_cpu_capability()}, the kernels need AVX512"
        )
    else:
        try:
            ops = _build()
        except Exception as error:  # noqa: BLE001 — any build failure must fall back, not crash
            why = f"compiling the kernels failed: {str(error).strip().splitlines()[-1:]}"
    if why:
        log.warning("channelwise CPU kernels unavailable (%s); using de-quantize + F.linear", why)
    _state["ops"] = ops
    return ops


def loaded_ops():
    """The ops if an earlier :func:`load_ops` loaded them, else None; never builds."""
    return _state.get("ops")


def _has_vnni() -> bool:
    check = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(check and check())


#: Asked once at import: torch's check is skipped by dynamo, so the first question must not come
#: from inside a compiled decode step (a prompt longer than SMALL_M tokens did that).
_VNNI = _has_vnni()


def vnni_supported() -> bool:
    """Whether this CPU has AVX-512 VNNI (the small-M W8A8 kernel's instructions)."""
    return _VNNI


def _build():
    from torch.utils import cpp_extension

    source = b"".join(path.read_bytes() for path in (*_SOURCES, *_HEADERS))
    digest = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:12]
    build = channelwise_home() / "kernels" / f"weight_only-torch{torch.__version__}-{digest}"
    build.mkdir(parents=True, exist_ok=True)
    here = str(Path(sys.executable).parent)  # the venv's bin: the pip-installed ninja lives there
    if here not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([here, os.environ.get("PATH", "")])
    cpp_extension.load(
        name="channelwise_weight_only",
        sources=[str(path) for path in _SOURCES],
        extra_cflags=_FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        is_python_module=False,
        verbose=False,
    )
    _register_fakes()
    return torch.ops.channelwise_cpu


def _register_fakes() -> None:
    """Shape functions of the ops a decode step calls, so ``torch.compile`` traces through
    them (the compiled decode loop, :mod:`channelwise.deploy.decode`) instead of breaking the
    graph at every packed linear: the weight-only kernels, the int8 quantizers and the small-M
    W8A8 kernel (oneDNN's int8 linear and ``dequantize_acc_``, for more tokens, stay eager)."""

    def weight_only(x: Tensor, w: Tensor, *_) -> Tensor:
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    def codes(x: Tensor, *_) -> tuple[Tensor, Tensor]:
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0], 1))

    def small_w8a8(q: Tensor, x_scale: Tensor, u: Tensor, *_) -> Tensor:
        return x_scale.new_empty((q.shape[0], u.shape[0]))

    def columns_out(x: Tensor, wt: Tensor) -> Tensor:
        """The output of a product with a columns-form weight: (K, N), or W4 (K, N/32, 16)."""
        columns = wt.shape[1] * (32 if wt.dtype == torch.uint8 else 1)
        return x.new_empty((*x.shape[:-1], columns))

    def sparse_mlp(x: Tensor, a: Tensor, up: Tensor, s: Tensor | None, z: Tensor | None,
                   down_t: Tensor, *_) -> Tensor:  # fmt: skip
        return columns_out(x, down_t)

    shapes = {"w8a16_mm": weight_only, "w4a16_mm": weight_only, "half_mm": weight_only}
    shapes["sparse_mlp"] = sparse_mlp
    shapes["sparse_input_mm"] = lambda x, wt, *_: columns_out(x, wt)
    shapes["sparsify"] = lambda x, _t: torch.empty_like(x)
    shapes["block_sparse_mm"] = lambda x, _b, _s, _c, _bias, n: x.new_empty((*x.shape[:-1], n))
    shapes["quantize_per_token"] = codes
    shapes |= {"quantize_static": codes, "w8a8_small_mm": small_w8a8}
    for name, shape in shapes.items():
        if name not in _FAKES:  # once per process: torch refuses a second registration
            torch.library.register_fake(f"channelwise_cpu::{name}")(shape)
            _FAKES.add(name)


_FAKES: set[str] = set()
