"""`edlm train`: continuous pretraining of an AR model into a block-diffusion LM, on accelerate.

One loop for 1 CPU, DDP, FSDP or DeepSpeed (`accelerate launch -m edlm.cli train ...`).
Determinism by construction: the examples of global step s and the noise each example gets are
functions of (seed, s, example index) only, so a resumed run, or a run with a different process
count and the same global batch, sees exactly the same data and masks.
Checkpoints are written to a temp dir and renamed: a crash mid-save leaves the last one intact;
a full disk is one line and leaves no temp dir. --resume checks state/ and model/ of the newest
checkpoint (falling back past a broken one) and compares its recorded settings with the new ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import torch

from edlm.config import CONFIG_KEY, DEFAULT_BLOCK_SIZE, DiffusionConfig
from edlm.errors import EdlmError, first_line
from edlm.files import (
    check_apart,
    check_output_target,
    copy_dir_atomically,
    publish_dir,
    release_run_lock,
    take_run_lock,
    write_failure,
)
from edlm.model import DiffusionLM, load_causal_lm, read_checkpoint_config
from edlm.moe import default_aux_coef, is_moe
from edlm.train.config import TrainConfig
from edlm.train.data import build_dataset, end_blocks_with_eos, to_device
from edlm.train.objective import causal_lm_loss, diffusion_loss, row_generators
from edlm.train.settings import TrainSettings, reconcile
from edlm.vision import hf_model, is_vlm, training_vision, vision_parameters


# ---------------------------------------------------------------- model set-up
def load_for_training(cfg: TrainConfig, device) -> tuple[DiffusionLM, TrainSettings]:
    """The model to train and the settings the run uses. The checkpoint is loaded as stored (an AR
    dir is converted with the flags, as `edlm convert` would), its settings are reconciled once with
    the flags, and the model's config is set from the result here, the one place. `cfg` is only read."""
    raw = read_checkpoint_config(cfg.model)
    converting = cfg.objective == "diffusion" and CONFIG_KEY not in raw
    if cfg.objective == "ar":
        model, tok = load_causal_lm(cfg.model, device, torch.float32, cfg.attn_implementation)
        dlm = DiffusionLM(model, tok, DiffusionConfig.autoregressive(cfg.model))
    elif converting:
        from edlm.train.convert import convert_model

        model, tok = load_causal_lm(cfg.model, device, torch.float32, cfg.attn_implementation)
        dlm = convert_model(model, tok, cfg.block_size or DEFAULT_BLOCK_SIZE, cfg.mask_token, bool(cfg.shift),
                            base_model=cfg.model)
    else:
        dlm = DiffusionLM.from_pretrained(cfg.model, device, torch.float32, cfg.attn_implementation)
    mask_id = dlm.config.mask_token_id
    mask_token = dlm.tokenizer.convert_ids_to_tokens(mask_id) if mask_id is not None else None
    run = reconcile(cfg, dlm.config, mask_token, converted_here=converting)
    run = replace(run, loss=replace(run.loss, router_aux_weight=router_aux_weight(cfg, dlm.inner_model)))
    for notice in run.notices:
        print(f"edlm train: {notice}")
    return DiffusionLM(dlm.model, dlm.tokenizer, run.model_config(dlm.config)), run


def router_aux_weight(cfg: TrainConfig, model) -> float:
    """--router-aux-loss, else the base config's coefficient on an MoE model (0 on a dense one)."""
    if not is_moe(model):
        if cfg.router_aux_loss:
            raise EdlmError(f"--router-aux-loss applies to mixture-of-experts models; {cfg.model} has no expert layers")
        return 0.0
    return default_aux_coef(model.config) if cfg.router_aux_loss is None else cfg.router_aux_loss


def apply_lora(model, rank: int):
    """LoRA on every linear layer; embeddings, LM head and norms stay fully trainable
    (the paper: freezing them costs a lot)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                      modules_to_save=["embed_tokens", "lm_head"])
    with warnings.catch_warnings():  # peft >= 0.21 reads transformers' deprecated alias: not the user's to fix
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        model = get_peft_model(model, lora)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.requires_grad_(True)
    return model


def train_drafter_only(model, mask_id: int) -> None:
    """`--train drafter`: only the drafting adapter and the mask token's embedding row learn; every
    other weight (the parent) stays bit-identical, so the clean stream stays the parent's."""
    from edlm.drafter import gate_of

    gate = gate_of(model)
    if gate is None:
        raise EdlmError("--train drafter needs a model with a drafting adapter: convert it with "
                        "`edlm convert BASE OUT --drafter lora:16`")
    gate.parent_frozen = True
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_a." in name or ".lora_b." in name)
    embed = model.get_input_embeddings().weight
    embed.requires_grad_(True)
    row = torch.zeros(embed.shape[0], 1, dtype=embed.dtype, device=embed.device)
    row[mask_id] = 1
    embed.register_hook(lambda grad: grad * row)  # Adam moves a weight only where it had a gradient


