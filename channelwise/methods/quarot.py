"""QuaRot: rotate the model so that weights and activations have no outliers, then quantize.

Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024,
arXiv 2404.00456. An orthogonal Q with entries of equal magnitude (a randomized Hadamard matrix)
spreads every outlier channel over all channels. QuaRot applies such rotations where they are
exact (computational invariance, as in SliceGPT):

1. fold every RMSNorm γ into the linears reading it (the final norm into the LM head);
2. rotate the residual stream by ``Q = diag(s)·H`` (s seeded ±1): embeddings and residual
   readers ``W·Q``, residual writers ``Qᵀ·W``;
3. rotate every attention head's values by a Hadamard ``H_d``, folded into v_proj rows and
   o_proj columns;
4. fold ``H`` into down_proj's input columns and apply ``H`` to its input online (a pre-hook):
   the input of down_proj is the model's worst outlier site and no weight produces it linearly;
5. likewise (our ``online_o``, default on) a Hadamard of size heads·d on o_proj's input.

The model computes the same function in float (tested); the quantizing step that follows (``rtn``
or ``gptq``) and the recipe's activation quantizers then see outlier-free tensors. This step
quantizes nothing: ``steps: [{method: quarot}, {method: gptq, args: {act_order: true}}]``.

Arguments: ``seed`` (default 0) for the random signs (or the random rotation); ``rotation``
``hadamard`` (default) or ``random`` — a seeded Haar-random orthogonal matrix (QR of a Gaussian)
for the residual and the heads, for widths with no Hadamard order here; ``online_o`` (default
true). The online Hadamards are always true Hadamard matrices (deterministic from the size, so a
saved checkpoint needs only the weights: ``restore`` re-installs the hooks).

The paper's W4A4 setting: weights int4 symmetric per output channel with GPTQ (or RTN),
activations int4 symmetric per token, dynamic, clip ratio 0.9; KV cache int4 (not here: 16-bit,
the KV-cache work adds it). Presets: ``quarot-w4a4`` (GPTQ, act-order) and ``quarot-rtn-w4a4``.

Deviations and ambiguities:

- The presets follow the paper's W4A4 setting: activations per-token min–max scaled by the clip
  ratio 0.9 (``clip_ratio: 0.9``); weights with a clip-ratio search (``range: mse``), as the
  official code's ``--w_clip`` does for both RTN and GPTQ [recall: the flag's exact grid and
  error norm are not reproduced; ours is the quantizer's own MSE grid].
- The paper's online Hadamard before o_proj is ``H_{n_h} ⊗ I_d`` after the per-head ``H_d`` in
  v_proj (together a Hadamard of size n_h·d); SmolLM2 has 9 heads and no Hadamard of order 9
  exists, so we fold a full Hadamard of size n_h·d (576 = 36·16) into o_proj's input and apply it
  online instead: same role, a different (still orthogonal, equal-magnitude) matrix.
- Hadamard orders come from Sylvester, Paley I/II (q prime or prime square) and Kronecker
  products; the official code stores tables of other orders (e.g. 172). A width without a
  supported order is refused unless ``rotation: random`` (residual and heads only).
- The randomized Hadamard flips input channels then mixes (``x·diag(s)·H``), as the official code
  does; the online Hadamards have no random signs (as in the paper).
- The official code also centres every embedding row (subtracts its mean) before rotating; that
  is exact only under LayerNorm, so on RMSNorm models we leave the embeddings uncentred.
- No Q/K rotation and no KV-cache quantization (the KV-cache issue does them).
- LayerNorm families (OPT, GPT-2, GPT-NeoX) are refused (see :mod:`channelwise.transforms.rotate`).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from channelwise.adapters import ModelAdapter
from channelwise.errors import ChannelwiseError, RecipeError
from channelwise.methods import registry
from channelwise.methods.registry import Method, register
from channelwise.transforms.hadamard import (
    hadamard_matrix,
    is_hadamard_size,
    random_hadamard,
    random_orthogonal,
)
from channelwise.transforms.rotate import (
    fold_online_hadamard,
    fuse_norms,
    install_online_hadamard,
    require_rmsnorm,
    rotate_heads_vo,
    rotate_residual,
)


class QuaRotArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(default=0, ge=0)
    rotation: Literal["hadamard", "random"] = "hadamard"
    online_o: bool = True


def _dims(model: nn.Module) -> dict[str, int]:
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "hidden": config.hidden_size,
        "head_dim": head_dim,
        "attn_width": heads * head_dim,
        "intermediate": config.intermediate_size,
    }


def _online_modules(model: nn.Module, adapter: ModelAdapter, online_o: bool) -> list[nn.Module]:
    names = [n for s in adapter.subsets if s.role == "mlp_out" for n in s.linears]
    if online_o:
        names.append(adapter.attention["o"])
    return [block.get_submodule(n) for block in adapter.block_list(model) for n in names]


@torch.no_grad()
def apply_quarot(
    model: nn.Module,
    adapter: ModelAdapter,
    seed: int = 0,
    rotation: str = "hadamard",
    online_o: bool = True,
) -> None:
    """Rotate ``model`` in place as QuaRot does (steps 1–5 of the module docstring); exact in
    float. Refuses LayerNorm families and widths without a Hadamard order."""
    require_rmsnorm(adapter, "quarot")
    dims = _dims(model)
    make = random_hadamard if rotation == "hadamard" else random_orthogonal
    q = make(dims["hidden"], seed)
    h_d = (
        hadamard_matrix(dims["head_dim"])
        if rotation == "hadamard"
        else random_orthogonal(dims["head_dim"], seed + 1)
    )
    fuse_norms(model, adapter)
    rotate_residual(model, adapter, q)
    for block in adapter.block_list(model):
        rotate_heads_vo(block, adapter, h_d)
    for module in _online_modules(model, adapter, online_o):
        fold_online_hadamard(module)


@register
class QuaRot(Method):
    """Hadamard rotations folded into the weights plus online ones; quantizes nothing."""

    name = "quarot"
    needs_calibration = False
    distributed = True  # data-free and seeded: every process rotates alike
    quantizes_weights = False
    Args: ClassVar[type[BaseModel]] = QuaRotArgs

    def check(self, model, adapter: ModelAdapter) -> None:
        super().check(model, adapter)
        where = f"recipe '{self.recipe.name}', step 'quarot'"
        if [step.method for step in self.recipe.steps].count(self.name) > 1:
            raise RecipeError(f"{where}: quarot may appear once per recipe")
        registry.check_transform_order(self.recipe, self.name, "the rotation", True)
        require_rmsnorm(adapter, "quarot")
        dims = _dims(model)
        needed = {"intermediate (down_proj input)": dims["intermediate"]}
        if self.args.online_o:
            needed["heads·head_dim (o_proj input)"] = dims["attn_width"]
        if self.args.rotation == "hadamard":
            needed |= {"hidden": dims["hidden"], "head_dim": dims["head_dim"]}
        missing = {what: n for what, n in needed.items() if not is_hadamard_size(n)}
        if missing:
            hints = []
            if {"hidden", "head_dim"} & missing.keys():
                hints.append("use rotation: random")
            if any("o_proj" in what for what in missing):
                hints.append("set online_o: false")
            if any("down_proj" in what for what in missing):
                hints.append("down_proj's online Hadamard has no fallback: QuaRot cannot run here")
            sizes = ", ".join(f"{n} ({what})" for what, n in missing.items())
            raise RecipeError(f"{where}: no Hadamard matrix of order {sizes}; {'; '.join(hints)}")

    def prepare_model(
        self, model: nn.Module, adapter, calibration: Tensor | None, *, progress: bool = False
    ) -> None:
        apply_quarot(model, adapter, self.args.seed, self.args.rotation, self.args.online_o)
        self.online_sizes = self._online_sizes(model)

    def _online_sizes(self, model: nn.Module) -> Tensor:
        dims = _dims(model)
        sizes = [dims["intermediate"]] + ([dims["attn_width"]] if self.args.online_o else [])
        return torch.tensor(sizes, dtype=torch.int64)

    def apply(self, ctx) -> None:
        """Nothing per block: all the work is whole-model (``prepare_model``)."""

    def saved_state(self) -> dict[str, Tensor]:
        sizes = getattr(self, "online_sizes", None)
        return {} if sizes is None else {"online_sizes": sizes}

    def restore(self, model: nn.Module, adapter, state: dict[str, Tensor]) -> None:
        """Re-install the online Hadamards (the weights already carry every fold)."""
        expected = self._online_sizes(model)
        saved = state.get("online_sizes")
        if saved is not None and not torch.equal(saved.to(torch.int64), expected):
            raise ChannelwiseError(
                f"quarot: the checkpoint's online Hadamard sizes {saved.tolist()} do not match "
                f"this model's {expected.tolist()}; the checkpoint does not match its config"
            )
        for module in _online_modules(model, adapter, self.args.online_o):
            install_online_hadamard(module)
        self.online_sizes = expected
