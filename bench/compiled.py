"""Eager, compiled (torch.compile) and AOT-compiled (DiffusionLM.compile(aot=True)) decoding of the
demo models, against HF generate of the parent, timed interleaved in one run (batch 1 and 8; fp32,
2 threads).

    python bench/compiled.py [--limit 500] [--draft-depths 1 0] [--variants eager compiled aot] [--out DIR]

Rows: HF generate (eager, as a user runs it), then per variant the AR engine, full-weight `verified`
(and any --more-dlms) and the drafter (and any --more-drafters) at each draft depth, and the
two-model mode. Every shape class is compiled in an untimed warm-up. Each row's texts are checked
against the first variant's and against HF generate's (the parent's greedy text), problem for
problem.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"eager": False, "compiled": "graph", "aot": "aot"}  # --variants: DiffusionLM.from_pretrained(compile=)


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
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help="how each engine row runs: eager, compiled (torch.compile), aot (compile(aot=True)); "
                    "default: all; texts are checked against the first")
    ap.add_argument("--more-drafters", nargs="+", default=[], metavar="DIR",
                    help="further drafters (e.g. a new schedule's), each decoded with its stored setting (its blocks) "
                    "at every --draft-depths, a row each beside the shipped one")
    ap.add_argument("--more-dlms", nargs="+", default=[], metavar="DIR",
                    help="further full-weight dLMs (e.g. the one a new recipe replaced), a row each at every "
                    "--draft-depths beside the shipped one")
    ap.add_argument("--out", default=None, help="write results.json here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    models = Path(args.models)

    def load(name: str, variant: str):
        path = models / name if name in ("ar", "dlm", "drafter") else Path(name)
        return DiffusionLM.from_pretrained(path, autoregressive=name == "ar",
                                           compile=VARIANTS[variant])

    hf_ar = DiffusionLM.from_pretrained(models / "ar", autoregressive=True)  # HF generate's, never compiled
    names = ("ar", "dlm", "drafter", *args.more_dlms, *args.more_drafters)  # a path under --models, or any path
    loaded = {(n, v): load(n, v) for v in args.variants for n in names}
    examples = load_examples("reasoning", args.limit)
    texts: dict[str, list[str]] = {}

    def kept(name: str, run):  # a runner that keeps its texts (first pass: the only one here)
        def go(prompts, images=None):
            out = run(prompts, images)
            texts.setdefault(name, []).extend(out[0])
            return out
        return name, go

    def suffix(v: str) -> str:
        return "" if v == "eager" else f" {v}"

    rows, first = [], args.variants[0]
    for bs in args.batch_sizes:
        texts.clear()
        settings = [kept("HF generate (parent)", hf_runner(hf_ar, 96))]
        for v in args.variants:
            ar, dlm, dr = (loaded[n, v] for n in ("ar", "dlm", "drafter"))
            settings += [kept(f"AR engine{suffix(v)}", engine_runner(ar, 96)),
                         *[kept(f"{name}, verified depth {d}{suffix(v)}", engine_runner(m, 96, draft_depth=d))
                           for d in args.draft_depths for name, m in (("full-weight dLM", dlm),
                                                                      *((f"full-weight dLM {p}", loaded[p, v])
                                                                        for p in args.more_dlms),
                                                                      ("drafter", dr),
                                                                      *((f"drafter {p}", loaded[p, v])
                                                                        for p in args.more_drafters))],
                         kept(f"dLM drafts, AR verifies{suffix(v)}", verified_runner(dlm, ar, 96))]
        warm_up(settings, examples, bs)
        texts.clear()
        got = measure_together(settings, examples, batch_size=bs)
        hf, n = got[0]["tokens_per_s"], len(examples)  # texts: the last n (measure_together's warm-up first)
        by_name = {row["name"]: row for row in got}
        for row in got:
            row["x_hf"] = row["tokens_per_s"] / hf
            base = row["name"]
            for v in VARIANTS:
                base = base.removesuffix(suffix(v)) if v != "eager" else base
            ref = base + suffix(first)
            if ref != row["name"] and ref in by_name:
                row[f"x_{first}"] = row["tokens_per_s"] / by_name[ref]["tokens_per_s"]
                row[f"same_texts_as_{first}"] = sum(a == b for a, b in zip(texts[row["name"]][-n:], texts[ref][-n:],
                                                                           strict=True))
            row["same_texts_as_hf"] = sum(a == b for a, b in zip(texts[row["name"]][-n:], texts[got[0]["name"]][-n:],
                                                                 strict=True))
            rows.append(row)
            tpf = f"{row['tpf']:.2f}" if row["tpf"] else "-"
            vs = (f"  {row[f'x_{first}']:.2f}x {first}, texts = {first}'s {row[f'same_texts_as_{first}']}/{n}"
                  if f"x_{first}" in row else "")
            print(f"b{bs} {row['name']:40s} acc {row['accuracy']:.1%}  TPF {tpf:>4}  {row['tokens_per_s']:7.1f} tok/s  "
                  f"{row['x_hf']:.2f}x HF generate (its text on {row['same_texts_as_hf']}/{n}){vs}", flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"limit": args.limit, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
