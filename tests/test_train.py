"""edlm train: learning, SFT masking, variants, exact resume after SIGKILL, DDP equivalence, errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edlm import DiffusionLM
from edlm.cli import main
from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer
from edlm.train import TrainConfig, train
from edlm.train.convert import convert_model
from edlm.train.data import build_dataset
from edlm.train.noise import NoiseSettings
from edlm.train.objective import LossSettings, diffusion_loss, row_generators

TEXT = "\n\n".join(f"the {w} jumps over the lazy dog {i % 7} times." for i, w in
                   enumerate(["fox", "cat", "cow", "hen"] * 30))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "train.txt").write_text(TEXT)
    rows = [{"prompt": f"Q{i}: add {i} and 2?", "response": f" {i + 2}"} for i in range(60)]
    (d / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d


def small(out, model, data, **kw):
    base = dict(model=str(model), data=[str(data)], out=str(out), block_size=4, seq_len=32, batch_size=4,
                steps=30, lr=3e-3, min_lr=3e-4, warmup_steps=3, save_every=1000, progress=False, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(model_dir):
    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_loss_decreases_and_model_reloads(tiny_ar_dir, corpus, tmp_path):
    final = train(small(tmp_path / "run", tiny_ar_dir, corpus / "train.txt", steps=40, complementary=True))
    ls = losses(tmp_path / "run")
    assert sum(ls[-5:]) / 5 < 0.7 * sum(ls[:5]) / 5
    dlm = DiffusionLM.from_pretrained(final)
    assert dlm.config.block_size == 4 and dlm.config.mask_token_id is not None
    assert dlm.generate("the fox", max_new_tokens=4).stats[0].generated_tokens == 4


@pytest.mark.parametrize("attention,shift", [("clean", True), ("noisy", False), ("bidirectional", False)])
def test_variants_train_and_reload(tiny_ar_dir, corpus, tmp_path, attention, shift):
    final = train(small(tmp_path / "r", tiny_ar_dir, corpus / "train.txt", steps=4, attention=attention,
                        shift=shift, masking="uniform", t_per_block=True))
    dlm = DiffusionLM.from_pretrained(final)
    assert dlm.config.shift == shift
    assert all(torch.isfinite(torch.tensor(losses(tmp_path / "r"))))


def test_ar_objective_and_lora(tiny_ar_dir, corpus, tmp_path):
    final = train(small(tmp_path / "ar", tiny_ar_dir, corpus / "train.txt", steps=20, objective="ar"))
    ls = losses(tmp_path / "ar")
    assert ls[-1] < ls[0]
    assert "edlm" not in json.loads((final / "config.json").read_text())  # stays a plain AR model
    lora = train(small(tmp_path / "lora", tiny_ar_dir, corpus / "train.txt", steps=3, lora_rank=4))
    assert set(weights(lora)) >= set(weights(final))  # merged back into plain weight names


def test_sft_prompt_never_masked_nor_scored(tiny_ar_dir, corpus):
    model = make_tiny_causal_lm("llama")
    dlm = convert_model(model, make_tiny_tokenizer(), block_size=4)
    ds = build_dataset([str(corpus / "sft.jsonl")], dlm.tokenizer, seq_len=32)
    batch = ds[:8]
    ids, maskable = batch["input_ids"], batch["maskable"]
    assert (~maskable).any() and maskable.any()
    prompt_text = dlm.tokenizer.decode(ids[0][~maskable[0]])
    assert "add" in prompt_text and "Q" in prompt_text
    seen = {}
    fixed = torch.randn(16, 32, 128)

    def spy(x_t, x_0, attention="clean", **kw):
        seen["x_t"] = x_t
        logits = fixed.clone()
        if seen.get("scramble_prompt"):
            prompt_rows = torch.cat([~maskable, ~maskable])
            logits[prompt_rows] = torch.randn(int(prompt_rows.sum()), 128) * 50
        return logits

    dlm.forward_noisy = spy
    noise = NoiseSettings(complementary=True, t_min=0.9)
    gens = lambda: row_generators(0, 0, torch.arange(8))  # noqa: E731
    loss, n_masked = diffusion_loss(dlm, ids, maskable, noise, gens())
    x_t = seen["x_t"]
    prompt = torch.cat([~maskable, ~maskable])
    assert not (x_t[prompt] == dlm.config.mask_token_id).any()  # prompt never masked
    assert n_masked == int(maskable.sum())  # complementary pair covers every response token once
    seen["scramble_prompt"] = True
    scrambled, _ = diffusion_loss(dlm, ids, maskable, noise, gens())
    assert torch.isfinite(loss) and loss.item() > 0
    assert scrambled.item() == pytest.approx(loss.item(), rel=1e-6)  # prompt logits never scored


def _cli_train(out, model, data, steps, extra=()):
    return [sys.executable, "-m", "edlm.cli", "train", str(model), "--data", str(data), "--out", str(out),
            "--block-size", "4", "--seq-len", "32", "--batch-size", "4", "--steps", str(steps), "--lr", "3e-3",
            "--warmup-steps", "3", "--save-every", "5", "--no-progress", *extra]


# `edlm train` in a process that SIGKILLs itself while publishing checkpoint argv[1] (its temp dir
# fully written, not yet renamed): a crash at a chosen point, with no wall-clock race.
KILLED_WHILE_SAVING = """
import os, signal, sys
import edlm.train.loop as loop
from edlm.cli import main
publish = loop.publish_dir
def publish_or_die(tmp, final):
    if final.name == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGKILL)
    publish(tmp, final)
