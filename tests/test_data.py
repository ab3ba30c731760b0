"""Tests for channelwise.data: Austen novels, source resolution and token windows."""

import os
import sys
import types
from pathlib import Path

import pytest
import torch

from channelwise.data import (
    AUSTEN_NOVELS,
    austen,
    austen_text,
    calibration_samples,
    debian,
    describe_sources,
    ensure_austen,
    eval_windows,
    load_text,
    tokenize_text,
)
from channelwise.errors import DataSourceError


def test_emma_is_real_text() -> None:
    text = austen_text("emma")
    assert text.startswith("EMMA")
    assert len(text) > 800_000


def test_pride_and_prejudice_opening() -> None:
    assert "It is a truth universally acknowledged" in austen_text("prideprejudice")


def test_six_novels_are_distinct() -> None:
    texts = {name: austen_text(name) for name in AUSTEN_NOVELS}
    assert len(AUSTEN_NOVELS) == 6
    assert len(set(texts.values())) == 6
    assert all(len(text) > 300_000 for text in texts.values())


def test_novel_cache_files_exist() -> None:
    folder = ensure_austen()
    assert sorted(p.stem for p in folder.glob("*.txt")) == sorted(AUSTEN_NOVELS)
    assert not list(folder.glob(".*.tmp"))


def test_unknown_novel_lists_the_six() -> None:
    with pytest.raises(DataSourceError) as info:
        austen_text("middlemarch")
    assert all(name in str(info.value) for name in AUSTEN_NOVELS)


def test_load_text_resolves_novel_names() -> None:
    assert load_text("Persuasion") == austen_text("persuasion")


def _fake_cache(home: Path) -> None:
    folder = home / "data" / "austen"
    folder.mkdir(parents=True)
    for name in AUSTEN_NOVELS:
        (folder / f"{name}.txt").write_text(f"cached {name} \u00e9", encoding="utf-8")


def test_cached_novels_are_read_without_fetching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHANNELWISE_HOME", str(tmp_path))
    _fake_cache(tmp_path)

    def refuse(_: Path) -> Path:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(austen, "_package_data_dir", refuse)
    assert ensure_austen() == tmp_path / "data" / "austen"
    assert austen_text("emma") == "cached emma \u00e9"


def test_missing_apt_get_is_actionable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHANNELWISE_HOME", str(tmp_path))
    monkeypatch.delenv(austen.DEB_ENV, raising=False)
    monkeypatch.setattr(debian.shutil, "which", lambda _: None)
    with pytest.raises(DataSourceError, match=austen.DEB_ENV):
        ensure_austen()


def test_bad_deb_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHANNELWISE_HOME", str(tmp_path))
    monkeypatch.setenv(austen.DEB_ENV, str(tmp_path / "nope.deb"))
    with pytest.raises(DataSourceError, match="nope.deb"):
        ensure_austen()
    empty = tmp_path / "extracted"
    empty.mkdir()
    monkeypatch.setenv(austen.DEB_ENV, str(empty))
    with pytest.raises(DataSourceError, match="Rdata"):
        ensure_austen()


def test_local_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "notes.md"
    path.write_text("caf\u00e9 au lait\nsecond line\n", encoding="utf-8")
    assert load_text(str(path)) == "caf\u00e9 au lait\nsecond line\n"


