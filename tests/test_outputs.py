"""Outputs that cannot destroy data: OUT never over its own input, --force only over an edlm output,
impossible OUTs refused before any model loads, published dirs readable by others (umask), a
failed write (a full disk) one line with no temp dir left; mask tokens that cannot work refused."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from edlm.cli import main
from edlm.model import DiffusionLM
from edlm.train.convert import convert


def snapshot(root: Path) -> dict:
    """Every file and dir under ROOT with its bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def refused(argv, capsys, *roots: Path) -> str:
    """Run the CLI; assert exit 2, one stderr line, nothing under ROOTS changed; return the line."""
    before = [snapshot(r) for r in roots]
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert [snapshot(r) for r in roots] == before
    return err


@pytest.fixture
def home(tmp_path, tiny_ar_dir):
    """A user's dir holding an AR base among other files, and an edlm model inside a project dir."""
    shutil.copytree(tiny_ar_dir, tmp_path / "base")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.txt").write_text("also mine")
    return tmp_path


def test_convert_never_writes_over_or_into_its_base(home, capsys):
    base = home / "base"
    err = refused(["convert", str(base), str(home), "--force"], capsys, home)
    assert f"OUT {home} contains BASE {base}: writing it would delete BASE" in err
    assert f"OUT {base} is BASE {base}" in refused(["convert", str(base), str(base), "--force"], capsys, home)
    assert f"lies inside BASE {base}" in refused(["convert", str(base), str(base / "dlm")], capsys, home)
    (home / "link").symlink_to(base)  # the same dir by another name
    err = refused(["convert", str(home / "link"), str(base), "--force"], capsys, home)
    assert f"OUT {base} is BASE {home / 'link'}" in err


def test_convert_keeps_clear_of_a_gguf_base_file(home, capsys):
    (home / "m.gguf").write_bytes(b"GGUF")  # never read: the output check comes first
    err = refused(["convert", str(home / "m.gguf"), str(home), "--force"], capsys, home)
    assert f"OUT {home} contains BASE {home / 'm.gguf'}" in err


def test_force_replaces_only_an_edlm_output(home, capsys):
    err = refused(["convert", str(home / "base"), str(home / "sub"), "--force"], capsys, home)
    assert f"refusing to replace {home / 'sub'}: it holds data.txt and is not an edlm output" in err
    mixed = home / "mixed"
    mixed.mkdir()
    (mixed / "notes.txt").write_text("x")
    (mixed / "sub").mkdir()
    err = refused(["convert", str(home / "base"), str(mixed), "--force"], capsys, home)
    assert "it holds notes.txt, sub/ and is not an edlm output" in err


def test_export_never_writes_over_its_model(home, capsys):
    dlm = convert(home / "base", home / "proj" / "dlm", block_size=4)
    model = home / "proj" / "dlm"
    err = refused(["export", str(model), str(home / "proj"), "--format", "hf", "--force"], capsys, home)
    assert f"OUT {home / 'proj'} contains MODEL {model}" in err
    err = refused(["export", str(model), str(model / "hf"), "--format", "hf"], capsys, home)
    assert f"lies inside MODEL {model}" in err
    err = refused(["export", str(model), str(home / "sub"), "--format", "hf", "--force"], capsys, home)
    assert "is not an edlm output" in err
    assert dlm.config.block_size == 4


@pytest.mark.parametrize("target,expected", [
    ("/proc/edlm-out", "cannot write /proc/edlm-out: /proc is a kernel pseudo-file system"),
    ("/sys/edlm-out", "cannot write /sys/edlm-out: /sys is a kernel pseudo-file system"),
    ("{h}/notes.txt/sub", "cannot write {h}/notes.txt/sub: {h}/notes.txt is a file, not a directory"),
    ("{h}/notes.txt", "output path {h}/notes.txt exists and is not a directory"),
])
@pytest.mark.parametrize("verb", ["convert", "export"])
def test_an_impossible_out_is_one_line_before_any_model_loads(home, capsys, monkeypatch, verb, target, expected):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded before OUT was checked")

    monkeypatch.setattr("edlm.train.convert.load_causal_lm", no_load)
    monkeypatch.setattr("edlm.serve.export.load_for_export", no_load)
    fill = lambda s: s.replace("{h}", str(home))  # noqa: E731
    extra = ["--format", "hf"] if verb == "export" else []
    assert fill(expected) in refused([verb, str(home / "base"), fill(target), *extra], capsys, home)


def test_published_dirs_honour_the_umask(home):
    old = os.umask(0o022)
    try:
        convert(home / "base", home / "dlm", block_size=4)
        os.umask(0o027)
        main(["export", str(home / "dlm"), str(home / "hf"), "--format", "hf"])
    finally:
        os.umask(old)
    assert (home / "dlm").stat().st_mode & 0o777 == 0o755  # mkdtemp alone makes 0700
    assert (home / "hf").stat().st_mode & 0o777 == 0o750


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3: "
                 "file write failed"),
])
def test_a_full_disk_is_one_line_and_leaves_no_temp_dir(home, capsys, monkeypatch, failure):
    def save(self, out, *a, **k):
        (Path(out) / "model.safetensors").write_bytes(b"half")  # what a write leaves before the disk fills
        raise failure

    monkeypatch.setattr(DiffusionLM, "save_pretrained", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 20 * 10**6,
                                                                                 20 * 10**6))
    err = refused(["convert", str(home / "base"), str(home / "dlm")], capsys, home)
    assert f"edlm convert: error: no space left on device writing {home / 'dlm'} (20 MB free)" in err
    assert not (home / "dlm").exists() and not list(home.glob(".*tmp-*"))


def test_a_permission_error_while_writing_is_one_line(home, capsys, monkeypatch):
    def save(self, out, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(out))

    monkeypatch.setattr(DiffusionLM, "save_pretrained", save)
    err = refused(["convert", str(home / "base"), str(home / "dlm")], capsys, home)
    assert f"could not write {home / 'dlm'}: Permission denied" in err and not list(home.glob(".*tmp-*"))


@pytest.mark.parametrize("mask,expected", [
    ("<eos>", "mask token '<eos>' (id 1) is the tokenizer's EOS token"),
    ("<bos>", "is the tokenizer's BOS token"),
    ("<pad>", "is the tokenizer's PAD token"),
    ("", "--mask-token is empty: leave the flag out for the default"),
])
def test_a_mask_token_that_cannot_work_is_refused(home, capsys, mask, expected):
    err = refused(["convert", str(home / "base"), str(home / "dlm"), "--mask-token", mask], capsys, home)
    assert expected in err and not (home / "dlm").exists()


def test_an_earlier_output_is_replaced_with_force(home, capsys):
    assert main(["convert", str(home / "base"), str(home / "dlm"), "--block-size", "4"]) == 0
    assert main(["convert", str(home / "base"), str(home / "dlm"), "--block-size", "8", "--force"]) == 0
    assert json.loads((home / "dlm" / "config.json").read_text())["edlm"]["block_size"] == 8
