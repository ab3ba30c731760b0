"""A compiled decode loop: ``model.generate`` through a static KV cache and a compiled forward.

Eager ``generate`` spends about a quarter of a SmolLM2 decode step outside the linears
(attention, norms, rotary, and the Python between ~250 modules: ~18 of ~70 ms on 1 CPU
thread), and that part does not shrink when the weights are packed. :func:`compile_decode`
sets the model's generation config to transformers' own compiled path — a ``StaticCache`` and
the forward compiled by ``torch.compile`` (inductor) — which transformers enables only on
accelerators by default; the CPU kernels of :mod:`channelwise.kernels` have shape functions
registered, so the whole decode step is one graph with the packed linears inside.

The prompt (prefill) still runs eagerly, as transformers runs it: W8A8's int8 GEMM serves it.
Inside the compiled graph a W8A8 linear with dynamic per-token int8 inputs runs the small-M
VNNI kernel (exact int32 sums, as eager); so does one with a calibrated static input scale
(OutlierTune, DGQ), the scale read once eagerly (``build_kernel_operands``: reading it in the
graph would break it) and traced as a constant.

The first ``generate`` after it compiles (~30 s for SmolLM2 on 2 CPU cores); a different
``max_new_tokens`` or prompt length compiles again (static shapes). By default the compiled
graph does not guard on module attributes (``skip_module_guards``: ~2 ms of a ~20 ms decode
step for SmolLM2): changing the model after the first ``generate`` (a submodule, a hook, a
packed buffer written in place) is then not noticed; call ``torch._dynamo.reset()`` and
:func:`compile_decode` again after such a change. Unguarded, the step must compile into one
graph (``fullgraph``): the pieces of a broken graph are code shared by every layer, and without
guards a piece compiled for one layer's modules would run for another's. A model that does not
compile whole makes the first ``generate`` raise torch's ``Unsupported`` error, naming the
break; ``skip_module_guards=False`` compiles it in guarded pieces.

Inside the graph, quantizers do not refuse NaN/inf activations (a data-dependent check breaks
the graph); non-finite values propagate into NaN outputs, as in the integer kernels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from channelwise.deploy.packed_modules import PackedCodes
from channelwise.deploy.sparse import SPARSE_INPUT_ATTR, SparseGatedMLP, build_sparse_weights
from channelwise.errors import ChannelwiseError, NonFiniteError
from channelwise.kernels import kernel_available


def compile_decode(
    model: nn.Module, *, skip_module_guards: bool = True, cpp_wrapper: bool = False
) -> nn.Module:
    """Make ``model.generate(...)`` decode through a static KV cache with its forward compiled
    (CPU included); returns ``model``. Packed linears keep their integer kernels inside the graph.
    ``skip_module_guards=False`` keeps dynamo's guards on module attributes (slower, and safe
    against changing the model afterwards). ``cpp_wrapper`` has inductor call the step's
    kernels from generated C++ instead of Python (inductor's ``cpp_wrapper``): less overhead per
    kernel call, which a batch-1 step of a small packed model makes ~1,000 of, at the cost of a
    much longer first compilation (minutes; cached afterwards)."""
    config = getattr(model, "generation_config", None)
    if config is None or not callable(getattr(model, "generate", None)):
        raise ChannelwiseError(
            f"compile_decode needs a generative transformers model (with .generate and a "
            f"generation_config), got {type(model).__name__}"
        )
    from transformers.generation.configuration_utils import CompileConfig

    packed = [m for m in model.modules() if isinstance(m, PackedCodes)]
    sparse = any(  # CHESS/CATS MLPs, TEAL's (and CHESS's q/o) sparse-input linears
        isinstance(m, SparseGatedMLP) or getattr(m, SPARSE_INPUT_ATTR, False)
        for m in model.modules()
    )
    if (packed or sparse) and next(model.parameters()).device.type == "cpu":
        kernel_available()  # builds the extension and registers its shape functions
    for module in packed:
        module.build_kernel_operands()
    if sparse:
        build_sparse_weights(model)
    options = {}
    if skip_module_guards:
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    if cpp_wrapper:
        options["cpp_wrapper"] = True
    # mode and options are exclusive in torch.compile; the default mode is what CPU supports
    compile_config = CompileConfig(
        fullgraph=skip_module_guards,  # unguarded pieces of a broken graph could be misapplied
        dynamic=False,
        mode=None if options else "default",
        options=options or None,
    )
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only
    config.cache_implementation = "static"
    config.compile_config = compile_config
    return model


@dataclass(frozen=True)
class Generation:
    """What :func:`generate_text` produced and how long it took."""

    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    compile_seconds: float | None = None  # the warm-up generate that compiled (``compiled=True``)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    chat: bool = True,
    compiled: bool = False,
    cpp_wrapper: bool = False,
) -> Generation:
    """Greedy continuation of ``prompt`` (through the tokenizer's chat template when it has one
    and ``chat``), timed after an untimed warm-up (two tokens; with ``compiled``,
    :func:`compile_decode` and a whole ``generate`` of the same shapes, which compiles the step:
    ``compile_seconds``; ``cpp_wrapper``: see :func:`compile_decode`). A model quantized with a
    ``kv_cache`` recipe decodes through its compressed cache."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ChannelwiseError(f"the prompt must be non-empty text, got {prompt!r}")
    if not callable(tokenizer):
        raise ChannelwiseError(f"a tokenizer is needed to encode the prompt, got {tokenizer!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise ChannelwiseError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ChannelwiseError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not callable(getattr(model, "generate", None)):
        raise ChannelwiseError(f"{type(model).__name__} cannot generate text (no .generate)")
    from channelwise.evaluate.perplexity import check_positions
    from channelwise.kvcache.cache import KV_CONFIG_ATTR, make_cache
    from channelwise.kvcache.evaluate import cache_kwarg

    if cpp_wrapper and not compiled:
        raise ChannelwiseError("cpp_wrapper applies to the compiled decode loop (add --compile)")
    compressed_kv = getattr(model, KV_CONFIG_ATTR, None) is not None
    if compiled and compressed_kv:
        raise ChannelwiseError(
            "the compiled decode loop uses a static float KV cache; a compressed KV cache "
            "decodes eagerly (drop --compile)"
        )
    device = next(model.parameters()).device
    if chat and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        encoded = tokenizer(prompt, return_tensors="pt")
    ids = encoded["input_ids"].to(device)
    check_positions(
        model,
        ids.shape[-1] + max_new_tokens,
        f"a {ids.shape[-1]}-token prompt and {max_new_tokens} new tokens",
        "a shorter prompt or fewer --max-new-tokens",
    )
    mask = encoded.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    options = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        attention_mask=mask,
        output_scores=True,  # each step's logits, checked for NaN/inf
        return_dict_in_generate=True,
    )
    eos = getattr(tokenizer, "eos_token_id", None)
    if getattr(tokenizer, "pad_token_id", None) is None and eos is not None:
        options["pad_token_id"] = eos

    def run(**override):
        extra = {cache_kwarg(model): make_cache(model)} if compressed_kv else {}
        try:
            with torch.no_grad():
                return model.generate(ids, **{**options, **override}, **extra)
        except RuntimeError as error:  # a kernel's refusal, raised inside the compiled step
            if compiled and "NaN or inf" in str(error):
                raise NonFiniteError(
                    "NaN or inf activations in the compiled decode step (a kernel refused them)"
                ) from None
            raise

    def tokens(out) -> torch.Tensor:
        """The generated ids, after refusing NaN/inf logits (greedy decoding would silently
        pick token 0 from them)."""
        if not all(torch.isfinite(step).all() for step in out.scores):
            raise NonFiniteError(
                "the model's logits hold NaN or inf while generating; check the checkpoint "
                "(channelwise eval refuses it too)"
            )
        return out.sequences

    compile_seconds = None
    if compiled:
        compile_decode(model, cpp_wrapper=cpp_wrapper)
        start = time.perf_counter()
        warm = run()
        compile_seconds = time.perf_counter() - start
    else:  # builds the kernels' operands and loads the extension outside the timing
        warm = run(max_new_tokens=min(2, max_new_tokens))
    tokens(warm)
    start = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - start
    new = tokens(out)[0, ids.shape[1] :]
    return Generation(
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=int(ids.shape[1]),
        new_tokens=int(new.numel()),
        seconds=seconds,
        compile_seconds=compile_seconds,
    )
