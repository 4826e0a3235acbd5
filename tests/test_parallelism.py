"""Training for parallelism (edlm.train.parallelism): each objective checked against an
independent construction, the schedules against their steps and a resume."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from edlm import DiffusionLM
from edlm.errors import EdlmError
from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer
from edlm.train import TrainConfig, train
from edlm.train import loop as train_loop
from edlm.train.convert import convert_model
from edlm.train.noise import NoiseSettings, sample_masks
from edlm.train.objective import LossSettings, diffusion_loss, row_generators
from edlm.train.parallelism import (
    certainty_loss,
    chosen_for_drafts,
    draft_position_weights,
    parse_block_schedule,
    substitute_drafts,
    top_k_kl,
)
from edlm.train.settings import reconcile

TEXT = "\n\n".join(f"the {w} jumps over the lazy dog {i % 7} times." for i, w in
                   enumerate(["fox", "cat", "cow", "hen"] * 30))


@pytest.fixture(scope="module")
def dlm():
    torch.manual_seed(0)
    return convert_model(make_tiny_causal_lm("llama", dtype=torch.float64), make_tiny_tokenizer(), block_size=4,
                         shift=True)


def _batch(rows=6, seq_len=16):
    ids = torch.randint(5, 90, (rows, seq_len), generator=torch.Generator().manual_seed(1))
    maskable = torch.ones(rows, seq_len, dtype=torch.bool)
    maskable[:, :4] = False  # a prompt block: never masked, never scored
    return ids, maskable


def test_on_policy_rows_are_replaced_whole_by_an_independent_argmax(dlm):
    ids, maskable = _batch()
    masked = sample_masks(ids, maskable, 4, NoiseSettings(mask_ratio=0.75), row_generators(0, 0, torch.arange(6)))
    gens = row_generators(0, 0, torch.arange(6))
    chosen = chosen_for_drafts(masked, gens, rows_fraction=0.5, positions_fraction=0.0)
    rows = chosen.any(1)
    assert torch.equal(chosen[rows], masked[rows]) and not chosen[~rows].any()  # whole rows or none
    assert 0 < rows.sum() < 6  # seed 0 draws both kinds
    x_t = torch.where(masked, dlm.config.mask_token_id, ids)
    with torch.no_grad():
        argmax = dlm.forward_noisy(x_t, ids).argmax(-1)  # independent: every row, no active-block trick
    expected = x_t.clone()
    for r in torch.nonzero(rows).flatten().tolist():
        expected[r, masked[r]] = argmax[r, masked[r]]
    active = masked.view(6, 4, 4).any(-1)
    assert torch.equal(substitute_drafts(dlm, x_t, ids, chosen, "clean", active), expected)


def test_on_policy_loss_equals_cross_entropy_on_the_substituted_input(dlm):
    ids, maskable = _batch()
    settings = LossSettings(on_policy=1.0)
    noise = NoiseSettings(mask_ratio=0.75)
    loss, n = diffusion_loss(dlm, ids, maskable, noise, row_generators(0, 2, torch.arange(6)), settings)
    scored = maskable.clone()
    scored[:, 0] = False  # shift
    masked = sample_masks(ids, scored, 4, noise, row_generators(0, 2, torch.arange(6)))
    x_t = torch.where(masked, dlm.config.mask_token_id, ids)
    with torch.no_grad():
        x_sub = torch.where(masked, dlm.forward_noisy(x_t, ids).argmax(-1), x_t)
        logits = dlm.forward_noisy(x_sub, ids)
    assert not (x_sub == dlm.config.mask_token_id).any()  # every mask holds a draft
    # a fixed ratio masks round(0.75 * 4) = 3 of each full block: 1/t = 4/3 on every token
    ce = F.cross_entropy(logits[masked], ids[masked], reduction="sum") * 4 / 3 / scored.sum()
    assert n == int(masked.sum()) == 3 * 3 * 6
    assert torch.allclose(loss, ce.float())


def test_repair_fraction_fills_part_of_every_row_with_the_models_argmax(dlm):
    ids, maskable = _batch(2)
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, 8:] = True
    x_t = torch.where(masked, dlm.config.mask_token_id, ids)
    chosen = chosen_for_drafts(masked, row_generators(0, 0, torch.arange(2)), 0.0, 0.5)
    drafted = substitute_drafts(dlm, x_t, ids, chosen, "clean")
    changed = drafted != x_t
    assert not changed[~masked].any() and 0 < changed.sum() < masked.sum()
    with torch.no_grad():
        argmax = dlm.forward_noisy(x_t, ids).argmax(-1)
    assert torch.equal(drafted[changed], argmax[changed])
    assert all(0 < chosen[r].sum() < masked[r].sum() for r in range(2))  # part of each row, not whole rows


def test_certainty_counts_only_right_masked_tokens():
    logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(0), requires_grad=True)
    labels = logits.argmax(-1).detach().clone()
    labels[3:] = (labels[3:] + 1) % 11  # rows 3..5 are wrong
    value = certainty_loss(logits, labels, temperature=0.5)
    p = F.softmax(logits[:3].detach() / 0.5, -1)
    assert torch.allclose(value, -(p * p.log()).sum(-1).mean())
    value.backward()
    assert logits.grad[3:].abs().sum() == 0 and logits.grad[:3].abs().sum() > 0
    assert certainty_loss(logits, (logits.argmax(-1) + 1) % 11, 0.5) == 0  # none right: nothing to sharpen


def test_certainty_forcing_sharpens_the_models_right_answers(dlm):
    ids, maskable = _batch()
    gens = lambda: row_generators(0, 5, torch.arange(6))  # noqa: E731
    plain, _ = diffusion_loss(dlm, ids, maskable, NoiseSettings(), gens(), LossSettings())
    forced, _ = diffusion_loss(dlm, ids, maskable, NoiseSettings(), gens(), LossSettings(certainty_weight=2.0))
    assert forced >= plain  # an entropy is >= 0; equal only when no masked token is right


def test_draft_position_weights_decay_along_the_block_with_mean_one():
    w = draft_position_weights(12, 4, gamma=4.0)
    assert torch.allclose(w[:4].mean(), torch.tensor(1.0)) and torch.equal(w[:4], w[4:8])
    assert (w[:4].diff() < 0).all()
    assert torch.allclose(w[1] / w[0], torch.tensor(torch.e ** -0.25))


def test_top_k_kl_is_zero_for_the_same_model_and_positive_for_another(dlm):
    x = torch.randn(5, 30, generator=torch.Generator().manual_seed(2))
    assert top_k_kl(x, x, 8) == 0
    assert top_k_kl(x + torch.randn(5, 30), x, 8) > 0
    ids, maskable = _batch()
    gens = lambda: row_generators(0, 7, torch.arange(6))  # noqa: E731
    alone, _ = diffusion_loss(dlm, ids, maskable, NoiseSettings(), gens(), LossSettings())
    self_taught, _ = diffusion_loss(dlm, ids, maskable, NoiseSettings(), gens(), LossSettings(teacher_weight=0.5),
                                    teacher=dlm)
    assert torch.equal(alone, self_taught)  # the student is its own teacher: KL 0
    other = DiffusionLM(dlm.model, dlm.tokenizer, dlm.config.__class__(**{**dlm.config.__dict__, "block_size": 2}))
    taught, _ = diffusion_loss(dlm, ids, maskable, NoiseSettings(), gens(), LossSettings(teacher_weight=0.5),
                               teacher=other)
    assert taught > alone  # a smaller-block teacher sees more clean context: it predicts otherwise


def test_fixed_mask_ratio_and_rising_noise_floor():
    ids, maskable = _batch(4, 16)
    masked = sample_masks(ids, maskable, 4, NoiseSettings(mask_ratio=0.5), row_generators(0, 0, torch.arange(4)))
    assert (masked.view(4, 4, 4).sum(-1)[:, 1:] == 2).all()  # exactly half of each maskable block
    noise = NoiseSettings(t_min=0.01, noise_floor=0.8)
    assert [round(noise.at_progress(p).t_min, 4) for p in (0.0, 0.5, 1.0)] == [0.01, 0.405, 0.8]
    assert NoiseSettings().at_progress(0.7) == NoiseSettings()


def test_full_fraction_mixes_wholly_masked_blocks_into_position_masking():
    ids, maskable = _batch(64, 16)
    rows = torch.arange(64)
    plain = sample_masks(ids, maskable, 4, NoiseSettings(t_per_block=True), row_generators(0, 0, rows))
    off = sample_masks(ids, maskable, 4, NoiseSettings(t_per_block=True, full_fraction=0.0), row_generators(0, 0, rows))
    assert torch.equal(plain, off)  # 0 draws nothing extra: existing runs replay identically
    every = sample_masks(ids, maskable, 4, NoiseSettings(full_fraction=1.0), row_generators(0, 0, rows))
    assert torch.equal(every, sample_masks(ids, maskable, 4, NoiseSettings(masking="full"), row_generators(0, 0, rows)))
    mixed = sample_masks(ids, maskable, 4, NoiseSettings(t_per_block=True, full_fraction=0.5), row_generators(0, 0, rows))
    m = maskable.view(64, 4, 4).bool()
    whole = lambda x: (x.view(64, 4, 4) == m).all(-1) & m.any(-1)  # noqa: E731
    assert whole(mixed).float().mean() > whole(plain).float().mean() + 0.3  # about half the blocks, not ~none
    assert (~whole(mixed) & m.any(-1)).any()  # and the rest stay partly masked
    with pytest.raises(EdlmError, match="--full-fraction"):
        TrainConfig(model="m", data=[__file__], out="o", full_fraction=1.5).validate()
    with pytest.raises(EdlmError, match="--full-fraction"):
        TrainConfig(model="m", data=[__file__], out="o", masking="full", full_fraction=0.5).validate()


def _cfg(out, model, data, **kw):
    base = dict(model=str(model), data=[str(data)], out=str(out), block_size=4, seq_len=32, batch_size=4,
                steps=8, lr=3e-3, min_lr=3e-4, warmup_steps=2, save_every=4, progress=False, log_every=1)
    return TrainConfig(**{**base, **kw})


def test_block_schedule_switches_at_its_steps_and_a_resume_lands_on_it(tiny_ar_dir, tmp_path, monkeypatch):
    from edlm.config import DiffusionConfig

    data = tmp_path / "train.txt"
    data.write_text(TEXT)
    cfg = _cfg(tmp_path / "x", tiny_ar_dir, data, block_schedule=["8@4", "16@6"])
    run = reconcile(cfg, DiffusionConfig(block_size=4, mask_token_id=3))
    assert [run.at(s, 8)[1] for s in range(8)] == [4, 4, 4, 4, 8, 8, 16, 16]
    sizes = []
    real = train_loop.diffusion_loss
    monkeypatch.setattr(train_loop, "diffusion_loss", lambda *a, **k: sizes.append(k["block_size"]) or real(*a, **k))
    unbroken = train(_cfg(tmp_path / "unbroken", tiny_ar_dir, data, block_schedule=["8@4"]))
    assert sizes == [4] * 4 + [8] * 4
    ckpt4 = tmp_path / "unbroken" / "checkpoints" / "step-00000004" / "model"
    assert json.loads((ckpt4 / "config.json").read_text())["edlm"]["block_size"] == 4  # trained at 4 so far
    assert DiffusionLM.from_pretrained(unbroken).config.block_size == 8

    saving = train_loop.save_checkpoint

    def killed_after_4(accelerator, dlm, cfg, run, step):
        saving(accelerator, dlm, cfg, run, step)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_loop, "save_checkpoint", killed_after_4)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "broken", tiny_ar_dir, data, block_schedule=["8@4"]))
    monkeypatch.setattr(train_loop, "save_checkpoint", saving)
    sizes.clear()
    resumed = train(_cfg(tmp_path / "broken", tiny_ar_dir, data, block_schedule=["8@4"], resume=True))
    assert sizes == [8] * 4
    a, b = load_file(str(resumed / "model.safetensors")), load_file(str(unbroken / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("entries,message", [(["16"], "SIZE@STEP"), (["x@3"], "SIZE@STEP"), (["0@3"], "SIZE >= 1"),
                                             (["8@2", "16@2"], "same step")])
def test_block_schedule_entries_are_checked(entries, message):
    with pytest.raises(ValueError, match=message):
        parse_block_schedule(entries)
