"""Decoding speed: dLM at several thresholds vs its AR parent through the same engine, one run.

    python bench/decode.py [--model models/dlm --base models/ar] [--limit 40] [--batch-sizes 1 8]

Reports accuracy on held-out reasoning problems, TPF, generated tokens/s and the speed-up over
AR at the same batch size, plus the histogram of tokens committed per step. Writes
bench/results/decode-<device>.json and .md. Untimed warm-up before every setting.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from edlm import DiffusionLM, reasoning
from edlm.evaluate import format_table, run_reasoning, warm_up

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "dlm"))
    ap.add_argument("--base", default=str(ROOT / "models" / "ar"))
    ap.add_argument("--thresholds", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7, 0.5, 0.3])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu-{torch.get_num_threads()}threads"
    ar = DiffusionLM.from_pretrained(args.base, autoregressive=True)
    dlm = DiffusionLM.from_pretrained(args.model)
    problems = reasoning.test_problems(args.limit)
    report = {"device": name, "platform": platform.platform(), "torch": torch.__version__, "runs": []}
    md = [f"# decode bench on {name} ({args.limit} problems)\n"]
    for bs in args.batch_sizes:
        warm_up(ar)
        base = run_reasoning(ar, f"AR b{bs}", problems, batch_size=bs)
        rows = [base]
        hist: dict[str, dict] = {}
        for t in args.thresholds:
            warm_up(dlm, threshold=t)
            rows.append(run_reasoning(dlm, f"dLM thr={t:g} b{bs}", problems, batch_size=bs, threshold=t))
            sample = dlm.generate([p.prompt for p in problems[:8]], max_new_tokens=96, threshold=t)
            merged: dict[int, int] = {}
            for s in sample.stats:
                for k, v in s.steps_histogram.items():
                    merged[k] = merged.get(k, 0) + v
            hist[f"{t:g}"] = dict(sorted(merged.items()))
        table = format_table(rows, baseline=base)
        print(table)
        md += [f"## batch {bs}\n", table, "\ntokens committed per step (threshold -> {tokens: steps}):",
               "```", json.dumps(hist), "```\n"]
        report["runs"].append({"batch_size": bs, "rows": [r.to_dict() for r in rows], "commit_histogram": hist})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"decode-{name.replace(' ', '_')}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text("\n".join(md))
    print(f"wrote {out / stem}.json/.md")


if __name__ == "__main__":
    main()
