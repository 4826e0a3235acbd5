"""Plot the demo models' training curves from their metrics.jsonl files.

    python bench/plot_training.py [--out docs/demo-training.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "bench" / "results" / "demo-training"


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "demo-training.png"))
    args = ap.parse_args()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (name, title) in zip(axes, [("ar", "AR parent (causal LM loss)"),
                                         ("dlm", "dLM (1/t-weighted masked CE)")], strict=True):
        rows = [json.loads(line) for line in (LOGS / f"{name}-metrics.jsonl").read_text().splitlines()]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8, label="train")
        val = [r for r in rows if "val_loss" in r]
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        ax.set(title=title, xlabel="step (16 x 256 tokens)", ylabel="loss", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
