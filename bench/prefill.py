"""Prefill of a long prompt against one HF forward over the same ids (SmolLM2 by default).

    make real-model && python bench/prefill.py [--model runs/smollm2-dlm] [--tokens 2006]

Times, interleaved (median of --repeats): one HF forward (logits_to_keep=1, as generate's prefill,
and with every position's logits), the AR engine's first call (the prompt through the backend's
causal fast path), and the dLM's first token block-causal (dense mask) and causal-clean (a causal
prefill forward, then the block).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    from edlm.model import DiffusionLM
    from edlm.recipes.reasoning import test_problems

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/smollm2-dlm", help="a converted dLM dir (default runs/smollm2-dlm)")
    ap.add_argument("--tokens", type=int, default=2006, help="prompt length (default 2006)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ar = DiffusionLM.from_pretrained(args.model, autoregressive=True)
    dlm = DiffusionLM.from_pretrained(args.model)
    ids = ar.tokenizer(" ".join(p.prompt for p in test_problems(200)))["input_ids"][: args.tokens]
    x = torch.tensor([ids])

    @torch.no_grad()
    def hf(keep):
        ar.model(input_ids=x, logits_to_keep=keep).logits[:, -1].argmax()

    def dlm_first(causal_clean):
        was, dlm.config.causal_clean = dlm.config.causal_clean, causal_clean
        try:
            dlm.generate([ids], max_new_tokens=1, strategy="prefix", threshold=1.0)
        finally:
            dlm.config.causal_clean = was

    runs = {"HF forward (logits_to_keep=1)": lambda: hf(1), "HF forward, every position's logits": lambda: hf(0),
            "edlm AR engine, first call": lambda: ar.generate([ids], max_new_tokens=1),
            "dLM block-causal (dense mask)": lambda: dlm_first(False),
            "dLM causal-clean (causal prefill + block)": lambda: dlm_first(True)}
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times["HF forward (logits_to_keep=1)"])
    print(f"prompt {len(ids)} tokens, {args.model}, {args.threads} threads, median of {args.repeats} interleaved")
    for name, t in times.items():
        print(f"{name:45s} {statistics.median(t) * 1000:8.1f} ms  {statistics.median(t) / base:5.2f}x HF")


if __name__ == "__main__":
    main()
