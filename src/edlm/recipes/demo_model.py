"""`make models`: rebuild the shipped demo models from scratch, resumably.

Stages (each skipped when its output exists, training resumes from its last checkpoint):
1. data: built-in reasoning problems -> train/val jsonl (prompt/response)
2. tokenizer: byte-level BPE, one token per digit
3. AR parent: a small Llama trained from random init with `edlm train --objective ar`
   (3000 steps at lr 1e-3, then 800 more at lr 4e-4 on a new data order)
4. dLM: `edlm convert --shift` the AR parent, then `edlm train` (block diffusion; 1800 steps at
   lr 3e-4, then 4000 more at lr 2e-4 on a new data order)
5. parity: 900 more steps (lr 1e-4) with a token-causal clean stream and its AR loss (weight 1,
   `--ar-loss-weight 1`), so the clean stream is an AR model again and the `verified` strategy can
   check the model's drafts against it -> models/dlm, whose config carries its best measured
   decode setting (`decoding`), so generate/serve/eval use it by default
6. parallelism (issue 25, `--parallel-steps`, off by default: see PARALLEL_STEPS): the parity
   model's own answers to 8,000 training prompts (`edlm distill-data`), then PARALLEL_RECIPE on
   them (bench/parallelism.py measured it against each method alone)
7. windows (issue 25, `--window-rounds`; the shipped dLM since 2026-12-07): WINDOW_ROUNDS rounds of
   the model's own greedy answers to 40,000 fresh prompts (its AR decode, what `verified` returns),
   then schedules of WINDOW_RECIPES on them: every noisy block all masks (what `verified`'s draft
   blocks are) in D2F windows of two (`--blocks 2` drafts), with the AR loss keeping the clean
   stream the model's own AR decode; the fourth round keeps only its right answers (rejection
   sampling: `edlm distill-data --answer-field`), which stopped the drift of the model's accuracy,
   and its second schedule mixes the paper's masks back in (`--full-fraction 0.5`) for the
   threshold rules

Wall time on 2 CPU cores: AR ~40 + ~20 min, dLM ~60 + ~100 min, parity ~25 min, windows 3 x 9 + 5 x 19 min.
Why shift for this model (measured, README "Rebuilding the demo models"): the paper's no-shift
setting wins after ~10B tokens on billion-parameter models, but a 3.5M model on a CPU budget
must first re-learn to predict position i at position i: after 150 steps from the same parent,
no-shift had loss 1.15 and 0% exact match, shift loss ~0.8, because with shift every AR
weight keeps its meaning (the logit at i-1 still predicts token i).
Schedules were changed mid-run through --resume (the cosine schedule is a function of --steps):
the first AR run 2000 -> 3000 steps at step 1700, the first dLM run 2000 -> 1800 at step 500,
the second 3000 -> 4000 at step 400, so a fresh `make models` differs slightly from the shipped
models.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edlm.files import copy_dir_atomically
from edlm.recipes import reasoning

AR_ARCH = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=512, rope_theta=10000.0)
N_TRAIN, N_VAL = 120_000, 1_000
# `verified` is the dLM's own AR decode at the highest TPF and AUP at its accuracy. After stage 7,
# timed interleaved with --compile aot (bench/results/compiled/2026-12-07-mixed-masks, 500 held-out
# problems): draft_depth 0 (one draft block per step, TPF 6.10) beats depth 1 (6.48) on CPU, 6.44x vs
# 5.96x HF generate at batch 1 and 3.97x vs 3.48x at batch 8.
DLM_DECODING = {"strategy": "verified", "threshold": 0.95, "draft_depth": 0}
# Stage 6 (bench/results/parallelism): of OPUT, certainty forcing, draft-position weights, the noise
# floor and block 16 with the block-8 model as teacher (300 steps each on 8,000 own answers), only
# block 16 moved a frontier (prefix: AUP 387 -> 427, TPF at 0.95 4.09 -> 4.36, 92.4% vs the
# parent's 93.2%). On this CPU its 16-token forwards cost more than the extra tokens buy (batch 1
# 2.21x HF generate vs the shipped model's 2.44x; batch 8 1.36x vs 1.71x), so the shipped dLM
# skips the stage: PARALLEL_STEPS 0; `--parallel-steps 300` builds the block-16 model.
PARALLEL_STEPS = 0
N_SELF = 8_000
PARALLEL_RECIPE = dict(t_per_block=True, block_schedule=["16@0"])  # and the parity model as --teacher
# Stage 7 (README "Full masks in training windows"): the recipe that moved the full-weight dLM's
# `verified` (500 held-out problems): after its three schedules TPF at depth 0 / 1 5.34 / 5.76 -> 5.93 /
# 6.32, two-block drafts at depth 2 6.03 -> 7.38, its own text 93.0% against the parent's 93.2%
# (bench/results/parallelism/2026-12-07-full-windows). A fourth round on all its answers went on
# to 6.03 / 6.37 / 7.61 but fell to 92.0%; on only its right ones (37,200 of 39,995) to 6.04 / 6.38 /
# 7.60 at 93.6%, and a second schedule there with the paper's masks mixed half and half with full
# ones ("mixed") to 6.10 / 6.48 / 7.69 at 93.6%, the threshold rules back near the parent (`prefix`
# 0.95 88.2% -> 92.2%; bench/results/parallelism/2026-12-07-right-answers). A round: (the generator
# index of its 40,000 prompts, past every earlier recipe's; whether only the right answers are kept;
# its schedules of 1,200 steps on them, by recipe). The first three rounds kept every answer: what
# was run.
WINDOW_ROUNDS = ((1_000_000, False, ("full", "full")), (1_100_000, False, ("full",)),
                 (1_200_000, True, ("full", "mixed")))
WINDOW_ANSWERS = 40_000
_WINDOW_COMMON = dict(window=2, ar_loss_weight=1.0, warmup_steps=20, eval_every=0, val_data=None)
WINDOW_RECIPES = {
    # every noisy block all masks: what `verified` drafts from
    "full": dict(masking="full", **_WINDOW_COMMON),
    # half the blocks all masks, half the paper's position-dependent masks (a level per block): the
    # partly decided blocks the threshold rules meet, which full masks alone had left untrained
    "mixed": dict(masking="position", t_per_block=True, full_fraction=0.5, **_WINDOW_COMMON),
}


def build_data(work: Path) -> Path:
    data = work / "data"
    if (data / "train.jsonl").exists():
        return data
    data.mkdir(parents=True, exist_ok=True)
    probs = list(reasoning.train_problems(N_TRAIN + N_VAL))
    for name, chunk in (("train", probs[:N_TRAIN]), ("val", probs[N_TRAIN:])):
        tmp = data / f".{name}.jsonl"
        with tmp.open("w") as f:
            for p in chunk:
                f.write(json.dumps({"prompt": p.prompt, "response": p.response}) + "\n")
        tmp.rename(data / f"{name}.jsonl")
    return data


def build_tokenizer(work: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = work / "tokenizer"
    if (out / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(out))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [p.text for p in reasoning.train_problems(20_000)]
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   model_max_length=AR_ARCH["max_position_embeddings"])
    fast.save_pretrained(str(out))
    return fast


def init_ar(work: Path, tokenizer) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = work / "ar-init"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    vocab = -(-len(tokenizer) // 64) * 64 + 64  # padded, with free rows for the mask token
    config = LlamaConfig(vocab_size=vocab, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                         tie_word_embeddings=True, **AR_ARCH)
    LlamaForCausalLM(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def main(argv=None) -> None:
    from edlm.train import TrainConfig, train
    from edlm.train.convert import convert

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/demo-build", help="scratch dir (checkpoints live here)")
    ap.add_argument("--models", default="models", help="where the shipped models go")
    ap.add_argument("--ar-steps", type=int, default=3000)
    ap.add_argument("--ar2-steps", type=int, default=800)
    ap.add_argument("--dlm-steps", type=int, default=1800)
    ap.add_argument("--dlm2-steps", type=int, default=4000)
    ap.add_argument("--parity-steps", type=int, default=900)
    ap.add_argument("--parallel-steps", type=int, default=PARALLEL_STEPS)
    ap.add_argument("--window-rounds", type=int, default=len(WINDOW_ROUNDS),
                    help=f"stage 7's rounds of answers and schedules (default {len(WINDOW_ROUNDS)}; 0 skips it)")
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--stage", choices=["all", "data", "ar", "dlm"], default="all",
                    help="data = only the jsonl splits and tokenizer (what `make studies` needs)")
    args = ap.parse_args(argv)
    work, models = Path(args.work), Path(args.models)
    data = build_data(work)
    tok = build_tokenizer(work)
    init = init_ar(work, tok)
    common = dict(data=[str(data / "train.jsonl")], val_data=[str(data / "val.jsonl")], seq_len=256, batch_size=16,
                  eval_every=250, save_every=100, keep_last=2, resume=True, warmup_steps=50)

    def run(model: Path, out: Path, steps: int, lr: float, min_lr: float, **extra) -> Path:
        return train(TrainConfig(model=str(model), out=str(out), steps=steps, lr=lr, min_lr=min_lr,
                                 **{**common, **extra}))

    if args.stage in ("all", "ar") and not (models / "ar" / "config.json").exists():
        run(init, work / "ar-run", args.ar_steps, 1e-3, 1e-4, objective="ar")
        # a second schedule on a new data order: a cooler lr lifted held-out accuracy further
        final = run(work / "ar-run" / "model", work / "ar2-run", args.ar2_steps, 4e-4, 2e-5, objective="ar", seed=1,
                    warmup_steps=30)
        copy_dir_atomically(final, models / "ar")
    if args.stage in ("all", "dlm") and not (models / "dlm" / "config.json").exists():
        conv = work / "dlm-init"
        if not (conv / "config.json").exists():
            convert(models / "ar", conv, block_size=args.block_size, shift=True, force=True)
        # lr 3e-4: ten times the paper's relative step for a model this small, but below the
        # 1e-3 the parent was trained at, so the AR weights move only as far as they must.
        # One t per block gives every sequence blocks at many noise levels.
        run(conv, work / "dlm-run", args.dlm_steps, 3e-4, 3e-5, t_per_block=True)
        # accuracy was still rising at the end of the first schedule: a second one, as for the AR
        run(work / "dlm-run" / "model", work / "dlm2-run", args.dlm2_steps, 2e-4, 2e-5, t_per_block=True, seed=1,
            warmup_steps=30)
        # the clean stream made token-causal and trained as an AR model (issue 16): the AR loss
        # brings the parent's accuracy back to it, and drafts are verified against it
        final = run(work / "dlm2-run" / "model", work / "parity-run", args.parity_steps, 1e-4, 1e-5,
                    t_per_block=True, seed=2, warmup_steps=30, eval_every=300, ar_loss_weight=1.0)
        if args.parallel_steps:
            final = train_for_parallelism(final, work, args.parallel_steps, run)
        if args.window_rounds:
            final = train_for_windows(final, work, WINDOW_ROUNDS[: args.window_rounds], run)
        _set_decoding(final, DLM_DECODING)
        copy_dir_atomically(final, models / "dlm")


def train_for_parallelism(parity: Path, work: Path, steps: int, run) -> Path:
    """Stage 6: PARALLEL_RECIPE on the parity model's own answers (resumable like the others)."""
    from edlm.model import DiffusionLM
    from edlm.recipes.distill import distill, read_prompts

    data = work / "parallel-data" / "self.jsonl"
    if not (work / "parallel-data" / ".done").exists():
        prompts = read_prompts(work / "data" / "train.jsonl")[:N_SELF]
        distill(DiffusionLM.from_pretrained(parity), prompts, data, max_new_tokens=96, batch_size=64)
        (work / "parallel-data" / ".done").touch()
    return run(parity, work / "parallel-run", steps, 1e-4, 1e-5, data=[str(data)], seed=3, warmup_steps=20,
               eval_every=0, val_data=None, ar_loss_weight=1.0, teacher=str(parity), **PARALLEL_RECIPE)