loop.publish_dir = publish_or_die
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_then_resume_equals_unbroken_run(tiny_ar_dir, corpus, tmp_path, capsys):
    steps, out = 20, tmp_path / "killed"
    argv = _cli_train(out, tiny_ar_dir, corpus / "train.txt", steps)[3:]  # after `python -m edlm.cli`
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, "step-00000010", *argv],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert left == [".tmp-step-00000010", "step-00000005"]  # the half-saved one never published
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert f"resumed from {out / 'checkpoints' / 'step-00000005'} at step 5" in capsys.readouterr().out
    unbroken = train(small(tmp_path / "unbroken", tiny_ar_dir, corpus / "train.txt", steps=steps, save_every=5,
                           lr=3e-3, min_lr=3e-6, warmup_steps=3))
    a, b = weights(out / "model"), weights(unbroken)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical


def test_ddp_two_processes_matches_one(tiny_ar_dir, corpus, tmp_path):
    base = ["--block-size", "4", "--seq-len", "32", "--steps", "6", "--lr", "3e-3", "--warmup-steps", "2",
            "--save-every", "100", "--log-every", "1", "--no-progress"]
    data = ["--data", str(corpus / "train.txt")]
    # accelerate's own CPU launcher needs MPI; its torchrun launcher + ACCELERATE_USE_CPU gives gloo DDP
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", "29517", "-m", "edlm.cli", "train", str(tiny_ar_dir), *data,
                          "--out", str(tmp_path / "ddp"), "--batch-size", "2", *base],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "on 2 process(es)" in two.stdout
    one = subprocess.run([sys.executable, "-m", "edlm.cli", "train", str(tiny_ar_dir), *data,
                          "--out", str(tmp_path / "single"), "--batch-size", "4", *base],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = weights(tmp_path / "ddp" / "model"), weights(tmp_path / "single" / "model")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    la, lb = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert len(la) == len(lb) == 6


def test_cli_errors(tiny_ar_dir, corpus, tmp_path, capsys):
    def err(*argv):
        assert main(["train", *argv]) == 2
        msg = capsys.readouterr().err
        assert msg.count("\n") == 1
        return msg

    out = ["--out", str(tmp_path / "o")]
    assert "not found" in err(str(tiny_ar_dir), "--data", str(tmp_path / "nope.txt"), *out)
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty" in err(str(tiny_ar_dir), "--data", str(tmp_path / "empty.jsonl"), *out)
    (tmp_path / "odd.jsonl").write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    assert "--text-field" in err(str(tiny_ar_dir), "--data", str(tmp_path / "odd.jsonl"), *out)
    assert "multiple of the block size" in err(str(tiny_ar_dir), "--data", str(corpus / "train.txt"),
                                                "--seq-len", "30", "--block-size", "4", *out)
    assert "not found" in err(str(tmp_path / "nomodel"), "--data", str(corpus / "train.txt"), *out)


def test_disk_full_while_saving_keeps_earlier_checkpoint(tiny_ar_dir, corpus, tmp_path, monkeypatch):
    import errno

    import edlm.train.loop as train_mod
    from edlm.errors import EdlmError

    real = train_mod.exportable
    calls = {"n": 0}

    def flaky(dlm, accelerator):
        calls["n"] += 1
        model = real(dlm, accelerator)
        if calls["n"] == 2:
            def full(path):
                raise OSError(errno.ENOSPC, "No space left on device")
            model.save_pretrained = full
        return model

    monkeypatch.setattr(train_mod, "exportable", flaky)
    out = tmp_path / "full"
    with pytest.raises(EdlmError, match="(?i)no space left on device.*earlier checkpoints are untouched"):
        train(small(out, tiny_ar_dir, corpus / "train.txt", steps=4, save_every=2))
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-00000002"]  # the good one stays, no half-written temp dir is left
    assert DiffusionLM.from_pretrained(out / "checkpoints" / "step-00000002" / "model").config.block_size == 4


def test_repair_training_trains(tiny_ar_dir, corpus, tmp_path):
    """The drafts themselves: tests/test_parallelism.py."""
    final = train(small(tmp_path / "rep", tiny_ar_dir, corpus / "train.txt", steps=20, repair_fraction=0.3))
    ls = losses(tmp_path / "rep")
    assert ls[-1] < ls[0] and DiffusionLM.from_pretrained(final).config.block_size == 4


def test_loss_feeds_only_blocks_with_masks_and_is_unchanged(corpus):
    model = make_tiny_causal_lm("llama", dtype=torch.float64)
    dlm = convert_model(model, make_tiny_tokenizer(), block_size=4, shift=True)
    batch = build_dataset([str(corpus / "sft.jsonl")], dlm.tokenizer, seq_len=32)[:8]
    noise = NoiseSettings(t_per_block=True)

    def loss_and_grads(settings=LossSettings()):
        model.zero_grad()
        loss, _ = diffusion_loss(dlm, batch["input_ids"], batch["maskable"], noise,
                                 row_generators(0, 3, torch.arange(8)), settings)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    fed = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: fed.append(args[0].shape[1]))
    loss, grads = loss_and_grads()
    assert fed[-1] < 64  # prompt-only blocks were left out of the noisy half
    full_loss, full_grads = loss_and_grads(LossSettings(skip_unmasked_blocks=False))
    assert fed[-1] == 64
    assert torch.allclose(loss, full_loss, rtol=1e-10)
    assert all(torch.allclose(g, h, atol=1e-10) for g, h in zip(grads, full_grads, strict=True))


