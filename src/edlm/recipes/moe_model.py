"""`make moe-models`: the MoE demo pair (issue 28), upcycled from the shipped dense models, resumably.

Stages (each skipped when its output exists; training resumes from its last checkpoint):
1. MoE AR parent: models/ar sparsely upcycled (edlm.moe.upcycle: EXPERTS copies of each MLP, a
   random router choosing TOP_K, so it starts as exactly the dense parent) and trained with
   `--objective ar` and the router balance loss, so router and experts specialise -> models/moe-ar
2. MoE dLM: models/dlm upcycled the same way and trained with the shipped recipe's last stage
   (block diffusion plus the clean stream's AR loss, the parity stage) -> models/moe-dlm

Why upcycle instead of training from scratch (measured): the dense recipe takes ~4 h on 2 cores;
an upcycled model is its parent's accuracy at step 0 and trains at ~1 AR step/s here (the dense
parent: ~1.3). Why the dLM is upcycled from the shipped dLM and not converted from the MoE parent:
the conversion recipe's ~3 h of diffusion training would have to be redone on the MoE model.
Weights ship in bf16 (the dense models are fp32) to keep the pair ~40 MB; CPU loads them as fp32.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

EXPERTS, TOP_K = 4, 2
DLM_DECODING = {"strategy": "prefix", "threshold": 0.9}


def upcycled(dense_dir: Path, out: Path, experts: int = EXPERTS, top_k: int = TOP_K) -> Path:
    """dense_dir's model upcycled into out (config, edlm settings and tokenizer kept)."""
    import torch

    from edlm.files import write_dir_atomically
    from edlm.model import load_causal_lm
    from edlm.moe import upcycle

    if (out / "config.json").exists():
        return out
    dense, tok = load_causal_lm(dense_dir, "cpu", torch.float32)
    moe = upcycle(dense, experts=experts, top_k=top_k)
    return write_dir_atomically(out, lambda tmp: (moe.save_pretrained(str(tmp)), tok.save_pretrained(str(tmp))))


def ship(trained: Path, out: Path, decoding: dict | None = None) -> None:
    """The trained model in bf16 into `out` (atomically), with its default decode setting."""
    import torch

    from edlm.files import write_dir_atomically
    from edlm.model import DiffusionLM

    dlm = DiffusionLM.from_pretrained(trained, "cpu", torch.float32, autoregressive=decoding is None)
    if decoding is not None:
        dlm.config = replace(dlm.config, decoding=decoding)
    dlm.model.to(torch.bfloat16)
    write_dir_atomically(out, dlm.save_pretrained)


def main(argv=None) -> None:
    from edlm.recipes.demo_model import build_data
    from edlm.train import TrainConfig, train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/moe-build", help="scratch dir (checkpoints live here)")
    ap.add_argument("--models", default="models", help="where the dense models are")
    ap.add_argument("--out", default=None, help="where the MoE pair goes (default: --models)")
    ap.add_argument("--experts", type=int, default=EXPERTS, help=f"experts per layer (default {EXPERTS})")
    ap.add_argument("--top-k", type=int, default=TOP_K, help=f"experts per token (default {TOP_K})")
    ap.add_argument("--ar-steps", type=int, default=400)
    ap.add_argument("--dlm-steps", type=int, default=400)
    args = ap.parse_args(argv)
    work, models, out = Path(args.work), Path(args.models), Path(args.out or args.models)
    data = build_data(Path("runs/demo-build"))
    common = dict(data=[str(data / "train.jsonl")], val_data=[str(data / "val.jsonl")], seq_len=256, batch_size=16,
                  eval_every=200, save_every=50, keep_last=2, resume=True, warmup_steps=20, seed=4)
    if not (out / "moe-ar" / "config.json").exists():
        init = upcycled(models / "ar", work / "ar-init", args.experts, args.top_k)
        final = train(TrainConfig(model=str(init), out=str(work / "ar-run"), steps=args.ar_steps, lr=2e-4,
                                  min_lr=2e-5, objective="ar", **common))
        ship(final, out / "moe-ar")
    if not (out / "moe-dlm" / "config.json").exists():
        init = upcycled(models / "dlm", work / "dlm-init", args.experts, args.top_k)
        final = train(TrainConfig(model=str(init), out=str(work / "dlm-run"), steps=args.dlm_steps, lr=1e-4,
                                  min_lr=1e-5, t_per_block=True, ar_loss_weight=1.0, **common))
        ship(final, out / "moe-dlm", DLM_DECODING)


if __name__ == "__main__":
    from edlm.recipes import run_recipe

    run_recipe(main)
