"""Specification of the block-wise engine: each block fed by the previous block's outputs."""

import pytest
import torch
from torch import nn

from channelwise.adapters import adapter_for, linear_weight
from channelwise.engine import BlockContext, run_blockwise
from channelwise.errors import NonFiniteError


def noop(ctx: BlockContext) -> None:
    return None


def head_logits(model: nn.Module, final_norm: str | None, hidden: torch.Tensor) -> torch.Tensor:
    """Hidden states after the last block → logits (final norm if any, then the output head)."""
    with torch.no_grad():
        if final_norm is not None:
            hidden = model.get_submodule(final_norm)(hidden)
        logits = model.get_output_embeddings()(hidden)
        cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2
        return logits if cap is None else torch.tanh(logits / cap) * cap


def reference_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_noop_blockwise_pass_reproduces_the_model(
    tiny_model: nn.Module, token_ids: torch.Tensor
) -> None:
    adapter = adapter_for(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    outputs = run_blockwise(
        tiny_model, adapter, token_ids, block_fn=noop, batch_size=2, progress=False
    )
    assert [tuple(out.shape) for out in outputs] == [(2, 16, 64), (2, 16, 64)]
    logits = head_logits(tiny_model, adapter.final_norm, torch.cat(outputs))
    torch.testing.assert_close(logits, reference_logits(tiny_model, token_ids), rtol=0, atol=1e-5)
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"


def test_post_ln_opt_blockwise_pass_reproduces_the_model(
    opt_post_ln: nn.Module, token_ids: torch.Tensor
) -> None:
    assert opt_post_ln.model.decoder.final_layer_norm is None
    outputs = run_blockwise(
        opt_post_ln,
        adapter_for(opt_post_ln),
        token_ids,
        block_fn=noop,
        batch_size=2,
        progress=False,
    )
    logits = head_logits(opt_post_ln, None, torch.cat(outputs))
    torch.testing.assert_close(logits, reference_logits(opt_post_ln, token_ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_last_batch_may_be_smaller(tiny_model: nn.Module) -> None:
    adapter = adapter_for(tiny_model)
    ids = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(3))
    outputs = run_blockwise(tiny_model, adapter, ids, block_fn=noop, batch_size=2, progress=False)
    assert [out.shape[0] for out in outputs] == [2, 2, 1]
    torch.testing.assert_close(
        head_logits(tiny_model, adapter.final_norm, torch.cat(outputs)),
        reference_logits(tiny_model, ids),
        rtol=0,
        atol=1e-5,
    )


def test_blocks_are_visited_once_in_order(tiny_model: nn.Module, token_ids: torch.Tensor) -> None:
    adapter = adapter_for(tiny_model)
    blocks = adapter.block_list(tiny_model)
    seen: list[int] = []

    def record(ctx: BlockContext) -> None:
        assert ctx.block is blocks[ctx.index]
        assert ctx.adapter is adapter
        assert len(ctx.inputs) == len(ctx.kwargs) == 2
        seen.append(ctx.index)

    run_blockwise(tiny_model, adapter, token_ids, block_fn=record, batch_size=2, progress=False)
    assert seen == list(range(len(blocks))) == [0, 1]


def test_each_block_receives_its_inputs_in_the_full_model(
    tiny_model: nn.Module, token_ids: torch.Tensor
) -> None:
    adapter = adapter_for(tiny_model)
    with torch.no_grad():
        expected = tiny_model(token_ids, use_cache=False, output_hidden_states=True).hidden_states
    received: dict[int, torch.Tensor] = {}

    def record(ctx: BlockContext) -> None:
        received[ctx.index] = torch.cat(ctx.inputs)

    run_blockwise(tiny_model, adapter, token_ids, block_fn=record, batch_size=2, progress=False)
    for index in (0, 1):
        torch.testing.assert_close(received[index], expected[index], rtol=0, atol=1e-5)


def test_changes_made_by_block_fn_reach_the_later_blocks(
    tiny_model: nn.Module, token_ids: torch.Tensor
) -> None:
    """Outputs are computed after ``block_fn``: the result is the changed model's forward."""
    adapter = adapter_for(tiny_model)
    original = reference_logits(tiny_model, token_ids)

    def shrink_last_linear(ctx: BlockContext) -> None:
        last = ctx.adapter.block_linears(ctx.block)[ctx.adapter.linear_names()[-1]]
        linear_weight(last, ctx.adapter.transposed_weights).mul_(0.5)

    outputs = run_blockwise(
        tiny_model, adapter, token_ids, block_fn=shrink_last_linear, batch_size=2, progress=False
    )
    changed = reference_logits(tiny_model, token_ids)
    assert not torch.allclose(changed, original, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        head_logits(tiny_model, adapter.final_norm, torch.cat(outputs)), changed, rtol=0, atol=1e-5
    )


def test_observe_streams_the_inputs_of_named_linears(
    tiny_model: nn.Module, token_ids: torch.Tensor
) -> None:
    adapter = adapter_for(tiny_model)
    names = adapter.linear_names()
    first = adapter.subsets[0]
    calls: list[tuple[int, str, torch.Tensor]] = []

    def observe_all(ctx: BlockContext) -> None:
        ctx.observe(names, lambda name, x: calls.append((ctx.index, name, x)))
        # Only the observed forward streams; a later forward does not.
        count = len(calls)
        ctx.forward()
        assert len(calls) == count
        if ctx.index == 0:
            prev = ctx.block.get_submodule(first.prev)
            with torch.no_grad():
                expected = [prev(x) for x in ctx.inputs]
            got = [x for index, name, x in calls if index == 0 and name == first.linears[0]]
            assert len(got) == len(expected) == 2
            for observed, wanted in zip(got, expected, strict=True):
                torch.testing.assert_close(observed, wanted, rtol=0, atol=1e-6)

    run_blockwise(
        tiny_model, adapter, token_ids, block_fn=observe_all, batch_size=2, progress=False
    )
    block = adapter.block_list(tiny_model)[0]
    widths = {
        name: linear_weight(module, adapter.transposed_weights).shape[1]
        for name, module in adapter.block_linears(block).items()
    }
    for index in (0, 1):
        for name in names:
            seen = [x for i, n, x in calls if i == index and n == name]
            assert len(seen) == 2, (index, name)  # once per calibration batch
            for x in seen:
                # (batch, seq, in_features); OPT's MLP flattens tokens to (batch·seq, in).
                assert x.shape[-1] == widths[name], (index, name)
                assert x.numel() == 2 * 16 * widths[name], (index, name)


def test_capture_inputs_keeps_inputs_only_inside_the_context(
    make_tiny_model, token_ids: torch.Tensor
) -> None:
    model = make_tiny_model("llama")
    adapter = adapter_for(model)

    def capture(ctx: BlockContext) -> None:
        with ctx.capture_inputs(("mlp.down_proj",)) as captured:
            ctx.forward()
        ctx.forward()
        assert [tuple(x.shape) for x in captured["mlp.down_proj"]] == [(2, 16, 128)] * 2

    run_blockwise(model, adapter, token_ids, block_fn=capture, batch_size=2, progress=False)


@pytest.mark.parametrize("bad_block", [0, 1])
def test_non_finite_block_output_names_the_block(
    tiny_model: nn.Module, token_ids: torch.Tensor, bad_block: int
) -> None:
    adapter = adapter_for(tiny_model)

    def poison(ctx: BlockContext) -> None:
        if ctx.index == bad_block:
            last = ctx.adapter.block_linears(ctx.block)[ctx.adapter.linear_names()[-1]]
            linear_weight(last, ctx.adapter.transposed_weights).fill_(float("nan"))

    with pytest.raises(NonFiniteError, match=f"block {bad_block}\\b"):
        run_blockwise(tiny_model, adapter, token_ids, block_fn=poison, batch_size=2, progress=False)


def test_observe_stops_each_batch_after_the_last_observed_module(make_tiny_model, token_ids):
    from channelwise.adapters import adapter_for
    from channelwise.engine import BlockContext, capture_block_inputs

    model = make_tiny_model("llama")
    adapter = adapter_for(model)
    inputs, kwargs = capture_block_inputs(model, adapter, token_ids, batch_size=2)
    block = adapter.block_list(model)[0]
    ctx = BlockContext(0, block, adapter, inputs, kwargs, torch.device("cpu"))
    later_calls = []
    handle = block.get_submodule("mlp.gate_proj").register_forward_pre_hook(
        lambda *_: later_calls.append(1)
    )
    seen = []
    ctx.observe(("self_attn.q_proj", "self_attn.k_proj"), lambda name, x: seen.append(name))
    handle.remove()
    assert later_calls == []
    assert seen.count("self_attn.q_proj") == seen.count("self_attn.k_proj") == len(inputs)
