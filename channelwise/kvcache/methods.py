"""KV-cache methods: a recipe's ``kv_cache`` names one; it builds the cache configuration and
makes any exact weight-side change the method needs.

* ``kivi`` — KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
  arXiv 2402.02750): keys per channel over groups of ``group_size`` tokens (after RoPE), values
  per token over groups of ``group_size`` channels, asymmetric with a float minimum and float16
  scales; the newest tokens stay in float until ``residual`` of them accumulate. The official
  code keeps a sliding window of the newest ``residual`` values in float; here keys and values
  flush together (a simplification: values spend a little less time in float).
* ``kv_bfp`` — K-sort block floating point (Trukhanov & Soloveychik, "Accurate Block
  Quantization in LLMs with Outliers", arXiv 2403.20137): key channels reordered by the L2 norm
  of their W_k rows (data-free), then keys and values stored as BFP (``block`` channels share an
  8-bit exponent, ``mantissa_bits``-bit sign-magnitude mantissas). The paper folds the order into
  W_k and W_q; with RoPE that is not exact (each rotary pair has its own frequency), so the order
  is applied to the keys after RoPE as they enter the cache and undone as they leave it — the
  same stored blocks, exactly equivalent. RoPE pairs (i, i + d/2) stay adjacent, sorted by their
  joint norm, since RoPE mixes the two. Values use the same BFP storage, unsorted (the paper
  evaluates the K cache; we say so in the docs).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from channelwise.adapters import linear_weight
from channelwise.errors import KVCacheError, RecipeError
from channelwise.kvcache.cache import KVCacheConfig, kv_geometry
from channelwise.kvcache.codecs import BFPCodec, GroupQuantCodec
from channelwise.methods.registry import validated_args
from channelwise.offload import block_readable
from channelwise.state import KV_CONFIG_ATTR


class KVMethod:
    """Base class: ``check`` before any change, ``prepare_model`` (exact weight-side changes,
    before the weight steps), then ``cache_config`` for the caches the model will use."""

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    #: Runs on a model whose blocks stay on disk (:mod:`channelwise.offload`): it changes no
    #: weight, and reads a block's weights (if at all) through ``offload.block_readable``.
    offloadable: ClassVar[bool] = False
    Args: ClassVar[type[BaseModel]]

    def __init__(self, recipe_name: str, args: BaseModel) -> None:
        self.recipe_name = recipe_name
        self.args = args

    def _where(self) -> str:
        return f"recipe '{self.recipe_name}', kv_cache {self.name}"

    def check(self, model: nn.Module, adapter) -> None:
        kv_geometry(model)

    def prepare_model(
        self, model: nn.Module, adapter, calibration: Tensor | None, progress: bool = True
    ) -> None:
        """Weight-side changes (and calibration), once, before the recipe's steps. Default:
        none."""

    def cache_config(self, model: nn.Module, adapter) -> KVCacheConfig:
        raise NotImplementedError

    def label(self) -> str:
        raise NotImplementedError

    def saved_state(self) -> dict[str, Tensor]:
        """Tensors a saved checkpoint needs to rebuild the cache configuration. Default: none."""
        return {}

    def restore(self, model: nn.Module, adapter, state: dict[str, Tensor]) -> None:
        """Take back ``saved_state`` on a loaded model (whose weights already carry any
        weight-side change). Default: nothing."""


_KV_METHODS: dict[str, type[KVMethod]] = {}


def register_kv(cls: type[KVMethod]) -> type[KVMethod]:
    _KV_METHODS[cls.name] = cls
    return cls


def kv_method_names() -> list[str]:
    return sorted(_KV_METHODS)


def offloadable_kv_methods() -> list[str]:
    """The registered KV-cache methods that run on a model offloaded to disk."""
    return sorted(name for name, cls in _KV_METHODS.items() if cls.offloadable)


def build_kv_method(recipe) -> KVMethod | None:
    """The recipe's KV-cache method, its arguments validated; ``None`` without ``kv_cache``."""
    spec = recipe.kv_cache
    if spec is None:
        return None
    if spec.method not in _KV_METHODS:
        raise RecipeError(
            f"recipe '{recipe.name}': unknown kv_cache method '{spec.method}'; "
            f"registered: {', '.join(kv_method_names())}"
        )
    cls = _KV_METHODS[spec.method]
    where = f"recipe '{recipe.name}', kv_cache '{spec.method}'"
    return cls(recipe.name, validated_args(cls.Args, spec.args, where))


class KiviArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(ge=2, le=8)
    group_size: int = Field(default=32, ge=1)
    residual: int = Field(default=32, ge=0)

    @model_validator(mode="after")
    def _residual(self) -> KiviArgs:
        if self.residual == 0 or self.residual % self.group_size:
            raise ValueError(
                f"residual ({self.residual}) must be a positive multiple of group_size "
                f"({self.group_size}): keys are quantized in whole groups of tokens"
            )
        return self


