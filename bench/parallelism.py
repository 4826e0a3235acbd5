"""The parallelism study (issue 25): dLMs trained for parallelism from the shipped one, each decoded
on the same held-out problems against the AR parent: accuracy, tokens per forward (TPF), the
tokens-per-step histogram and AUP per strategy. TPF and accuracy do not depend on the batch, so
this decodes at a large batch; speed against HF generate is measured apart, interleaved at batch
1 and 8 on a quiet machine (bench/drafter.py's kind of run, `--timed`).

    python bench/parallelism.py --models shipped=models/dlm oput=runs/par/oput/model \\
        --limit 500 --out bench/results/parallelism
    python bench/parallelism.py --merge runs/par/eval-*/results.json --out bench/results/parallelism

--merge joins earlier runs' results.json into one study table (study.md: accuracy and TPF per
model and setting, AUP per strategy over the settings all runs share) and plots accuracy
against TPF (study.png).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["verified", "prefix:0.95", "prefix:0.9", "prefix:0.8", "prefix:0.7",
            "threshold:0.9", "threshold:0.7", "threshold:0.5"]


def main() -> None:
    from edlm.model import DiffusionLM
    from edlm.recipes.bench import aup, engine_runner, hf_runner, load_examples, measure_together

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[], help="NAME=DIR of each dLM")
    ap.add_argument("--parent", default=str(ROOT / "models/ar"), help="the AR parent (default models/ar)")
    ap.add_argument("--limit", type=int, default=500, help="held-out problems (default 500)")
    ap.add_argument("--batch-size", type=int, default=64, help="decode batch (TPF/accuracy only; default 64)")
    ap.add_argument("--settings", nargs="+", default=None,
                    help="[BLOCKSx]strategy[/GATE][:threshold][#depth][@block] to decode with, e.g. prefix:0.95, "
                    "2xprefix:0.95 (a window of two blocks), 2xprefix/0.5:0.9 (the next block opens once the "
                    "leading one is half decided), 2xverified#3 (verified drafting two blocks, draft_depth 3); "
                    "default: verified, prefix 0.95-0.7, threshold 0.9-0.5, at each model's block size")
    ap.add_argument("--block-size", type=int, default=None, help="decode block size (default: each model's)")
    ap.add_argument("--timed", action="store_true", help="instead: tokens/s against HF generate at batch 1 and 8, "
                    "every model at every setting, interleaved (run on a quiet machine)")
    ap.add_argument("--out", default=None, help="write results.json and results.md here")
    ap.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                    help="instead: join these runs' results.json into study.md and study.png in --out")
    args = ap.parse_args()
    if args.merge:
        return merge([Path(p) for p in args.merge], Path(args.out or "."))
    torch.set_num_threads(2)
    settings = [parse_setting(s) for s in (args.settings or SETTINGS)]
    examples = load_examples("reasoning", args.limit)
    ar = DiffusionLM.from_pretrained(args.parent, autoregressive=True)
    models = {name: DiffusionLM.from_pretrained(path) for name, path in (m.split("=", 1) for m in args.models)}

    def runner(dlm, setting):
        return engine_runner(dlm, 96, **{"block_size": args.block_size, **setting.decode})

    rows = []
    if args.timed:
        for bs in (1, 8):
            runs = [("HF generate (parent)", hf_runner(ar, 96)), ("AR engine (parent)", engine_runner(ar, 96))]
            runs += [(f"{n} {st.label}", runner(d, st)) for n, d in models.items() for st in settings]
            got = measure_together(runs, examples, batch_size=bs)
            for row in got:
                row["x_hf"] = row["tokens_per_s"] / got[0]["tokens_per_s"]
                rows.append(row)
    else:
        rows += measure_together([("AR parent", engine_runner(ar, 96))], examples, args.batch_size)
        for name, dlm in models.items():
            rows += measure_together([(f"{name} {st.label}", runner(dlm, st)) for st in settings], examples,
                                     args.batch_size)
    y_max = 100 * rows[0]["accuracy"] if not args.timed else None
    lines = ["| setting | batch | accuracy | TPF | tokens/s | x HF |", "|---|---|---|---|---|---|"]
    for r in rows:
        tpf = f"{r['tpf']:.2f}" if r["tpf"] else "-"
        x_hf = f"{r['x_hf']:.2f}" if "x_hf" in r else "-"
        lines.append(f"| {r['name']} | {r['batch_size']} | {100 * r['accuracy']:.1f}% | {tpf} | "
                     f"{r['tokens_per_s']:.0f} | {x_hf} |")
    if y_max is not None:
        lines += ["", f"AUP per strategy (y_max = the parent's {y_max:.1f}%):"]
        for name in models:
            for strategy in dict.fromkeys(st.group for st in settings):
                pts = [(r["tpf"], 100 * r["accuracy"]) for r in rows if r["name"].split()[:2] == [name, strategy]]
                lines.append(f"- {name} {strategy}: {aup(pts, y_max):.0f}")
    lines += ["", "Tokens committed per model call ({tokens: calls}):", ""]
    lines += [f"- {r['name']}: {json.dumps(r['commit_histogram'])}" for r in rows if r.get("commit_histogram")]
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "timed" if args.timed else "results"
        (out / f"{stem}.json").write_text(json.dumps({"limit": args.limit, "models": args.models, "rows": rows},
                                                     indent=1, default=str) + "\n")
        (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def merge(paths: list[Path], out: Path) -> None:
    """One table of every run's rows (the AR parent once), AUP over shared settings, and a plot."""
    from edlm.recipes.bench import aup

    rows, seen, limits = [], set(), set()
    for path in paths:
        run = json.loads(path.read_text())
        limits.add(run["limit"])
        for r in run["rows"]:
            if r["name"] not in seen:
                seen.add(r["name"])
                rows.append(r)
    parent = next(r for r in rows if r["name"] == "AR parent")
    y_max = 100 * parent["accuracy"]
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r["name"] != "AR parent":
            model, _, setting = r["name"].partition(" ")
            by_model.setdefault(model, {})[setting] = r
    shared = [s for s in next(iter(by_model.values())) if all(s in m for m in by_model.values())]
    head = "| model | " + " | ".join(shared) + " | " + " | ".join(
        f"AUP {s}" for s in dict.fromkeys(x.split()[0] for x in shared)) + " |"
    lines = [f"Held-out problems: {', '.join(map(str, sorted(limits)))}; the AR parent {y_max:.1f}%. Each cell: "
             "accuracy, TPF.", "", head, "|---" * (head.count("|") - 1) + "|"]
    for model, settings in by_model.items():
        cells = [f"{100 * settings[s]['accuracy']:.1f}%, {settings[s]['tpf']:.2f}" for s in shared]
        aups = [f"{aup([(settings[s]['tpf'], 100 * settings[s]['accuracy']) for s in shared if s.split()[0] == st], y_max):.0f}"
                for st in dict.fromkeys(x.split()[0] for x in shared)]
        lines.append(f"| {model} | " + " | ".join(cells + aups) + " |")
    lines += ["", "Tokens committed per model call ({tokens: calls}):", ""]
    lines += [f"- {r['name']}: {json.dumps(r['commit_histogram'])}" for r in rows if r.get("commit_histogram")]
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:len(by_model) + 4]))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(dict.fromkeys(x.split()[0] for x in shared))
    fig, axes = plt.subplots(1, len(strategies), figsize=(5.5 * len(strategies), 4.2), squeeze=False)
    for ax, st in zip(axes[0], strategies, strict=True):
        for model, settings in by_model.items():
            pts = sorted((settings[s]["tpf"], 100 * settings[s]["accuracy"]) for s in shared if s.split()[0] == st)
            ax.plot(*zip(*pts, strict=True), "o-", label=model, ms=4)
        ax.axhline(y_max, color="gray", ls=":", label="AR parent")
        ax.set(xlabel="tokens per forward", ylabel="accuracy (%)", title=st)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=120)
    plt.close(fig)


