"""Names compress, models, deploy and kvcache share: the attributes a compressed model carries
and the files of a saved folder. A leaf module, so any of them can import it at top level."""

#: The :class:`~channelwise.recipe.Recipe` a model was compressed with.
RECIPE_ATTR = "channelwise_recipe"
#: The built methods of its steps, in step order.
METHODS_ATTR = "channelwise_methods"
#: Its KV-cache method, or None.
KV_METHOD_ATTR = "channelwise_kv_method"
#: The KV-cache configuration ``make_cache(model)`` uses by default.
KV_CONFIG_ATTR = "_channelwise_kv_config"
#: The recipe name of a ``quantize`` that failed after it began changing the model in place.
FAILED_ATTR = "_channelwise_failed"
#: An offloaded model's :class:`~channelwise.offload.DiskWeights` (its blocks wait on disk).
OFFLOAD_ATTR = "_channelwise_offload"

#: A saved folder's description: recipe, format, packed modules, input quantizers.
MARKER_FILE = "channelwise.json"
#: Calibrated ranges of static input quantizers.
STATIC_QPARAMS_FILE = "activation_qparams.safetensors"
#: Calibrated static attention quantizers (q/k/v ranges, log√2 or SULQ softmax parameters).
ATTENTION_RANGES_FILE = "attention_ranges.safetensors"
#: Tensors the steps' runtime ops and the KV method saved (``saved_state``).
STEP_STATE_FILE = "step_state.safetensors"
