"""A bridge to EleutherAI's lm-evaluation-harness: any model channelwise loads, packed included.

:func:`run_tasks` wraps the (possibly quantized) model in lm-eval's ``HFLM`` and runs
``simple_evaluate`` on the named tasks. Two local tasks are built from the embedded *Pride and
Prejudice* (the benchmark's evaluation text, never a calibration text), so the bridge works with
no network:

* ``austen_pride_perplexity``: rolling log-likelihood over passages of :data:`PASSAGE_WORDS`
  words (word and byte perplexity, bits per byte);
* ``austen_pride_next_word``: which of four words comes next after :data:`CONTEXT_WORDS` words
  of the novel (the true one and three others drawn from the novel, seeded): accuracy.

Their data and YAML are written once under ``<channelwise_home>/lm_eval_tasks``. Every other
task name is lm-eval's own; one whose dataset lives on the Hugging Face hub fails, offline,
with a one-line error naming the local tasks.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import random
import subprocess
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

from torch import nn

from channelwise.errors import ChannelwiseError
from channelwise.paths import channelwise_home, write_atomic

PERPLEXITY_TASK = "austen_pride_perplexity"
NEXT_WORD_TASK = "austen_pride_next_word"
LOCAL_TASKS = (PERPLEXITY_TASK, NEXT_WORD_TASK)
PASSAGE_WORDS = 256
CONTEXT_WORDS = 40
NEXT_WORD_ITEMS = 500
SEED = 0
#: Bump when the local tasks' data or definitions change (a new cache folder).
TASKS_VERSION = 1


def _words() -> list[str]:
    from channelwise.data.austen import austen_text

    return austen_text("prideprejudice").split()


def _perplexity_docs(words: list[str]) -> list[dict]:
    return [
        {"text": " ".join(words[i : i + PASSAGE_WORDS])}
        for i in range(0, len(words) - PASSAGE_WORDS + 1, PASSAGE_WORDS)
    ]


def _next_word_docs(words: list[str]) -> list[dict]:
    rng = random.Random(SEED)
    vocabulary = sorted(set(words))
    docs = []
    for start in rng.sample(range(len(words) - CONTEXT_WORDS - 1), NEXT_WORD_ITEMS):
        answer = words[start + CONTEXT_WORDS]
        others: list[str] = []
        while len(others) < 3:
            word = rng.choice(vocabulary)
            if word != answer and word not in others:
                others.append(word)
        label = rng.randrange(4)
        choices = others[:label] + [answer] + others[label:]
        context = " ".join(words[start : start + CONTEXT_WORDS])
        docs.append({"context": context, "choices": choices, "label": label})
    return docs


def _task_yaml(task: str, data: Path, cache: Path) -> dict:
    common = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache)},
        "test_split": "test",
    }
    if task == PERPLEXITY_TASK:
        metrics = ("word_perplexity", "byte_perplexity", "bits_per_byte")
        return common | {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": m, "aggregation": "bits_per_byte" if m == "bits_per_byte" else
                 "weighted_perplexity", "higher_is_better": False}
                for m in metrics
            ],
        }  # fmt: skip
    return common | {
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }


def local_task_folder() -> Path:
    """The folder of the local tasks' YAML and data (written on first use)."""
    folder = channelwise_home() / "lm_eval_tasks" / f"v{TASKS_VERSION}"
    if all((folder / f"{task}.yaml").is_file() for task in LOCAL_TASKS):
        return folder
    import yaml

    words = _words()
    docs = {PERPLEXITY_TASK: _perplexity_docs(words), NEXT_WORD_TASK: _next_word_docs(words)}
    for task in LOCAL_TASKS:
        data = folder / f"{task}.jsonl"
        write_atomic(data, "".join(json.dumps(doc) + "\n" for doc in docs[task]))
        spec = _task_yaml(task, data, folder / "datasets-cache")
        write_atomic(folder / f"{task}.yaml", yaml.safe_dump(spec, sort_keys=False))
    return folder


def _harness():
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ChannelwiseError(
            "the lm-evaluation-harness is not installed (pip install lm-eval)"
        ) from exc
    return simple_evaluate, HFLM, TaskManager


