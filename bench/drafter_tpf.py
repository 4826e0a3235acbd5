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
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from edlm.model import DiffusionLM
    from edlm.recipes.bench import load_examples, measure, result_runner

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+", metavar="DIR:BLOCK_SIZES:DEPTHS[:BLOCKS]")
    ap.add_argument("--parent", default=str(ROOT / "models/ar"), help="the AR parent (default models/ar)")
    ap.add_argument("--limit", type=int, default=500, help="held-out problems (default 500)")
    ap.add_argument("--out", default=None, help="write the rows as json here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    examples = load_examples("reasoning", args.limit)
    n = len(examples)

    def tokens_of(name: str, model, **options) -> tuple[dict, list[list[int]]]:
        """measure()'s row (TPF, histogram) of one setting, and its token ids (the last n: the first
        chunk is decoded once more as measure's warm-up)."""
        tokens = []

        def decode(prompts, images):
            res = model.generate(prompts, max_new_tokens=96, images=images, **options)
            tokens.extend(res.token_ids)
            return res
        return measure(name, result_runner(decode), examples, batch_size=32, progress=False), tokens[-n:]

    _, theirs = tokens_of("parent", DiffusionLM.from_pretrained(args.parent, autoregressive=True, compile="aot"))
    rows = []
    for spec in args.specs:
        path, sizes, depths, *blocks = spec.split(":")
        drafter = DiffusionLM.from_pretrained(path, compile="aot")
        n_blocks = int(blocks[0]) if blocks else 1
        for size in map(int, sizes.split(",")):
            for depth in map(int, depths.split(",")):
                got, ids = tokens_of(path, drafter, block_size=size, draft_depth=depth, blocks=n_blocks)
                row = {"drafter": path, "block_size": size, "draft_depth": depth, "blocks": n_blocks,
                       "parents_text": sum(a == b for a, b in zip(ids, theirs, strict=True)), "problems": n,
                       "accuracy": got["accuracy"], "tpf": got["tpf"], "histogram": got["commit_histogram"]}
                rows.append(row)
                print(f"{path} block {size} depth {depth} blocks {n_blocks}: the parent's text {row['parents_text']}/"
                      f"{n}, TPF {row['tpf']:.2f}, tokens a step {row['histogram']}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
