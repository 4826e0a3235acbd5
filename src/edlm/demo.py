"""`edlm demo`: the shipped AR model vs its dLM on held-out reasoning problems, in one run.

Prints accuracy, TPF, tokens/s and speed-up over AR (batch 1) and writes a PNG of accuracy
vs tokens/s. The models are the ones `make models` builds (edlm.recipes.demo_model).
"""

from __future__ import annotations

import json
from pathlib import Path

from edlm.errors import EdlmError

DEFAULT_MODELS = Path(__file__).resolve().parents[2] / "models"
MAX_NEW_TOKENS = 96  # the longest held-out worked solution is 96 tokens


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="AR vs dLM on the built-in reasoning set: table + plot",
                       description="Run the held-out reasoning problems with the shipped AR model and its dLM "
                       "at several thresholds; print a table and write a PNG. Example: edlm demo --limit 50")
    p.add_argument("--models", default=str(DEFAULT_MODELS), help="dir holding ar/ and dlm/ (default: shipped)")
    p.add_argument("--limit", type=int, default=100, help="number of held-out problems (default 100)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.95, 0.9, 0.7])
    p.add_argument("--strategies", nargs="+", default=["threshold", "prefix"], choices=["threshold", "prefix"],
                   help="commit rules to show: threshold (the paper's: any slot above the threshold) and prefix "
                   "(left to right while slots pass it)")
    p.add_argument("--out", default="demo-out", help="where results.json, results.md and pareto.png go")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=run)


def run(args) -> None:
    import torch

    from edlm import reasoning
    from edlm.bench import engine_runner, load_examples, markdown, measure, plot
    from edlm.decoding import model_defaults
    from edlm.model import DiffusionLM

    models = Path(args.models)
    for sub in ("ar", "dlm"):
        if not (models / sub / "config.json").is_file():
            raise EdlmError(f"no demo model at {models / sub}: build them with `make models`")
    if not 1 <= args.limit <= reasoning.TEST_SIZE:
        raise EdlmError(f"--limit must be in [1, {reasoning.TEST_SIZE}], got {args.limit}")
    for t in args.thresholds:
        if not 0 < t <= 1:
            raise EdlmError(f"--thresholds must be in (0, 1], got {t}")
    if args.threads:
        torch.set_num_threads(args.threads)
    examples = load_examples("reasoning", args.limit)
    ar = DiffusionLM.from_pretrained(models / "ar", autoregressive=True)
    dlm = DiffusionLM.from_pretrained(models / "dlm")
    print(f"edlm demo: {len(examples)} held-out problems, batch 1, {torch.get_num_threads()} threads, "
          f"dLM block size {dlm.config.block_size}")
    default = model_defaults(dlm)  # what `edlm generate models/dlm` uses with no flags
    rows = [measure("AR (KV cache)", engine_runner(ar, MAX_NEW_TOKENS), examples)]
    for strategy in args.strategies:
        for t in args.thresholds:
            name = f"dLM {strategy} {t:g}"
            if (strategy, t) == (default["strategy"], default["threshold"]):
                name += " (default)"
            rows.append(measure(name, engine_runner(dlm, MAX_NEW_TOKENS, threshold=t, strategy=strategy), examples))
    table = markdown(rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "pareto.png", f"edlm demo: {len(examples)} held-out problems, {dlm.device}")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'pareto.png'}")