def train_vision_only(model) -> None:
    """`--train vision`: only a VLM's vision tower and projector learn (LLaVA's alignment stage), so
    the language model, embeddings and LM head stay bit-identical to the text model it was."""
    if not is_vlm(hf_model(model).config):
        raise EdlmError("--train vision needs a vision-language model; this one is a text-only LM")
    model.requires_grad_(False)
    for p in vision_parameters(model):
        p.requires_grad_(True)


def _no_decay(name: str, cfg: TrainConfig) -> bool:
    """Under --train drafter the embedding takes no weight decay: it would shrink the parent's rows."""
    return cfg.train == "drafter" and ".lora_" not in name


def exportable(dlm: DiffusionLM, accelerator) -> DiffusionLM:
    """The plain model to save: unwrapped from the engine, LoRA merged into a copy."""
    return DiffusionLM(accelerator.unwrap_model(dlm.model), dlm.tokenizer, dlm.config).merged()


def lr_lambda(cfg: TrainConfig):
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0

    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# ---------------------------------------------------------------- data order
class StepSampler:
    """Example indices of (step, micro-step, process): a fresh permutation per epoch."""

    def __init__(self, n: int, batch_size: int, n_procs: int, grad_accum: int, seed: int):
        self.n, self.bs, self.procs, self.accum, self.seed = n, batch_size, n_procs, grad_accum, seed
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def global_batch(self) -> int:
        return self.bs * self.procs * self.accum

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self._perms[epoch]

    def global_rows(self, step: int, micro: int, proc: int) -> torch.Tensor:
        start = step * self.global_batch + (micro * self.procs + proc) * self.bs
        return torch.arange(start, start + self.bs)

    def indices(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._perm(int(r) // self.n)[int(r) % self.n] for r in rows])


# ---------------------------------------------------------------- checkpoints
def checkpoint_dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def save_checkpoint(accelerator, dlm: DiffusionLM, cfg: TrainConfig, run: TrainSettings, step: int) -> Path:
    out = Path(cfg.out)
    final = out / "checkpoints" / f"step-{step:08d}"
    tmp = out / "checkpoints" / f".tmp-step-{step:08d}"
    accelerator.wait_for_everyone()
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            # state/ too: accelerate creates it on the main process only, with no barrier before the
            # other processes write their files into it (seen as a race under DeepSpeed)
            (tmp / "state").mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "state"))
        save_model(accelerator, dlm, tmp / "model")
        if accelerator.is_main_process:
            (tmp / "trainer.json").write_text(json.dumps({"step": step, "config": run.record(cfg)}, indent=1, default=str))
            publish_dir(tmp, final)
            for old in checkpoint_dirs(out)[: -cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    except Exception as exc:
        failure = write_failure(exc, final)  # before the clean-up frees the space it reports
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is None:
            raise
        raise EdlmError(f"{failure}; earlier checkpoints are untouched") from None
    accelerator.wait_for_everyone()
    return final


def sharded(accelerator) -> bool:
    """FSDP or DeepSpeed: the full weights must be gathered by every process before saving."""
    return str(accelerator.distributed_type) in ("DistributedType.FSDP", "DistributedType.DEEPSPEED", "FSDP",
                                                  "DEEPSPEED")


def save_model(accelerator, dlm: DiffusionLM, out: Path) -> None:
    """The loadable model dir. Under FSDP/DeepSpeed every process joins the gather of the full
    state dict (a collective); the main process writes it."""
    if not sharded(accelerator):
        if accelerator.is_main_process:
            exportable(dlm, accelerator).save_pretrained(out)
        return
    state = accelerator.get_state_dict(dlm.model)
    if accelerator.is_main_process:
        DiffusionLM(accelerator.unwrap_model(dlm.model), dlm.tokenizer, dlm.config).save_pretrained(out, state)


def checkpoint_problem(ckpt: Path) -> str | None:
    """A cheap integrity check of one checkpoint (no tensors loaded): the first unreadable file, or None.
    torch.save files are zip archives whose directory sits at the end, so a truncated one fails here."""
    try:
        info = json.loads((ckpt / "trainer.json").read_text())
        int(info["step"])
    except FileNotFoundError:
        return "trainer.json is missing"
    except (ValueError, KeyError, TypeError, OSError) as exc:
        return f"trainer.json is unreadable ({first_line(exc)})"
    for part in ("state", "model"):  # model/: the loadable copy; --resume reads state/, users model/
        if not (ckpt / part).is_dir():
            return f"{part}/ is missing"
    if not (ckpt / "model" / "config.json").is_file():
        return "model/config.json is missing"
    for f in sorted([*(ckpt / "state").rglob("*"), *(ckpt / "model").rglob("*")]):
        if f.suffix in (".bin", ".pkl", ".pt", ".pth") and f.is_file() and not zipfile.is_zipfile(f):
            return f"{f.relative_to(ckpt)} is truncated or corrupt"
        if f.suffix == ".safetensors" and f.is_file():
            problem = safetensors_problem(f)
            if problem:
                return f"{f.relative_to(ckpt)} is truncated or corrupt ({problem})"
    return None


def safetensors_problem(f: Path) -> str | None:
    """Why a .safetensors file is unreadable, from its header alone: the header's last tensor must end
    exactly at the end of the file (a truncated copy ends early; safe_open only maps the file)."""
    try:
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"unreadable header: {first_line(exc)}"
    size = f.stat().st_size
    return None if size == 8 + n + end else f"{size} bytes, the header says {8 + n + end}"


# Settings a resumed run must share with the run it continues: they define the model being trained
# (its config or its LoRA layout), so the saved state cannot carry on under other values.
FIXED_ON_RESUME = ("model", "objective", "block_size", "mask_token", "shift", "causal_clean", "lora_rank", "train")
# Settings that only say how a run reports and saves: changing them on resume is routine.
BOOKKEEPING = ("out", "resume", "progress", "log_every", "save_every", "keep_last", "eval_every", "eval_batches")


def changed_settings(recorded: dict, now: dict) -> dict[str, tuple]:
    """{setting: (recorded, now)} for every non-bookkeeping setting that differs; paths compared resolved."""
    def norm(name, value):
        if name in ("model", "data", "val_data") and value is not None:
            return [str(Path(v).resolve()) for v in value] if isinstance(value, list) else str(Path(value).resolve())
        return value

    now = json.loads(json.dumps(now, default=str))  # as trainer.json stores it (tuples -> lists, paths -> str)
    return {k: (recorded.get(k), v) for k, v in now.items()
            if k not in BOOKKEEPING and norm(k, recorded.get(k)) != norm(k, v)}


def check_resumed_settings(ckpt: Path, now: dict) -> dict[str, tuple]:
    """Refuse a resume that changes what the model is (before its state is loaded: it would not
    fit); return every other change, for a warning (lr, data, seed...: the run continues, but is
    no longer the one an unbroken run would be)."""
    recorded = json.loads((ckpt / "trainer.json").read_text()).get("config") or {}
    changed = changed_settings(recorded, now)
    fixed = {k: v for k, v in changed.items() if k in FIXED_ON_RESUME}
    if fixed:
        raise EdlmError(f"--resume: {_describe(fixed)} differ from the run in {ckpt.parent.parent}, and define "
                        "the model it trains; keep them, or start a new run with another --out")
    return changed


def _describe(changed: dict[str, tuple]) -> str:
    return ", ".join(f"{'--' + k.replace('_', '-')} {old!r} -> {new!r}" for k, (old, new) in changed.items())


def resume_from(accelerator, out: Path, settings: dict | None = None) -> int:
    """Load the newest intact checkpoint; a corrupt newer one is skipped with a warning. Returns its
    step; 0 with a notice when OUT holds no checkpoint (so a job script may always pass --resume).
    `settings`: this run's trainer.json record, checked against the checkpoint's (check_resumed_settings)."""
    ckpts = checkpoint_dirs(out)
    if not ckpts:
        accelerator.print(f"edlm train: no checkpoint in {out}: starting from step 0")
        return 0
    bad = []
    for ckpt in reversed(ckpts):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            changed = check_resumed_settings(ckpt, settings) if settings is not None else {}
            try:
                accelerator.load_state(str(ckpt / "state"))
            except Exception as exc:  # noqa: BLE001 - a file that passed the cheap check but does not load
                problem = f"state/ does not load ({first_line(exc)})"
        if problem is not None:
            bad.append(f"{ckpt.name}: {problem}")
            accelerator.print(f"edlm train: warning: skipping checkpoint {ckpt}: {problem}")
            continue
        step = json.loads((ckpt / "trainer.json").read_text())["step"]
        if changed:
            accelerator.print(f"edlm train: warning: resuming {ckpt} with changed settings: {_describe(changed)}")
        accelerator.print(f"resumed from {ckpt} at step {step}")
        return step
    raise EdlmError(f"no intact checkpoint in {out / 'checkpoints'} to resume from: {'; '.join(bad)}")


def check_launch(accelerator) -> None:
    """Refuse processes that are not the one distributed job their launcher asked for, and an
    FSDP/DeepSpeed config that accelerate did not apply (it falls back to DDP or to one process)."""
    asked = int(os.environ.get("WORLD_SIZE", "1") or 1)
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if asked > 1 and accelerator.num_processes != asked:
        hint = ("accelerate found no GPU; for CPU processes set ACCELERATE_USE_CPU=true (plain DDP over gloo)"
                if not torch.cuda.is_available() else "check the accelerate config")
        raise EdlmError(f"the launcher started {asked} processes but accelerate formed a {accelerator.num_processes}"
                        f"-process job ({kind}): they would train separately; {hint}")
    for engine in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true" and kind != engine:
            raise EdlmError(f"the accelerate config asks for {engine} but accelerate runs {kind}"
                            f"{' (it applies ' + engine + ' only on GPUs/accelerators, not with ACCELERATE_USE_CPU)' if kind in ('MULTI_CPU', 'NO') else ''}; "
                            "use configs/ddp.yaml to train without sharding")


class _NoSharedTensorNotice(logging.Filter):
    """accelerate warns "Removed shared tensor {'lm_head.weight'} while saving" at every checkpoint of a
    model with tied embeddings: expected (the tie is restored on load), so not shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


def _silence_shared_tensor_notice() -> None:
    log = logging.getLogger("accelerate.utils.other")
    if not any(isinstance(f, _NoSharedTensorNotice) for f in log.filters):
        log.addFilter(_NoSharedTensorNotice())


@contextlib.contextmanager
def _full_weights_on_load(accelerator):
    """ZeRO-3: load the full model in every process (it is partitioned at prepare). accelerate makes
    transformers' from_pretrained build ZeRO-3 models under zero.Init (it registers the DeepSpeed config
    whatever zero3_init_flag says), where every parameter is an empty partition: converting on the
    fly and checking the mask token's embedding row cannot work on those."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


