"""Tokens per forward of drafting adapters over decode settings, on held-out problems (no timing).

    python bench/drafter_tpf.py --limit 500 models/drafter:8:0,1 runs/drafter-w2b/out:8:0,1,2:2 [--out FILE]

Each spec is DIR:BLOCK_SIZES:DEPTHS[:BLOCKS]: the drafter decodes `verified` at every block size and
draft depth given (comma lists), with draft blocks BLOCKS model blocks wide (default 1). Every
row's texts are checked token for token against the parent's (the AR engine: HF generate's), so a
drafter's accuracy is the parent's and what a row reports is TPF and its tokens-per-step histogram.
Steps are compiled ahead of time (edlm.aot) for speed only; this bench counts forwards, it does not
time them (bench/compiled.py does, interleaved with HF generate).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from edlm.model import DiffusionLM
    from edlm.recipes.bench import load_examples

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+", metavar="DIR:BLOCK_SIZES:DEPTHS[:BLOCKS]")
    ap.add_argument("--parent", default=str(ROOT / "models/ar"), help="the AR parent (default models/ar)")
    ap.add_argument("--limit", type=int, default=500, help="held-out problems (default 500)")
    ap.add_argument("--out", default=None, help="write the rows as json here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    prompts = [e.prompt for e in load_examples("reasoning", args.limit)]

    def decode(model, **options):
        ids, stats = [], []
        for i in range(0, len(prompts), 32):
            res = model.generate(prompts[i:i + 32], max_new_tokens=96, **options)
            ids, stats = ids + res.token_ids, stats + res.stats
        return ids, stats

    theirs, _ = decode(DiffusionLM.from_pretrained(args.parent, autoregressive=True, compile="aot"))
    rows = []
    for spec in args.specs:
        path, sizes, depths, *blocks = spec.split(":")
        drafter = DiffusionLM.from_pretrained(path, compile="aot")
        for size in map(int, sizes.split(",")):
            for depth in map(int, depths.split(",")):
                n_blocks = int(blocks[0]) if blocks else 1
                ids, stats = decode(drafter, block_size=size, draft_depth=depth, blocks=n_blocks)
                histogram = collections.Counter()
                for s in stats:
                    histogram.update(s.steps_histogram)
                row = {"drafter": path, "block_size": size, "draft_depth": depth, "blocks": n_blocks,
                       "parents_text": sum(a == b for a, b in zip(ids, theirs, strict=True)), "problems": len(prompts),
                       "tpf": sum(s.generated_tokens for s in stats) / sum(s.model_calls for s in stats), "histogram": dict(sorted(histogram.items()))}
                rows.append(row)
                print(f"{path} block {size} depth {depth} blocks {n_blocks}: the parent's text {row['parents_text']}/"
                      f"{len(prompts)}, TPF {row['tpf']:.2f}, tokens a step {row['histogram']}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
