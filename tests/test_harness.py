"""The lm-evaluation-harness bridge: local tasks from Pride and Prejudice, any model channelwise
loads (packed included), one-line errors for unknown or unreachable tasks."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import build_tiny_model, build_tiny_tokenizer

from channelwise import load_model, quantize
from channelwise.cli import main
from channelwise.data.austen import austen_text
from channelwise.deploy import pack_model
from channelwise.errors import ChannelwiseError
from channelwise.evaluate import harness
from channelwise.evaluate.harness import (
    CONTEXT_WORDS,
    LOCAL_TASKS,
    NEXT_WORD_TASK,
    PASSAGE_WORDS,
    PERPLEXITY_TASK,
    local_task_folder,
    run_tasks,
)

pytest.importorskip("lm_eval")


def read_docs(task: str) -> list[dict]:
    lines = (local_task_folder() / f"{task}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_local_tasks_are_built_from_pride_and_prejudice() -> None:
    words = austen_text("prideprejudice").split()
    passages = read_docs(PERPLEXITY_TASK)
    assert len(passages) == len(words) // PASSAGE_WORDS
    assert " ".join(p["text"] for p in passages[:3]).split() == words[: 3 * PASSAGE_WORDS]
    items = read_docs(NEXT_WORD_TASK)
    assert len(items) == harness.NEXT_WORD_ITEMS
    text = " ".join(words)
    for item in items[:50]:
        assert len(item["choices"]) == len(set(item["choices"])) == 4
        context = item["context"].split()
        assert len(context) == CONTEXT_WORDS
        answer = item["choices"][item["label"]]
        assert f"{item['context']} {answer}" in text
    assert {item["label"] for item in items} == {0, 1, 2, 3}
    for task in LOCAL_TASKS:
        assert (local_task_folder() / f"{task}.yaml").is_file()


def test_the_next_word_items_are_seeded() -> None:
    words = austen_text("prideprejudice").split()
    assert harness._next_word_docs(words) == harness._next_word_docs(words)


@pytest.fixture(scope="module")
def smollm2():
    return load_model(device="cpu")


def rolling_log_likelihood(model, tokenizer, text: str) -> float:
    """log p(text) token by token after the BOS token (EOS if none): what lm-eval's rolling
    task sums for a text shorter than its window."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    prefix = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    ids = torch.cat([torch.tensor([prefix]), ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[None]).logits[0, :-1].double(), dim=-1)
    return logprobs.gather(1, ids[1:, None]).sum().item()


