"""TrainSettings: what one run trains with, reconciled once from the flags and the checkpoint.

A converted checkpoint already fixes block size, shift, causal_clean and its mask token; the
flags (TrainConfig) may leave them unset (None: the checkpoint's) or override them. `reconcile`
is the one place that decides the effective values, states the rule that couples two settings
(an AR loss needs a token-causal clean stream) and refuses what cannot be reconciled; the frozen
result is what the loop, the saved model's config and trainer.json all read. The TrainConfig is
only read, so it stays what the user asked for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from edlm.config import DiffusionConfig
from edlm.errors import EdlmError
from edlm.train.config import TrainConfig, flag
from edlm.train.noise import NoiseSettings
from edlm.train.objective import LossSettings
from edlm.train.parallelism import parse_block_schedule


@dataclass(frozen=True)
class TrainSettings:
    """The effective settings of a run (see `reconcile`); frozen: nothing rewrites them mid-run."""

    objective: str  # "diffusion" | "ar"
    block_size: int  # 1 for --objective ar
    shift: bool
    causal_clean: bool
    mask_token_id: int | None  # the checkpoint's (None for --objective ar)
    noise: NoiseSettings
    loss: LossSettings
    notices: tuple[str, ...] = ()  # said once when the model is loaded: what the flags changed
    block_schedule: tuple[tuple[int, int], ...] = ()  # (from step, block size), after `block_size`

    def at(self, step: int, steps: int) -> tuple[NoiseSettings, int]:
        """The noise and block size of optimizer step `step` (0-based) of a `steps`-step run. The
        schedules are functions of the step alone, so a resumed run lands on the same ones."""
        size = self.block_size
        for start, stage_size in self.block_schedule:
            if step >= start:
                size = stage_size
        return self.noise.at_progress(step / max(1, steps - 1)), size

    def model_config(self, checkpoint: DiffusionConfig) -> DiffusionConfig:
        """The trained model's config: the checkpoint's with the effective values (the saved model records them)."""
        if self.objective == "ar":
            return checkpoint
        return replace(checkpoint, block_size=self.block_size, shift=self.shift, causal_clean=self.causal_clean,
                       mask_token_id=self.mask_token_id)

    def record(self, cfg: TrainConfig) -> dict:
        """trainer.json's "config": the flags, with the model settings this run used in place of
        unset ones (None where the objective uses none)."""
        values = asdict(cfg)
        if self.objective == "ar":
            values.update(block_size=None, mask_token=None, shift=None)
        else:
            values.update(block_size=self.block_size, shift=self.shift, causal_clean=self.causal_clean)
        return values


def reconcile(cfg: TrainConfig, checkpoint: DiffusionConfig, checkpoint_mask_token: str | None = None,
              converted_here: bool = False) -> TrainSettings:
    """The effective settings of a run on `checkpoint` (the loaded model's own DiffusionConfig) with
    the flags `cfg`: a flag left unset keeps the checkpoint's value, a flag set replaces it (said,
    and recorded by the saved model). `converted_here`: an AR checkpoint this run converted with the
    flags, so nothing is replaced. `checkpoint_mask_token`: the name of the checkpoint's mask token.

    Raises EdlmError for what cannot be reconciled: another --mask-token on a converted model,
    --ar-loss-weight with --no-causal-clean, a --seq-len that is no multiple of the block size."""
    noise = NoiseSettings(masking=cfg.masking, half_life=cfg.half_life, t_per_block=cfg.t_per_block,
                          t_min=cfg.t_min, complementary=cfg.complementary, mask_ratio=cfg.mask_ratio,
                          noise_floor=cfg.noise_floor, full_fraction=cfg.full_fraction)
    loss = LossSettings(attention=cfg.attention, ar_loss_weight=cfg.ar_loss_weight,
                        repair_fraction=cfg.repair_fraction, skip_unmasked_blocks=not cfg.all_noisy_blocks,
                        on_policy=cfg.on_policy, certainty_weight=cfg.certainty_weight,
                        certainty_temperature=cfg.certainty_temperature, draft_decay=cfg.draft_decay, window=cfg.window,
                        teacher_weight=cfg.teacher_weight if cfg.teacher else 0.0, teacher_top_k=cfg.teacher_top_k)
    if cfg.objective == "ar":
        given = [flag(n) for n in ("block_size", "mask_token", "shift") if getattr(cfg, n) is not None]
        notices = (f"{', '.join(given)} apply to diffusion training; --objective ar does not use them",) if given else ()
        run = TrainSettings("ar", block_size=checkpoint.block_size, shift=checkpoint.shift,
                            causal_clean=checkpoint.causal_clean, mask_token_id=checkpoint.mask_token_id,
                            noise=noise, loss=loss, notices=notices)
        _check(run, cfg)
        return run
    if cfg.mask_token is not None and cfg.mask_token != checkpoint_mask_token:
        raise EdlmError(f"{cfg.model} is already converted with mask token id {checkpoint.mask_token_id}; "
                        "--mask-token applies when converting an AR checkpoint")
    notices = []
    effective = {}
    for name in ("block_size", "shift", "causal_clean"):
        value, stored = getattr(cfg, name), getattr(checkpoint, name)
        effective[name] = stored if value is None else value
        if value is not None and value != stored and not converted_here:
            notices.append(f"{flag(name)} {value} replaces the checkpoint's {stored}; the trained model records it")
    # the clean stream's AR loss predicts token i+1 from tokens <= i: a block-causal clean stream
    # lets position i see the rest of its block, so the AR loss needs (and turns on) causal_clean
    if cfg.ar_loss_weight > 0 and not effective["causal_clean"]:
        if cfg.causal_clean is False:
            raise EdlmError("--ar-loss-weight needs --causal-clean: a block-causal clean stream sees the tokens "
                            "it would predict")
        notices.append("--ar-loss-weight turns on --causal-clean (the clean stream becomes an AR model); "
                       "the trained model records it")
        effective["causal_clean"] = True
    run = TrainSettings("diffusion", mask_token_id=checkpoint.mask_token_id, noise=noise, loss=loss,
                        notices=tuple(notices), block_schedule=parse_block_schedule(cfg.block_schedule), **effective)
    _check(run, cfg)
    return run


def _check(run: TrainSettings, cfg: TrainConfig) -> None:
    """What the effective settings must satisfy together with the flags the checkpoint does not fix."""
    for size in (run.block_size, *(s for _, s in run.block_schedule)):
        if cfg.seq_len % size:
            raise EdlmError(f"--seq-len {cfg.seq_len} must be a multiple of the block size {size}")
