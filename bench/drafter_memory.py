"""Peak memory of `--train drafter` against full-weight training of the same parent, same batch.

    python bench/drafter_memory.py [--parent runs/real-drafter-bench/parent] [--steps 3] [--out bench/results/drafter-memory]

Each run is its own process (`edlm train`, diffusion objective, full masking), so its peak resident
memory (CPU) or peak allocated GPU memory is that run's alone. The drafter keeps the parent frozen:
no gradients or Adam moments for the base weights, and its clean stream is computed without a graph
(DiffusionLM._over_frozen_clean), so backward holds the noisy half's activations only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys, torch
from edlm.train import TrainConfig, train
cfg = TrainConfig(**json.loads(sys.argv[1]))
train(cfg)
peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, peak_gpu)
"""


def main() -> None:
    from edlm.recipes.real_drafter import ALL_LINEAR, chat_prompts, hf_parent, write_prompts
    from edlm.train.convert import convert

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", default=None, help="HF dir or GGUF (default: SmolLM2-135M-Instruct's GGUF)")
    ap.add_argument("--work", default="runs/drafter-memory")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    parent = hf_parent(args.parent, work)
    from edlm.model import DiffusionLM
    from edlm.recipes import reasoning

    data = work / "data.jsonl"
    if not data.exists():  # the problems' worked solutions as responses: the batch is what matters here
        tok = DiffusionLM.from_pretrained(parent, autoregressive=True).tokenizer
        problems = list(reasoning.train_problems(64))
        write_prompts(work / "prompts.jsonl", chat_prompts(tok, problems))
        rows = [json.loads(line) | {"response": p.solution}
                for line, p in zip((work / "prompts.jsonl").read_text().splitlines(), problems, strict=True)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {}
    for name, drafter in (("full weights", None), (f"drafter lora:16 ({ALL_LINEAR})", f"lora:16:{ALL_LINEAR}")):
        model = work / ("drafter" if drafter else "full")
        if not (model / "config.json").exists():
            convert(parent, model, shift=True, drafter=drafter)
        cfg = dict(model=str(model), data=[str(data)], out=str(work / f"run-{model.name}"), masking="full",
                   steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-4, save_every=10_000,
                   log_every=1, progress=False, train="drafter" if drafter else "all")
        shutil.rmtree(cfg["out"], ignore_errors=True)  # a fresh run each time, not a resumed one
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("PEAK")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"{name}: training failed\n{proc.stderr[-2000:]}")
        rss, gpu = map(int, line.split()[1:])
        tok_s = json.loads((Path(cfg["out"]) / "metrics.jsonl").read_text().splitlines()[-1])["tokens_per_s"]
        results[name] = {"peak_rss_mib": rss / 2**20, "peak_gpu_mib": gpu / 2**20, "train_tokens_per_s": tok_s}
        print(f"{name:60s} peak RSS {rss / 2**20:8.0f} MiB" + (f", GPU {gpu / 2**20:.0f} MiB" if gpu else "")
              + f", {tok_s:.0f} tokens/s", flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"batch_size": args.batch_size, "seq_len": args.seq_len,
                                                      "steps": args.steps, "parent": str(parent),
                                                      "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
