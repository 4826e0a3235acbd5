"""`edlm eval`: lm-evaluation-harness tasks on an edlm model; prints a table, writes JSON."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from edlm.cli.common import add_decode_flags, decode_flags
from edlm.errors import EdlmError


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate on lm-evaluation-harness tasks (local data only)",
                       description="Run lm-eval TASKS on MODEL through edlm's decoder (generate_until) and "
                       "likelihood estimator (loglikelihood). Example: edlm eval models/dlm --tasks gsm8k "
                       "--limit 100 --threshold 0.9 --out results.json")
    p.add_argument("model", help="converted edlm model directory (--ar: a plain AR directory)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (or YAML paths)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (< 1: a fraction)")
    p.add_argument("--num-fewshot", type=int, default=None, help="override the tasks' few-shot count")
    p.add_argument("--include-path", default=None, help="directory of extra (local) YAML tasks")
    add_decode_flags(p, only=("strategy", "threshold", "block_size"))
    p.add_argument("--max-gen-toks", type=int, default=256, help="generation budget when a task sets none")
    p.add_argument("--estimator", default="ltr", choices=["ltr", "elbo"],
                   help="loglikelihood estimator: ltr = exact left-to-right unmasking, elbo = Monte-Carlo bound")
    p.add_argument("--mc-samples", type=int, default=32, help="samples of the elbo estimator")
    p.add_argument("--batch-size", type=int, default=8, help="requests decoded or scored together")
    p.add_argument("--verifier", default=None, help="AR_DIR: generate_until returns this AR parent's greedy text, "
                   "drafted by MODEL (loglikelihood stays MODEL's)")
    p.add_argument("--ar", action="store_true", help="MODEL is a plain AR checkpoint (block size 1 baseline)")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.set_defaults(func=run)


def check_out_file(out: str) -> Path:
    """--out is a file: its folder must be writable (edlm.files.check_output_target) and the file
    itself a writable file or not there yet; checked before any work, so results are never lost."""
    from edlm.files import check_output_target

    path = Path(out)
    if path.is_dir():
        raise EdlmError(f"--out {out} is a directory; give a file name, e.g. {path / 'results.json'}")
    check_output_target(path.parent)
    if path.exists() and not os.access(path, os.W_OK):
        raise EdlmError(f"cannot write {out}: the file is read-only")
    return path


def run(args) -> None:
    if args.limit is not None and args.limit <= 0:
        raise EdlmError(f"--limit must be > 0, got {args.limit}")
    for flag, value in (("--max-gen-toks", args.max_gen_toks), ("--mc-samples", args.mc_samples),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise EdlmError(f"{flag} must be >= 1, got {value}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise EdlmError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    out = check_out_file(args.out) if args.out else None
    try:
        from edlm.recipes.evaluate import evaluate_tasks
    except ImportError as exc:
        raise EdlmError(f"lm-evaluation-harness is not installed ({exc}): pip install 'edlm[eval]'") from None

    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = evaluate_tasks(args.model, tasks, limit=limit, num_fewshot=args.num_fewshot,
                             include_path=args.include_path, max_gen_toks=args.max_gen_toks, **decode_flags(args),
                             estimator=args.estimator, mc_samples=args.mc_samples, batch_size=args.batch_size,
                             verifier=args.verifier,
                             autoregressive=args.ar)
    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    gen = results["config"]["edlm"]["generation"]
    if gen["model_calls"]:
        print(f"generate_until: {gen['generated_tokens']} tokens in {gen['model_calls']} model calls "
              f"(TPF {gen['tpf']:.2f})")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=handle_non_serializable))
        print(f"results written to {out}", file=sys.stderr)