@pytest.mark.parametrize(("arch", "shift"), [("llama", True), ("qwen3", False)])
def test_ar_loss_on_the_causal_clean_stream_is_the_causal_lm_loss(corpus, arch, shift):
    """With the diffusion term off, the clean stream's AR loss is exactly the plain causal LM loss of
    the same model on the same tokens (SFT data: prompts unscored), whichever noisy blocks are fed."""
    from edlm.train.objective import causal_lm_loss, next_token_loss

    model = make_tiny_causal_lm(arch, dtype=torch.float64)
    dlm = convert_model(model, make_tiny_tokenizer(), block_size=4, shift=shift)
    dlm.config.causal_clean = True
    batch = build_dataset([str(corpus / "sft.jsonl")], dlm.tokenizer, seq_len=32)[:6]
    ids, maskable = batch["input_ids"], batch["maskable"]
    plain, _ = causal_lm_loss(model, ids, maskable)
    x_t = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.5,
                      dlm.config.mask_token_id, ids)
    active = torch.rand(6, 8, generator=torch.Generator().manual_seed(1)) < 0.5
    for act in (None, active):
        _, clean = dlm.forward_noisy(x_t, ids, active=act, with_clean=True)
        assert torch.allclose(next_token_loss(clean, ids, maskable), plain, rtol=1e-6)  # both reduce in fp32
    # the joint loss adds exactly a * L_AR to the diffusion loss
    gens = lambda: row_generators(0, 0, torch.arange(6))  # noqa: E731
    diff, _ = diffusion_loss(dlm, ids, maskable, NoiseSettings(), gens())
    joint, _ = diffusion_loss(dlm, ids, maskable, NoiseSettings(), gens(), LossSettings(ar_loss_weight=0.5))
    assert torch.allclose(joint - diff, 0.5 * plain, rtol=1e-6)
    dlm.config.causal_clean = False  # block-causal clean tokens see the token they would predict
    _, leaky = dlm.forward_noisy(x_t, ids, with_clean=True)
    assert not torch.allclose(next_token_loss(leaky, ids, maskable), plain, rtol=1e-4)


def test_ar_loss_weight_trains_a_causal_clean_model_with_full_mask_blocks(tiny_ar_dir, corpus, tmp_path):
    final = train(small(tmp_path / "r", tiny_ar_dir, corpus / "train.txt", steps=30, ar_loss_weight=1.0,
                        masking="full"))
    ls = losses(tmp_path / "r")
    assert sum(ls[-5:]) / 5 < 0.8 * sum(ls[:5]) / 5
    dlm = DiffusionLM.from_pretrained(final)
    assert dlm.config.causal_clean is True
    res = dlm.generate(["the fox", "a"], max_new_tokens=6, strategy="verified")
    assert all(s.generated_tokens == 6 or r == "stop" for s, r in zip(res.stats, res.finish_reasons, strict=True))
