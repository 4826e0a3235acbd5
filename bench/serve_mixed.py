"""Latency under a mixed load: many concurrent requests of several decode settings on the demo dLM.

    python bench/serve_mixed.py [--requests 400] [--in-flight 100] [--out bench/results/serve-mixed.json]

A live server (uvicorn in this process, 127.0.0.1) gets `--requests` completions of held-out
problems, at most `--in-flight` at once, cycling through six plain greedy settings (threshold
and prefix rules at several thresholds). Reports p50/p95/max latency, the worker's counters
(calls, joined rows) and checks every answer against the same setting decoded alone. Before
rows of other settings could join a running call, a request of another setting waited for the
whole call (FIFO head rule), so p95 was many times p50. Timed only on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [{"strategy": "threshold", "threshold": 0.9}, {"strategy": "threshold", "threshold": 0.7},
            {"strategy": "prefix", "threshold": 0.95}, {"strategy": "prefix", "threshold": 0.9},
            {"strategy": "prefix", "threshold": 0.7}, {"strategy": "threshold", "threshold": 0.95}]


def serve(app) -> tuple[uvicorn.Server, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


async def load(url: str, bodies: list[dict], in_flight: int) -> list[tuple[float, str]]:
    gate = asyncio.Semaphore(in_flight)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=in_flight)) as client:
        async def one(body):
            async with gate:
                started = time.perf_counter()
                r = await client.post(f"{url}/v1/completions", json=body)
                r.raise_for_status()
                return time.perf_counter() - started, r.json()["choices"][0]["text"]
        return await asyncio.gather(*(one(b) for b in bodies))


def main() -> None:
    from edlm import DiffusionLM
    from edlm.recipes.reasoning import test_problems
    from edlm.serve.app import create_app

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models/dlm"), help="dLM dir (default models/dlm)")
    ap.add_argument("--requests", type=int, default=400, help="requests in all (default 400)")
    ap.add_argument("--in-flight", type=int, default=100, help="most requests open at once (default 100)")
    ap.add_argument("--max-tokens", type=int, default=64, help="budget per request (default 64)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dlm = DiffusionLM.from_pretrained(args.model)
    held_out = [p.prompt for p in test_problems()]
    prompts = [held_out[i % len(held_out)] for i in range(args.requests)]
    bodies = [{"model": "m", "prompt": p, "max_tokens": args.max_tokens, **SETTINGS[i % len(SETTINGS)]}
              for i, p in enumerate(prompts)]
    app = create_app(dlm, "m", max_batch=64, max_queue=args.requests)
    server, url = serve(app)
    started = time.perf_counter()
    answers = asyncio.run(load(url, bodies, args.in_flight))
    wall = time.perf_counter() - started
    health = httpx.get(f"{url}/health").json()
    server.should_exit = True
    latencies = sorted(t for t, _ in answers)
    wrong = 0
    for setting_index, setting in enumerate(SETTINGS):  # every answer against its setting alone
        rows = list(range(setting_index, len(bodies), len(SETTINGS)))
        solo = dlm.generate([prompts[i] for i in rows], max_new_tokens=args.max_tokens, **setting)
        wrong += sum(answers[i][1] != text for i, text in zip(rows, solo.texts, strict=True))
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * (len(latencies) - 1))]
    figures = {"requests": len(bodies), "in_flight": args.in_flight, "settings": len(SETTINGS), "wall_s": wall,
               "p50_s": p50, "p95_s": p95, "max_s": latencies[-1], "p95_over_p50": p95 / p50,
               "answers_unlike_solo": wrong, "worker": {k: health.get(k) for k in ("batches", "joined", "largest_batch")}}
    print(json.dumps(figures, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
