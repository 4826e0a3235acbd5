"""Latency of a short request that arrives while a long one decodes, on the demo dLM (CPU).

    python bench/serve_join.py [--model models/dlm] [--out bench/results/serve-join.json]

Three timings through a live server (uvicorn in this process, 127.0.0.1): the short request
alone, the long request alone, and the short request sent 0.3 s after the long one started.
Before rows moved at their own pace, a request could join only at a block boundary of the whole
batch; now it joins at the next step. Timed only on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
SHORT = {"prompt": "Question: Kim has 107 cards. Kim gets 9 more cards. How many cards does Kim have now?\nAnswer:",
         "max_tokens": 24}


def create(dlm, name):
    try:
        from edlm.serve.app import create_app
    except ImportError:  # the layout before edlm/serve/ (for before/after runs)
        from edlm.serve import create_app
    return create_app(dlm, name)


def main() -> None:
    from edlm import DiffusionLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "dlm"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    try:
        from edlm.recipes import reasoning
    except ImportError:
        from edlm import reasoning
    torch.set_num_threads(1)
    long_body = {"prompt": [p.prompt for p in reasoning.test_problems(16)], "max_tokens": 96}  # a 16-row call
    dlm = DiffusionLM.from_pretrained(args.model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create(dlm, "m"), host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}/v1/completions"
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)

    def post(body, out, key):
        t0 = time.perf_counter()
        r = httpx.post(url, json={"model": "m", "temperature": 0, **body}, timeout=600).json()
        out[key] = (time.perf_counter() - t0, r["usage"]["completion_tokens"])

    res: dict = {}
    post(SHORT, res, "warm-up")
    runs = []
    for _ in range(args.repeats):
        one: dict = {}
        post(SHORT, one, "short alone")
        post(long_body, one, "long alone")
        long = threading.Thread(target=post, args=(long_body, one, "long with short"))
        long.start()
        time.sleep(0.3)
        post(SHORT, one, "short arriving mid-call")
        long.join()
        runs.append(one)
    summary = {k: sorted(r[k][0] for r in runs)[len(runs) // 2] for k in runs[0]}
    summary["tokens"] = {k: runs[0][k][1] for k in runs[0]}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    server.should_exit = True


if __name__ == "__main__":
    main()
