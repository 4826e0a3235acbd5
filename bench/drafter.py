"""A drafting adapter on the demo AR parent against HF generate, full-weight `verified` and the
two-model mode, timed interleaved in one run (batch 1 and 8; fp32, 2 threads).

    python bench/drafter.py --drafter runs/drafter/run2/model [--limit 100] [--out bench/results/drafter]
    python bench/drafter.py --drafter models/drafter runs/drafter-next2 --depths 1 2   # two adapters, two depths

The drafter's text is the parent's own (it is checked token for token against the AR engine, which
equals HF generate), so its accuracy is the parent's; what it buys is tokens per forward.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from edlm.model import DiffusionLM
    from edlm.recipes.bench import engine_runner, hf_runner, load_examples, measure_together, verified_runner

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", required=True, nargs="+",
                    help="dLMs with a drafting adapter (edlm convert --drafter), each a row")
    ap.add_argument("--depths", type=int, nargs="+", default=None,
                    help="the drafters' `verified` draft depths, each a row (default: each one's stored setting)")
    ap.add_argument("--parent", default=str(ROOT / "models/ar"), help="its AR parent (default models/ar)")
    ap.add_argument("--dlm", default=str(ROOT / "models/dlm"), help="the full-weight dLM (default models/dlm)")
    ap.add_argument("--limit", type=int, default=100, help="held-out problems (default 100)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="default: 1 8")
    ap.add_argument("--out", default=None, help="write results.json here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    ar = DiffusionLM.from_pretrained(args.parent, autoregressive=True)
    drafters = {path: DiffusionLM.from_pretrained(path) for path in args.drafter}
    dlm = DiffusionLM.from_pretrained(args.dlm)
    examples = load_examples("reasoning", args.limit)
    prompts = [e.prompt for e in examples]
    theirs = ar.generate(prompts, max_new_tokens=96).token_ids
    identical = {path: sum(a == b for a, b in zip(d.generate(prompts, max_new_tokens=96).token_ids, theirs, strict=True))
                 for path, d in drafters.items()}
    depths = args.depths or [None]
    rows = []
    for bs in args.batch_sizes:
        settings = [("HF generate (parent)", hf_runner(ar, 96)), ("AR engine (parent)", engine_runner(ar, 96)),
                    *[(f"drafter {path}, verified" + (f" depth {k}" if k is not None else ""),
                       engine_runner(d, 96, draft_depth=k)) for path, d in drafters.items() for k in depths],
                    ("full-weight dLM, verified", engine_runner(dlm, 96)),
                    ("dLM drafts, AR verifies (two models)", verified_runner(dlm, ar, 96))]
        got = measure_together(settings, examples, batch_size=bs)
        hf = got[0]["tokens_per_s"]
        for row in got:
            row["x_hf"] = row["tokens_per_s"] / hf
            rows.append(row)
            tpf = f"{row['tpf']:.2f}" if row["tpf"] else "-"
            print(f"b{bs} {row['name']:38s} acc {row['accuracy']:.1%}  TPF {tpf:>4}  "
                  f"{row['tokens_per_s']:8.1f} tok/s  {row['x_hf']:.2f}x HF generate")
    for path, n in identical.items():
        print(f"drafter {path}: text identical to the parent's on {n}/{len(prompts)} problems")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps({"identical": identical, "problems": len(prompts),
                                                                  "rows": rows}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
