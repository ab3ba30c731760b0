"""Channel-wise quantizer primitives: granularities, specs, and (fake-)quantization."""

from channelwise.quant.core import (
    QParams,
    QuantSpec,
    calibration_sample,
    compute_qparams,
    dequantize,
    fake_quantize,
    qparams_from_range,
    quantization_error,
    quantize,
    spec_from_dict,
    spec_to_dict,
    static_qparams,
)
from channelwise.quant.granularity import (
    Granularity,
    PerColumn,
    PerGroup,
    PerRow,
    PerTensor,
    granularity_from_name,
)

__all__ = [
    "Granularity",
    "PerColumn",
    "PerGroup",
    "PerRow",
    "PerTensor",
    "QParams",
    "QuantSpec",
    "calibration_sample",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "granularity_from_name",
    "qparams_from_range",
    "quantization_error",
    "quantize",
    "spec_from_dict",
    "spec_to_dict",
    "static_qparams",
]
