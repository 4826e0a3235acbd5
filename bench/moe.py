"""TEAM on the MoE demo (issue 28): plain prefix/threshold decoding against each TEAM mechanism alone and
all three, on the same held-out problems, against the MoE AR parent: accuracy, tokens per forward
(TPF), expert activations per committed token (distinct (layer, expert) weights run: what a forward
loads; and token-expert pairs: what it multiplies), tokens/s and AUP.

    python bench/moe.py --limit 500 --out bench/results/moe-cpu             # accuracy, TPF, experts
    python bench/moe.py --timed --limit 100 --teams off all --out bench/results/moe-cpu   # tokens/s

Both decode at batch 1, TEAM's own setting: exploration moves a batch's rows on to their next block
together, so at a larger batch a row waits, computed, for the slowest (TPF falls with the batch).
`--timed` decodes the settings and HF generate of the parent interleaved (run it on a quiet
machine). Counts cover every forward of a decode, the prompt's included.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEAMS = ("off", "cache", "cold", "explore", "all")
RULES = (("prefix", 0.9), ("threshold", 0.95), ("threshold", 0.7))


def counting_runner(dlm, max_new_tokens: int, counts: dict, **decode):
    """edlm.recipes.bench's runner contract, adding the expert counts of every call into `counts`."""

    def run(prompts):
        res = dlm.generate(prompts, max_new_tokens=max_new_tokens, **decode)
        hist: dict[int, int] = {}
        for s in res.stats:
            counts["activations"] += s.expert_activations
            counts["pairs"] += s.expert_pairs
            counts["tokens"] += s.generated_tokens
            for k, v in s.steps_histogram.items():
                hist[k] = hist.get(k, 0) + v
        return res.texts, sum(s.generated_tokens for s in res.stats), sum(s.model_calls for s in res.stats), hist

    return run


def main() -> None:
    from edlm.model import DiffusionLM
    from edlm.recipes.bench import aup, hf_runner, load_examples, measure_together

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dlm", default=str(ROOT / "models/moe-dlm"))
    ap.add_argument("--parent", default=str(ROOT / "models/moe-ar"))
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=1, help="decode batch (default 1)")
    ap.add_argument("--teams", nargs="+", default=list(TEAMS), help=f"team settings (default {' '.join(TEAMS)})")
    ap.add_argument("--rules", nargs="+", default=[f"{s}:{t}" for s, t in RULES],
                    help="STRATEGY:THRESHOLD of each rule (default: " + " ".join(f"{s}:{t}" for s, t in RULES) + ")")
    ap.add_argument("--timed", action="store_true", help="tokens/s, interleaved with HF generate and the AR engine")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rules = [(r.split(":")[0], float(r.split(":")[1])) for r in args.rules]
    examples = load_examples("reasoning", args.limit)
    ar = DiffusionLM.from_pretrained(args.parent, autoregressive=True)
    dlm = DiffusionLM.from_pretrained(args.dlm)
    counts: dict[str, dict] = {}

    def settings():
        out = []
        for strategy, threshold in rules:
            for team in args.teams:
                name = f"{strategy} {threshold} team={team}"
                counts[name] = {"activations": 0, "pairs": 0, "tokens": 0}
                out.append((name, counting_runner(dlm, 96, counts[name], strategy=strategy, threshold=threshold,
                                                  team=team)))
        return out

    rows = []
    if args.timed:
        parent_counts = counts.setdefault("AR engine (parent)", {"activations": 0, "pairs": 0, "tokens": 0})
        runs = [("HF generate (parent)", hf_runner(ar, 96)),
                ("AR engine (parent)", counting_runner(ar, 96, parent_counts))] + settings()
        rows = measure_together(runs, examples, batch_size=args.batch_size)
        for row in rows:
            row["x_hf"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    else:
        parent_counts = counts.setdefault("AR parent", {"activations": 0, "pairs": 0, "tokens": 0})
        rows += measure_together([("AR parent", counting_runner(ar, 96, parent_counts))], examples, args.batch_size)
        rows += measure_together(settings(), examples, args.batch_size)
    for row in rows:
        c = counts.get(row["name"])
        if c and c["tokens"]:
            row["activations_per_token"] = c["activations"] / c["tokens"]
            row["pairs_per_token"] = c["pairs"] / c["tokens"]
    lines = table(rows, args.timed)
    if not args.timed:
        y_max = 100 * rows[0]["accuracy"]
        lines += ["", f"AUP over the `threshold` rows (y_max = the parent's {y_max:.1f}%):"]
        for team in args.teams:
            pts = [(r["tpf"], 100 * r["accuracy"]) for r in rows if r["name"].startswith("threshold")
                   and r["name"].endswith(f"team={team}")]
            if pts:  # no threshold rule asked for: no AUP
                lines.append(f"- team={team}: {aup(pts, y_max):.0f}")
        lines += vs_plain(rows)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "timed" if args.timed else "results"
        (out / f"{stem}.json").write_text(json.dumps({"limit": args.limit, "rows": rows}, indent=1, default=str) + "\n")
        (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
        if not args.timed:
            plot(rows, out / "experts.png")
    print("\n".join(lines))


def table(rows, timed: bool) -> list[str]:
    head = "| setting | batch | accuracy | TPF | experts/token | pairs/token | tokens/s |" + (" x HF |" if timed else "")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    def fmt(r, key, spec):
        return format(r[key], spec) if r.get(key) else "-"

    for r in rows:
        lines.append(f"| {r['name']} | {r['batch_size']} | {100 * r['accuracy']:.1f}% | {fmt(r, 'tpf', '.2f')} | "
                     f"{fmt(r, 'activations_per_token', '.1f')} | {fmt(r, 'pairs_per_token', '.1f')} | "
                     f"{r['tokens_per_s']:.0f} |" + (f" {r['x_hf']:.2f} |" if timed else ""))
    return lines


def vs_plain(rows) -> list[str]:
    """Each TEAM row against the same rule without TEAM: activations saved, accuracy moved."""
    plain = {r["name"].rsplit(" team=", 1)[0]: r for r in rows if r["name"].endswith("team=off")}
    lines = ["", "Against the same rule without TEAM (activations per committed token, accuracy):", ""]
    for r in rows:
        rule, _, team = r["name"].rpartition(" team=")
        base = plain.get(rule)
        if base is None or team in ("", "off") or not base.get("activations_per_token"):
            continue
        saved = 1 - r["activations_per_token"] / base["activations_per_token"]
        lines.append(f"- {r['name']}: activations {-100 * saved:+.0f}%, pairs {r['pairs_per_token']:.1f} vs "
                     f"{base['pairs_per_token']:.1f}, accuracy {100 * (r['accuracy'] - base['accuracy']):+.1f} points, "
                     f"TPF {r['tpf']:.2f} vs {base['tpf']:.2f}")
    return lines


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for team in TEAMS:
        pts = [(r["activations_per_token"], 100 * r["accuracy"]) for r in rows
               if r["name"].endswith(f"team={team}") and r.get("activations_per_token")]
        if pts:
            ax.scatter(*zip(*pts, strict=True), label=f"team={team}")
    parent = rows[0]
    if parent.get("activations_per_token"):
        ax.scatter([parent["activations_per_token"]], [100 * parent["accuracy"]], marker="*", s=150, c="k",
                   label="MoE AR parent")
    ax.set_xlabel("expert activations per committed token (distinct layer-experts run)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("TEAM on the MoE demo dLM")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