def test_local_folder_concatenates_sorted_txt(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("beta", encoding="utf-8")
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("gamma", encoding="utf-8")
    (tmp_path / "skip.json").write_text("{}", encoding="utf-8")
    assert load_text(str(tmp_path)) == "alpha\n\nbeta\n\ngamma"


def test_folder_without_txt(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("x", encoding="utf-8")
    with pytest.raises(DataSourceError, match="no .txt files"):
        load_text(str(tmp_path))


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9")
    with pytest.raises(DataSourceError, match="UTF-8"):
        load_text(str(path))


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such.txt"
    with pytest.raises(DataSourceError) as info:
        load_text(str(missing))
    message = str(info.value)
    assert str(missing) in message
    assert "wikitext2" in message and "emma" in message


@pytest.mark.parametrize("name", ["wikitext2", "wikitext-2", "c4", "pile-val"])
def test_hub_corpus_without_datasets(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataSourceError) as info:
        load_text(name)
    message = str(info.value)
    assert "could not reach dataset" in message and "datasets" in message
    assert "emma" in message and "\n" not in message


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset: object) -> None:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hub_corpus_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError(
            "Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)\nmore"
        )

    _fake_datasets(monkeypatch, offline)
    with pytest.raises(DataSourceError, match="could not reach dataset 'c4'.*ConnectionError"):
        load_text("c4")


def test_hub_corpus_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(*args: object, **kwargs: object) -> dict[str, list[str]]:
        calls.append((args, kwargs))
        return {"text": ["one", "two"]}

    _fake_datasets(monkeypatch, fake)
    assert load_text("wikitext2", split="train") == "one\n\ntwo"
    assert calls[-1] == (("wikitext", "wikitext-2-raw-v1"), {"split": "train"})
    load_text("c4")
    assert calls[-1][0] == ("allenai/c4",) and calls[-1][1]["split"] == "validation"
    load_text("pile-val")
    assert calls[-1] == (("mit-han-lab/pile-val-backup",), {"split": "validation"})
    with pytest.raises(DataSourceError, match="split"):
        load_text("wikitext2", split="dev")


def test_describe_sources_mentions_every_form() -> None:
    text = describe_sources()
    for word in ("emma", "folder", "file", "wikitext2", "c4", "pile-val"):
        assert word in text


def test_eval_windows_consecutive() -> None:
    ids = torch.arange(20_000)
    windows = eval_windows(ids, seqlen=128, n_windows=4)
    assert windows.shape == (4, 128)
    assert windows.dtype == torch.long
    assert torch.equal(windows.flatten(), torch.arange(5000, 5000 + 4 * 128))
    assert torch.equal(eval_windows(ids, 16, 2, start=0), torch.arange(32).reshape(2, 16))


def test_eval_windows_too_short() -> None:
    with pytest.raises(DataSourceError, match="needs 13192 tokens.*has 6000"):
        eval_windows(torch.arange(6000), seqlen=512, n_windows=16)


def test_calibration_samples_reproducible() -> None:
    ids = torch.arange(10_000)
    first = calibration_samples(ids, n_samples=8, seqlen=64, seed=3)
    assert first.shape == (8, 64)
    assert torch.equal(first, calibration_samples(ids, n_samples=8, seqlen=64, seed=3))
    assert not torch.equal(first, calibration_samples(ids, n_samples=8, seqlen=64, seed=4))
    steps = first[:, 1:] - first[:, :-1]
    assert bool((steps == 1).all())
    assert int(first.min()) >= 0 and int(first.max()) < 10_000


def test_calibration_exact_length_and_too_short() -> None:
    ids = torch.arange(64)
    assert torch.equal(calibration_samples(ids, n_samples=2, seqlen=64), ids.repeat(2, 1))
    with pytest.raises(DataSourceError, match="64 tokens.*has 63"):
        calibration_samples(torch.arange(63), n_samples=2, seqlen=64)


def test_windows_reject_bad_streams() -> None:
    with pytest.raises(DataSourceError, match="1-D"):
        eval_windows(torch.zeros(2, 10_000, dtype=torch.long))
    with pytest.raises(DataSourceError, match="positive"):
        calibration_samples(torch.arange(100), n_samples=0, seqlen=10)


def test_tokenize_text_adds_no_special_tokens() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "it": 2, "is": 3, "a": 4, "truth": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", unk_token="[UNK]"
    )
    ids = tokenize_text(tokenizer, "it is a truth indeed")
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == [2, 3, 4, 5, 0]


# --- the Debian download: a private folder, the exact file apt names, its hash checked ---------

_DEB_NAME = f"{austen.JANEAUSTENR.name}_1.0.0-1_all.deb"


def _fake_apt(deb_bytes: bytes, announced: bytes | None = None, decoy: bool = True):
    """A stand-in for ``debian._run`` that answers apt-get as Debian's would, recording the
    download folder's mode; ``decoy`` drops another .deb that sorts first."""
    import hashlib

    seen: dict[str, int] = {}
    announced = deb_bytes if announced is None else announced

    def run(command: list[str], cwd: Path, _package=None):
        seen["mode"] = cwd.stat().st_mode & 0o777
        out = ""
        if "--print-uris" in command:
            digest = hashlib.sha256(announced).hexdigest()
            out = f"'http://deb/{_DEB_NAME}' {_DEB_NAME} {len(announced)} SHA256:{digest}\n"
        elif command[:2] == ["apt-get", "download"]:
            if decoy:
                (cwd / "a-planted.deb").write_bytes(b"not the package")
            (cwd / _DEB_NAME).write_bytes(deb_bytes)
        return types.SimpleNamespace(returncode=0, stdout=out, stderr="")

    return run, seen