def train_for_windows(model: Path, work: Path, rounds, run) -> Path:
    """Stage 7: per round, the current model's own greedy answers to WINDOW_ANSWERS prompts, then its
    schedules of WINDOW_RECIPES on them, each with a new data order (resumable like the others). Its
    own answers, not the data's: the drafts are scored on matching its own text. Later rounds
    answer anew with the newer model, since for the drafter new answers paid more than repeated ones;
    a round with right_only keeps only the answers whose final number is right."""
    from edlm.model import DiffusionLM
    from edlm.recipes.distill import distill

    seed = 7
    for r, (start, right_only, recipes) in enumerate(rounds, 1):
        data = work / f"window-data{r}" / "self.jsonl"
        if not (data.parent / ".done").exists():
            problems = list(reasoning.train_problems(WINDOW_ANSWERS, start=start))
            answers = {p.prompt: str(p.answer) for p in problems} if right_only else None
            distill(DiffusionLM.from_pretrained(model, autoregressive=True, compile=True),
                    [p.prompt for p in problems], data, max_new_tokens=96, batch_size=64, answers=answers)
            (data.parent / ".done").touch()
        for i, recipe in enumerate(recipes, 1):
            model = run(model, work / f"window-run{r}-{i}", 1200, 1e-4, 1e-5, data=[str(data)], seed=seed,
                        **WINDOW_RECIPES[recipe])
            seed += 1
    return model


def _set_decoding(model: Path, settings: dict) -> None:
    """Store the model's default decode setting in its config (see DiffusionConfig.decoding)."""
    path = model / "config.json"
    cfg = json.loads(path.read_text())
    cfg["edlm"]["decoding"] = settings
    tmp = path.with_name(".config.json.tmp")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    tmp.rename(path)


if __name__ == "__main__":
    from edlm.recipes import run_recipe

    run_recipe(main)
