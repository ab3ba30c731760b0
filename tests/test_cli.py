"""The CLI's error paths: one line on stderr, exit status 2, nothing written."""

import pytest

from channelwise.cli import main
from channelwise.recipe import preset_names


def run(capsys, *argv):
    code = main(["-q", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_recipes_lists_every_preset(capsys):
    code, out, _ = run(capsys, "recipes")
    assert code == 0
    assert all(name in out for name in preset_names())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--device", "tpu", "eval"), "unknown device 'tpu'"),
        (("eval", "/nonexistent/model"), "not found"),
        (("compare", "--recipes", "fp,bogus"), "unknown recipe 'bogus'"),
        (("eval", "--data", "/nonexistent/text.txt", "--windows", "1"), "/nonexistent/text.txt"),
        (("--device", "meta", "eval"), "device 'meta' is not supported"),
        (("eval", "--seqlen", "1"), "seqlen must be at least 2"),
        (("eval", "--windows", "1", "--seqlen", "9000"), "exceed the model's 8192 positions"),
        (("compare", "--recipes", "fp", "--plot", "/tmp/chart"), "expected a file ending in"),
        (("inspect", "--out", "/tmp/heat.txt"), "expected a file ending in"),
        (("eval", "--json", "/tmp/report.csv"), "expected a file ending in .json"),
        (("quantize", "--recipe", "fp", "--format", "gguf", "--out", "/x"), "nothing to export"),
        (("quantize", "--recipe", "rtn-w8a16", "--gguf-float", "F16", "--out", "/x"), "needs --"),
        (
            ("quantize", "--recipe", "rtn-w8a16", "--offload", "--format", "gguf", "--out", "/x"),
            "needs the whole model in memory",
        ),
        (("eval", "--offload", "--tasks", "austen_pride_next_word"), "takes no --tasks"),
        (("eval", "dinov2-small"), "'dinov2-small' is a vision model, not a causal language"),
        (("compare", "--recipes", ",,"), "names no recipe"),
        (("vision", "--recipes", " , "), "names no recipe"),
        (("vision", "--calib-data", __file__), "is a file, not a folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    last = err.strip().splitlines()[-1]  # earlier lines may be a first-use progress bar
    assert last.startswith("error: ") and message in last
    assert "Traceback" not in err


def test_malformed_recipe_file_is_refused_before_loading_the_model(capsys, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: bad\nweights: {bits: 1}\n")
    out = tmp_path / "out"
    code, _, err = run(capsys, "quantize", "--recipe", str(recipe), "--out", str(out))
    assert code == 2 and "weights.bits" in err
    assert not out.exists()


def test_existing_output_is_refused_and_left_untouched(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "quantize", "--recipe", "rtn-w8a16", "--out", str(out))
    assert code == 2 and "exists" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_report_paths_are_checked_before_any_work(capsys, tmp_path):
    folder = tmp_path / "is_a_folder.json"
    folder.mkdir()
    code, _, err = run(capsys, "eval", "--json", str(folder))
    assert code == 2 and "is a folder" in err
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    code, _, err = run(capsys, "compare", "--plot", str(blocker / "sub" / "chart.png"))
    assert code == 2 and "is a file, not a folder" in err
    code, _, err = run(capsys, "quantize", "--recipe", "rtn-w8a16", "--out", str(blocker / "out"))
    assert code == 2 and "is a file, not a folder" in err
    assert blocker.read_text() == "mine"


def test_a_report_never_replaces_a_file_of_the_input_model(capsys, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(b"weights")
    for target in (weights, model / "scores.json"):
        code, _, err = run(capsys, "eval", str(model), "--json", str(target))
        assert code == 2 and "error: " in err
    assert weights.read_bytes() == b"weights" and not (model / "scores.json").exists()


@pytest.mark.parametrize("command", ["compare-recipe", "eval-data", "vision-data"])
def test_a_report_never_replaces_or_joins_a_recipe_or_data_input(capsys, tmp_path, command):
    """--json and --plot are checked against every input the command reads, not the model only
    (a recipe file given as --json was overwritten with the results; a plot went into a class
    folder of the evaluation images, which then read it as an image)."""
    recipe = tmp_path / "mine.json"
    recipe.write_text('{"name": "mine", "weights": {"bits": 8}}')
    text = tmp_path / "notes.json"
    text.write_text('{"text": "' + "word " * 50 + '"}')
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    argv = {
        "compare-recipe": ("compare", "--recipes", f"fp,{recipe}", "--json", str(recipe)),
        "eval-data": ("eval", "--data", str(text), "--windows", "1", "--json", str(text)),
        "vision-data": (
            "vision",
            "--eval-data",
            str(images.parent),
            "--plot",
            str(images / "p.png"),
        ),
    }[command]
    before = {path: path.read_bytes() for path in (recipe, text)}
    code, _, err = run(capsys, *argv)
    assert code == 2 and "over or inside the input" in err, err
    assert {path: path.read_bytes() for path in before} == before
    assert list(images.iterdir()) == []


def test_write_failures_are_one_line_and_leave_no_temporary(tmp_path):
    from channelwise.errors import OutputPathError
    from channelwise.report import write_atomic

    target = tmp_path / "out.json"
    target.mkdir()  # renaming a file over a folder fails
    with pytest.raises(OutputPathError, match="could not write"):
        write_atomic(target, "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_cuda_index_beyond_the_visible_devices_is_refused(monkeypatch):
    import torch

    from channelwise.errors import DeviceError
    from channelwise.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceError, match="only 2 CUDA devices are visible"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match="only 1 CUDA device is visible"):
        resolve_device("cuda:7")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("Swinv2Config", "is a swinv2 model, not a causal language model"),
        ("Dinov2Config", "is a Vision Transformer model, not a causal language model"),
        ("BertConfig", "is a masked language model (BertForMaskedLM)"),
    ],
)
@pytest.mark.parametrize("command", ["eval", "generate"])
def test_a_model_that_is_no_causal_lm_is_named_as_such(capsys, tmp_path, config, message, command):
    """Transformers' message for a vision config listed a hundred LLM configs (or, for saved
    vision checkpoints, blamed a missing tokenizer); a BERT loaded as a decoder and printed a
    meaningless perplexity."""
    import transformers

    cfg = getattr(transformers, config)()
    if config == "BertConfig":
        cfg.architectures = ["BertForMaskedLM"]
    cfg.save_pretrained(tmp_path / "model")
    argv = ["--windows", "1"] if command == "eval" else ["--prompt", "hi"]
    code, _, err = run(capsys, command, str(tmp_path / "model"), *argv)
    assert code == 2 and message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("recipe", "fmt", "message"),
    [
        ("gptq-w3a16-g64", "compressed-tensors", "3-bit weights; vLLM's compressed-tensors"),
        ("gptq-w4a16-g64", "gguf", "one scale per group of 32 input channels"),
    ],
)
def test_an_export_format_refuses_the_recipe_before_calibrating(
    capsys, tmp_path, monkeypatch, recipe, fmt, message
):
    """The format's refusal came after the calibration (minutes on SmolLM2)."""
    import channelwise

    def calibrated(*args, **kwargs):
        raise AssertionError("calibrated before refusing")

    monkeypatch.setattr(channelwise, "quantize", calibrated)
    out = tmp_path / "out"
    code, _, err = run(capsys, "quantize", "--recipe", recipe, "--format", fmt, "--out", str(out))
    assert code == 2 and f"recipe '{recipe}' weights" in err and message in err, err
    assert not out.exists()


def test_device_is_taken_before_or_after_the_command() -> None:
    from channelwise.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["eval"]).device == "auto"
    assert parser.parse_args(["--device", "cpu", "eval"]).device == "cpu"
    assert parser.parse_args(["eval", "--device", "cuda:1"]).device == "cuda:1"
    both = ["--device", "cpu", "quantize", "--recipe", "fp", "--out", "o", "--device", "cuda"]
    assert parser.parse_args(both).device == "cuda"


def test_the_offload_help_names_what_runs_offloaded() -> None:
    from channelwise.cli import _OFFLOADABLE
    from channelwise.kvcache.methods import offloadable_kv_methods
    from channelwise.methods.registry import method_classes

    steps = sorted(name for name, cls in method_classes().items() if cls.offloadable)
    assert _OFFLOADABLE == f"{', '.join(steps)}; KV caches {', '.join(offloadable_kv_methods())}"


def test_a_closed_pipe_exits_quietly(monkeypatch, capsys) -> None:
    """``channelwise recipes | head``: the reader leaves, the CLI stops with 141, no traceback."""
    from channelwise import cli

    def leaves(args):
        raise BrokenPipeError

    redirected = []
    monkeypatch.setattr(cli, "cmd_recipes", leaves)
    monkeypatch.setattr(cli.os, "dup2", lambda fd, to: redirected.append(to))
    monkeypatch.setattr(cli.sys.stdout, "fileno", lambda: 1, raising=False)
    assert cli.main(["recipes"]) == 141
    assert redirected == [1]
    assert capsys.readouterr().err == ""
