"""`edlm study`: the paper's attention / masking / block-size studies at small scale (edlm.recipes.study)."""

from __future__ import annotations

from pathlib import Path

from edlm.recipes.study import STUDIES


def add_parser(sub) -> None:
    p = sub.add_parser("study", help="the paper's attention / masking / block-size studies at small scale",
                       description="Train each variant from the same AR parent and compare on held-out "
                       "reasoning problems. Example: edlm study --base models/ar --data train.jsonl --steps 300")
    p.add_argument("--base", required=True, help="AR parent (e.g. models/ar)")
    p.add_argument("--data", nargs="+", required=True, help="training data (e.g. the demo's train.jsonl)")
    p.add_argument("--out", default="studies", help="directory for report.md, results.json, plots and runs/")
    p.add_argument("--studies", nargs="+", default=list(STUDIES), help=f"which studies, of {', '.join(STUDIES)}")
    p.add_argument("--steps", type=int, default=300, help="training steps per variant")
    p.add_argument("--limit", type=int, default=100, help="held-out problems per evaluation")
    p.add_argument("--block-size", type=int, default=8, help="block size of the base recipe")
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length (rounded down to a multiple "
                   "of each variant's block size)")
    p.add_argument("--batch-size", type=int, default=16, help="training sequences per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine to lr/10)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="generation budget per held-out problem")
    p.add_argument("--shift", action="store_true", help="base recipe with token shift (the demo dLM's setting)")
    p.set_defaults(func=run)


def run(args) -> None:
    from edlm.recipes.study import run_study

    run_study(args.base, args.data, args.out, args.studies, args.steps, args.limit, args.block_size, args.seq_len,
              args.batch_size, args.lr, args.max_new_tokens, shift=args.shift)
    print((Path(args.out) / "report.md").read_text())
