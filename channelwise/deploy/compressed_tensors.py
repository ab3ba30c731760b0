"""Export a packed model to the compressed-tensors format that vLLM loads.

The folder is a Hugging Face checkpoint whose ``config.json`` carries a ``quantization_config``
in compressed-tensors' own schema (built with its ``QuantizationConfig``, ``QuantizationScheme``
and ``QuantizationArgs`` classes and written by its ``ModelCompressor.update_config``), and whose
quantized linears were compressed by the package's own compressors (``compress_module``:
``pack-quantized`` for weight-only schemes, ``int-quantized`` for W8A8). Non-quantized tensors
(embeddings, norms, ``lm_head``) are written as they are, by ``save_pretrained``.

What maps exactly (anything else is refused with :class:`ExportError`, before writing):

- weight-only int4 / int8 with per-output-channel (``channel``) or input-group (``group``)
  scales, symmetric or asymmetric (zero points, stored by the package as signed ``int8`` offset
  by ``2^{b−1}``: ``q_ct − z_ct = q − z`` exactly);
- W8A8: symmetric int8 per-channel or per-tensor weights with int8 inputs, dynamic per-token or
  static per-tensor (``input_scale``, and ``input_zero_point`` if asymmetric).

Scales stay float32, as the packed model holds them, so decompressing the export with the
package reproduces :meth:`PackedLinear.dequantized` bit for bit (:func:`verify_compressed_tensors`).
Transforms already folded into the weights need nothing at runtime; an online op (QuaRot's online
Hadamard, a step with saved runtime state) cannot be expressed and is refused.

Not verified here: loading with vLLM itself (not installed on this machine). The schemes above
are the ones vLLM's compressed-tensors integration names (``WNA16`` for 4/8-bit channel/group
weights, ``W8A8Int8`` for symmetric int8 weights with per-token or per-tensor inputs); vLLM casts
float32 scales to the model's dtype when it loads them. GPT-2's ``Conv1D`` layers are refused:
vLLM transposes their weights on load, which packed weights cannot undergo.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from channelwise.deploy.exportable import exported_recipe, packed_linears, refuse_online_steps
from channelwise.deploy.packed import _set_submodule
from channelwise.deploy.packed_modules import PackedLinear
from channelwise.errors import ExportError
from channelwise.paths import output_folder, staged_folder
from channelwise.quant import PerGroup, PerRow, PerTensor, QuantSpec
from channelwise.quant.activation import InputQuantizer, input_quantizer

SUPPORTED_WEIGHT_BITS = (4, 8)


def export_compressed_tensors(
    model: nn.Module, tokenizer, out_dir: str | Path, force: bool = False
) -> Path:
    """Write packed ``model`` (after :func:`~channelwise.deploy.pack_model`) as compressed-tensors.

    The folder holds ``config.json`` (with ``quantization_config``), ``model.safetensors`` and the
    tokenizer; it is written under a temporary name and renamed into place. Raises
    :class:`ExportError` for what the format cannot express, :class:`OutputExistsError` if
    ``out_dir`` exists and ``force`` is false. Returns the folder.
    """
    _require_package()
    from compressed_tensors.compressors.base import compress_module
    from compressed_tensors.compressors.model_compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    out = output_folder(out_dir, model, force)
    schemes = plan_schemes(model)  # every refusal happens here, before anything is written

    export = copy.deepcopy(model)
    groups: dict[str, dict] = {}  # scheme JSON → {"scheme", "names"}
    for name, scheme in schemes.items():
        packed = export.get_submodule(name)
        linear = _compressible_linear(packed, input_quantizer(packed), scheme)
        compress_module(linear)
        _check_round_trip(name, linear, packed)
        _set_submodule(export, name, linear)
        key = scheme.model_dump_json(exclude={"targets", "format"})
        groups.setdefault(key, {"scheme": scheme, "names": []})["names"].append(name)
    for module in export.modules():  # input quantizers, compressed-tensors' own hooks: not saved
        module._forward_pre_hooks.clear()

    ignore = [
        name
        for name, module in export.named_modules()
        if isinstance(module, nn.Linear) and name not in schemes
    ]
    config_groups = {}
    for index, group in enumerate(groups.values()):
        targets = ["Linear"] if len(groups) == 1 else [f"re:^{n}$" for n in group["names"]]
        config_groups[f"group_{index}"] = group["scheme"].model_copy(update={"targets": targets})
    formats = {s.format for s in schemes.values()}
    qconfig = QuantizationConfig(
        config_groups=config_groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )

    with staged_folder(out) as tmp:
        export.save_pretrained(tmp)
        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def transformers_load_options(folder: Path) -> dict:
    """Extra ``from_pretrained`` arguments for a compressed-tensors checkpoint in ``folder``
    (``{}`` for any other folder).

    A weight-only scheme is de-quantized once at load
    (``CompressedTensorsConfig(dequantize=True)``): the same floats the compressed route
    computes, dense, and the only route that reads the package's packed asymmetric zero points
    with transformers 5.x (its compressed route builds them unpacked and stops on the size
    mismatch). A scheme that quantizes activations keeps the compressed route, so the package's
    own forward quantizes the inputs (symmetric int8 on its ``absmax / 127.5`` grid, where ours
    and vLLM's kernel use ``absmax / 127``).
    """
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quantization, dict):
        return {}
    if quantization.get("quant_method") != "compressed-tensors":
        return {}
    groups = quantization.get("config_groups") or {}
    quantizes_activations = any(
        isinstance(group, dict)
        and (group.get("input_activations") or group.get("output_activations"))
        for group in groups.values()
    ) or bool(quantization.get("kv_cache_scheme"))
    if quantizes_activations:
        return {}
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def _require_package() -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ExportError(
            "--format compressed-tensors needs the compressed-tensors package: "
            "pip install compressed-tensors==0.20.0"
        ) from None


def plan_schemes(model: nn.Module) -> dict:
    """``{module name: QuantizationScheme}`` for every packed linear, or :class:`ExportError`."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme

    recipe = exported_recipe(model)
    packed = packed_linears(model, recipe)
    for field, what in (("attention", "attention / KV-cache"), ("embedding", "embedding")):
        if getattr(recipe, field, None) is not None:
            raise ExportError(
                f"recipe '{recipe.name}' quantizes the {what}; this exporter writes quantized "
                "block linears only, and would silently drop it"
            )
    refuse_online_steps(
        model, recipe, "compressed-tensors", "an online Hadamard rotation or a runtime shift"
    )
    schemes = {}
    for name, module in packed.items():
        quantizer = input_quantizer(module)
        extra = len(module._forward_pre_hooks) - (quantizer is not None)
        if extra or module._forward_pre_hooks_with_kwargs or module._forward_hooks:
            raise ExportError(
                f"{name}: a forward hook besides its input quantizer (an online op such as "
                "QuaRot's Hadamard) runs at runtime; compressed-tensors cannot express it"
            )
        if module.transposed:
            raise ExportError(
                f"{name}: GPT-2 Conv1D layout; vLLM transposes these weights on load, which "
                "packed compressed-tensors weights cannot undergo"
            )
        weights = weight_args(module.spec, name)
        inputs = _input_args(quantizer, name)
        if inputs is not None and not (
            module.spec.bits == 8 and module.spec.symmetric and weights.strategy != "group"
        ):
            raise ExportError(
                f"{name}: {_describe(module.spec)} weights with int8 inputs; compressed-tensors' "
                "int8 activation scheme (W8A8) needs symmetric 8-bit per-channel or per-tensor "
                "weights"
            )
        if inputs is None and weights.strategy == "tensor":
            raise ExportError(
                f"{name}: weight-only quantization with one scale per tensor; the weight-only "
                "(WNA16) scheme takes per-channel or grouped scales"
            )
        scheme = QuantizationScheme(targets=[name], weights=weights, input_activations=inputs)
        scheme.format = infer_module_format(nn.Linear, scheme)
        schemes[name] = scheme
    return schemes


def _describe(spec: QuantSpec) -> str:
    kind = "symmetric" if spec.symmetric else "asymmetric"
    return f"{spec.bits}-bit {kind} {spec.granularity}"


def weight_args(spec: QuantSpec, where: str):
    """compressed-tensors' ``QuantizationArgs`` of a weight grid, or :class:`ExportError` for a
    grid it cannot hold (also checked on a recipe before any calibration)."""
    from compressed_tensors.quantization import QuantizationArgs

    if spec.bits not in SUPPORTED_WEIGHT_BITS:
        raise ExportError(
            f"{where}: {spec.bits}-bit weights; vLLM's compressed-tensors kernels take "
            f"{' or '.join(map(str, SUPPORTED_WEIGHT_BITS))}-bit integer weights"
        )
    g = spec.granularity
    if isinstance(g, PerRow):
        strategy, group_size = "channel", None
    elif isinstance(g, PerGroup) and g.along == "input":
        strategy, group_size = "group", g.size
    elif isinstance(g, PerTensor):
        strategy, group_size = "tensor", None
    else:
        raise ExportError(
            f"{where}: {g} weight scales (per input channel); compressed-tensors stores scales "
            "per output channel, per group of input channels or per tensor"
        )
    return QuantizationArgs(
        num_bits=spec.bits,
        type="int",
        symmetric=spec.symmetric,
        strategy=strategy,
        group_size=group_size,
        dynamic=False,
    )


def _input_args(quantizer: InputQuantizer | None, where: str):
    from compressed_tensors.quantization import QuantizationArgs

    if quantizer is None:
        return None
    spec, static = quantizer.spec, quantizer.qparams is not None
    if spec.bits != 8:
        raise ExportError(
            f"{where}: {spec.bits}-bit input activations (W{spec.bits}A{spec.bits}-like); "
            "compressed-tensors' integer activation scheme served by vLLM is 8-bit"
        )
    if static and isinstance(spec.granularity, PerTensor):
        return QuantizationArgs(
            num_bits=8, type="int", symmetric=spec.symmetric, strategy="tensor", dynamic=False
        )
    if not static and isinstance(spec.granularity, PerRow):
        if spec.range_method != "minmax" or spec.clip_ratio != 1.0:
            raise ExportError(
                f"{where}: dynamic input ranges by '{spec.range_method}' with clip ratio "
                f"{spec.clip_ratio}; compressed-tensors' dynamic scales are plain min-max"
            )
        return QuantizationArgs(
            num_bits=8, type="int", symmetric=spec.symmetric, strategy="token", dynamic=True
        )
    kind = "static" if static else "dynamic"
    raise ExportError(
        f"{where}: {kind} {spec.granularity} input quantization; compressed-tensors expresses "
        "int8 inputs dynamic per token or static per tensor"
    )


def _compressible_linear(packed: PackedLinear, quantizer: InputQuantizer | None, scheme):
    """An ``nn.Linear`` holding ``packed``'s dequantized weight and its qparams under
    compressed-tensors' names (zero points as signed int8: ``z − 2^{b−1}``), ready for
    ``compress_module``."""
    from compressed_tensors.quantization import QuantizationStatus

    spec = packed.spec
    linear = nn.Linear(packed.in_features, packed.out_features, packed.bias is not None)
    linear.weight = nn.Parameter(packed.dequantized().detach(), requires_grad=False)
    if packed.bias is not None:
        linear.bias = nn.Parameter(packed.bias.detach().clone(), requires_grad=False)
    shape = (1,) if isinstance(spec.granularity, PerTensor) else tuple(packed.scale.shape)
    params = {"weight_scale": packed.scale.detach().float().reshape(shape).clone()}
    if not spec.symmetric:
        offset = 2 ** (spec.bits - 1)
        params["weight_zero_point"] = (packed.zero.to(torch.int16) - offset).reshape(shape)
    if quantizer is not None and quantizer.qparams is not None:
        params["input_scale"] = quantizer.qparams.scale.detach().float().reshape(1).clone()
        if not quantizer.spec.symmetric:
            zero = quantizer.qparams.zero_point.detach().reshape(1)
            params["input_zero_point"] = zero.to(torch.int16) - 2 ** (quantizer.spec.bits - 1)
    for key, value in params.items():
        if not value.is_floating_point():
            value = value.to(torch.int8)
        linear.register_parameter(key, nn.Parameter(value.contiguous(), requires_grad=False))
    linear.quantization_scheme = scheme.model_copy(deep=True)
    linear.quantization_status = QuantizationStatus.FROZEN
    return linear.to(packed.qweight.device)


def _check_round_trip(name: str, linear: nn.Module, packed: PackedLinear) -> None:
    """Decompress ``linear``'s compressed state with its compressor; it must be ``packed``'s."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.utils import get_direct_state_dict

    scheme = linear.quantization_scheme
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    weight = compressor.decompress(get_direct_state_dict(linear), scheme)["weight"]
    if not torch.equal(weight.float(), packed.dequantized()):
        worst = (weight.float() - packed.dequantized()).abs().max().item()
        raise ExportError(
            f"{name}: compressed-tensors' {scheme.format} compressor does not reproduce the "
            f"packed weight (off by up to {worst:.3g}); its scales cannot be stored exactly"
        )


def verify_compressed_tensors(folder: str | Path, model: nn.Module) -> float:
    """Decompress the export in ``folder`` with compressed-tensors and compare it to ``model``.

    Every quantized linear's compressed state (read from the safetensors files under the
    package's own names) is decompressed by the compressor its config names; returns the largest
    ``|w_ct − PackedLinear.dequantized()|`` over all packed linears of ``model`` (0.0 when the
    scales are float32, as written). A linear the export lacks raises :class:`ExportError`.
    """
    _require_package()
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    fields = set(QuantizationConfig.model_fields)
    qconfig = QuantizationConfig.model_validate({k: v for k, v in config.items() if k in fields})
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    worst = 0.0
    for name, module in model.named_modules():
        if not isinstance(module, PackedLinear):
            continue
        scheme = _scheme_for(qconfig, name)
        local = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")}
        if scheme is None or not local:
            raise ExportError(f"{folder}: the export has no quantized tensors for {name}")
        compressor = BaseCompressor.get_value_from_registry(scheme.format or qconfig.format)
        weight = compressor.decompress(local, scheme)["weight"]
        worst = max(worst, (weight.float() - module.dequantized()).abs().max().item())
    return worst


def _scheme_for(qconfig, name: str):
    """The scheme of ``qconfig`` that compressed-tensors' own matcher gives linear ``name``."""
    from compressed_tensors.utils.match import is_match

    linear = nn.Linear(1, 1, device="meta")  # exported quantized layers are plain Linears
    for scheme in qconfig.config_groups.values():
        if is_match(name, linear, scheme.targets, qconfig.ignore or ()):
            return scheme
    return None
