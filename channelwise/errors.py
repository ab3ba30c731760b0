"""User-facing errors: each says what was wrong and what is expected.

Every error a user can cause derives from :class:`ChannelwiseError`; the CLI prints its message on
one line and exits with status 2 instead of showing a traceback.
"""


class ChannelwiseError(ValueError):
    """Base class of every error a user can act on."""


class RecipeError(ChannelwiseError):
    """A recipe is malformed, contradictory, or cannot be honoured by the model."""


class QuantConfigError(RecipeError):
    """A quantizer setting is invalid (bit-width, granularity, group size)."""


class NonFiniteError(ChannelwiseError):
    """NaN or inf met in weights or activations."""


class UnsupportedModelError(ChannelwiseError):
    """The model's architecture has no adapter, or the adapter cannot do what was asked."""


class ModelNotFoundError(ChannelwiseError):
    """A model path or hub id could not be loaded."""


class DataSourceError(ChannelwiseError):
    """A calibration or evaluation data source cannot be read or reached."""


class OutputPathError(ChannelwiseError):
    """An output path cannot be written: wrong kind, unwritable, or inside an input."""


class OutputExistsError(OutputPathError):
    """An output path exists and ``force`` was not given."""


class DeviceError(ChannelwiseError):
    """A requested compute device does not exist or is not available."""


class PackingError(ChannelwiseError):
    """Integer codes or a packed buffer do not fit the bit-packing layout (range, dtype, shape)."""


class CheckpointError(ChannelwiseError):
    """A saved checkpoint is corrupt, incomplete or does not match its config."""


class ExportError(ChannelwiseError):
    """A model cannot be written in a serving engine's format (the format cannot express it)."""


class KernelInputError(ChannelwiseError):
    """A kernel was given tensors of the wrong dtype, shape or layout."""


class KVCacheError(ChannelwiseError):
    """A compressed KV cache cannot be built or used as asked (unsupported model or input)."""
