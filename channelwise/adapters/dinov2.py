"""DINOv2 Vision Transformers (``Dinov2Model``): pre-LN LayerNorm blocks with LayerScale.

The residual branches are scaled by LayerScale (``layer_scale1``/``layer_scale2``) after
``o_proj`` and ``fc2``; no channel transform folds through them, so none is declared. The patch
embedding (a convolution) and the final LayerNorm sit outside the blocks and stay in float.
The SwiGLU variant (``use_swiglu_ffn``, the giant model) has other MLP names and is refused.
"""

from channelwise.adapters.base import ModelAdapter, register_adapter
from channelwise.adapters.vit import pre_ln_vit_adapter
from channelwise.errors import UnsupportedModelError


@register_adapter("dinov2")
def dinov2_adapter(config) -> ModelAdapter:
    if getattr(config, "use_swiglu_ffn", False):
        raise UnsupportedModelError(
            "DINOv2 with a SwiGLU MLP (use_swiglu_ffn=True) is not supported yet; the "
            "small, base and large models (GELU MLP) are"
        )
    return pre_ln_vit_adapter("dinov2", "encoder.layer", ("norm1", "norm2"))
