"""Where quantization scales live.

Every tensor is viewed as 2-D ``(rows, cols) = x.reshape(-1, x.shape[-1])``: for a Linear weight
rows are output channels and cols input channels; for activations rows are tokens and cols
channels. A granularity splits that view into equal blocks, each block sharing one scale, so the
scale tensor has shape ``(rows // block_rows, cols // block_cols)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from channelwise.errors import QuantConfigError

_AXIS_NAMES = {"input": "input channels", "output": "output channels"}


class _Granularity:
    """Shared helpers; subclasses define ``block_shape``."""

    def block_shape(self, rows: int, cols: int) -> tuple[int, int]:
        raise NotImplementedError

    def scale_shape(self, rows: int, cols: int) -> tuple[int, int]:
        """Shape of the scale tensor for a ``(rows, cols)`` view."""
        block_rows, block_cols = self.block_shape(rows, cols)
        return rows // block_rows, cols // block_cols


@dataclass(frozen=True)
class PerTensor(_Granularity):
    """One scale for the whole tensor: ``(rows, cols)`` → scale ``(1, 1)``."""

    def block_shape(self, rows: int, cols: int) -> tuple[int, int]:
        return rows, cols


@dataclass(frozen=True)
class PerRow(_Granularity):
    """One scale per row: ``(rows, cols)`` → scale ``(rows, 1)``.

    Per output channel for weights, per token for activations.
    """

    def block_shape(self, rows: int, cols: int) -> tuple[int, int]:
        return 1, cols


@dataclass(frozen=True)
class PerColumn(_Granularity):
    """One scale per column (input channel): ``(rows, cols)`` → scale ``(1, cols)``."""

    def block_shape(self, rows: int, cols: int) -> tuple[int, int]:
        return rows, 1


@dataclass(frozen=True)
class PerGroup(_Granularity):
    """One scale per group of ``size`` consecutive channels.

    ``along="input"``: ``(rows, cols)`` → scale ``(rows, cols // size)``, blocks ``(1, size)``.
    ``along="output"``: ``(rows, cols)`` → scale ``(rows // size, cols)``, blocks ``(size, 1)``.
    """

    size: int
    along: Literal["input", "output"] = "input"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise QuantConfigError(f"group size must be a positive integer, got {self.size!r}")
        if self.along not in _AXIS_NAMES:
            raise QuantConfigError(f"group 'along' must be 'input' or 'output', got {self.along!r}")

    def block_shape(self, rows: int, cols: int) -> tuple[int, int]:
        dim = cols if self.along == "input" else rows
        if dim % self.size:
            raise QuantConfigError(
                f"group size {self.size} does not divide {dim} {_AXIS_NAMES[self.along]}; "
                f"use a divisor such as {_suggest_divisors(dim, self.size)}"
            )
        return (1, self.size) if self.along == "input" else (self.size, 1)


Granularity = PerTensor | PerRow | PerColumn | PerGroup

_NAMES: dict[str, type[_Granularity]] = {
    "tensor": PerTensor,
    "channel": PerRow,
    "row": PerRow,
    "token": PerRow,
    "input_channel": PerColumn,
    "column": PerColumn,
    "group": PerGroup,
}


def granularity_from_name(
    name: str, group_size: int | None = None, along: str = "input"
) -> Granularity:
    """Build a granularity from its recipe name.

    ``"tensor"`` → PerTensor; ``"channel"``/``"row"``/``"token"`` → PerRow;
    ``"input_channel"``/``"column"`` → PerColumn; ``"group"`` → PerGroup(group_size, along).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    cls = _NAMES.get(key)
    if cls is None:
        raise QuantConfigError(
            f"unknown granularity {name!r}; valid names are: {', '.join(sorted(_NAMES))}"
        )
    if cls is PerGroup:
        if group_size is None:
            raise QuantConfigError("granularity 'group' needs a group_size, e.g. 128")
        return PerGroup(group_size, along)  # type: ignore[arg-type]
    if group_size is not None:
        raise QuantConfigError(
            f"group_size={group_size} is only used with granularity 'group', not {name!r}"
        )
    return cls()  # type: ignore[return-value]


def _suggest_divisors(dim: int, size: int) -> str:
    """Up to two divisors of ``dim`` below ``size``, preferring powers of two."""
    below = [d for d in range(min(size - 1, dim), 0, -1) if dim % d == 0]
    powers = [d for d in below if d & (d - 1) == 0]
    picks = (powers or below)[:2]
    return " or ".join(str(d) for d in picks)
