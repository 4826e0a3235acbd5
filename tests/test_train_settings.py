"""edlm.train.settings: the flags and the checkpoint reconciled once into frozen TrainSettings; the
TrainConfig is never written, the model's config and trainer.json record the effective values."""

import copy
import dataclasses
import json

import pytest

from edlm import DiffusionLM
from edlm.config import DiffusionConfig
from edlm.errors import EdlmError
from edlm.train import TrainConfig, train
from edlm.train.convert import convert
from edlm.train.loop import load_for_training
from edlm.train.settings import TrainSettings, reconcile

CHECKPOINT = DiffusionConfig(block_size=4, mask_token_id=7, shift=False, causal_clean=False, base_model="base",
                             decoding={"threshold": 0.9})


def cfg(**kw):
    return TrainConfig(model="m", data=["d"], out="o", seq_len=32, **kw)


def settled(checkpoint=CHECKPOINT, converted_here=False, **kw) -> TrainSettings:
    return reconcile(cfg(**kw), checkpoint, "<|mask|>", converted_here=converted_here)


# (user --causal-clean, checkpoint's, --ar-loss-weight) -> (effective, notices); None = refused
CAUSAL_CLEAN = [
    (None, False, 0.0, False, []),
    (None, True, 0.0, True, []),
    (False, False, 0.0, False, []),
    (False, True, 0.0, False, ["--causal-clean False replaces the checkpoint's True"]),
    (True, False, 0.0, True, ["--causal-clean True replaces the checkpoint's False"]),
    (True, True, 0.0, True, []),
    (None, False, 0.5, True, ["--ar-loss-weight turns on --causal-clean"]),
    (None, True, 0.5, True, []),
    (False, False, 0.5, None, []),
    (False, True, 0.5, None, []),
    (True, False, 0.5, True, ["--causal-clean True replaces the checkpoint's False"]),
    (True, True, 0.5, True, []),
]


@pytest.mark.parametrize("user,stored,weight,effective,said", CAUSAL_CLEAN)
def test_causal_clean_truth_table(user, stored, weight, effective, said):
    checkpoint = dataclasses.replace(CHECKPOINT, causal_clean=stored)
    if effective is None:
        with pytest.raises(EdlmError, match="--ar-loss-weight needs --causal-clean"):
            settled(checkpoint, causal_clean=user, ar_loss_weight=weight)
        return
    run = settled(checkpoint, causal_clean=user, ar_loss_weight=weight)
    assert run.causal_clean is effective and run.loss.ar_loss_weight == weight
    assert len(run.notices) == len(said) and all(n.startswith(s) for n, s in zip(run.notices, said, strict=True))
    assert run.model_config(checkpoint).causal_clean is effective


@pytest.mark.parametrize("name,stored,given", [("block_size", 4, 8), ("shift", False, True)])
def test_a_flag_left_unset_keeps_the_checkpoints_value_a_set_one_replaces_it(name, stored, given):
    assert getattr(settled(), name) == stored and settled().notices == ()
    assert settled(**{name: stored}).notices == ()  # the same value: nothing to say
    run = settled(**{name: given})
    assert getattr(run, name) == given
    assert run.notices == (f"--{name.replace('_', '-')} {given} replaces the checkpoint's {stored}; "
                           "the trained model records it",)
    quiet = settled(converted_here=True, **{name: given})  # converted by this run from these very flags
    assert getattr(quiet, name) == given and quiet.notices == ()


def test_converting_with_an_ar_loss_still_says_it_turns_on_causal_clean():
    run = settled(converted_here=True, ar_loss_weight=1.0)
    assert run.causal_clean and run.notices[0].startswith("--ar-loss-weight turns on --causal-clean")


def test_refusals_name_the_flag():
    with pytest.raises(EdlmError, match="already converted with mask token id 7; --mask-token applies when"):
        settled(mask_token="<other>")
    assert settled(mask_token="<|mask|>").mask_token_id == 7  # its own token: fine
    with pytest.raises(EdlmError, match="--seq-len 32 must be a multiple of the block size 3"):
        settled(block_size=3)
    with pytest.raises(EdlmError, match="--seq-len 32 must be a multiple of the block size 6"):
        settled(dataclasses.replace(CHECKPOINT, block_size=6))  # the checkpoint's block size counts too


