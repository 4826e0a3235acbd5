"""Plot the demo models' training curves from their metrics.jsonl files.

    python bench/plot_training.py [--out docs/demo-training.png]

Left: the AR parent (first schedule, then the second one that starts at step 3000).
Right: the shipped dLM (shift; lr 3e-4, then a second schedule at lr 2e-4 from step 1800, then a
third with a causal clean stream and its AR loss from step 5800, whose loss includes that AR term)
next to the earlier no-shift run (lr 1e-3) from the same kind of parent: the reason the demo recipe
uses shift.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "bench" / "results" / "demo-training"


def load(name: str, offset: int = 0) -> list[dict]:
    """Rows of a metrics.jsonl, one per step (a resumed run re-logs steps after its checkpoint:
    the last record wins), steps shifted by `offset`."""
    by_step = {}
    for line in (LOGS / f"{name}-metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        by_step[r["step"]] = {**by_step.get(r["step"], {}), **r, "step": r["step"] + offset}
    return [by_step[s] for s in sorted(by_step)]


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "demo-training.png"))
    args = ap.parse_args()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    panels = [("AR parent (causal LM loss)", [("schedule 1", load("ar")), ("schedule 2", load("ar2", 3000))]),
              ("dLM (1/t-weighted masked CE)", [("shipped: shift, lr 3e-4", load("dlm")),
                                                ("shipped: schedule 2, lr 2e-4", load("dlm2", 1800)),
                                                ("shipped: schedule 3, + AR loss", load("parity", 5800)),
                                                ("earlier: no shift, lr 1e-3", load("dlm-noshift"))])]
    for ax, (title, runs) in zip(axes, panels, strict=True):
        for (label, rows), color in zip(runs, ("tab:blue", "tab:green", "tab:red", "tab:orange"), strict=False):
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.6, alpha=0.5, color=color)
            val = [r for r in rows if "val_loss" in r]
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color=color,
                    label=f"{label} (validation)")
        ax.set(title=title, xlabel="step (16 x 256 tokens)", ylabel="loss", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
