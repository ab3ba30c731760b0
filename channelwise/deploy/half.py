"""Float embedding and LM head kept at the 16 bits their checkpoint stores them in.

A packed checkpoint saved with ``--float-dtype float16`` (or ``bfloat16``) stores its float
tensors at 16 bits, as the anchors ship their embeddings. Widened to float32 at load, SmolLM2's
tied embedding/LM head takes 113 MB and the head reads all of it every decoded token (a third of
a compiled W4A16 decode step). :func:`keep_half_floats` keeps such an embedding and head at 16
bits instead: the lookup widens only the rows it returns, the head runs
:func:`~channelwise.kernels.half_weight_linear` (fp16/bf16 widened in registers, float32 sums).
Both give the values of the widened float32 weight (widening is exact); the head's sums run in
another order, so its outputs agree to float32 rounding, not bit for bit.

The 16-bit weight is a buffer, not a parameter: transformers reads a model's dtype from its
first float parameter, and the activations must stay float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from channelwise.deploy.kernel_call import kernels_enabled
from channelwise.deploy.packed import _set_submodule
from channelwise.kernels import HALF_DTYPES, half_weight_linear


class HalfEmbedding(nn.Module):
    """A float token embedding stored at 16 bits; a lookup returns float32 rows."""

    def __init__(self, weight: Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        _check_half(weight, "embedding")
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.register_buffer("weight", weight.contiguous())

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight, self.padding_idx).float()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, stored {self.weight.dtype}"


class HalfLinear(nn.Module):
    """A float linear (the LM head) whose weight stays at 16 bits: ``y = x Wᵀ + b`` in float32."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        _check_half(weight, "linear")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight if weight.is_contiguous() else weight.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if kernels_enabled() and x.dtype is torch.float32 and x.device.type == "cpu":
            return half_weight_linear(x, self.weight, self.bias)
        return F.linear(
            x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, stored {self.weight.dtype}"


def _check_half(weight: Tensor, what: str) -> None:
    if weight.dtype not in HALF_DTYPES or weight.dim() != 2:
        raise ValueError(
            f"a 16-bit {what} needs a 2-D float16/bfloat16 weight, got {weight.dtype} "
            f"{tuple(weight.shape)}"
        )


def keep_half_floats(model: nn.Module, stored: dict[str, torch.dtype]) -> list[str]:
    """Swap the float token embedding and LM head of a loaded float32 ``model`` for 16-bit ones
    where the checkpoint stored their weights at 16 bits (``stored``: state-dict key → stored
    dtype). A head tied to the embedding shares its 16-bit buffer. Modules that are not plain
    ``nn.Embedding``/``nn.Linear`` (packed ones) are left alone. Returns the swapped names."""
    names = {id(module): name for name, module in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    swapped: list[str] = []
    half_embedding = None
    if type(embedding) is nn.Embedding and embedding.weight.dtype == torch.float32:
        name = names[id(embedding)]
        dtype = stored.get(f"{name}.weight")
        if dtype in HALF_DTYPES:
            half_embedding = HalfEmbedding(
                embedding.weight.detach().to(dtype), embedding.padding_idx
            )
            _set_submodule(model, name, half_embedding)
            swapped.append(name)
    if type(head) is nn.Linear and head.weight.dtype == torch.float32:
        name = names[id(head)]
        if half_embedding is not None and head.weight is embedding.weight:
            weight = half_embedding.weight
        else:
            dtype = stored.get(f"{name}.weight")
            weight = head.weight.detach().to(dtype) if dtype in HALF_DTYPES else None
        if weight is not None:
            _set_submodule(model, name, HalfLinear(weight, head.bias))
            swapped.append(name)
    return swapped
