"""Registered methods; importing this package registers every one."""

from channelwise.methods import (  # noqa: F401  (registration)
    adadim,
    awq,
    bivit,
    chess,
    dgq,
    gptq,
    ias_vit,
    lpvit,
    lrp_qvit,
    osplus,
    outliertune,
    quarot,
    repq_vit,
    repquant,
    rtn,
    smoothquant,
    smoothquant_plus,
    teal,
)
from channelwise.methods.registry import Method, build_method, method_names, register

__all__ = ["Method", "build_method", "method_names", "register"]
