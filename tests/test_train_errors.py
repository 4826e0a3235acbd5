"""edlm train: bad input is one line and exit 2 and touches nothing on disk; one job per --out;
launches that are not one distributed job; resume past corrupt checkpoints; logged loss is a mean;
data errors name file and line; chat data without a chat template."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_train import losses, weights
from test_train import small as train_small

from edlm.cli import main
from edlm.errors import EdlmError
from edlm.files import release_run_lock, take_run_lock
from edlm.train import TrainConfig, train
from edlm.train.data import build_dataset, chat_prompt

TEXT = "\n\n".join(f"the {w} jumps over the lazy dog {i % 7} times." for i, w in
                   enumerate(["fox", "cat", "cow", "hen"] * 30))
FAST = ["--block-size", "4", "--seq-len", "32", "--batch-size", "4", "--steps", "3", "--lr", "3e-3",
        "--warmup-steps", "1", "--no-progress"]


def small(out, model, data, **kw):
    """test_train's tiny run, 3 steps long."""
    return train_small(out, model, data, **{"steps": 3, "warmup_steps": 1, **kw})


def snapshot(root: Path) -> dict:
    """Every file and dir under ROOT with its bytes: what a failed command must leave as it was."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_ar_dir):
    """Data files (good and bad), a model without tokenizer files, and runs holding checkpoints."""
    d = tmp_path_factory.mktemp("world")
    (d / "train.txt").write_text(TEXT)
    (d / "empty.jsonl").write_text("")
    (d / "odd.jsonl").write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    (d / "int.jsonl").write_text("\n".join(json.dumps({"text": 123 + i}) for i in range(3)) + "\n")
    (d / "mixed.jsonl").write_text(json.dumps({"text": "a fox"}) + "\n" + json.dumps({"text": 123}) + "\n")
    (d / "badjson.jsonl").write_text(json.dumps({"text": "a fox"}) + "\n{\"text\": \"unterminated\n")
    (d / "latin1.txt").write_bytes("a fox\n\ncaf\u00e9 au lait\n".encode("latin-1"))
    (d / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}: the fox", "response": TEXT[:60]}) + "\n"
                                         for i in range(20)))
    (d / "notok").mkdir()
    for f in Path(tiny_ar_dir).iterdir():
        if f.name == "config.json" or f.suffix == ".safetensors":
            shutil.copy(f, d / "notok" / f.name)
    # a finished run (checkpoints at steps 1, 2), and one whose every checkpoint is corrupt
    train(small(d / "done", tiny_ar_dir, d / "train.txt", steps=2, save_every=1))
    shutil.copytree(d / "done", d / "corrupt")
    for ckpt in sorted((d / "corrupt" / "checkpoints").iterdir()):
        (ckpt / "trainer.json").write_text("{garbage")
    (d / "existing").mkdir()
    (d / "existing" / "notes.txt").write_text("mine")
    (d / "afile").write_text("not a dir")
    (d / "locked").mkdir()
    (d / "locked" / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "today"}))
    return d


# (argv after MODEL, expected text in the one stderr line); {w} = the world dir, {m} = the tiny model
BAD_INPUTS = [
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--lr", "abc"], "invalid float value"),
    (["--data", "{w}/train.txt"], "required: --out"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--objective", "foo"], "invalid choice"),
    (["--data", "{w}/train.txt", "--out", "{w}/existing", "--lr", "-1"], "--lr must be >= 0"),
    (["--data", "{w}/train.txt", "--out", "{w}/existing", "--lr", "0"], "--lr must be > 0"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--lr", "nan"], "--lr must be a finite number"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--min-lr", "1"], "--min-lr 1.0 must not exceed"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--steps", "0"], "--steps must be >= 1"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--keep-last", "0"], "--keep-last must be >= 1"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--block-size", "0"], "--block-size must be >= 1"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--lora-rank", "-2"], "--lora-rank must be >= 0"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--train", "vision"], "--train vision trains a VLM's vision"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--train", "vision", "--objective", "ar"],
     "--train vision needs a vision-language model"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--val-fraction", "1"], "--val-fraction must be in"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--repair-fraction", "1.5"], "--repair-fraction"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--t-min", "0"], "--t-min must be in (0, 1)"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--half-life", "0"], "--half-life must be > 0"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--eval-every", "5"], "--eval-every needs held-out"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--val-data", "{w}/train.txt", "--val-fraction", "0.1"],
     "alternatives"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--ar-loss-weight", "-1"], "--ar-loss-weight must be >= 0"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--ar-loss-weight", "1", "--no-causal-clean"],
     "--ar-loss-weight needs --causal-clean"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--causal-clean", "--attention", "noisy"],
     "apply to diffusion training with --attention clean"),
    # training for parallelism
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--on-policy", "1.5"], "--on-policy must be in [0, 1]"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--mask-ratio", "0"], "--mask-ratio must be in (0, 1]"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--mask-ratio", "0.5", "--masking", "full"],
     "both fix the noise level"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--noise-floor", "1"], "--noise-floor must be in [0, 1)"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--noise-floor", "0.5", "--mask-ratio", "0.5"],
     "--mask-ratio fixes it"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--certainty-weight", "-1"], "--certainty-weight must be >= 0"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--certainty-temperature", "0"],
     "--certainty-temperature must be > 0"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--draft-decay", "-4"], "--draft-decay must be >= 0"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--teacher-top-k", "0"], "--teacher-top-k must be >= 1"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--teacher", "{w}/nope"], "--teacher {w}/nope: no config.json"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--block-schedule", "16"], "--block-schedule: '16' is not SIZE@"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--block-schedule", "12@3"], "multiple of the block size 12"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--objective", "ar", "--on-policy", "0.5"],
     "apply to --objective diffusion"),
    (["--data", "{w}/nope.txt", "--out", "{w}/new"], "data file not found"),
    (["--data", "{w}/empty.jsonl", "--out", "{w}/existing"], "data file is empty"),
    (["--data", "{w}/train.txt", "{w}/odd.jsonl", "--out", "{w}/new"], "must all be one of"),
    (["--data", "{w}/odd.jsonl", "--out", "{w}/new"], "--text-field"),
    (["--data", "{w}/int.jsonl", "--out", "{w}/new"], "int.jsonl, row 1: field 'text' must be a string"),
    (["--data", "{w}/mixed.jsonl", "--out", "{w}/existing"], "mixed.jsonl, row 2: field 'text' must be a string"),
    (["--data", "{w}/badjson.jsonl", "--out", "{w}/new"], "badjson.jsonl, line 2: invalid JSON"),
    (["--data", "{w}/latin1.txt", "--out", "{w}/new"], "latin1.txt, line 3: not UTF-8"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--seq-len", "30"], "multiple of the block size"),
    (["--data", "{w}/train.txt", "--out", "{w}/existing", "--seq-len", "1024"], "exceeds the model's 256"),
    (["--data", "{w}/train.txt", "--out", "{w}/afile"], "not a directory"),
    (["--data", "{w}/train.txt", "--out", "{w}/done"], "already holds checkpoints: pass --resume"),
    (["--data", "{w}/train.txt", "--out", "{w}/done", "--resume", "--steps", "2"], "already trained to step 2"),
    (["--data", "{w}/train.txt", "--out", "{w}/corrupt", "--resume"],
     "no intact checkpoint in {w}/corrupt/checkpoints to resume from: step-00000002: trainer.json is unreadable"),
    (["--data", "{w}/train.txt", "--out", "{w}/locked"], "in use by another job (pid 1 on elsewhere"),
    # OUT that cannot be written, or would be written into the model; mask tokens that cannot work
    (["--data", "{w}/train.txt", "--out", "/proc/edlm-run"], "cannot write /proc/edlm-run: /proc is a kernel"),
    (["--data", "{w}/train.txt", "--out", "/sys/edlm-run"], "cannot write /sys/edlm-run: /sys is a kernel"),
    (["--data", "{w}/train.txt", "--out", "{w}/afile/sub"], "{w}/afile is a file, not a directory"),
    (["--data", "{w}/train.txt", "--out", "{m}/run"], "lies inside MODEL {m}"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--mask-token", "<eos>"], "is the tokenizer's EOS token"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--mask-token", ""], "--mask-token is empty"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--seed", str(2**64)], "--seed must be in [0, 2**63)"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--seed", "-1"], "--seed must be in [0, 2**63)"),
    (["--data", "{w}/sft.jsonl", "--out", "{w}/new", "--text-field", "nope"],
     "--text-field 'nope': the data has no such field (fields present: prompt, response)"),
    (["--data", "{w}/train.txt", "--out", "{w}/new", "--messages-field", "chat"],
     "--messages-field 'chat': the data has no such field (fields present: text)"),
    # resuming with settings that define the model: refused (other changes only warn, see below)
    (["--data", "{w}/train.txt", "--out", "{w}/done", "--resume", "--steps", "3", "--lora-rank", "2"],
     "--resume: --lora-rank 0 -> 2 differ from the run in {w}/done"),
    ("MODEL={w}/nomodel", "model directory not found"),
    ("MODEL={w}/notok", "no tokenizer files in {w}/notok"),
]


@pytest.mark.parametrize("argv,expected", BAD_INPUTS, ids=[e[:40] for _, e in BAD_INPUTS])
def test_bad_train_input_is_one_line_exit_2_and_changes_nothing(world, tiny_ar_dir, capsys, argv, expected):
    model = str(tiny_ar_dir)
    if isinstance(argv, str):  # a bad model: everything else fine
        model, argv = argv.split("=", 1)[1], ["--data", "{w}/train.txt", "--out", "{w}/new"]
    fill = lambda s: s.replace("{w}", str(world)).replace("{m}", str(tiny_ar_dir))  # noqa: E731
    before = snapshot(world)
    capsys.readouterr()
    try:
        code = main(["train", fill(model), *FAST[:4], *[fill(a) for a in argv]])
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert fill(expected) in err, err
    assert snapshot(world) == before  # no new --out dir, no lock left, nothing rewritten


def test_bad_input_table_is_large():
    assert len(BAD_INPUTS) >= 30


@pytest.mark.parametrize("data", ["int.jsonl", "badjson.jsonl"])
def test_bad_input_from_a_real_process_is_one_line(world, tiny_ar_dir, data):
    """Also what libraries log on their own (datasets logs a JSON failure before raising)."""
    r = subprocess.run([sys.executable, "-m", "edlm.cli", "train", str(tiny_ar_dir), "--data",
                        str(world / data), "--out", str(world / "new2"), *FAST], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert data in r.stderr and not (world / "new2").exists()


# ---------------------------------------------------------------- one job per run dir
def test_run_lock_refuses_a_second_job_and_takes_over_a_dead_ones(tmp_path, capsys):
    lock = take_run_lock(tmp_path)
    holder = json.loads(lock.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(EdlmError, match=f"in use by another job \\(pid {os.getpid()} on {socket.gethostname()}"):
        take_run_lock(tmp_path)  # a live holder (this very process)
    release_run_lock(lock)
    assert not lock.exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    take_run_lock(tmp_path)
    assert f"its holder (pid {dead.pid}" in capsys.readouterr().out
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release_run_lock(lock)

    lock.write_text(json.dumps({"pid": dead.pid, "host": "other-node", "since": "then"}))
    with pytest.raises(EdlmError, match="pid .* on other-node"):
        take_run_lock(tmp_path)  # another host's process cannot be checked: never taken over
    release_run_lock(lock)
    assert lock.exists()  # not ours: left alone


def test_a_launch_that_is_not_one_job_is_refused(monkeypatch):
    from accelerate.utils import DistributedType

    from edlm.train.loop import check_launch

    for var in ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(var, raising=False)
    single = SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO)
    check_launch(single)  # plain `edlm train`
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun / accelerate launch asked for 2 processes
    with pytest.raises(EdlmError, match="started 2 processes but accelerate formed a 1-process job"):
        check_launch(single)
    ddp = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU)
    check_launch(ddp)
    for engine in ("FSDP", "DEEPSPEED"):
        monkeypatch.setenv(f"ACCELERATE_USE_{engine}", "true")
        with pytest.raises(EdlmError, match=f"asks for {engine} but accelerate runs MULTI_CPU"):
            check_launch(ddp)
        check_launch(SimpleNamespace(num_processes=2, distributed_type=getattr(DistributedType, engine)))
        monkeypatch.delenv(f"ACCELERATE_USE_{engine}")


# ---------------------------------------------------------------- resume
def test_resume_skips_corrupt_checkpoints_and_equals_the_unbroken_run(world, tiny_ar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(small(out, tiny_ar_dir, world / "train.txt", steps=3, save_every=1, keep_last=3))
    unbroken = weights(out / "model")
    ckpts = sorted((out / "checkpoints").iterdir())
    opt = ckpts[2] / "state" / "optimizer.bin"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])  # truncated (a crash mid-copy)
    (ckpts[1] / "trainer.json").write_text("{not json")
    capsys.readouterr()
    train(small(out, tiny_ar_dir, world / "train.txt", steps=3, save_every=1, keep_last=3, resume=True))
    printed = capsys.readouterr().out
    assert "skipping checkpoint" in printed and "state/optimizer.bin is truncated or corrupt" in printed
    assert "trainer.json is unreadable" in printed and "at step 1" in printed
    resumed = weights(out / "model")
    assert max((resumed[k] - unbroken[k]).abs().max().item() for k in unbroken) <= 1e-6


def test_resume_skips_a_truncated_model_dir_and_lists_changed_settings(world, tiny_ar_dir, tmp_path, capsys):
    """model/ is what users load: a checkpoint whose copy is truncated is no resume point either."""
    out = tmp_path / "run"
    shutil.copytree(world / "done", out)
    weights_file = out / "checkpoints" / "step-00000002" / "model" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-100])
    capsys.readouterr()
    train(small(out, tiny_ar_dir, world / "train.txt", steps=3, save_every=1, lr=1e-3, resume=True))
    printed = capsys.readouterr().out
    assert "skipping checkpoint" in printed and "model/model.safetensors is truncated or corrupt" in printed
    assert "resumed from" in printed and "at step 1" in printed
    assert "with changed settings: --steps 2 -> 3, --lr 0.003 -> 0.001" in printed


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_temp_dir(world, tiny_ar_dir, tmp_path,
                                                                              monkeypatch, capsys):
    """torch.save on a full disk raises a bare RuntimeError; the free space says what happened."""
    from accelerate import Accelerator

    def full(self, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                           "file data/3: file write failed")

    monkeypatch.setattr(Accelerator, "save_state", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9, free=20 * 10**6))
    out = tmp_path / "run"
    code = main(["train", str(tiny_ar_dir), "--data", str(world / "train.txt"), "--out", str(out), *FAST,
                 "--steps", "2", "--save-every", "1", "--log-every", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert (f"no space left on device writing {out}/checkpoints/step-00000001 (20 MB free); earlier checkpoints "
            "are untouched") in err
    assert not list(out.rglob(".tmp-*")) and not (out / "checkpoints" / "step-00000001").exists()


def test_resume_without_checkpoint_starts_at_0_and_logged_loss_is_the_mean_since_the_last_line(
        world, tiny_ar_dir, tmp_path, capsys):
    every = tmp_path / "every"
    train(small(every, tiny_ar_dir, world / "train.txt", steps=6, log_every=1))
    capsys.readouterr()
    train(small(tmp_path / "third", tiny_ar_dir, world / "train.txt", steps=6, log_every=3, resume=True))
    assert f"no checkpoint in {tmp_path / 'third'}: starting from step 0" in capsys.readouterr().out
    per_step, logged = losses(every), losses(tmp_path / "third")
    assert logged == pytest.approx([sum(per_step[:3]) / 3, sum(per_step[3:]) / 3], rel=1e-6)


def test_a_failed_run_removes_only_the_out_dir_it_created(world, tiny_ar_dir, tmp_path):
    with pytest.raises(EdlmError):
        train(small(tmp_path / "fresh" / "run", tiny_ar_dir, world / "int.jsonl"))
    assert not (tmp_path / "fresh" / "run").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(EdlmError):
        train(small(tmp_path / "mine", tiny_ar_dir, world / "int.jsonl"))
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


# ---------------------------------------------------------------- data and small things
def test_chat_data_without_a_chat_template_trains_on_role_lines(world, tiny_ar_dir, tmp_path):
    from edlm.testing import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    assert not getattr(tok, "chat_template", None)
    rows = [{"messages": [{"role": "user", "content": f"add {i} and 2"}, {"role": "assistant", "content": f"{i + 2}"}]}
            for i in range(40)]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = build_dataset([str(tmp_path / "chat.jsonl")], tok, seq_len=32)
    ids, maskable = ds[0]["input_ids"], ds[0]["maskable"]
    assert "user: add" in tok.decode(ids[~maskable]) and "assistant:" in tok.decode(ids[~maskable])
    assert chat_prompt(tok, rows[0]["messages"][:1]) == "user: add 0 and 2\nassistant:"
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    assert chat_prompt(tok, rows[0]["messages"][:1]) == "<user>add 0 and 2<assistant>"


def test_shared_tensor_notice_is_silenced(caplog):
    import torch
    from accelerate.utils.other import clean_state_dict_for_safetensors

    from edlm.train.loop import _silence_shared_tensor_notice

    _silence_shared_tensor_notice()
    shared = torch.zeros(2, 2)
    with caplog.at_level(logging.WARNING):
        clean_state_dict_for_safetensors({"model.embed_tokens.weight": shared, "lm_head.weight": shared})
    assert "Removed shared tensor" not in caplog.text


def test_warmup_default_is_a_fraction_of_the_run():
    from edlm.train.loop import lr_lambda

    cfg = lambda **kw: TrainConfig(model="m", data=["d"], out="o", **kw)  # noqa: E731
    assert cfg(steps=1000).warmup == 50 and cfg(steps=10).warmup == 1 and cfg(steps=1000, warmup_steps=0).warmup == 0
    f = lr_lambda(cfg(steps=1000, lr=1e-3, min_lr=1e-4))
    assert f(0) == pytest.approx(1 / 50) and f(49) == pytest.approx(1.0) and f(999) == pytest.approx(0.1, abs=1e-3)
    assert lr_lambda(cfg(steps=10, warmup_steps=0, lr=1e-3, min_lr=1e-4))(0) == pytest.approx(1.0)


def test_every_numeric_setting_has_a_range_check():
    """A negative (or non-finite) value of any number the run uses is refused, naming its flag."""
    from dataclasses import fields

    from edlm.train.config import flag

    def cfg(**kw):
        return TrainConfig(model="m", data=[__file__], out="o", **kw)

    cfg().validate()
    free = {"seed"}  # any integer seeds the generators
    numeric = [f.name for f in fields(TrainConfig) if f.name not in free
               and any(t in str(f.type) for t in ("int", "float")) and not isinstance(getattr(cfg(), f.name), bool)]
    assert len(numeric) >= 18
    for name in numeric:
        for bad in (-1, float("nan")):
            if bad != bad and "float" not in str(TrainConfig.__dataclass_fields__[name].type):
                continue
            with pytest.raises(EdlmError, match=flag(name)):
                cfg(**{name: bad}).validate()