# ---------------------------------------------------------------- the loop
def compute_loss(dlm, model, batch, cfg: TrainConfig, run: TrainSettings, step: int, rows, teacher=None,
                 noise_seed_step: int | None = None):
    """The loss of one micro-batch at optimizer step `step` (its schedules); the noise is drawn for
    `noise_seed_step` (default `step`: validation fixes it)."""
    ids, maskable = batch["input_ids"], batch["maskable"]
    images = batch.get("images")
    if run.objective == "ar":  # an AR (parent) VLM learns to see: its vision tower trains too
        return causal_lm_loss(model, ids, maskable, run.loss.router_aux_weight,
                              vision=batch_vision(dlm, ids, images, grad=True))
    noise, block_size = run.at(step, cfg.steps)
    if "length" in batch:  # one padded example per row (data with images)
        ids, maskable = end_blocks_with_eos(ids, maskable, batch["length"], block_size, dlm.tokenizer.eos_token_id)
    seed_step = step if noise_seed_step is None else noise_seed_step
    return diffusion_loss(dlm, ids, maskable, noise, row_generators(cfg.seed, seed_step, rows), run.loss,
                          teacher=teacher, block_size=block_size, vision=batch_vision(dlm, ids, images),
                          teacher_vision=batch_vision(teacher, ids, images) if teacher is not None else None,
                          order=batch.get("order"))


