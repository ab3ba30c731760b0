"""Registered methods; importing this package registers every one."""

from channelwise.methods import gptq, rtn, smoothquant  # noqa: F401  (registration)
from channelwise.methods.registry import Method, build_method, method_names, register

__all__ = ["Method", "build_method", "method_names", "register"]
