"""Shared fixtures: the tiny random causal LMs of :mod:`channelwise.tiny`, token ids."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import FAMILIES, tiny_dinov2_config
from torch import nn

from channelwise.tiny import (  # noqa: F401 (re-exported to the test files)
    VOCAB,
    build_tiny_model,
    build_tiny_tokenizer,
    tiny_config,
)

# The models are tiny: thread start-up and hand-off cost far more than the arithmetic (on a
# 2-core runner a forward takes ~150 ms with 2 threads and ~1 ms with one).
torch.set_num_threads(1)


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    """Each supported family in turn (a test may parametrize ``family`` itself to narrow it)."""
    return request.param


@pytest.fixture
def tiny_model(family: str) -> nn.Module:
    """A fresh tiny random model of ``family``; tests may change it freely."""
    return build_tiny_model(family)


@pytest.fixture
def make_tiny_model() -> Callable[..., nn.Module]:
    """Factory ``(family, **config_overrides) -> model`` for variants such as post-LN OPT."""
    return build_tiny_model


@pytest.fixture
def opt_post_ln() -> nn.Module:
    """OPT with ``do_layer_norm_before=False`` (the OPT-350m layout)."""
    return build_tiny_model("opt", do_layer_norm_before=False)


@pytest.fixture
def token_ids() -> torch.Tensor:
    """Four sequences of 16 token ids, fixed."""
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def calibration_ids() -> torch.Tensor:
    """Six calibration sequences of 16 token ids, disjoint in seed from ``token_ids``."""
    return torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def tiny_tokenizer():
    """:func:`build_tiny_tokenizer`."""
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_dinov2():
    """A tiny random ``Dinov2Model`` (:func:`helpers.tiny_dinov2_config`), seeded, in eval mode."""
    import transformers

    torch.manual_seed(0)
    return transformers.Dinov2Model(tiny_dinov2_config()).eval()