def batch_vision(dlm, ids, images, grad: bool = False):
    """A batch's images as `dlm`'s vision tower sees them (None: a text batch). Under the diffusion
    objective the tower is frozen: features under no_grad, the parent's vision kept exactly."""
    if not images or not any(images):
        return None
    return training_vision(dlm.inner_model, dlm.image_processor, ids, images, grad=grad)


def load_teacher(cfg: TrainConfig, student: DiffusionLM, device) -> DiffusionLM | None:
    """The frozen --teacher, refused with one line when it cannot read the student's inputs."""
    if cfg.teacher is None:
        return None
    teacher = DiffusionLM.from_pretrained(cfg.teacher, device, torch.float32, cfg.attn_implementation)
    mine, theirs = student.config, teacher.config
    if (theirs.mask_token_id, theirs.shift) != (mine.mask_token_id, mine.shift) or \
            teacher.model.get_output_embeddings().weight.shape != student.model.get_output_embeddings().weight.shape:
        raise EdlmError(f"--teacher {cfg.teacher} reads other inputs than {cfg.model} (mask token, shift or "
                        "vocabulary differ): distil from a model converted from the same parent")
    teacher.model.eval().requires_grad_(False)
    return teacher


@torch.no_grad()
def validate(dlm, model, val_ds, cfg, run, device, step: int = 0, teacher=None) -> float:
    model.eval()
    losses = []
    n = min(len(val_ds), cfg.eval_batches * cfg.batch_size)
    for start in range(0, n, cfg.batch_size):
        rows = torch.arange(start, min(n, start + cfg.batch_size))
        batch = to_device(val_ds[rows], device)
        loss, _ = compute_loss(dlm, model, batch, cfg, run, step, rows, teacher, noise_seed_step=-1)  # fixed noise
        losses.append(loss.item())
    model.train()
    return sum(losses) / max(1, len(losses))


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns OUT/model, the final loadable checkpoint.

    One job per --out (OUT/.lock). A run that fails before writing a checkpoint or a metrics line
    removes the --out dir it created (never one that existed before)."""
    from accelerate import Accelerator

    cfg.validate()
    out = check_output_target(cfg.out)
    check_apart(out, MODEL=cfg.model)
    if not cfg.resume and checkpoint_dirs(out):
        raise EdlmError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    use_cuda = torch.cuda.is_available()
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                              mixed_precision="bf16" if use_cuda else "no")
    check_launch(accelerator)
    _silence_shared_tensor_notice()
    created, lock = False, None
    if accelerator.is_main_process:
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            lock = take_run_lock(out)
        except EdlmError:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise
    accelerator.wait_for_everyone()
    try:
        return _train(cfg, accelerator, out)
    except BaseException:
        if created and not checkpoint_dirs(out) and not (out / "metrics.jsonl").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            release_run_lock(lock)


def _train(cfg: TrainConfig, accelerator, out: Path) -> Path:
    from tqdm.auto import tqdm

    device = accelerator.device
    torch.manual_seed(cfg.seed)

    with _full_weights_on_load(accelerator):
        dlm, run = load_for_training(cfg, device)
        teacher = load_teacher(cfg, dlm, device)
    with accelerator.main_process_first():
        train_ds = build_dataset(cfg.data, dlm.tokenizer, cfg.seq_len, cfg.fields, model=dlm.inner_model)
        val_ds = build_dataset(cfg.val_data, dlm.tokenizer, cfg.seq_len, cfg.fields,
                               model=dlm.inner_model) if cfg.val_data else None
    if cfg.objective == "diffusion" and cfg.masking == "trajectory" and "order" not in train_ds.column_names:
        raise EdlmError(f"--masking trajectory needs prompt/response rows with a '{cfg.fields.trajectory}' field "
                        f"(edlm distill-data --trajectory): {', '.join(cfg.data)} has none")
    limit = dlm.max_positions  # checked after the data, whose mistakes are the commoner ones
    if limit is not None and cfg.seq_len > limit:
        raise EdlmError(f"--seq-len {cfg.seq_len} exceeds the model's {limit} positions")
    if val_ds is None and cfg.val_fraction > 0:
        split = train_ds.train_test_split(test_size=cfg.val_fraction, seed=cfg.seed, shuffle=True)
        train_ds, val_ds = split["train"], split["test"]

    model = dlm.model
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora_rank > 0:
        model = apply_lora(model, cfg.lora_rank)
    if cfg.train == "drafter":
        train_drafter_only(model, dlm.config.mask_token_id)
    if cfg.train == "vision":
        train_vision_only(model)
    if cfg.objective == "diffusion" and is_vlm(dlm.inner_model.config):
        # the dLM keeps its parent's vision exactly, as conversion does: only the language model learns
        # (--objective ar trains the tower and projector: an AR parent learning to see)
        for p in vision_parameters(model):
            p.requires_grad_(False)
    model.train()
    groups = [{"params": [p for n, p in model.named_parameters() if p.requires_grad and not _no_decay(n, cfg)]},
              {"params": [p for n, p in model.named_parameters() if p.requires_grad and _no_decay(n, cfg)],
               "weight_decay": 0.0}]
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if str(accelerator.distributed_type).endswith("DEEPSPEED"):  # DeepSpeed wants its batch sizes: no dataloader here
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
            train_batch_size=cfg.batch_size * cfg.grad_accum * accelerator.num_processes,
            gradient_clipping=cfg.grad_clip)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 replaces them with sharded ones
    # the scheduler is stepped by hand once per optimizer step (accelerate's wrapper would
    # step it once per process), and registered so save_state/load_state carry it
    accelerator.register_for_checkpointing(scheduler)
    dlm = DiffusionLM(model, dlm.tokenizer, dlm.config)

    start = resume_from(accelerator, out, run.record(cfg)) if cfg.resume else 0
    if start >= cfg.steps:
        raise EdlmError(f"{out} is already trained to step {start} >= --steps {cfg.steps}")

    sampler = StepSampler(len(train_ds), cfg.batch_size, accelerator.num_processes, cfg.grad_accum, cfg.seed)
    accelerator.print(f"training {cfg.objective} on {accelerator.num_processes} process(es) "
                      f"({accelerator.distributed_type}), {len(train_ds)} sequences of {cfg.seq_len}, "
                      f"global batch {sampler.global_batch}")
    metrics = out / "metrics.jsonl"
    writer = _tensorboard(out) if accelerator.is_main_process else None
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and accelerator.is_main_process),
               desc="train", dynamic_ncols=True)
    tokens_seen, t0 = 0, time.perf_counter()
    loss_sum, loss_steps = 0.0, 0  # since the last metrics line: each line logs their mean (as HF Trainer)
    for step in range(start, cfg.steps):
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            rows = sampler.global_rows(step, micro, accelerator.process_index)
            batch = to_device(train_ds[sampler.indices(rows)], device)
            with accelerator.accumulate(model):
                loss, _ = compute_loss(dlm, model, batch, cfg, run, step, rows, teacher)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.grad_clip > 0:
                    accelerator.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.item() / cfg.grad_accum
            tokens_seen += batch["input_ids"].numel() * accelerator.num_processes
        scheduler.step()
        loss_sum, loss_steps = loss_sum + step_loss, loss_steps + 1
        done = step + 1
        tok_s = tokens_seen / (time.perf_counter() - t0)
        record = {"step": done, "loss": loss_sum / loss_steps, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tok_s}
        if cfg.eval_every and val_ds is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
            record["val_loss"] = validate(dlm, model, val_ds, cfg, run, device, step, teacher)
        log_now = done % cfg.log_every == 0 or "val_loss" in record or done == cfg.steps
        if log_now and accelerator.num_processes > 1:  # every process reaches this at the same steps
            record["loss"] = accelerator.reduce(torch.tensor(record["loss"], device=device), "mean").item()
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tok_s:.0f}", lr=f"{record['lr']:.1e}",
                        **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
        bar.update(1)
        if log_now:
            loss_sum, loss_steps = 0.0, 0
            if accelerator.is_main_process:
                try:
                    with metrics.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                except OSError as exc:
                    raise write_failure(exc, metrics) from None
                if writer is not None:
                    for k, v in record.items():
                        if k != "step":
                            writer.add_scalar(k, v, done)
        if done % cfg.save_every == 0 or done == cfg.steps:
            # the model as this step trained it: a block schedule's size is what it now decodes with
            block_size = run.at(step, cfg.steps)[1]
            saved = dlm if block_size == dlm.config.block_size else \
                DiffusionLM(dlm.model, dlm.tokenizer, replace(dlm.config, block_size=block_size))
            save_checkpoint(accelerator, saved, cfg, run, done)
    bar.close()
    final = out / "model"
    if accelerator.is_main_process:
        copy_dir_atomically(checkpoint_dirs(out)[-1] / "model", final)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))