@register_kv
class Kivi(KVMethod):
    name = "kivi"
    offloadable = True
    Args = KiviArgs

    def check(self, model: nn.Module, adapter) -> None:
        _, kv_heads, head_dim = kv_geometry(model)
        channels = kv_heads * head_dim
        if channels % self.args.group_size:
            raise RecipeError(
                f"{self._where()}: value groups of "
                f"{self.args.group_size} channels do not divide the {channels} KV channels "
                f"of a token ({kv_heads} heads × {head_dim})"
            )

    def cache_config(self, model: nn.Module, adapter) -> KVCacheConfig:
        a = self.args
        return KVCacheConfig(
            GroupQuantCodec(a.bits, a.group_size, "token"),
            GroupQuantCodec(a.bits, a.group_size, "channel"),
            residual=a.residual,
        )

    def label(self) -> str:
        return f"KV{self.args.bits}"


class BfpArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    block: int = Field(default=32, ge=2)
    mantissa_bits: int = Field(default=4, ge=2, le=8)
    sort: bool = True


class ChannelOrder:
    """Per layer, per KV head, a permutation of the head's channels (a ``KeyTransform``)."""

    def __init__(self, orders: list[Tensor]) -> None:
        self.orders = orders  # each (kv_heads, head_dim), long
        self.inverses = [o.argsort(dim=-1) for o in orders]

    @staticmethod
    def _gather(keys: Tensor, index: Tensor) -> Tensor:
        index = index.to(keys.device)[:, None, :].expand(-1, keys.shape[1], -1)
        return torch.gather(keys, 2, index)

    def to_stored(self, keys: Tensor, layer: int, positions: Tensor | None = None) -> Tensor:
        return self._gather(keys, self.orders[layer])

    def from_stored(self, keys: Tensor, layer: int, positions: Tensor | None = None) -> Tensor:
        return self._gather(keys, self.inverses[layer])


def ksort_order(w_k: Tensor, kv_heads: int, rope_pairs: bool) -> Tensor:
    """``(kv_heads, head_dim)``: each head's key channels by ascending L2 norm of their W_k rows.

    With ``rope_pairs`` the rotary pairs (i, i + d/2) move together, ordered by their joint
    norm, and sit next to each other (RoPE mixes the two channels of a pair).
    """
    rows = w_k.float().reshape(kv_heads, -1, w_k.shape[-1])
    norms = rows.square().sum(dim=-1)  # (kv_heads, head_dim)
    if not rope_pairs:
        return norms.argsort(dim=-1, stable=True)
    half = norms.shape[-1] // 2
    pair_order = (norms[:, :half] + norms[:, half:]).argsort(dim=-1, stable=True)
    return torch.stack([pair_order, pair_order + half], dim=-1).reshape(kv_heads, -1)


@register_kv
class KvBfp(KVMethod):
    name = "kv_bfp"
    offloadable = True
    Args = BfpArgs

    def check(self, model: nn.Module, adapter) -> None:
        _, kv_heads, head_dim = kv_geometry(model)
        if head_dim % self.args.block:
            raise RecipeError(
                f"{self._where()}: blocks of {self.args.block} "
                f"channels do not divide the head dimension {head_dim}"
            )
        if self.args.sort:
            adapter.require_kv_transforms(f"{self._where()}: K-sort")
        if self.args.sort and (
            adapter.family not in ("llama", "opt") or "k" not in adapter.attention
        ):
            raise RecipeError(
                f"{self._where()}: K-sort reads a separate k_proj "
                f"(Llama family, OPT); {adapter.family} is not supported (use sort: false)"
            )

    def cache_config(self, model: nn.Module, adapter) -> KVCacheConfig:
        a = self.args
        codec = BFPCodec(a.block, a.mantissa_bits)
        transform = None
        if a.sort:
            _, kv_heads, _ = kv_geometry(model)
            orders = []
            for block in adapter.block_list(model):
                with block_readable(model, block):
                    k_proj = block.get_submodule(adapter.attention["k"])
                    w_k = linear_weight(k_proj, adapter.transposed_weights).detach()
                    rope_pairs = adapter.family == "llama"
                    orders.append(ksort_order(w_k, kv_heads, rope_pairs=rope_pairs))
            transform = ChannelOrder(orders)
        return KVCacheConfig(codec, codec, residual=0, key_transform=transform)

    def label(self) -> str:
        return f"KV{self.args.mantissa_bits}bfp"


def attach_kv_config(model: nn.Module, config: KVCacheConfig | None) -> None:
    """Make ``config`` the default of ``make_cache(model)``."""
    if config is None:
        raise KVCacheError("no KV-cache configuration to attach")
    setattr(model, KV_CONFIG_ATTR, config)
