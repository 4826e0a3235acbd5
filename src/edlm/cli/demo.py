"""`edlm demo`: the shipped AR model vs its dLM on held-out reasoning problems (edlm.recipes.demo)."""

from __future__ import annotations

from edlm.recipes.demo import STRATEGIES, THRESHOLDS


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="AR vs dLM on the built-in reasoning set: table + plot",
                       description="Run the held-out reasoning problems with the shipped AR model and its dLM "
                       "at several thresholds; print a table and write a PNG. Example: edlm demo --limit 50")
    p.add_argument("--models", default=None, help="dir holding ar/ and dlm/ (default: ./models, else the "
                   "source checkout's)")
    p.add_argument("--limit", type=int, default=100, help="number of held-out problems")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS),
                   help="confidence thresholds each commit rule is run at, in (0, 1]")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES),
                   help="commit rules to show: threshold (the paper's: any slot above the threshold) and prefix "
                   "(left to right while slots pass it); prefix also gets a row over a window of two blocks at 0.97 "
                   "(multi-block decoding, the dLM's point at its parent's accuracy)")
    p.add_argument("--out", default="demo-out", help="where results.json, results.md and pareto.png go")
    p.add_argument("--vlm", action="store_true", help="the vision-language pair (models/vlm-ar, models/vlm-dlm, "
                   "`make vlm-models`) on the same problems with their first number shown as a picture")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads, >= 1 (default: torch's choice)")
    p.set_defaults(func=run)


def run(args) -> None:
    from edlm.recipes.demo import run_demo

    run_demo(args.models, args.limit, args.thresholds, args.strategies, args.out, args.threads, args.vlm)
