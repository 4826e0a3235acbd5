"""Two versions of edlm on the demo models, timed interleaved chunk by chunk (a refactor's before/after).

    git worktree add /tmp/before <commit>
    python bench/before_after.py --before /tmp/before --after . --problems 64 --chunk 16

Each version runs in its own worker process (its `src/` first on PYTHONPATH, both loading the
models of this checkout), and every chunk of held-out problems is decoded by every setting of both
versions in turn, so a slow spell of the machine hits both alike. Prints tokens/s, the ratio over
the same version's AR engine, TPF, and whether both versions emitted the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [("AR engine", {"ar": True}), ("verified", {"strategy": "verified"}),
            ("prefix 0.95", {"strategy": "prefix", "threshold": 0.95}),
            ("threshold 0.9", {"strategy": "threshold", "threshold": 0.9}),
            ("prefix 1.0", {"strategy": "prefix", "threshold": 1.0}), ("parent verifies", {"parent": True})]


def worker(max_new_tokens: int) -> None:
    """Read {"setting", "start", "n"} lines, decode those problems, answer seconds/tokens/calls/ids."""
    import torch

    torch.set_num_threads(2)
    from edlm.model import DiffusionLM
    from edlm.recipes.reasoning import test_problems

    dlm = DiffusionLM.from_pretrained(ROOT / "models/dlm")
    ar = DiffusionLM.from_pretrained(ROOT / "models/ar", autoregressive=True)
    prompts = [p.prompt for p in test_problems()]

    def run(setting, batch):
        setting = dict(setting)
        if setting.pop("parent", False):
            try:  # versions before the two-model mode was an option of generate
                from edlm.decode.verify import generate_verified
            except ImportError:
                return dlm.generate(batch, max_new_tokens=max_new_tokens, verifier=ar)
            return generate_verified(dlm, ar, batch, max_new_tokens)
        model = ar if setting.pop("ar", False) else dlm
        return model.generate(batch, max_new_tokens=max_new_tokens, **setting)

    run({"strategy": "prefix", "threshold": 0.95}, prompts[:2])  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        started = time.perf_counter()
        res = run(cmd["setting"], prompts[cmd["start"]:cmd["start"] + cmd["n"]])
        print(json.dumps({"seconds": time.perf_counter() - started, "ids": res.token_ids,
                          "calls": sum(s.model_calls for s in res.stats)}), flush=True)


def start(src: str, max_new_tokens: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(src).resolve() / "src"), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, __file__, "--worker", "--max-new-tokens", str(max_new_tokens)],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"the worker for {src} did not start")
    return proc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", help="checkout (worktree) of the old version (required)")
    p.add_argument("--after", default=str(ROOT), help="checkout of the new version (default: this one)")
    p.add_argument("--problems", type=int, default=64, help="held-out problems (default 64)")
    p.add_argument("--chunk", type=int, default=16, help="problems per interleaved chunk (default 16)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="default: 1 8")
    p.add_argument("--max-new-tokens", type=int, default=128, help="budget per problem (default 128)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.max_new_tokens)
        return
    if args.before is None:
        p.error("--before is required")
    workers = {"before": start(args.before, args.max_new_tokens), "after": start(args.after, args.max_new_tokens)}
    total: dict = {}
    for bsz in args.batch_sizes:
        for first in range(0, args.problems, args.chunk):
            last = min(args.problems, first + args.chunk)
            for name, setting in SETTINGS:
                for version, proc in workers.items():
                    for s in range(first, last, bsz):
                        proc.stdin.write(json.dumps({"setting": setting, "start": s, "n": min(bsz, last - s)}) + "\n")
                        proc.stdin.flush()
                        got = json.loads(proc.stdout.readline())
                        acc = total.setdefault((bsz, name, version), {"seconds": 0.0, "calls": 0, "ids": []})
                        acc["seconds"] += got["seconds"]
                        acc["calls"] += got["calls"]
                        acc["ids"] += got["ids"]
    print(f"{args.problems} problems, chunks of {args.chunk}, 2 threads, fp32; x = over the same version's AR engine")
    for bsz in args.batch_sizes:
        for name, _ in SETTINGS:
            cells = []
            for version in workers:
                acc, ar = total[(bsz, name, version)], total[(bsz, "AR engine", version)]
                tokens = sum(len(x) for x in acc["ids"])
                speed, ar_speed = tokens / acc["seconds"], sum(len(x) for x in ar["ids"]) / ar["seconds"]
                cells.append(f"{speed:7.1f} tok/s {speed / ar_speed:5.2f}x TPF {tokens / acc['calls']:.2f}")
            same = total[(bsz, name, "before")]["ids"] == total[(bsz, name, "after")]["ids"]
            print(f"b{bsz} {name:16s} before {cells[0]} | after {cells[1]} | tokens equal {same}")


if __name__ == "__main__":
    main()
