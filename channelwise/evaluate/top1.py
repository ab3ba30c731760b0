"""Top-1 of a vision backbone through a frozen linear probe, and its agreement with float.

A backbone has no classifier of its own here (the embedded DINOv2 is self-supervised), so a
linear probe is fitted once on the float model's features of training images and then frozen:
every compressed model is scored through the same probe. Features are the final-LayerNorm class
token concatenated with the mean of the patch tokens (DINOv2's linear-evaluation features,
arXiv 2304.07193 §7); a backbone without a class token (Swin) gives the mean of its tokens, as
its own pooler does. The probe is ridge regression onto one-hot labels in closed form, on
standardised features, its ridge chosen from a fixed grid by accuracy on a held-out tenth of the
probe's training images (never on the evaluation images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from channelwise.adapters import adapter_for_config
from channelwise.data.images import ImageSet
from channelwise.engine import model_device
from channelwise.errors import CheckpointError, DataSourceError, NonFiniteError
from channelwise.evaluate.perplexity import overflow_hint
from channelwise.paths import staged_file

RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
HELD_OUT = 0.1


@torch.no_grad()
def image_features(
    model: nn.Module,
    images: ImageSet,
    resolution: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 64,
    progress: bool = True,
) -> torch.Tensor:
    """``(n, 2·hidden)`` float32 features: ``[class token, mean of patch tokens]`` of the
    backbone's last hidden state (after its final LayerNorm); ``(n, hidden)``, the mean of all
    tokens, for a backbone without a class token (Swin)."""
    adapter = adapter_for_config(model.config)
    if adapter.check_image is not None:
        adapter.check_image(resolution, resolution)
    device = model_device(model)
    out = []
    for start in tqdm(
        range(0, len(images), batch_size), desc="images", disable=not progress, leave=False
    ):
        pixels = images.pixels(start, min(start + batch_size, len(images)), resolution, mean, std)
        hidden = adapter.run(model, pixels.to(device)).last_hidden_state.float()
        if not torch.isfinite(hidden).all():
            raise NonFiniteError(
                f"the model produced NaN/inf features on images {start}..{start + batch_size}; "
                + overflow_hint(model, "a wider bit-width")
            )
        if adapter.class_token:
            pooled = torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=-1)
        else:
            pooled = hidden.mean(dim=1)
        out.append(pooled.cpu())
    return torch.cat(out)


@dataclass
class LinearProbe:
    """``logits = ((f − mean) / scale) @ weight.T + bias`` over ``classes``."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    ridge: float

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.weight.shape[1]:
            raise CheckpointError(
                f"features of width {features.shape[-1]} do not fit a probe fitted on width "
                f"{self.weight.shape[1]}: was the probe fitted on another model?"
            )
        return ((features - self.mean) / self.scale) @ self.weight.T + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).argmax(dim=-1)

    def save(self, path: Path) -> None:
        tensors = {
            "weight": self.weight,
            "bias": self.bias,
            "mean": self.mean,
            "scale": self.scale,
            "ridge": torch.tensor([self.ridge], dtype=torch.float64),
        }
        with staged_file(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))

    @classmethod
    def load(cls, path: Path) -> LinearProbe:
        try:
            t = load_file(str(path))
            return cls(t["weight"], t["bias"], t["mean"], t["scale"], float(t["ridge"][0]))
        except (OSError, KeyError, Exception) as exc:  # safetensors errors share no base class
            raise CheckpointError(f"{path} is not a linear probe ({exc})") from exc


def fit_probe(
    features: torch.Tensor, labels: torch.Tensor, classes: int, seed: int = 0
) -> LinearProbe:
    """Closed-form ridge probe; the ridge is picked on a seeded held-out tenth, then refitted
    on all of ``features``."""
    if features.shape[0] != labels.shape[0] or features.shape[0] < 20:
        raise DataSourceError(
            f"a linear probe needs at least 20 labelled images (got {features.shape[0]} features "
            f"and {labels.shape[0]} labels); raise --probe-images"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(features.shape[0], generator=generator)
    held = max(1, int(HELD_OUT * features.shape[0]))
    val, train = order[:held], order[held:]
    best = max(
        RIDGE_GRID,
        key=lambda ridge: (
            (
                _solve(features[train], labels[train], classes, ridge).predict(features[val])
                == labels[val]
            )
            .float()
            .mean()
            .item()
        ),
    )
    return _solve(features, labels, classes, best)


def _solve(features: torch.Tensor, labels: torch.Tensor, classes: int, ridge: float):
    x = features.double()
    mean = x.mean(dim=0)
    scale = x.std(dim=0).clamp_min(1e-6)
    z = (x - mean) / scale
    targets = F.one_hot(labels, classes).double()
    target_mean = targets.mean(dim=0)
    gram = z.T @ z + ridge * z.shape[0] * torch.eye(z.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, z.T @ (targets - target_mean)).T
    return LinearProbe(weight.float(), target_mean.float(), mean.float(), scale.float(), ridge)


@dataclass(frozen=True)
class Top1:
    """Top-1 on labelled images, agreement of predictions with the float model's, and the mean
    cosine similarity of the features to the float model's (1.0 for the float model itself)."""

    top1: float
    agreement: float
    feature_cosine: float
    images: int


def score(
    features: torch.Tensor,
    labels: torch.Tensor,
    probe: LinearProbe,
    reference: torch.Tensor | None = None,
) -> Top1:
    """Score ``features`` against ``labels``; ``reference`` are the float model's features of
    the same images (defaults to ``features``: the float model's own row)."""
    reference = features if reference is None else reference
    if reference.shape != features.shape:
        raise DataSourceError("reference features must be of the same images")
    predicted = probe.predict(features)
    return Top1(
        top1=100.0 * (predicted == labels).float().mean().item(),
        agreement=100.0 * (predicted == probe.predict(reference)).float().mean().item(),
        feature_cosine=F.cosine_similarity(features, reference, dim=-1).mean().item(),
        images=int(labels.shape[0]),
    )
