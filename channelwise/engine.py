"""Block-wise calibration: one decoder block at a time, fed by the previous block's outputs.

The inputs of block 0 (and the keyword arguments the model passes every block: attention mask,
rotary position embeddings; per block where the model mixes layer types, as Gemma does) are
captured once; then for each block the method runs on that block
alone, and the block's outputs — computed *after* the method changed it, so quantization error
propagates as it will at inference — become the next block's inputs. Only the current block needs
to sit on the compute device; peak memory is one block plus the calibration activations.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from channelwise.adapters import ModelAdapter
from channelwise.adapters.mixtral import every_expert_sees_every_token
from channelwise.distributed import ProcessGroup
from channelwise.errors import NonFiniteError
from channelwise.offload import block_on_device, home_device


class _Captured(Exception):
    """Raised by a hook to end a forward pass once what it needs was seen."""


#: What :func:`run_until` grabs: a module's first positional input, its output, or its call
#: ``(args, kwargs)``.
Capture = Literal["input", "output", "call"]


def run_until(module: nn.Module, what: Capture, forward: Callable[[], object]) -> Any | None:
    """Call ``forward()`` (no grad), stopping it the first time ``module`` runs.

    Returns that run's input (``args[0]``, detached), output (detached if a tensor) or call
    ``(args, kwargs)`` as received — or ``None`` if ``module`` never ran (``forward`` completed).
    """
    got: list = []

    def keep(value) -> None:
        got.append(value)
        raise _Captured

    if what == "input":
        handle = module.register_forward_pre_hook(lambda _m, args: keep(args[0].detach()))
    elif what == "output":
        handle = module.register_forward_hook(lambda _m, _a, out: keep(_detached(out)))
    else:
        handle = module.register_forward_pre_hook(
            lambda _m, args, kwargs: keep((args, dict(kwargs))), with_kwargs=True
        )
    try:
        with torch.no_grad():
            forward()
    except _Captured:
        pass
    finally:
        handle.remove()
    return got[0] if got else None


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


@dataclass
class BlockContext:
    """Everything a method sees while it works on one block.

    ``inputs`` holds one hidden-state tensor per calibration batch, ``(batch, seq, hidden)``;
    ``kwargs`` the matching keyword arguments for the block's forward; ``progress`` whether a
    method may show its own progress bar for long work on the block; ``last`` whether this is
    the model's last block; ``group`` the calibration processes when calibration is spread over
    several (``inputs`` are then this process's share, and a method reduces what it observes
    across them, :mod:`channelwise.distributed`); ``model`` the whole model (what runs between
    blocks reads it).
    """

    index: int
    block: nn.Module
    adapter: ModelAdapter
    inputs: list[torch.Tensor]
    kwargs: list[dict]
    device: torch.device
    progress: bool = False
    last: bool = False
    group: ProcessGroup | None = None
    model: nn.Module | None = None
    #: Where ``block`` sits in the model; None: the adapter's ``block_path(index)`` (a
    #: transition between blocks, Swin's patch merging, gives its own).
    path: str | None = None

    def module_path(self) -> str:
        """The module path of ``block`` in the model (what its tensors' names start with)."""
        return self.path if self.path is not None else self.adapter.block_path(self.index)

    @property
    def is_transition(self) -> bool:
        """Whether ``block`` is a module between blocks (Swin's patch merging), not a block."""
        return self.path is not None

    def to_next_block(self, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """What the next block reads, given this block's output ``hidden`` on a batch it ran
        with ``kwargs``: ``hidden`` itself, or the adapter's transition between the two
        (Swin's patch merging after a stage's last block)."""
        if not self.adapter.transitions:
            return hidden
        if self.model is None:
            raise ValueError("a block context without its model cannot run the transition")
        return self.adapter.to_next_block(self.model, self.index, hidden, kwargs)

    def forward(self) -> list[torch.Tensor]:
        """Run the block on every calibration batch; outputs stay on the compute device."""
        with torch.no_grad():
            return [
                hidden_state(self.block(x.to(self.device), **kw))
                for x, kw in zip(self.inputs, self.kwargs, strict=True)
            ]

    def capture(
        self,
        name: str,
        what: Capture = "input",
        batches: Iterable[tuple[torch.Tensor, dict]] | None = None,
    ) -> list:
        """Per batch, submodule ``name``'s input ``(batch, seq, in)``, output or call
        ``(args, kwargs)`` (see :func:`run_until`); each batch's forward stops right there.

        ``batches`` are ``(hidden, kwargs)`` pairs (default: ``zip(inputs, kwargs)``); a batch in
        which the module never runs contributes nothing.
        """
        module = self.block.get_submodule(name)
        pairs = zip(self.inputs, self.kwargs, strict=True) if batches is None else batches
        got = [
            run_until(module, what, lambda x=x, kw=kw: self.block(x.to(self.device), **kw))
            for x, kw in pairs
        ]
        return [value for value in got if value is not None]

    @contextmanager
    def capture_inputs(self, names: tuple[str, ...]) -> Iterator[dict[str, list[torch.Tensor]]]:
        """Record the inputs of the named submodules during the forwards run inside the block."""
        captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        handles = [
            self.block.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, name=name: captured[name].append(args[0].detach())
            )
            for name in names
        ]
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def observe(self, names: tuple[str, ...], update: Callable[[str, torch.Tensor], None]) -> None:
        """Stream every named submodule's input through ``update(name, x)``, batch by batch.

        Use this for statistics and Hessians: nothing is kept beyond what ``update`` keeps. Each
        batch's forward stops as soon as every named module has been seen (at the last of them in
        execution order), so observing the attention inputs costs almost nothing.
        """
        wanted = set(names)

        def hook(_module, args, name, seen):
            update(name, args[0].detach())
            seen.add(name)
            if seen == wanted:
                raise _Captured

        with torch.no_grad():
            for x, kw in zip(self.inputs, self.kwargs, strict=True):
                seen: set[str] = set()
                handles = [
                    self.block.get_submodule(name).register_forward_pre_hook(
                        lambda module, args, name=name, seen=seen: hook(module, args, name, seen)
                    )
                    for name in names
                ]
                try:
                    self.block(x.to(self.device), **kw)
                except _Captured:
                    pass
                finally:
                    for handle in handles:
                        handle.remove()


def hidden_state(output) -> torch.Tensor:
    """A block's hidden-state output (the first element where it returns a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def capture_block_inputs(
    model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[dict]]:
    """Run the embeddings only, returning block 0's hidden states and kwargs per batch.

    ``input_ids`` are token ids ``(n, seq)``, or pixel values ``(n, 3, h, w)`` for a vision
    model (``adapter.run`` feeds each batch the way the model takes it)."""
    first = adapter.block_list(model)[0]
    inputs: list[torch.Tensor] = []
    kwargs: list[dict] = []
    device = model_device(model)
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        args, kw = run_until(first, "call", lambda ids=ids: adapter.run(model, ids))
        hidden, rest = split_block_call(first, args, kw)
        inputs.append(hidden)
        kwargs.append(rest)
    return inputs, kwargs


def split_block_call(block: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """A block call's hidden states (detached) and everything else as keyword arguments:
    positional ones after the hidden states are named by the block's ``forward`` signature
    (Swin passes ``input_dimensions`` positionally)."""
    if not args:
        return kwargs["hidden_states"].detach(), {
            k: v for k, v in kwargs.items() if k != "hidden_states"
        }
    rest = dict(kwargs)
    if len(args) > 1:
        names = [
            name
            for name, param in inspect.signature(block.forward).parameters.items()
            if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)
        ]
        rest.update(zip(names[1:], args[1:], strict=False))
    return args[0].detach(), rest


def varying_layer_kwargs(model: nn.Module, adapter: ModelAdapter | None = None) -> bool:
    """Whether blocks get different keyword arguments: a model mixing layer types (Gemma's
    sliding-window and global layers take their own masks and rotary embeddings), or one whose
    blocks change shape between stages (Swin's input dimensions halve after each merge)."""
    if adapter is not None and adapter.transitions:
        return True
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    return bool(layer_types) and len(set(layer_types)) > 1


def capture_layer_kwargs(
    model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Block 0's hidden states per batch, as :func:`capture_block_inputs` gives them, and per
    block, per batch, the keyword arguments the model passes that block (one forward of the
    float model per batch, stopped at the last block)."""
    blocks = adapter.block_list(model)
    inputs: list[torch.Tensor] = []
    per_block: list[list[dict]] = [[] for _ in blocks]
    device = model_device(model)

    def keep(index: int, args: tuple, kwargs: dict) -> None:
        hidden, rest = split_block_call(blocks[index], args, kwargs)
        if index == 0:
            inputs.append(hidden)
        per_block[index].append(rest)
        if index == len(blocks) - 1:
            raise _Captured

    handles = [
        block.register_forward_pre_hook(
            lambda _m, args, kwargs, index=index: keep(index, args, kwargs), with_kwargs=True
        )
        for index, block in enumerate(blocks)
    ]
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            try:
                with torch.no_grad():
                    adapter.run(model, ids)
            except _Captured:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return inputs, per_block


def run_blockwise(
    model: nn.Module,
    adapter: ModelAdapter,
    input_ids: torch.Tensor,
    block_fn: Callable[[BlockContext], None],
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    group: ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """Apply ``block_fn`` to each block in order, on calibration ``input_ids`` ``(n, seq)``.

    Each block is moved to ``device`` (default: where the model is) while it is worked on and
    back afterwards; a mixture of experts runs every expert on every token meanwhile
    (:func:`~channelwise.adapters.mixtral.every_expert_sees_every_token`). With ``group``,
    ``input_ids`` are this process's share and every process runs this in step (each block's
    context carries the group). Returns the last block's outputs (hidden states per batch).
    """
    device = torch.device(device) if device is not None else model_device(model)
    progress = progress and (group is None or group.main)
    with every_expert_sees_every_token(model):
        return _run_blockwise(
            model, adapter, input_ids, block_fn, batch_size, device, progress, group
        )


def _run_blockwise(model, adapter, input_ids, block_fn, batch_size, device, progress, group):
    blocks = adapter.block_list(model)
    if varying_layer_kwargs(model, adapter):
        inputs, per_block = capture_layer_kwargs(model, adapter, input_ids, batch_size)
    else:
        inputs, kwargs = capture_block_inputs(model, adapter, input_ids, batch_size)
        per_block = [kwargs] * len(blocks)
    for index in tqdm(range(len(blocks)), desc="blocks", disable=not progress, leave=False):
        block = blocks[index]
        home = home_device(model, block)
        with block_on_device(model, block, device):
            ctx = BlockContext(
                index, block, adapter, inputs, _to(per_block[index], device), device,
                progress=progress, last=index == len(blocks) - 1, group=group, model=model,
            )  # fmt: skip
            block_fn(ctx)
            outputs = [
                ctx.to_next_block(out, kw)
                for out, kw in zip(ctx.forward(), ctx.kwargs, strict=True)
            ]
        finite = all(bool(torch.isfinite(out).all()) for out in outputs)
        if group is not None:
            finite = not group.any(not finite)
        if not finite:
            raise NonFiniteError(
                f"block {index} produced NaN/inf activations during calibration; the model "
                "or the recipe overflows here (try a float32 model or a wider bit-width)"
            )
        inputs = [out.to(home) for out in outputs]
    return inputs


def _to(kwargs: list[dict], device: torch.device) -> list[dict]:
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        return value

    return [{k: move(v) for k, v in kw.items()} for kw in kwargs]
