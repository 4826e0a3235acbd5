"""Training throughput: `edlm train` (block diffusion, concat layout) vs plain causal-LM training
of the same model, same data, same batch, in one run.

    python bench/train.py [--model models/ar] [--steps 20] [--seq-len 256] [--batch-size 16]

The concat(x_t, x_0) input doubles the sequence, so the target is a ratio >= 0.45.
Tokens/s counts input tokens of the packed batches (the same data for both objectives).
Also measured: the diffusion step with every noisy block fed (the plain concat layout), to show
what leaving out blocks without masked tokens (prompt-only blocks of SFT data) saves.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from edlm.recipes import reasoning
from edlm.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def measure(objective: str, args, data: Path, work: Path, **extra) -> float:
    if objective == "diffusion":
        extra["block_size"] = args.block_size
    cfg = TrainConfig(model=args.model, data=[str(data)], out=str(work / objective), objective=objective,
                      seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, lr=1e-4, min_lr=1e-5,
                      warmup_steps=1, save_every=10**9, log_every=1, progress=False, **extra)
    train(cfg)
    records = [json.loads(x) for x in (work / objective / "metrics.jsonl").read_text().splitlines()]
    # metrics hold cumulative rates; recover elapsed time per record and drop the first quarter
    # of the run (allocator and kernel warm-up) from the measurement
    per_step = args.seq_len * args.batch_size
    elapsed = [r["step"] * per_step / r["tokens_per_s"] for r in records]
    skip = len(records) // 4
    return (records[-1]["step"] - records[skip]["step"]) * per_step / (elapsed[-1] - elapsed[skip])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "ar"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data.jsonl"
        data.write_text("\n".join(json.dumps({"prompt": p.prompt, "response": p.response})
                                  for p in reasoning.train_problems(3000)))
        ar = measure("ar", args, data, work)
        dlm = measure("diffusion", args, data, work)
        full = measure("diffusion", args, data, work / "full", all_noisy_blocks=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{torch.get_num_threads()}threads"
    result = {"device": device, "ar_tokens_per_s": ar, "diffusion_tokens_per_s": dlm, "ratio": dlm / ar,
              "diffusion_full_layout_tokens_per_s": full, "active_blocks_speedup": dlm / full,
              "seq_len": args.seq_len, "batch_size": args.batch_size, "model": args.model}
    print(json.dumps(result, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train-{device.replace(' ', '_')}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