@pytest.mark.slow
def test_word_perplexity_is_the_models_own(smollm2, tmp_path, monkeypatch, capfd) -> None:
    model, tokenizer = smollm2
    monkeypatch.chdir(tmp_path)  # outside any git checkout: lm-eval's git call must stay quiet
    got = run_tasks(model, tokenizer, [PERPLEXITY_TASK], limit=1, progress=False)
    got = got[PERPLEXITY_TASK]
    printed = capfd.readouterr().err
    assert "not a git repository" not in printed
    assert "it/s" not in printed and "s/it" not in printed  # no progress bar (-q)
    text = read_docs(PERPLEXITY_TASK)[0]["text"]
    ll = rolling_log_likelihood(model, tokenizer, text)
    words = len(re.split(r"\s+", text))
    assert got["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-4)
    assert got["byte_perplexity"] == pytest.approx(
        math.exp(-ll / len(text.encode("utf-8"))), rel=1e-4
    )


@pytest.mark.slow
def test_a_packed_model_runs_through_the_bridge(smollm2, tmp_path) -> None:
    model, tokenizer = smollm2
    tasks = [PERPLEXITY_TASK, NEXT_WORD_TASK]
    fp = run_tasks(model, tokenizer, tasks, limit=4)
    quantized, _ = load_model(device="cpu")
    quantize(quantized, "rtn-w8a16", progress=False)
    pack_model(quantized)
    w8 = run_tasks(quantized, tokenizer, tasks, limit=4)
    quantized, _ = load_model(device="cpu")
    quantize(quantized, "rtn-w3a16-g64", progress=False)
    w3 = run_tasks(quantized, tokenizer, tasks, limit=4)
    ppl = {name: r[PERPLEXITY_TASK]["word_perplexity"] for name, r in (("fp", fp), ("w8", w8))}
    ppl["w3"] = w3[PERPLEXITY_TASK]["word_perplexity"]
    assert ppl["w8"] == pytest.approx(ppl["fp"], rel=0.02)
    assert ppl["w3"] > 1.05 * ppl["fp"], ppl
    for result in (fp, w8, w3):
        assert 0.0 <= result[NEXT_WORD_TASK]["acc"] <= 1.0


def test_unknown_tasks_and_bad_limits_are_one_line_errors(smollm2) -> None:
    model, tokenizer = smollm2
    with pytest.raises(ChannelwiseError, match="unknown lm-eval task 'no_such_task'"):
        run_tasks(model, tokenizer, ["no_such_task"])
    with pytest.raises(ChannelwiseError, match="no task given"):
        run_tasks(model, tokenizer, [" "])
    with pytest.raises(ChannelwiseError, match="positive number"):
        run_tasks(model, tokenizer, [NEXT_WORD_TASK], limit=0)
    with pytest.raises(ChannelwiseError, match="batch size must be at least 1, got 0"):
        run_tasks(model, tokenizer, [NEXT_WORD_TASK], limit=1, batch_size=0)


def test_a_tokenizer_without_bos_or_eos_is_refused_up_front(tmp_path, capsys) -> None:
    folder = tmp_path / "tiny"
    build_tiny_model("llama").save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)  # no BOS, no EOS
    model, tokenizer = load_model(folder, device="cpu")
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id is None
    with pytest.raises(ChannelwiseError, match="tokenizer has no BOS or EOS token"):
        run_tasks(model, tokenizer, [NEXT_WORD_TASK], limit=2)
    assert main(["-q", "eval", str(folder), "--tasks", NEXT_WORD_TASK, "--limit", "2"]) == 2
    assert "error: the tokenizer has no BOS or EOS token" in capsys.readouterr().err


def test_a_hub_task_offline_names_the_local_tasks(smollm2, monkeypatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, tokenizer = smollm2
    with pytest.raises(ChannelwiseError, match="hellaswag.*need no network"):
        run_tasks(model, tokenizer, ["hellaswag"], limit=1)


def test_cli_runs_tasks_and_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "tasks.json"
    args = ["eval", "--tasks", NEXT_WORD_TASK, "--limit", "3", "--json", str(out)]
    assert main(["-q", *args]) == 0
    printed = capsys.readouterr().out
    assert f"{NEXT_WORD_TASK}: acc " in printed
    saved = json.loads(out.read_text())
    assert 0.0 <= saved["tasks"][NEXT_WORD_TASK]["acc"] <= 1.0 and saved["limit"] == 3
    assert main(["-q", "eval", "--tasks", NEXT_WORD_TASK, "--windows", "2"]) == 2
    assert "--tasks runs lm-eval tasks instead" in capsys.readouterr().err
    assert main(["-q", "eval", "--limit", "2"]) == 2
    assert "needs --tasks" in capsys.readouterr().err
    assert main(["-q", "eval", "--batch-size", "4"]) == 2  # was ignored
    assert "--batch-size applies to lm-eval tasks; it needs --tasks" in capsys.readouterr().err


def test_quiet_patches_restore_and_skip_what_this_lm_eval_lacks() -> None:
    import contextlib

    import lm_eval.evaluator

    original, marker = lm_eval.evaluator.get_git_commit_hash, object()
    with contextlib.ExitStack() as stack:
        harness._replace_if_present(stack, "lm_eval.evaluator", "no_such_name", marker)
        harness._replace_if_present(stack, "lm_eval.no_such_module", "tqdm", marker)
        harness._replace_if_present(stack, "lm_eval.evaluator", "get_git_commit_hash", marker)
        assert lm_eval.evaluator.get_git_commit_hash is marker
        assert not hasattr(lm_eval.evaluator, "no_such_name")
    assert lm_eval.evaluator.get_git_commit_hash is original
