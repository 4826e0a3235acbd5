"""`make drafter-model`: the demo drafter (issue 26), a drafting adapter over the shipped AR parent, resumably.

Stages (each skipped when its output exists; training resumes from its last checkpoint):
1. data: the parent's own greedy answers to N_SELF training prompts (`edlm distill-data --ar`): a
   drafter is scored on agreeing with its parent, so the parent's text is the target, not the
   data's reference answers
2. adapter: `edlm convert models/ar --drafter lora:RANK:TARGETS` (or, with --init, an adapter already
   trained, to go on training it under a new schedule)
3. training: `--train drafter --masking full` (every noisy block wholly masked: what `verified`'s mask
   blocks are) -> models/drafter, with `verified` depth 0 as its decode setting

The parent's weights never change, so the drafter's text is the parent's own at any step; what
training buys is tokens per forward (README: A drafting adapter).
"""

from __future__ import annotations

import argparse
from pathlib import Path

N_SELF = 6_000
FRESH_START = 200_000  # generator index past the demo's train + val split: prompts no model has seen
RANK = 32
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
DECODING = {"strategy": "verified", "draft_depth": 0}  # one mask block: measured fastest on CPU (README)


def parent_answers(parent: Path, work: Path, n: int, skip: int = 0) -> Path:
    """Stage 1: the parent's greedy answers to n training prompts after the first `skip` (resumable:
    distill appends), decoded compiled (the AR engine's texts, ~1.3x faster batched). Past the demo's
    120,000 train prompts come fresh ones from the same generator (held-out questions skipped)."""
    from edlm.model import DiffusionLM
    from edlm.recipes import reasoning
    from edlm.recipes.demo_model import build_data
    from edlm.recipes.distill import distill, read_prompts

    out, done = work / "self.jsonl", work / ".self-done"
    if not done.exists():
        prompts = read_prompts(build_data(Path("runs/demo-build")) / "train.jsonl")
        if skip + n > len(prompts):
            extra = skip + n - len(prompts)
            prompts += [p.prompt for p in reasoning.train_problems(extra, start=FRESH_START)]
        prompts = prompts[skip : skip + n]
        distill(DiffusionLM.from_pretrained(parent, autoregressive=True, compile=True), prompts, out, max_new_tokens=96,
                batch_size=64)
        done.touch()
    return out


def main(argv=None) -> None:
    from edlm.files import copy_dir_atomically
    from edlm.recipes.demo_model import _set_decoding
    from edlm.train import TrainConfig, train
    from edlm.train.convert import convert

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/drafter-build", help="scratch dir (checkpoints live here)")
    ap.add_argument("--parent", default="models/ar", help="the AR parent (default models/ar)")
    ap.add_argument("--out", default="models/drafter", help="where the trained drafter goes")
    ap.add_argument("--init", default=None, metavar="ADAPTER",
                    help="go on training this trained adapter (a drafter.safetensors or its folder) instead of a "
                    "fresh adapter")
    ap.add_argument("--rank", type=int, default=RANK, help=f"a fresh adapter's LoRA rank (default {RANK})")
    ap.add_argument("--targets", default=TARGETS, help=f"the modules a fresh adapter adapts (default {TARGETS})")
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--answers", type=int, default=N_SELF, help=f"the parent's answers to train on (default {N_SELF})")
    ap.add_argument("--data", nargs="+", default=None, metavar="JSONL",
                    help="train on these answer files (an earlier schedule's self.jsonl) instead of answering anew")
    ap.add_argument("--block-size", type=int, default=8,
                    help="the drafter's block (default 8): under shift a draft is this many tokens, a step accepts "
                    "up to one more")
    ap.add_argument("--window", type=int, default=1,
                    help="train for drafts this many blocks wide (`--window`, D2F's windows; default 1); the drafter "
                    "then decodes with `--blocks` this many")
    ap.add_argument("--skip-answers", type=int, default=0,
                    help="answer the training prompts after this many (those an earlier schedule trained on; "
                    "new answers paid more than repeated ones); past the demo's 120,000 the generator makes more")
    args = ap.parse_args(argv)
    work, parent = Path(args.work), Path(args.parent)
    data = args.data or [parent_answers(parent, work, args.answers, args.skip_answers)]
    init = work / "init"
    if not (init / "config.json").exists():  # --init: a trained adapter rebuilt on the parent (edlm.drafter.read_adapter)
        convert(parent, init, block_size=args.block_size, shift=True, force=True,
                drafter=args.init or f"lora:{args.rank}:{args.targets}")
    final = work / "run" / "model"  # a finished run's last model
    if not (final / "config.json").exists():
        final = train(TrainConfig(model=str(init), out=str(work / "run"), data=[str(d) for d in data], train="drafter",
                                  masking="full", seq_len=256, batch_size=16, steps=args.steps, lr=args.lr,
                                  min_lr=args.min_lr, warmup_steps=20, save_every=100, keep_last=2, resume=True,
                                  eval_every=0, seed=5, window=args.window))
    _set_decoding(final, DECODING if args.window == 1 else {**DECODING, "blocks": args.window})
    copy_dir_atomically(final, Path(args.out))


if __name__ == "__main__":
    from edlm.recipes import run_recipe

    run_recipe(main)
