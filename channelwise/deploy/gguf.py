"""Export a packed model to one GGUF file, the format llama.cpp loads: Llama, Mistral, Qwen2,
Qwen3, Gemma 2, Gemma 3 and Phi-3 (:data:`GGUF_ARCHITECTURES`).

Each quantized linear's codes and scales are written, as they are, into GGUF's 32-element blocks
(built here byte by byte, :func:`gguf_blocks`); nothing is re-quantized. What maps exactly:

============================================  ===========  ==============================
our grid (groups of 32 input channels,        GGUF type    GGUF value of code ``u``
``scale_dtype: float16``)
============================================  ===========  ==============================
4-bit symmetric (codes −8…7)                  ``Q4_0``     ``d·(u − 8)``,  u = q + 8
4-bit asymmetric, ``zero_point: float``       ``Q4_1``     ``d·u + m``
5-bit symmetric (codes −16…15)                ``Q5_0``     ``d·(u − 16)``, u = q + 16
5-bit asymmetric, ``zero_point: float``       ``Q5_1``     ``d·u + m``
8-bit symmetric (codes −128…127)              ``Q8_0``     ``d·u`` (u int8)
============================================  ===========  ==============================

Everything else is refused with :class:`ExportError` before anything is written: other bit
widths or group sizes, float32 scales (GGUF stores float16), integer zero points (``(q − z)·s``
is not ``d·q + m`` bit for bit), activation or attention quantizers (llama.cpp runs float
activations), online ops such as QuaRot's online Hadamard (GGUF cannot express a runtime
rotation), other architectures (OPT, GPT-2, GPT-NeoX). Rotations and smoothing folded into the
weights need nothing at runtime and export as they are.

Tensors use llama.cpp's names, from the ``gguf`` package's own per-architecture map
(``token_embd``, ``blk.N.attn_q`` …, ``output_norm``, ``output`` when untied; Qwen3's
``attn_q_norm``/``attn_k_norm``, Gemma's ``post_attention_norm``/``post_ffw_norm``), its row
order for Q and K in the ``llama`` architecture (``convert_hf_to_gguf.py``'s ``permute``, which
transformers' GGUF loader undoes), and its Gemma norms: the factor ``1 + w`` itself, as
llama.cpp's converter writes them (transformers' loader subtracts the 1 again). Norms are
F32; unquantized embedding/head F32 or F16. Phi-3's fused ``qkv_proj`` and ``gate_up_proj``,
quantized as separate parts (:class:`~channelwise.adapters.phi3.SplitLinear`), are written fused
again as ``attn_qkv`` and ``ffn_up``: their rows concatenated, each row's blocks as they are (a
GGUF block never spans two rows, so this is exact), and refused if the parts' grids differ.
:func:`verify_gguf` reads the file back with ``gguf.GGUFReader`` and de-quantizes every tensor
with ``gguf.quants.dequantize``: the values must equal ours exactly (both compute ``d·u`` and
``d·u + m`` as separately rounded float32 products and sums).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from channelwise.adapters import norm_gain
from channelwise.adapters.phi3 import SplitLinear
from channelwise.deploy.exportable import exported_recipe, packed_linears, refuse_online_steps
from channelwise.deploy.gguf_tokenizer import add_tokenizer
from channelwise.deploy.packed_modules import PackedCodes, PackedTiedHead
from channelwise.errors import ExportError, OutputExistsError
from channelwise.paths import check_replaceable, staged_file
from channelwise.quant import PerGroup, QuantSpec
from channelwise.state import RECIPE_ATTR

BLOCK = 32
FLOAT_TYPES = ("F32", "F16")
#: Hugging Face ``model_type`` → the llama.cpp architecture its GGUF declares.
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}


def gguf_architecture(config) -> str:
    """The llama.cpp architecture name of ``config``'s model, or :class:`ExportError`."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_ARCHITECTURES:
        raise ExportError(
            f"a {model_type or type(config).__name__} model; the GGUF exporter writes "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))} models"
        )
    return GGUF_ARCHITECTURES[model_type]


