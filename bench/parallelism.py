"""The parallelism study (issue 25): dLMs trained for parallelism from the shipped one, each decoded
on the same held-out problems against the AR parent: accuracy, tokens per forward (TPF), the
tokens-per-step histogram and AUP per strategy. TPF and accuracy do not depend on the batch, so
this decodes at a large batch; speed against HF generate is measured apart, interleaved at batch
1 and 8 on a quiet machine (bench/drafter.py's kind of run, `--timed`).

    python bench/parallelism.py --models shipped=models/dlm oput=runs/par/oput/model \\
        --limit 500 --out bench/results/parallelism
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [("verified", None), ("prefix", 0.95), ("prefix", 0.9), ("prefix", 0.8), ("prefix", 0.7),
            ("threshold", 0.9), ("threshold", 0.7), ("threshold", 0.5)]


def main() -> None:
    from edlm.model import DiffusionLM
    from edlm.recipes.bench import aup, engine_runner, hf_runner, load_examples, measure_together

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="NAME=DIR of each dLM")
    ap.add_argument("--parent", default=str(ROOT / "models/ar"), help="the AR parent (default models/ar)")
    ap.add_argument("--limit", type=int, default=500, help="held-out problems (default 500)")
    ap.add_argument("--batch-size", type=int, default=64, help="decode batch (TPF/accuracy only; default 64)")
    ap.add_argument("--settings", nargs="+", default=None,
                    help="strategy[:threshold] to decode with (default: verified, prefix 0.95-0.7, threshold 0.9-0.5)")
    ap.add_argument("--block-size", type=int, default=None, help="decode block size (default: each model's)")
    ap.add_argument("--timed", action="store_true", help="instead: tokens/s against HF generate at batch 1 and 8, "
                    "interleaved, for the first setting of each model (run on a quiet machine)")
    ap.add_argument("--out", default=None, help="write results.json and results.md here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    settings = SETTINGS if args.settings is None else [
        (s.split(":")[0], float(s.split(":")[1]) if ":" in s else None) for s in args.settings]
    examples = load_examples("reasoning", args.limit)
    ar = DiffusionLM.from_pretrained(args.parent, autoregressive=True)
    models = {name: DiffusionLM.from_pretrained(path) for name, path in (m.split("=", 1) for m in args.models)}

    def runner(dlm, strategy, threshold):
        extra = {} if threshold is None else {"threshold": threshold}
        return engine_runner(dlm, 96, strategy=strategy, block_size=args.block_size, **extra)

    def label(name, strategy, threshold):
        return f"{name} {strategy}" + ("" if threshold is None else f" {threshold}")

    rows = []
    if args.timed:
        for bs in (1, 8):
            runs = [("HF generate (parent)", hf_runner(ar, 96)), ("AR engine (parent)", engine_runner(ar, 96))]
            runs += [(label(n, *settings[0]), runner(d, *settings[0])) for n, d in models.items()]
            got = measure_together(runs, examples, batch_size=bs)
            for row in got:
                row["x_hf"] = row["tokens_per_s"] / got[0]["tokens_per_s"]
                rows.append(row)
    else:
        rows += measure_together([("AR parent", engine_runner(ar, 96))], examples, args.batch_size)
        for name, dlm in models.items():
            rows += measure_together([(label(name, s, t), runner(dlm, s, t)) for s, t in settings], examples,
                                     args.batch_size)
    y_max = 100 * rows[0]["accuracy"] if not args.timed else None
    lines = ["| setting | batch | accuracy | TPF | tokens/s | x HF |", "|---|---|---|---|---|---|"]
    for r in rows:
        tpf = f"{r['tpf']:.2f}" if r["tpf"] else "-"
        x_hf = f"{r['x_hf']:.2f}" if "x_hf" in r else "-"
        lines.append(f"| {r['name']} | {r['batch_size']} | {100 * r['accuracy']:.1f}% | {tpf} | "
                     f"{r['tokens_per_s']:.0f} | {x_hf} |")
    if y_max is not None:
        lines += ["", f"AUP per strategy (y_max = the parent's {y_max:.1f}%):"]
        for name in models:
            for strategy in dict.fromkeys(s for s, _ in settings):
                pts = [(r["tpf"], 100 * r["accuracy"]) for r in rows if r["name"].startswith(f"{name} {strategy}")]
                lines.append(f"- {name} {strategy}: {aup(pts, y_max):.0f}")
    lines += ["", "Tokens committed per model call ({tokens: calls}):", ""]
    lines += [f"- {r['name']}: {json.dumps(r['commit_histogram'])}" for r in rows if r.get("commit_histogram")]
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "timed" if args.timed else "results"
        (out / f"{stem}.json").write_text(json.dumps({"limit": args.limit, "models": args.models, "rows": rows},
                                                     indent=1, default=str) + "\n")
        (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