@contextlib.contextmanager
def _lm_eval_quiet(progress: bool = True):
    """While lm-eval runs: its logging at ERROR (its ``verbosity`` arguments are deprecated), its
    record of the git commit asked quietly (:func:`_quiet_git_hash`), and with ``progress``
    False its request-building bar off (the model's bars are :func:`_without_bars`')."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.ExitStack() as stack:
            _replace_if_present(stack, "lm_eval.evaluator", "get_git_commit_hash", _quiet_git_hash)
            if not progress:
                from tqdm import tqdm

                quiet_tqdm = functools.partial(tqdm, disable=True)
                _replace_if_present(stack, "lm_eval.api.task", "tqdm", quiet_tqdm)
            yield
    finally:
        logger.setLevel(level)


def _replace_if_present(stack: contextlib.ExitStack, module: str, name: str, value) -> None:
    """``module.name`` replaced by ``value`` for the ``stack``'s life, where this lm-eval has
    it (another version may not: then its own, noisier, behaviour stays)."""
    try:
        target = importlib.import_module(module)
    except ImportError:
        return
    if hasattr(target, name):
        stack.enter_context(mock.patch.object(target, name, value))


def _without_bars(hflm: type) -> type:
    """``hflm`` whose scoring and generation draw no progress bar (lm-eval calls them, and
    rolling scoring its token scorer, without asking for that)."""

    class QuietHFLM(hflm):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, **kwargs)

    return QuietHFLM


def _quiet_git_hash() -> str | None:
    """lm-eval's record of the working directory's git commit, asked without the ``fatal: not
    a git repository`` line that lm-eval's own ``git describe`` prints outside a checkout."""
    try:
        found = subprocess.run(
            ["git", "describe", "--always"],  # noqa: S607
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return None
    if found.returncode != 0:
        return None
    return found.stdout.strip() or None


def _check_tokenizer(tokenizer) -> None:
    """Refuse a tokenizer with neither a BOS nor an EOS token: lm-eval puts one of them before
    every scored text (the context of its first token) and fails deep inside otherwise."""
    if getattr(tokenizer, "bos_token_id", None) is None and (
        getattr(tokenizer, "eos_token_id", None) is None
    ):
        raise ChannelwiseError(
            "the tokenizer has no BOS or EOS token, which lm-eval needs to start every scored "
            "text; give the checkpoint's tokenizer one (bos_token or eos_token in "
            "tokenizer_config.json)"
        )


def run_tasks(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of ``model`` on lm-eval ``tasks`` (the first ``limit``
    documents of each, all by default); ``progress`` False draws no lm-eval progress bar."""
    tasks = [task.strip() for task in tasks if task.strip()]
    if not tasks:
        raise ChannelwiseError(f"no task given; the local tasks are {', '.join(LOCAL_TASKS)}")
    if limit is not None and limit < 1:
        raise ChannelwiseError(f"limit must be a positive number of documents, got {limit}")
    if batch_size < 1:
        raise ChannelwiseError(f"batch size must be at least 1, got {batch_size}")
    simple_evaluate, hflm, task_manager_class = _harness()
    with _lm_eval_quiet(progress):
        manager = task_manager_class(include_path=str(local_task_folder()))
        unknown = [task for task in tasks if task not in manager.all_tasks]
        if unknown:
            raise ChannelwiseError(
                f"unknown lm-eval task {unknown[0]!r}; the local tasks are "
                f"{', '.join(LOCAL_TASKS)} (every name `lm-eval ls tasks` lists is accepted too)"
            )
        _check_tokenizer(tokenizer)
        lm_class = hflm if progress else _without_bars(hflm)
        lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            output = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit)
        except ChannelwiseError:
            raise
        except Exception as exc:  # noqa: BLE001 (a dataset the machine cannot fetch: one line)
            hub = [task for task in tasks if task not in LOCAL_TASKS]
            if not hub:
                raise
            text = str(exc).strip()
            first = text.splitlines()[0][:300] if text else type(exc).__name__
            raise ChannelwiseError(
                f"lm-eval could not run {', '.join(hub)}: {first}. Their datasets come from the "
                f"Hugging Face hub, which this machine may not reach; the local tasks "
                f"({', '.join(LOCAL_TASKS)}) need no network"
            ) from exc
    results = {}
    for task in tasks:
        values = output["results"].get(task, {})
        results[task] = {
            key.split(",")[0]: float(value)
            for key, value in values.items()
            if "," in key and "stderr" not in key and isinstance(value, int | float)
        }
    return results
