"""Eager against compiled decoding (DiffusionLM.compile) on the demo models, against HF generate of
the parent, timed interleaved in one run (batch 1 and 8; fp32, 2 threads).

    python bench/compiled.py [--limit 500] [--draft-depths 1 0] [--out bench/results/compiled]

Rows: HF generate (eager, as a user runs it), the AR engine, full-weight `verified` and the drafter
at each draft depth, and the two-model mode, each eager and compiled. Every shape class is compiled in an untimed warm-up.
Each compiled row's texts are checked against its eager row's, problem for problem.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from edlm.model import DiffusionLM
    from edlm.recipes.bench import (
        engine_runner,
        hf_runner,
        load_examples,
        measure_together,
        verified_runner,
        warm_up,
    )

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=str(ROOT / "models"), help="folder of ar, dlm, drafter (default models/)")
    ap.add_argument("--limit", type=int, default=500, help="held-out problems (default 500)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="default: 1 8")
    ap.add_argument("--draft-depths", type=int, nargs="+", default=[1, 0],
                    help="verified rows per draft depth (mask blocks per step - 1; default: 1 0)")
    ap.add_argument("--out", default=None, help="write results.json here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    models = Path(args.models)

    def load(name: str, compiled: bool):
        return DiffusionLM.from_pretrained(models / name, autoregressive=name == "ar", compile=compiled)

    ar, arc = load("ar", False), load("ar", True)
    dlm, dlmc = load("dlm", False), load("dlm", True)
    dr, drc = load("drafter", False), load("drafter", True)
    examples = load_examples("reasoning", args.limit)
    texts: dict[str, list[str]] = {}

    def kept(name: str, run):  # a runner that keeps its texts (first pass: the only one here)
        def go(prompts, images=None):
            out = run(prompts, images)
            texts.setdefault(name, []).extend(out[0])
            return out
        return name, go

    rows = []
    for bs in args.batch_sizes:
        texts.clear()
        settings = [("HF generate (parent)", hf_runner(ar, 96)),
                    kept("AR engine", engine_runner(ar, 96)), kept("AR engine compiled", engine_runner(arc, 96)),
                    *[kept(f"{name}, verified depth {d}{c}", engine_runner(m, 96, draft_depth=d))
                      for d in args.draft_depths for name, pair in (("full-weight dLM", (dlm, dlmc)), ("drafter", (dr, drc)))
                      for c, m in (("", pair[0]), (" compiled", pair[1]))],
                    kept("dLM drafts, AR verifies", verified_runner(dlm, ar, 96)),
                    kept("dLM drafts, AR verifies compiled", verified_runner(dlmc, arc, 96))]
        warm_up(settings, examples, bs)
        texts.clear()
        got = measure_together(settings, examples, batch_size=bs)
        hf = got[0]["tokens_per_s"]
        by_name = {row["name"]: row for row in got}
        for row in got:
            row["x_hf"] = row["tokens_per_s"] / hf
            eager = row["name"].removesuffix(" compiled")
            if eager != row["name"]:
                row["x_eager"] = row["tokens_per_s"] / by_name[eager]["tokens_per_s"]
                n = len(examples)  # the last n: measure_together's own warm-up chunk comes first
                row["same_texts_as_eager"] = sum(a == b for a, b in zip(texts[row["name"]][-n:], texts[eager][-n:],
                                                                        strict=True))
            rows.append(row)
            tpf = f"{row['tpf']:.2f}" if row["tpf"] else "-"
            vs = (f"  {row['x_eager']:.2f}x eager, texts = eager's {row['same_texts_as_eager']}/{len(examples)}"
                  if "x_eager" in row else "")
            print(f"b{bs} {row['name']:36s} acc {row['accuracy']:.1%}  TPF {tpf:>4}  {row['tokens_per_s']:7.1f} tok/s  "
                  f"{row['x_hf']:.2f}x HF generate{vs}", flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"limit": args.limit, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
