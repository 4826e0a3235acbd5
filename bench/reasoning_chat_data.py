"""Chat SFT data from the demo's arithmetic problems (edlm.recipes.reasoning), for converting a
chat model such as SmolLM2-Instruct: one JSONL row {"messages": [user, assistant]} per problem.

    python bench/reasoning_chat_data.py OUT_DIR --train 2000 --val 100
writes OUT_DIR/train.jsonl (training split) and OUT_DIR/val.jsonl (the held-out test split).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edlm.recipes import reasoning


def row(p) -> dict:
    return {"messages": [{"role": "user", "content": p.question},
                         {"role": "assistant", "content": p.solution}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--val", type=int, default=100)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w") as f:
        for p in reasoning.train_problems(args.train):
            f.write(json.dumps(row(p)) + "\n")
    with open(out / "val.jsonl", "w") as f:
        for p in reasoning.test_problems(args.val):
            f.write(json.dumps(row(p)) + "\n")
    print(f"wrote {out}/train.jsonl ({args.train}) and {out}/val.jsonl ({args.val})")


if __name__ == "__main__":
    main()