def _name_map(config):
    """gguf's own Hugging Face → llama.cpp tensor-name map for ``config``'s architecture (the
    one llama.cpp's converter and transformers' GGUF loader use)."""
    import gguf

    arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[gguf_architecture(config)]
    return gguf.get_tensor_name_map(arch, config.num_hidden_layers)


def gguf_type(spec: QuantSpec, where: str = "weight"):
    """The ``GGMLQuantizationType`` that stores ``spec``'s grid exactly, or :class:`ExportError`."""
    from gguf import GGMLQuantizationType as T

    g = spec.granularity
    if not (isinstance(g, PerGroup) and g.along == "input" and g.size == BLOCK):
        raise ExportError(
            f"{where}: {g} scales; GGUF's block formats hold one scale per group of {BLOCK} input "
            "channels (use granularity: group, group_size: 32)"
        )
    if spec.scale_dtype != "float16":
        raise ExportError(
            f"{where}: float32 scales; GGUF blocks store float16 scales, so the values would "
            "change (quantize with scale_dtype: float16, e.g. preset rtn-w4a16-q4_0)"
        )
    if spec.symmetric:
        types = {4: T.Q4_0, 5: T.Q5_0, 8: T.Q8_0}
    elif spec.float_zero:
        types = {4: T.Q4_1, 5: T.Q5_1}
    else:
        raise ExportError(
            f"{where}: asymmetric grid with an integer zero point, values (q − z)·s; GGUF's "
            "Q4_1/Q5_1 store d·q + m with a float16 minimum, which that does not equal bit for "
            "bit (quantize with zero_point: float, e.g. preset rtn-w4a16-q4_1)"
        )
    if spec.bits not in types:
        kind = "symmetric" if spec.symmetric else "asymmetric (float minimum)"
        raise ExportError(
            f"{where}: {spec.bits}-bit {kind} weights; GGUF has {kind} block formats for "
            f"{', '.join(map(str, types))} bits only"
        )
    return types[spec.bits]


