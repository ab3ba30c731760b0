"""DGQ's dual-grained weights packed at 4 bits, widened to int8 rows for the int8 GEMM.

A DGQ linear (:mod:`channelwise.methods.dgq`, arXiv 2310.04836) is ``s1·S2·(q − z)``: 4-bit codes
``q`` with, per group of ``g`` inputs, an integer scale ``S2`` and zero ``z``, and a float scale
``s1`` per output row. Its A8W4 GEMM runs on ``W_int8 = S2·(q − z)`` (exact in int8) with row
scale ``s1``. :class:`PackedDualGrained` stores the 4-bit codes (two per byte) and the two uint8
group grids, ``0.5 + 2/g`` bytes a weight instead of the int8 rows' 1, and presents itself as an
int8-rows :class:`PackedLinear` (``codes()`` are ``W_int8``): the kernels, the exporters and the
reference path see the widened matrix, built once per module by the kernel call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from channelwise.deploy.packed_modules import PackedLinear
from channelwise.errors import PackingError
from channelwise.quant import PerRow, QuantSpec
from channelwise.quant.dual_grained import DualGrainedWeight, int8_weight
from channelwise.quant.packing import pack_codes, packed_size, unpack_codes

#: The widened matrix's grid: int8 rows with DGQ's float scale ``s1`` per row.
INT8_ROWS = QuantSpec(bits=8, symmetric=True, granularity=PerRow())


class PackedDualGrained(PackedLinear):
    """``y = x·(s1·S2·(q − z))ᵀ + b`` with 4-bit ``qweight``, uint8 ``group_scale`` (S2) and
    ``group_zero`` (z) per group of ``group_size`` inputs, float32 ``scale`` (s1) per row."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: bool,
        transposed: bool = False,
    ) -> None:
        if not isinstance(group_size, int) or group_size < 2 or in_features % group_size:
            raise PackingError(
                f"a dual-grained group must divide the {in_features} inputs, got {group_size!r}"
            )
        super().__init__(in_features, out_features, INT8_ROWS, bias, transposed)
        self.group_size = group_size
        groups = (out_features, in_features // group_size)
        self.register_buffer(
            "qweight", torch.zeros(out_features, packed_size(in_features, 4), dtype=torch.uint8)
        )
        self.register_buffer("group_scale", torch.zeros(groups, dtype=torch.uint8))
        self.register_buffer("group_zero", torch.zeros(groups, dtype=torch.uint8))

    @classmethod
    def from_dual_grained(
        cls, dgw: DualGrainedWeight, bias: Tensor | None, transposed: bool
    ) -> PackedDualGrained:
        out_features, in_features = dgw.shape
        packed = cls(in_features, out_features, dgw.group_size, bias is not None, transposed)
        packed.qweight.copy_(pack_codes(dgw.codes.to(torch.int16), 4))
        packed.group_scale.copy_(dgw.S2.to(torch.uint8))  # 1…127
        packed.group_zero.copy_(dgw.zeros)
        packed.scale.copy_(dgw.s1.float()[:, None])
        if bias is not None:
            packed.bias.data.copy_(bias)
        return packed.to(dgw.codes.device)

    def dual_grained(self, rows: Tensor | None = None) -> DualGrainedWeight:
        """The stored format (of the ``rows`` indexed, if given)."""

        def pick(t: Tensor) -> Tensor:
            return t if rows is None else t[rows]

        codes = unpack_codes(pick(self.qweight), 4, self.in_features).to(torch.uint8)
        return DualGrainedWeight(
            codes,
            pick(self.group_zero),
            pick(self.group_scale).to(torch.int8),
            pick(self.scale)[:, 0],
            self.group_size,
        )

    def codes(self, rows: Tensor | None = None) -> Tensor:
        """``W_int8 = S2·(q − z)`` ``(out, in)`` int16: the int8 rows this format widens to."""
        return int8_weight(self.dual_grained(rows)).to(torch.int16)

    def _int8_codes(self) -> Tensor:
        return int8_weight(self.dual_grained())

    def _uint8_codes(self) -> Tensor:
        return self._int8_codes().view(torch.uint8) ^ 0x80  # W_int8 + 128

    def layout(self) -> dict:
        return {**super().layout(), "kind": "dual_grained", "group_size": self.group_size}

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, 4-bit codes with integer scales "
            f"per {self.group_size} inputs, widened to int8 rows"
        )
