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
