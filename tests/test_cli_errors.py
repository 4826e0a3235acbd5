"""Bad input at every entrance of the CLI: exit 2, one line on stderr, no traceback, nothing changed.

Each case names what a newcomer tried; the table grows with every report (training's own cases
live in tests/test_train*.py).
"""

import json
import shutil

import pytest

from edlm.cli import main
from edlm.train.convert import convert


@pytest.fixture(scope="module")
def dirs(tiny_ar_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    convert(tiny_ar_dir, root / "dlm", block_size=4)
    convert(tiny_ar_dir, root / "shift", block_size=4, shift=True)
    for name, edit in {"eight": {"block_size": "eight"}, "badmask": {"mask_token_id": 99999}}.items():
        shutil.copytree(root / "dlm", root / name)
        cfg = json.loads((root / name / "config.json").read_text())
        cfg["edlm"].update(edit)
        (root / name / "config.json").write_text(json.dumps(cfg))
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (root / "binary.bin").write_bytes(bytes(range(256)))
    (root / "existing.txt").write_text("keep me")
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("keep me")
    (root / "long.txt").write_text("x" * 250)  # 250 of the tiny model's 256 positions
    (root / "data.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (root / "ar.gguf").write_bytes(b"GGUF")
    return {"root": root, "ar": tiny_ar_dir}


GEN = ["generate", "{root}/dlm", "--prompt", "hi"]
CASES = [  # (what was tried, argv, a word the message must hold)
    ("prompt file in Latin-1", ["generate", "{root}/dlm", "--prompt-file", "{root}/latin1.txt"], "UTF-8"),
    ("binary prompt file", ["generate", "{root}/dlm", "--prompt-file", "{root}/binary.bin"], "UTF-8"),
    ("missing prompt file", ["generate", "{root}/dlm", "--prompt-file", "{root}/nope.txt"], "not found"),
    ("missing model", ["generate", "{root}/nope", "--prompt", "hi"], "not found"),
    ("a file as MODEL", ["generate", "{root}/existing.txt", "--prompt", "hi"], "is a file, not a model directory"),
    ("a .gguf file as --verifier", [*GEN, "--verifier", "{root}/ar.gguf"], "ar.gguf is a file, not a model directory"),
    ("a directory as --prompt-file", ["generate", "{root}/dlm", "--prompt-file", "{root}/out"], "is a directory"),
    ("--chat without a chat template", [*GEN, "--chat"], "chat template"),
    ("embed a text over the context", ["embed", "{root}/dlm", "--text", "x" * 300], "over the model's 256 positions"),
    ("convert a file that is not GGUF", ["convert", "{root}/existing.txt", "{root}/c4"], "is a file"),
    ("threshold 0", [*GEN, "--threshold", "0"], "threshold"),
    ("threshold 1.5", [*GEN, "--threshold", "1.5"], "threshold"),
    ("factor -1", [*GEN, "--strategy", "factor", "--factor", "-1"], "factor"),
    ("gamma -1", [*GEN, "--strategy", "entropy", "--gamma", "-1"], "gamma"),
    ("tokens per step 0", [*GEN, "--strategy", "steps", "--tokens-per-step", "0"], "tokens_per_step"),
    ("draft depth 0", [*GEN, "--strategy", "psd", "--draft-depth", "0"], "draft_depth"),
    ("draft depth x block over the context", [*GEN, "--strategy", "psd", "--draft-depth", "100"], "positions"),
    ("block size 0", [*GEN, "--block-size", "0"], "block size"),
    ("block size over the context", [*GEN, "--block-size", "100000"], "positions"),
    ("unknown strategy", [*GEN, "--strategy", "magic"], "unknown strategy"),
    ("greedy-only strategy sampled", [*GEN, "--strategy", "psd", "--temperature", "0.7"], "greedily"),
    ("wino on a shift model", ["generate", "{root}/shift", "--prompt", "hi", "--strategy", "wino"], "shift"),
    ("temperature -1", [*GEN, "--temperature", "-1"], "temperature"),
    ("top_p 0", [*GEN, "--top-p", "0"], "top_p"),
    ("max new tokens 0", [*GEN, "--max-new-tokens", "0"], "max_new_tokens"),
    ("prompt + budget beyond the context", ["generate", "{root}/dlm", "--prompt-file", "{root}/long.txt",
                                            "--max-new-tokens", "64"], "positions"),
    ("block_size 'eight' in config.json", ["generate", "{root}/eight", "--prompt", "hi"], "block_size"),
    ("mask_token_id 99999 in config.json", ["generate", "{root}/badmask", "--prompt", "hi"], "mask_token_id"),
    ("AR model without --ar", ["generate", "{ar}", "--prompt", "hi"], "edlm convert"),
    ("convert block size beyond the context", ["convert", "{ar}", "{root}/c1", "--block-size", "1000"],
     "positions"),
    ("convert block size 0", ["convert", "{ar}", "{root}/c2", "--block-size", "0"], "block-size"),
    ("convert onto a non-empty dir", ["convert", "{ar}", "{root}/out"], "not empty"),
    ("convert onto a file", ["convert", "{ar}", "{root}/existing.txt"], "not a directory"),
    ("convert a converted model", ["convert", "{root}/dlm", "{root}/c3"], "already"),
    ("bench --out onto a file", ["bench", "{root}/dlm", "--base", "{ar}", "--out", "{root}/existing.txt",
                                 "--limit", "1"], "not a directory"),
    ("bench with a dLM as --base", ["bench", "{root}/dlm", "--base", "{root}/dlm", "--limit", "1"], "AR model"),
    ("study with a dLM as --base", ["study", "--base", "{root}/dlm", "--data", "{root}/data.jsonl",
                                    "--out", "{root}/study"], "AR parent"),
    ("export sdar of a Llama", ["export", "{root}/dlm", "{root}/e1", "--format", "sdar"], "Qwen3"),
    ("export threshold 2", ["export", "{root}/dlm", "{root}/e2", "--format", "sdar", "--threshold", "2"],
     "threshold"),
    ("export hf with a threshold", ["export", "{root}/dlm", "{root}/e3", "--format", "hf", "--threshold", "0.9"],
     "sdar"),
    ("export onto a non-empty dir", ["export", "{root}/dlm", "{root}/out", "--format", "hf"], "not empty"),
    ("embed a missing model", ["embed", "{root}/nope", "--text", "a"], "not found"),
    ("demo without models", ["demo", "--models", "{root}/nope"], "demo models"),
    ("demo limit 0", ["demo", "--limit", "0"], "limit"),
    ("serve on a bad port", ["serve", "{root}/dlm", "--port", "0"], "port"),
]


def snapshot(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("what", "argv", "word"), CASES, ids=[c[0] for c in CASES])
def test_bad_cli_input_is_one_line_and_exit_2(dirs, capsys, what, argv, word):
    before = snapshot(dirs["root"])
    code = main([a.format(**dirs) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, (what, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert word in lines[0], lines[0]
    assert snapshot(dirs["root"]) == before  # nothing already on disk changed, nothing half-written left


EARLY = [  # (what was tried, argv, a word the message must hold): refused before any model is loaded
    ("study --steps -1", ["study", "--base", "{ar}", "--data", "{root}/data.jsonl", "--out", "{root}/s1",
                          "--steps", "-1"], "--steps"),
    ("study --limit 0", ["study", "--base", "{ar}", "--data", "{root}/data.jsonl", "--out", "{root}/s2",
                         "--limit", "0"], "--limit"),
    ("study --lr 0", ["study", "--base", "{ar}", "--data", "{root}/data.jsonl", "--out", "{root}/s3", "--lr", "0"],
     "--lr"),
    ("study --out in /proc", ["study", "--base", "{ar}", "--data", "{root}/data.jsonl", "--out", "/proc/x"], "/proc"),
    ("study --out under a file", ["study", "--base", "{ar}", "--data", "{root}/data.jsonl", "--out",
                                  "{root}/existing.txt/sub"], "existing.txt"),
    ("bench --out in /proc", ["bench", "{root}/dlm", "--base", "{ar}", "--out", "/proc/x"], "/proc"),
    ("bench --out under a file", ["bench", "{root}/dlm", "--base", "{ar}", "--out", "{root}/existing.txt/sub"],
     "existing.txt"),
    ("bench --strategies magic", ["bench", "{root}/dlm", "--base", "{ar}", "--strategies", "magic"],
     "unknown strategy"),
    ("bench --thresholds 2", ["bench", "{root}/dlm", "--base", "{ar}", "--thresholds", "2"], "threshold"),
    ("bench --repeats 0", ["bench", "{root}/dlm", "--base", "{ar}", "--repeats", "0"], "--repeats"),
    ("bench --block-sizes 0", ["bench", "{root}/dlm", "--base", "{ar}", "--block-sizes", "0"], "--block-sizes"),
    ("bench an AR model as MODEL", ["bench", "{ar}", "--base", "{ar}"], "edlm convert"),
    ("bench --drafter without an adapter", ["bench", "{root}/dlm", "--base", "{ar}", "--drafter", "{root}/dlm"],
     "has no drafting adapter"),
    ("demo --threads 0", ["demo", "--threads", "0"], "--threads"),
    ("demo --out in /proc", ["demo", "--out", "/proc/x"], "/proc"),
    ("eval --out in /proc", ["eval", "{root}/dlm", "--tasks", "x", "--out", "/proc/x/res.json"], "/proc"),
    ("eval --out under a file", ["eval", "{root}/dlm", "--tasks", "x", "--out", "{root}/existing.txt/res.json"],
     "existing.txt"),
    ("eval --out a directory", ["eval", "{root}/dlm", "--tasks", "x", "--out", "{root}/out"], "is a directory"),
]


@pytest.mark.parametrize(("what", "argv", "word"), EARLY, ids=[c[0] for c in EARLY])
def test_bad_arguments_are_refused_before_any_work(dirs, capsys, monkeypatch, what, argv, word):
    """bench, eval, study and demo used to load models and decode (or train) first, then fail on an
    argument or at the final write, losing the work."""
    from edlm.model import DiffusionLM

    def work(*args, **kwargs):
        raise AssertionError(f"{what}: work started before the arguments were checked")

    monkeypatch.setattr(DiffusionLM, "from_pretrained", work)
    monkeypatch.setattr("edlm.train.train", work)
    before = snapshot(dirs["root"])
    code = main([a.format(**dirs) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and word in lines[0], err
    assert snapshot(dirs["root"]) == before