class Setting(NamedTuple):
    group: str  # what AUP is taken over: the strategy, its window and depth, e.g. 'prefix', '2xprefix/0.5'
    label: str
    decode: dict  # keyword arguments of DiffusionLM.generate


def parse_setting(text: str) -> Setting:
    """'2xprefix/0.5:0.9@16' -> strategy prefix, a window of 2 blocks, the next opening at 0.5 decided,
    threshold 0.9, block size 16; '2xverified#3' -> verified drafting two blocks, draft_depth 3;
    everything but the strategy optional."""
    m = re.fullmatch(r"(?:(\d+)x)?([a-z_-]+)(?:/([\d.]+))?(?::([\d.]+))?(?:#(\d+))?(?:@(\d+))?", text)
    if m is None:
        raise SystemExit(f"bad setting {text!r}: expected [BLOCKSx]strategy[/GATE][:threshold][#depth][@block]")
    blocks, strategy, gate, threshold, depth, block = m.groups()
    decode = {"strategy": strategy}
    if blocks:
        decode["blocks"] = int(blocks)
    if gate:
        decode["next_block_at"] = float(gate)
    if threshold:
        decode["threshold"] = float(threshold)
    if depth:
        decode["draft_depth"] = int(depth)
    if block:
        decode["block_size"] = int(block)
    group = (f"{blocks}x" if blocks else "") + strategy + (f"/{gate}" if gate else "") + (f"#{depth}" if depth else "")
    label = group + (f" {threshold}" if threshold else "") + (f" @{block}" if block else "")
    return Setting(group, label, decode)


if __name__ == "__main__":
    main()