def test_ar_objective_uses_no_diffusion_setting_and_records_none():
    ar = DiffusionConfig.autoregressive("m")
    run = reconcile(cfg(objective="ar", block_size=8, shift=False), ar, None)
    assert (run.block_size, run.shift, run.causal_clean, run.mask_token_id) == (1, True, False, None)
    assert run.notices == ("--block-size, --shift apply to diffusion training; --objective ar does not use them",)
    assert run.model_config(ar) is ar
    recorded = run.record(cfg(objective="ar", block_size=8, shift=False))
    assert (recorded["block_size"], recorded["shift"], recorded["mask_token"]) == (None, None, None)


def test_settings_are_frozen_and_the_model_config_keeps_the_rest_of_the_checkpoint():
    run = settled(block_size=8, ar_loss_weight=1.0, masking="full", repair_fraction=0.25, all_noisy_blocks=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.block_size = 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.loss.ar_loss_weight = 0.0
    model = run.model_config(CHECKPOINT)
    assert (model.block_size, model.causal_clean, model.mask_token_id) == (8, True, 7)
    assert (model.base_model, model.decoding) == ("base", {"threshold": 0.9})
    assert (CHECKPOINT.block_size, CHECKPOINT.causal_clean) == (4, False)  # the checkpoint's own, untouched
    assert run.noise.masking == "full" and run.noise.signed_half_life is None
    assert (run.loss.repair_fraction, run.loss.skip_unmasked_blocks) == (0.25, False)
    recorded = run.record(cfg(block_size=8, ar_loss_weight=1.0))
    assert (recorded["block_size"], recorded["shift"], recorded["causal_clean"]) == (8, False, True)


# ---------------------------------------------------------------- with real checkpoints
@pytest.fixture(scope="module")
def converted_dir(tiny_ar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "dlm"
    convert(tiny_ar_dir, out, block_size=4)
    return out


@pytest.mark.parametrize("kind,flags,expected", [
    ("ar_dir", dict(block_size=4, ar_loss_weight=0.5), (4, False, True)),
    ("ar_dir", dict(shift=True, causal_clean=True), (32, True, True)),
    ("converted", dict(block_size=8, shift=True), (8, True, False)),
    ("converted", dict(ar_loss_weight=1.0), (4, False, True)),
    ("ar_objective", dict(objective="ar", block_size=8), (1, True, False)),
])
def test_loading_sets_the_model_config_from_the_settings_and_leaves_the_train_config_alone(
        tiny_ar_dir, converted_dir, kind, flags, expected):
    model = converted_dir if kind == "converted" else tiny_ar_dir
    asked = TrainConfig(model=str(model), data=["d"], out="o", seq_len=32, **flags)
    before = copy.deepcopy(asked)
    dlm, run = load_for_training(asked, "cpu")
    assert asked == before
    assert (dlm.config.block_size, dlm.config.shift, dlm.config.causal_clean) == expected
    assert (run.block_size, run.shift, run.causal_clean) == expected
    assert dlm.config.mask_token_id == run.mask_token_id


def test_a_run_records_the_effective_settings_and_keeps_its_train_config(tiny_ar_dir, converted_dir, tmp_path):
    (tmp_path / "t.txt").write_text("\n\n".join(f"the fox jumps over the dog {i} times." for i in range(60)))
    asked = TrainConfig(model=str(converted_dir), data=[str(tmp_path / "t.txt")], out=str(tmp_path / "run"),
                        seq_len=32, batch_size=2, steps=2, warmup_steps=1, ar_loss_weight=1.0, shift=True,
                        progress=False)
    before = copy.deepcopy(asked)
    final = train(asked)
    assert asked == before
    recorded = json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "trainer.json").read_text())
    assert {k: recorded["config"][k] for k in ("block_size", "shift", "causal_clean", "ar_loss_weight")} == {
        "block_size": 4, "shift": True, "causal_clean": True, "ar_loss_weight": 1.0}
    saved = DiffusionLM.from_pretrained(final).config
    assert (saved.block_size, saved.shift, saved.causal_clean) == (4, True, True)
