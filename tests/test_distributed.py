"""Calibration across processes (``torch.distributed``, gloo): two CPU processes launched with
``torchrun`` end with the model one process makes, and refuse what they cannot do alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import CASES, calibration_ids, quantized_tensors, recipe_for
from safetensors.torch import load_file

from channelwise.tiny import WIDE, build_tiny_model, build_tiny_tokenizer

WORKER = Path(__file__).with_name("distributed_worker.py")


def torchrun(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 argv…`` with one thread per process."""
    path = os.pathsep.join(filter(None, [str(WORKER.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    return subprocess.run(
        [*command, "2", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_processes")
    done = torchrun(str(WORKER), str(out), cwd=out)
    assert done.returncode == 0, failure_report(done.stderr)
    return out


def failure_report(stderr: str) -> str:
    """Each rank's last lines of a failed torchrun (its tail alone is mostly rank 0's)."""
    lines = stderr.splitlines()
    ranks = ["\n".join([s for s in lines if s.startswith(f"[rank{r}]")][-25:]) for r in (0, 1)]
    return "\n".join([*ranks, *lines[-15:]])


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_give_what_one_process_gives(two_processes, tmp_path, case):
    family, recipe = CASES[case]
    theirs = load_file(str(two_processes / f"{case}.safetensors"))
    ours = quantized_tensors(family, recipe_for(recipe, tmp_path), calibration_ids())
    assert sorted(theirs) == sorted(ours)
    float_model = build_tiny_model(family, **WIDE[family]).state_dict()
    changed = [k for k in ours if k in float_model and not torch.equal(ours[k], float_model[k])]
    assert changed, "the recipe changed no tensor: the comparison would prove nothing"
    worst = max(float((theirs[k].double() - ours[k].double()).abs().max()) for k in ours)
    assert worst <= 1e-6, f"{case}: the two-process result differs by {worst:g}"


def test_each_process_calibrates_on_its_share(two_processes):
    shares = json.loads((two_processes / "shares.json").read_text())
    # Five batches of two samples dealt round robin: batches 0, 2, 4 and 1, 3.
    assert shares == {"0": 6, "1": 4}


def test_what_cannot_run_across_processes_is_refused_on_every_process(two_processes):
    errors = [json.loads((two_processes / f"errors-{rank}.json").read_text()) for rank in (0, 1)]
    assert errors[0] == errors[1]
    assert "step 'awq' runs in one process only" in errors[0]["awq"]
    assert "give 1 batch, fewer than the 2 processes" in errors[0]["few-batches"]
    assert "different calibration data" in errors[0]["different-data"]
    assert all(
        message.startswith(("RecipeError", "DataSourceError")) for message in errors[0].values()
    )


def test_cli_quantize_under_torchrun_writes_what_one_process_writes(tmp_path):
    from channelwise.cli import main

    folder = tmp_path / "tiny"
    build_tiny_model("llama", **WIDE["llama"]).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    args = ["-q", "--device", "cpu", "quantize", str(folder), "--recipe", "gptq-w4a16-g64"]
    args += ["--calib-samples", "16", "--seqlen", "32"]
    done = torchrun("-m", "channelwise.cli", *args, "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert done.returncode == 0, failure_report(done.stderr)
    assert done.stdout.count("wrote") == 1  # process 0 alone writes and reports
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two, one = (load_file(str(tmp_path / k / "model.safetensors")) for k in ("two", "one"))
    assert sorted(two) == sorted(one)
    assert all(torch.equal(two[k], one[k]) for k in one)


def test_other_commands_refuse_a_torchrun_launch(monkeypatch, capsys):
    from channelwise.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["recipes"]) == 2
    assert "only 'channelwise quantize' calibrates across" in capsys.readouterr().err