def gguf_blocks(codes: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec) -> np.ndarray:
    """GGUF block bytes ``(rows, cols/32 · block_bytes)`` uint8 of integer ``codes``
    ``(rows, cols)`` in ``[qmin, qmax]``, float16-valued ``scale`` ``(rows, cols/32)`` and, for a
    float-minimum grid, ``zero`` (the minimums, same shape)."""
    from gguf import GGMLQuantizationType as T

    qtype = gguf_type(spec)
    rows, cols = codes.shape
    u = (codes.to(torch.int16) - spec.qmin).to(torch.uint8).reshape(rows, cols // BLOCK, BLOCK)
    parts = [_half_bytes(scale, "scale")]
    if spec.float_zero:
        parts.append(_half_bytes(zero, "minimum"))
    if qtype == T.Q8_0:
        parts.append((u.to(torch.int16) + spec.qmin).to(torch.int8).view(torch.uint8))
    else:  # element j in the low nibble of byte j, element j + 16 in its high nibble
        low = u & 0x0F
        if spec.bits == 5:  # the fifth bits: bit j of a little-endian uint32 is element j's
            weights = torch.tensor([1 << k for k in range(8)], dtype=torch.int32)
            high = (u >> 4).to(torch.int32).reshape(rows, cols // BLOCK, 4, 8)
            parts.append((high * weights).sum(-1).to(torch.uint8))
        parts.append(low[..., :16] | (low[..., 16:] << 4))
    return torch.cat(parts, dim=-1).reshape(rows, -1).numpy()


def _half_bytes(values: Tensor, what: str) -> Tensor:
    half = values.detach().cpu().to(torch.float16)
    if not torch.equal(half.float(), values.detach().cpu().float()):
        raise ExportError(f"a {what} is not a float16 value; the grid was not built for GGUF")
    return half.view(torch.uint8).reshape(*values.shape, 2)


def qk_permutation(rows: int, n_head: int) -> Tensor:
    """Row order llama.cpp expects for a Q or K projection of ``n_head`` heads: within each
    head, the rotary pairs (i, i + d/2) of the HF layout become neighbours (2i, 2i + 1)."""
    head_dim = rows // n_head
    return torch.arange(rows).reshape(n_head, 2, head_dim // 2).transpose(1, 2).reshape(-1)


def export_gguf(
    model: nn.Module,
    out: str | os.PathLike,
    tokenizer=None,
    tokenizer_gguf: str | os.PathLike | None = None,
    float_type: str = "F32",
    force: bool = False,
) -> Path:
    """Write packed ``model`` (after :func:`~channelwise.deploy.pack_model`) as one GGUF.

    ``out`` is a ``.gguf`` file, or a folder that gets ``<recipe name>.gguf``. The tokenizer is
    copied from ``tokenizer_gguf`` (the GGUF the model came from: every ``tokenizer.*`` key) or
    built from the Hugging Face ``tokenizer`` (its vocabulary, BPE merges, special ids).
    ``float_type`` (``F32``/``F16``) stores an unquantized embedding or head. The file is written
    under a temporary name and renamed into place. Returns its path.
    """
    import gguf

    if float_type not in FLOAT_TYPES:
        raise ExportError(f"float_type must be one of {', '.join(FLOAT_TYPES)}, not {float_type!r}")
    recipe = _check_exportable(model)
    path = gguf_path(out, recipe.name)
    for source in (getattr(model, "name_or_path", None), tokenizer_gguf):
        if source and Path(source).expanduser().resolve() == path:
            raise OutputExistsError(f"refusing to write over the input file {path}")
    check_replaceable(path, force, kind="gguf")
    tensors = list(_tensors(model, float_type))  # every refusal happens before writing
    config = model.config

    with staged_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf_architecture(config))
        writer.add_name(f"{Path(str(config.name_or_path or 'model')).name} {recipe.name}")
        writer.add_string("general.quantized_by", "channelwise")
        writer.add_string("channelwise.recipe", getattr(model, RECIPE_ATTR).to_yaml())
        _add_metadata(writer, config)
        writer.add_file_type(_file_type(tensors))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, config, tokenizer, tokenizer_gguf)
        for name, data, qtype in tensors:
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def gguf_path(out: str | os.PathLike, recipe_name: str) -> Path:
    """The file ``out`` names: itself if it ends in ``.gguf``, else ``out/<recipe>.gguf``
    (a recipe name is validated by :class:`~channelwise.recipe.Recipe`; one that would leave
    ``out`` is refused here too)."""
    out = Path(out).expanduser().resolve()
    if out.suffix == ".gguf":
        return out
    path = (out / f"{recipe_name}.gguf").resolve()
    if path.parent != out:
        raise ExportError(f"recipe name {recipe_name!r} would write outside {out}")
    return path


def _check_exportable(model: nn.Module):
    recipe = exported_recipe(model)
    gguf_architecture(model.config)
    scaling = getattr(model.config, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ExportError(f"rope scaling {scaling}; the GGUF exporter writes plain RoPE only")
    packed_linears(model, recipe)
    if getattr(recipe, "activations", None) is not None or getattr(recipe, "attention", None):
        raise ExportError(
            f"recipe '{recipe.name}' quantizes activations or attention inputs; llama.cpp "
            "multiplies GGUF weights with float activations, so the export would compute a "
            "different model"
        )
    refuse_online_steps(
        model, recipe, "GGUF", "QuaRot's online Hadamard rotation or a runtime shift"
    )
    for name, module in model.named_modules():
        hooks = (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs)
        if any(hooks) or module._forward_hooks or module._forward_hooks_with_kwargs:
            raise ExportError(
                f"{name}: a forward hook runs at runtime (an input quantizer or an online op "
                "such as a Hadamard rotation); GGUF cannot express it"
            )
    return recipe


def _named_tensors(model: nn.Module):
    """``(module name, module, gguf base name)`` of every module written to the file."""
    names = _name_map(model.config)
    for name, module in model.named_modules():
        base = names.get_name(name) if name else None
        if base is None or isinstance(module, PackedTiedHead):
            continue
        if name == "lm_head" and module.weight is model.get_input_embeddings().weight:
            continue  # tied: llama.cpp reads token_embd when output is absent
        yield name, module, base


def _tensors(model: nn.Module, float_type: str):
    """``(gguf name, numpy data, GGMLQuantizationType)`` for every tensor, in file order."""
    from gguf import GGMLQuantizationType as T

    mapped: set[int] = set()
    for name, module, base in _named_tensors(model):
        perm = _row_permutation(model.config, name)
        parts = _fused_parts(module, name)
        if isinstance(parts[0], PackedCodes):
            spec = parts[0].spec
            qtype = gguf_type(spec, name)
            codes = torch.cat([part.codes() for part in parts])
            scale = torch.cat([part.scale for part in parts])
            zero = torch.cat([part.zero for part in parts]) if spec.float_zero else None
            if perm is not None:
                codes, scale = codes[perm], scale[perm]
                zero = None if zero is None else zero[perm]
            yield f"{base}.weight", gguf_blocks(codes, scale, zero, spec), qtype
        else:
            weight = _float_weight(parts).detach().float().cpu()
            weight = weight if perm is None else weight[perm]
            f16 = float_type == "F16" and weight.ndim == 2
            data = weight.half() if f16 else weight
            yield f"{base}.weight", data.numpy(), T.F16 if f16 else T.F32
        for part in parts:
            mapped.update(id(t) for t in part.parameters(recurse=False))
            mapped.update(id(t) for t in part.buffers(recurse=False))
        bias = _fused_bias(parts)
        if bias is not None:
            bias = bias.detach().float().cpu()
            yield f"{base}.bias", (bias if perm is None else bias[perm]).numpy(), T.F32
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in mapped:
            raise ExportError(
                f"'{key}' has no place in llama.cpp's {gguf_architecture(model.config)} "
                "architecture"
            )


def _fused_parts(module: nn.Module, name: str) -> list[nn.Module]:
    """The modules one GGUF tensor is made of: a split fused linear's parts (same grid), else
    ``module`` itself."""
    if not isinstance(module, SplitLinear):
        return [module]
    parts = list(module.children())
    specs = {part.spec if isinstance(part, PackedCodes) else None for part in parts}
    if len(specs) != 1:
        raise ExportError(
            f"{name}: its parts ({', '.join(n for n, _ in module.named_children())}) are "
            "quantized differently; llama.cpp stores them as one fused tensor of one type"
        )
    return parts


def _float_weight(parts: list[nn.Module]) -> Tensor:
    """A float tensor's values as written (a Gemma norm's ``1 + w``; a fused linear's rows)."""
    if len(parts) == 1:
        return norm_gain(parts[0])
    return torch.cat([part.weight for part in parts])


def _fused_bias(parts: list[nn.Module]) -> Tensor | None:
    biases = [getattr(part, "bias", None) for part in parts]
    return None if any(b is None for b in biases) else torch.cat(biases)


def _dequantized(parts: list[nn.Module]) -> Tensor:
    if isinstance(parts[0], PackedCodes):
        return torch.cat([part.dequantized() for part in parts])
    return _float_weight(parts)


def _row_permutation(config, name: str) -> Tensor | None:
    """llama.cpp's Q/K row order; only its ``llama`` architecture permutes."""
    if gguf_architecture(config) != "llama":
        return None
    heads = config.num_attention_heads
    if name.endswith("self_attn.q_proj"):
        return qk_permutation(config.hidden_size // heads * heads, heads)
    if name.endswith("self_attn.k_proj"):
        kv = getattr(config, "num_key_value_heads", None) or heads
        return qk_permutation(_head_dim(config) * kv, kv)
    return None


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_dims(config) -> int:
    """Rotary dimensions per head (Phi-3 variants may rotate a fraction of each head)."""
    return int(_head_dim(config) * (getattr(config, "partial_rotary_factor", None) or 1.0))


def _add_metadata(writer, config) -> None:
    heads = config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(_rope_dims(config))
    if _head_dim(config) * heads != config.hidden_size or config.model_type.startswith("gemma"):
        writer.add_key_length(_head_dim(config))
        writer.add_value_length(_head_dim(config))
    if getattr(config, "sliding_window", None) and config.model_type.startswith(("gemma", "phi3")):
        writer.add_sliding_window(int(config.sliding_window))
    for key, add in (
        ("attn_logit_softcapping", writer.add_attn_logit_softcapping),
        ("final_logit_softcapping", writer.add_final_logit_softcapping),
    ):
        if getattr(config, key, None) is not None:
            add(float(getattr(config, key)))


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # newer transformers keep it in rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return theta


def _file_type(tensors) -> int:
    from gguf import GGMLQuantizationType as T
    from gguf import LlamaFileType as F

    kinds = {T.Q4_0: F.MOSTLY_Q4_0, T.Q4_1: F.MOSTLY_Q4_1, T.Q5_0: F.MOSTLY_Q5_0}
    kinds.update({T.Q5_1: F.MOSTLY_Q5_1, T.Q8_0: F.MOSTLY_Q8_0})
    counts: dict = {}
    for _name, data, qtype in tensors:
        if qtype in kinds:
            counts[kinds[qtype]] = counts.get(kinds[qtype], 0) + data.size
    return int(max(counts, key=counts.get))


def verify_gguf(path: str | os.PathLike, model: nn.Module) -> float:
    """Read the export at ``path`` back with ``gguf.GGUFReader`` and compare it with ``model``.

    Every tensor is de-quantized by ``gguf.quants.dequantize`` (Q/K rows put back in the HF
    order) and compared with the model's own weight (:meth:`PackedCodes.dequantized` for packed
    ones; a Gemma norm's ``1 + w``); the metadata must match ``model.config``. Returns the
    largest absolute difference over all tensors: 0.0 for a faithful export (F16 float tensors
    are compared with the float16 rounding of ours). A missing tensor or wrong metadata raises
    :class:`ExportError`.
    """
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    _check_metadata(reader, model.config, path)
    stored = {t.name: t for t in reader.tensors}
    expected = {}
    for name, module, base in _named_tensors(model):
        parts = _fused_parts(module, name)
        expected[f"{base}.weight"] = (name, _dequantized(parts))
        bias = _fused_bias(parts)
        if bias is not None:
            expected[f"{base}.bias"] = (name, bias)
    if set(stored) != set(expected):
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        raise ExportError(f"{path}: tensors missing {missing[:5]}, unexpected {extra[:5]}")
    worst = 0.0
    for key, (name, ours) in expected.items():
        tensor = stored[key]
        theirs = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type)))
        theirs = theirs.float().reshape(ours.shape)
        perm = _row_permutation(model.config, name)
        if perm is not None:
            theirs = theirs[torch.argsort(perm)]
        ours = ours.detach().float().cpu()
        if tensor.tensor_type == T.F16:
            ours = ours.half().float()
        worst = max(worst, (theirs - ours).abs().max().item())
    return worst


def _check_metadata(reader, config, path) -> None:
    def value(key: str):
        field = reader.fields.get(key)
        if field is None:
            raise ExportError(f"{path}: metadata '{key}' is missing")
        return field.contents()

    arch = gguf_architecture(config)
    if value("general.architecture") != arch:
        raise ExportError(f"{path}: architecture {value('general.architecture')!r}, not {arch}")
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    want = {
        "block_count": config.num_hidden_layers,
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads,
        "attention.head_count_kv": kv,
        "rope.dimension_count": _rope_dims(config),
        "vocab_size": config.vocab_size,
        "rope.freq_base": np.float32(_rope_theta(config)),
        "attention.layer_norm_rms_epsilon": np.float32(config.rms_norm_eps),
    }
    want = {f"{arch}.{key}": expected for key, expected in want.items()}
    for key, expected in want.items():
        if value(key) != expected:
            raise ExportError(f"{path}: {key} is {value(key)}, the model has {expected}")
    if len(reader.fields["tokenizer.ggml.tokens"].data) != config.vocab_size:
        raise ExportError(f"{path}: the token list does not have {config.vocab_size} entries")
