"""`edlm bench`: accuracy vs tokens/s of a dLM against its AR base, in one run (edlm.recipes.bench)."""

from __future__ import annotations

from edlm.cli.common import add_compile_flag, add_dtype_flag, dtype_flag
from edlm.recipes.bench import THRESHOLD_SWEEP


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="accuracy vs tokens/s of a dLM against its AR base, in one run",
                       description="Example: edlm bench models/dlm --base models/ar --task reasoning "
                       "--thresholds 0.9 0.7 0.5 --batch-sizes 1 8 --limit 100 --out bench-out")
    p.add_argument("model", help="converted edlm model dir")
    p.add_argument("--base", required=True, help="the AR model it came from")
    p.add_argument("--task", default="reasoning", help="reasoning | pictures (the VLM demo's: reasoning "
                   "problems whose first number is an image) | FILE.jsonl (prompt/answer) | lm-eval:TASK")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLD_SWEEP),
                   help=f"thresholds of the strategies that read one (default {' '.join(map(str, THRESHOLD_SWEEP))})")
    p.add_argument("--strategies", nargs="+", default=None,
                   help="decode strategies to measure (default: threshold, and the checkpoint's own from its "
                   "config.json, e.g. verified on models/dlm)")
    p.add_argument("--block-sizes", type=int, nargs="+", default=None, help="decode block sizes (default: "
                   "the model's)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="batch sizes, each measured apart")
    p.add_argument("--limit", type=int, default=50, help="number of task examples")
    p.add_argument("--repeats", type=int, default=1, help="timed passes per setting (median reported)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="budget of new tokens per example")
    p.add_argument("--verified", action="store_true", help="also the dLM drafting for its AR parent (output = "
                   "the parent's greedy text; TPF = tokens per verification step)")
    p.add_argument("--drafter", default=None, metavar="DIR",
                   help="also this drafting adapter over the parent (`edlm convert --drafter`): one model, the "
                   "parent's own greedy text")
    p.add_argument("--no-hf", dest="hf_baselines", action="store_false", help="skip the HF generate baselines")
    p.add_argument("--out", default="bench-out", help="directory for results.json, results.md, pareto.png")
    add_dtype_flag(p)
    add_compile_flag(p)
    p.set_defaults(func=run)


def run(args) -> None:
    from edlm.recipes.bench import run_bench

    run_bench(args.model, args.base, args.task, args.thresholds, args.strategies, args.block_sizes or (None,),
              args.batch_sizes, args.limit, args.repeats, args.max_new_tokens, args.out, args.hf_baselines,
              args.verified, dtype_flag(args), args.drafter, compile=args.compile)