def test_download_uses_a_private_folder_and_the_exact_file_apt_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, seen = _fake_apt(b"the package")
    monkeypatch.setattr(debian, "_run", run)
    monkeypatch.setattr(debian.shutil, "which", lambda _: "/usr/bin/apt-get")
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    deb = debian.download_deb(austen.JANEAUSTENR, work)
    assert deb.name == _DEB_NAME and deb.read_bytes() == b"the package"
    assert seen["mode"] & 0o077 == 0, "the download folder must not be open to other users"


def test_download_refuses_a_file_that_does_not_match_what_apt_announced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, _ = _fake_apt(b"tampered bytes", announced=b"the package bytes")
    monkeypatch.setattr(debian, "_run", run)
    monkeypatch.setattr(debian.shutil, "which", lambda _: "/usr/bin/apt-get")
    with pytest.raises(DataSourceError, match="SHA-256"):
        debian.download_deb(austen.JANEAUSTENR, tmp_path)


def test_ensure_austen_downloads_into_a_private_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHANNELWISE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(austen.DEB_ENV, raising=False)
    run, seen = _fake_apt(b"pkg")
    monkeypatch.setattr(debian, "_run", run)
    monkeypatch.setattr(debian.shutil, "which", lambda _: "/usr/bin/apt-get")
    monkeypatch.setattr(debian, "extract_deb", lambda _pkg, deb, target: deb.parent)
    with pytest.raises(DataSourceError, match="no janeaustenr data"):
        ensure_austen()  # the fake package holds no R data: it stops after the download
    assert seen["mode"] == 0o700


def test_parse_uri_line_takes_only_the_packages_plain_file_name() -> None:
    line = f"'http://x/{_DEB_NAME}' {_DEB_NAME} 12 SHA256:ABC\n"
    assert debian.parse_uri_line(line, austen.JANEAUSTENR.name) == (_DEB_NAME, 12, "abc")
    name = austen.JANEAUSTENR.name
    assert debian.parse_uri_line("'http://x/y' ../../etc/x.deb 12 SHA256:abc", name) is None
    assert debian.parse_uri_line("'http://x/y' other_1_all.deb 12 SHA256:abc", name) is None
    assert debian.parse_uri_line("E: nothing", name) is None


# --- calibration must not read the evaluation text -------------------------------------------


@pytest.mark.parametrize("calib", ["PridePrejudice", " prideprejudice ", "cached-file", "folder"])
def test_calibrating_on_the_evaluation_text_is_refused_however_it_is_named(
    calib: str, tmp_path: Path
) -> None:
    from channelwise.data.austen import austen_folder
    from channelwise.protocol import Protocol

    ensure_austen()
    if calib == "cached-file":
        calib = str(austen_folder() / "prideprejudice.txt")
    elif calib == "folder":
        calib = str(austen_folder())
    with pytest.raises(DataSourceError, match="never calibrate on the evaluation text"):
        Protocol(calib_data=calib, eval_data="prideprejudice")


def test_the_same_local_file_by_two_paths_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from channelwise.protocol import Protocol

    text = tmp_path / "eval.txt"
    text.write_text("words")
    (tmp_path / "link.txt").symlink_to(text)
    monkeypatch.chdir(tmp_path)
    for calib in ("eval.txt", "./eval.txt", str(tmp_path / "link.txt"), str(tmp_path)):
        with pytest.raises(DataSourceError, match="never calibrate"):
            Protocol(calib_data=calib, eval_data=str(text))
    other = tmp_path / "calib.txt"
    other.write_text("other words")
    assert Protocol(calib_data=str(other), eval_data=str(text)).calib_data == str(other)


def test_wikitext2_train_may_calibrate_a_wikitext2_test_evaluation() -> None:
    from channelwise.protocol import Protocol

    assert Protocol(calib_data="wikitext2", eval_data="wikitext-2").eval_data == "wikitext-2"
    with pytest.raises(DataSourceError, match="never calibrate"):
        Protocol(calib_data="c4", eval_data="c4")


# --- the GGUF conversion cache is keyed by the whole file's content ---------------------------


def test_content_key_hashes_the_whole_file(tmp_path: Path) -> None:
    from channelwise.models import content_key

    size = 3 << 20  # 3 MiB: the old key read only the first and last MiB
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    data = bytearray(size)
    a.write_bytes(bytes(data))
    data[size // 2] = 1  # differs only in the middle
    b.write_bytes(bytes(data))
    assert content_key(a) != content_key(b)
    c = tmp_path / "c.gguf"
    c.write_bytes(a.read_bytes())
    assert content_key(c) == content_key(a)
    a.write_bytes(bytes(data))  # rewritten in place: the remembered key must not be reused
    os.utime(a, ns=(1, 1))
    assert content_key(a) == content_key(b)
