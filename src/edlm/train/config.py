"""TrainConfig: every `edlm train` setting, its default and its help text, stated once.

`edlm train`'s flags are generated from these fields (edlm.cli.train), and recipes (study, the
demo models, bench/train.py) build a TrainConfig directly: one owner for every default.
Settings that a converted checkpoint already fixes (block size, shift, causal_clean, mask token)
are None here, meaning "the checkpoint's"; edlm.train.settings.reconcile decides what a run uses.
A TrainConfig is what the user asked for: training reads it and never writes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from edlm.config import DEFAULT_BLOCK_SIZE
from edlm.errors import EdlmError
from edlm.model import ATTENTION_VARIANTS
from edlm.train.data import DataFields
from edlm.train.noise import MASKINGS

OBJECTIVES = ("diffusion", "ar")
WARMUP_FRACTION = 0.05  # warm-up when --warmup-steps is unset: a fraction of the run, as users expect


def _opt(default, help: str, **meta):
    """A dataclass field with its CLI help (and choices / flag hints for the generated parser)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    model: str = field(metadata={"help": "converted edlm dir, or a HF AR dir (converted on the fly)",
                                 "positional": True})
    data: list[str] = field(metadata={"help": ".txt/.jsonl/.parquet files or one saved HF dataset dir"})
    out: str = field(metadata={"help": "run directory: checkpoints/, metrics.jsonl, model/"})
    val_data: list[str] | None = _opt(None, "held-out files for validation loss")
    val_fraction: float = _opt(0.0, "hold out this fraction of --data for validation instead")
    objective: str = _opt("diffusion", "diffusion, or ar: plain causal-LM training (baseline / AR parent)",
                          choices=OBJECTIVES)
    # settings a converted checkpoint fixes: None = the checkpoint's (converting: DEFAULT_BLOCK_SIZE etc.)
    block_size: int | None = _opt(None, f"diffusion block size L' (default: the checkpoint's; converting: "
                                  f"{DEFAULT_BLOCK_SIZE}); a different one on a converted model is applied "
                                  "and recorded in the saved config")
    mask_token: str | None = _opt(None, "mask token when converting on the fly (see edlm convert)")
    shift: bool | None = _opt(None, "predict token i at position i-1 (default: the checkpoint's; converting: "
                              "no shift)")
    causal_clean: bool | None = _opt(None, "clean stream token-causal, i.e. an AR model the `verified` strategy "
                                     "checks drafts with (default: the checkpoint's; on with --ar-loss-weight > 0)")
    # objective (paper defaults first)
    attention: str = _opt("clean", "clean (the paper's: noisy blocks see clean earlier blocks) | noisy | "
                          "bidirectional (study variants)", choices=ATTENTION_VARIANTS)
    masking: str = _opt("position", "position-dependent masking (the paper's) | uniform | reverse "
                        "(right-to-left study variant) | full (TiDAR: every block all masks, for drafting) | "
                        "trajectory (d3LLM: the decoder's own states, as recorded by edlm distill-data "
                        "--trajectory; tokens without a recorded time fall back to position masking)",
                        choices=MASKINGS)
    ar_loss_weight: float = _opt(0.0, "weight a of the clean stream's AR next-token loss: a * L_AR + L_diffusion "
                                 "(turns on --causal-clean)")
    half_life: float = _opt(0.1, "lambda of position-dependent masking: beta = ln2 / (lambda * L')")
    t_per_block: bool = _opt(False, "one noise level per block, not per sequence")
    t_min: float = _opt(1e-3, "smallest noise level t (1/t weights explode near 0)")
    complementary: bool = _opt(False, "also train each sample with the inverse mask")
    repair_fraction: float = _opt(0.0, "on-policy repair, per position: fill this fraction of every example's "
                                  "masked tokens with the model's own argmax draft (still scored), for --strategy "
                                  "soft/wino; --on-policy is its per-example form (OPUT)")
    # training for parallelism (edlm.train.parallelism): each alone or together
    on_policy: float = _opt(0.0, "DMax OPUT: this fraction of the examples gets every masked token replaced by "
                            "the model's own argmax draft (one extra no-grad forward), scored against the clean "
                            "text; DMax: 0.5 with --mask-ratio 0.75 on the model's own answers (edlm distill-data)")
    mask_ratio: float | None = _opt(None, "a fixed noise level: every block masks this fraction of its maskable "
                                    "tokens, in place of t ~ U[t_min, 1] (OPUT: 0.75)")
    full_fraction: float = _opt(0.0, "mix in full masking: this fraction of the noise levels (per example, or per "
                                "block with --t-per-block) is t = 1, the block wholly masked as `verified` drafts it; "
                                "the rest keep --masking, the partly decided blocks the threshold rules meet")
    noise_floor: float = _opt(0.0, "d3LLM's noise curriculum: the lowest noise level rises linearly from --t-min "
                              "to this over the run (d3LLM: 0.8); 0 = off")
    certainty_weight: float = _opt(0.0, "dParallel certainty forcing: weight of the entropy term over masked tokens "
                                   "the model already predicts right (dParallel: 2, with --complementary)")
    certainty_temperature: float = _opt(0.5, "temperature of the certainty-forcing entropy")
    draft_decay: float = _opt(0.0, "DFlash draft-position weights: cross-entropy at block position j weighted "
                              "exp(-j/GAMMA), mean 1 (DFlash: 4 at block 8); 0 = off")
    window: int = _opt(1, "D2F-style training for multi-block decoding (--blocks N): blocks in windows of this "
                       "many from a random offset per example, each seeing the noisy blocks of its window before "
                       "it instead of their clean ones; 1 = the paper's layout")
    block_schedule: list[str] | None = _opt(None, "BARD's progressive block merging: SIZE@STEP entries (e.g. 16@500 "
                                            "32@1000): the block size from that step on; the saved model records "
                                            "the one in effect")
    teacher: str | None = _opt(None, "a frozen dLM the student follows on its masked tokens with a top-k forward KL "
                               "(BARD: the smaller-block model); it reads the same noisy input with its own blocks")
    teacher_weight: float = _opt(0.5, "weight of the --teacher KL term (BARD: 0.5)")
    teacher_top_k: int = _opt(16, "the teacher's top-k tokens the KL is taken over (BARD: 16)")
    router_aux_loss: float | None = _opt(None, "MoE models: weight of the router's load-balancing loss (Switch "
                                         "Transformer's, over every layer); default: the base config's "
                                         "router_aux_loss_coef; 0 = off")
    all_noisy_blocks: bool = _opt(False, "feed every noisy block, also those without a masked token (the plain "
                                  "concat layout, same loss: for benchmarks)")
    # optimisation
    seq_len: int = _opt(512, "tokens per training sequence (a multiple of the block size)")
    batch_size: int = _opt(8, "sequences per process and micro-step")
    grad_accum: int = _opt(1, "micro-steps per optimizer step")
    steps: int = _opt(1000, "optimizer steps of the whole run (the cosine schedule's length)")
    lr: float = _opt(1e-5, "peak learning rate (AdamW; the paper: 1e-5)")
    min_lr: float = _opt(3e-6, "learning rate at the end of the cosine schedule")
    warmup_steps: int | None = _opt(None, f"linear warm-up steps (default: {WARMUP_FRACTION:.0%} of --steps)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    grad_clip: float = _opt(1.0, "gradient-norm clip (0 = off)")
    lora_rank: int = _opt(0, "LoRA rank (0 = full training); embeddings, norms and LM head stay trainable")
    train: str = _opt("all", "what trains: all (the weights, or --lora-rank's adapter) | drafter (only a drafting "
                      "adapter added by `edlm convert --drafter` and the mask token's embedding: the parent stays "
                      "exact) | vision (a VLM with --objective ar: only the vision tower and projector, LLaVA's "
                      "alignment stage; the language model stays exact)", choices=("all", "drafter", "vision"))
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward (less memory)")
    attn_implementation: str = _opt("sdpa", "attention backend: sdpa | eager | flex_attention (CUDA)")
    # bookkeeping
    save_every: int = _opt(500, "steps between checkpoints")
    keep_last: int = _opt(2, "checkpoints kept")
    eval_every: int = _opt(0, "steps between validation losses (0 = never)")
    eval_batches: int = _opt(8, "validation batches per evaluation")
    log_every: int = _opt(10, "steps between metrics.jsonl lines (each logs the mean loss since the last)")
    seed: int = _opt(0, "seed of data order, noise and init")
    resume: bool = _opt(False, "continue from the newest intact checkpoint in --out (a corrupt newer one is "
                        "skipped with a warning); with none there, start from step 0 with a notice")
    progress: bool = _opt(True, "show a progress bar")
    fields: DataFields = field(default_factory=DataFields, metadata={"help": "data column names"})

    def validate(self) -> None:
        """Ranges of every setting, flags that exclude each other, and the data paths, before any model
        is loaded; names the flag. What depends on the checkpoint: edlm.train.settings.reconcile."""
        for path in [*self.data, *(self.val_data or [])]:
            if not Path(path).exists():
                raise EdlmError(f"data file not found: {path}")
            if Path(path).is_file() and Path(path).stat().st_size == 0:
                raise EdlmError(f"data file is empty: {path}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise EdlmError(f"{flag(f.name)} must be a finite number, got {value}")
        if self.objective not in OBJECTIVES:
            raise EdlmError(f"--objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.attention not in ATTENTION_VARIANTS:
            raise EdlmError(f"--attention must be one of {ATTENTION_VARIANTS}, got {self.attention!r}")
        if self.masking not in MASKINGS:
            raise EdlmError(f"--masking must be one of {MASKINGS}, got {self.masking!r}")
        if self.masking in ("position", "reverse", "trajectory") and self.half_life <= 0:
            raise EdlmError(f"--half-life must be > 0, got {self.half_life}")
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "save_every", "keep_last", "log_every",
                     "eval_batches"):
            if getattr(self, name) < 1:
                raise EdlmError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("block_size", "warmup_steps"):
            value = getattr(self, name)
            if value is not None and value < (1 if name == "block_size" else 0):
                raise EdlmError(f"{flag(name)} must be >= {1 if name == 'block_size' else 0}, got {value}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "eval_every", "lora_rank", "ar_loss_weight"):
            if getattr(self, name) < 0:
                raise EdlmError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:  # torch.manual_seed takes a 64-bit seed, numpy/python more
            raise EdlmError(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.lr == 0:
            raise EdlmError("--lr must be > 0")
        if self.train == "drafter" and self.lora_rank:
            raise EdlmError("--train drafter trains the model's drafting adapter: drop --lora-rank")
        if self.train == "vision" and (self.lora_rank or self.objective != "ar"):
            raise EdlmError("--train vision trains a VLM's vision tower and projector with --objective ar "
                            "(the diffusion objective keeps them the parent's): use --objective ar, no --lora-rank")
        if self.min_lr > self.lr:
            raise EdlmError(f"--min-lr {self.min_lr} must not exceed --lr {self.lr}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise EdlmError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("repair_fraction", "on_policy"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise EdlmError(f"{flag(name)} must be in [0, 1], got {getattr(self, name)}")
        self._validate_parallelism()
        if not 0.0 < self.t_min < 1.0:
            raise EdlmError(f"--t-min must be in (0, 1), got {self.t_min}")
        if (self.ar_loss_weight > 0 or self.causal_clean) and (self.attention != "clean"
                                                                or self.objective != "diffusion"):
            raise EdlmError("--ar-loss-weight and --causal-clean apply to diffusion training with --attention clean")
        if self.val_data and self.val_fraction > 0:
            raise EdlmError("--val-data and --val-fraction are alternatives: give one")
        if self.eval_every and not (self.val_data or self.val_fraction > 0):
            raise EdlmError("--eval-every needs held-out data: --val-data FILES or --val-fraction F")

    def _validate_parallelism(self) -> None:
        from edlm.train.parallelism import parse_block_schedule

        if self.mask_ratio is not None and not 0.0 < self.mask_ratio <= 1.0:
            raise EdlmError(f"--mask-ratio must be in (0, 1], got {self.mask_ratio}")
        if self.mask_ratio is not None and self.masking == "full":
            raise EdlmError("--mask-ratio and --masking full both fix the noise level: give one")
        if not 0.0 <= self.full_fraction <= 1.0:
            raise EdlmError(f"--full-fraction must be in [0, 1], got {self.full_fraction}")
        if self.full_fraction and self.masking == "full":
            raise EdlmError("--full-fraction mixes full masks into another --masking; --masking full is all of them")
        if not 0.0 <= self.noise_floor < 1.0:
            raise EdlmError(f"--noise-floor must be in [0, 1), got {self.noise_floor}")
        if self.noise_floor and self.mask_ratio is not None:
            raise EdlmError("--noise-floor raises a drawn noise level; --mask-ratio fixes it: give one")
        for name in ("certainty_weight", "draft_decay", "teacher_weight", "router_aux_loss"):
            if (getattr(self, name) or 0) < 0:  # router_aux_loss None: the base config's
                raise EdlmError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise EdlmError(f"--window must be an integer >= 1, got {self.window}")
        if self.window > 1 and self.attention != "clean":
            raise EdlmError("--window trains the clean-context layout's noisy blocks: use --attention clean")
        if self.certainty_temperature <= 0:
            raise EdlmError(f"--certainty-temperature must be > 0, got {self.certainty_temperature}")
        if self.teacher_top_k < 1:
            raise EdlmError(f"--teacher-top-k must be >= 1, got {self.teacher_top_k}")
        if self.teacher is not None and not (Path(self.teacher) / "config.json").is_file():
            raise EdlmError(f"--teacher {self.teacher}: no config.json there (a converted edlm model dir)")
        try:
            parse_block_schedule(self.block_schedule)
        except ValueError as exc:
            raise EdlmError(f"--block-schedule: {exc}") from None
        if self.objective != "diffusion" and (self.on_policy or self.certainty_weight or self.draft_decay
                                              or self.block_schedule or self.teacher or self.window > 1):
            raise EdlmError("the parallelism options (--on-policy, --certainty-weight, --draft-decay, "
                            "--window, --block-schedule, --teacher) apply to --objective diffusion")

    @property
    def warmup(self) -> int:
        """Warm-up steps in effect."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return max(1, round(WARMUP_FRACTION * self.steps))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_fields() -> list:
    """The fields that become `edlm train` flags, in order (dataclass fields)."""
    return list(fields(TrainConfig))
