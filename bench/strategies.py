"""Decoding strategies side by side: accuracy, TPF and tokens/s on the same model, in one run.

    python bench/strategies.py [--models models] [--limit 100] [--draft-depth 4] [--out bench/results]

--models is a dir holding ar/ and dlm/ (the shipped demo models; `make models` builds them).
Settings: the AR parent through the engine (speed-up baseline), one-token-per-step greedy
("steps k=1", what lossless must equal), lossless, threshold 0.9/0.7/0.5 for reference, then
prefix, psd, soft and wino. Batch 1, untimed warm-up per setting, tokens/s counts generated tokens only.
Also checks that lossless reproduces steps k=1 token for token on the first problems.
Writes strategies.md, strategies.json and strategies.png to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = [  # (label, decode options)
    ("steps k=1", {"strategy": "steps", "tokens_per_step": 1}),
    ("lossless", {"strategy": "lossless"}),
    ("threshold 0.9", {"strategy": "threshold", "threshold": 0.9}),
    ("threshold 0.7", {"strategy": "threshold", "threshold": 0.7}),
    ("threshold 0.5", {"strategy": "threshold", "threshold": 0.5}),
    ("prefix 0.9", {"strategy": "prefix", "threshold": 0.9}),
    ("prefix 0.7", {"strategy": "prefix", "threshold": 0.7}),
    ("psd 0.9", {"strategy": "psd", "threshold": 0.9}),
    ("psd 0.7", {"strategy": "psd", "threshold": 0.7}),
    ("soft 0.9", {"strategy": "soft", "threshold": 0.9}),
    ("soft 0.7", {"strategy": "soft", "threshold": 0.7}),
    ("wino 0.7", {"strategy": "wino", "threshold": 0.7}),
    ("wino 0.5", {"strategy": "wino", "threshold": 0.5}),
]


def lossless_agreement(dlm, prompts: list[str], max_new_tokens: int, draft_depth: int) -> tuple[int, int]:
    """(prompts where lossless == steps k=1 token for token, prompts checked)."""
    ref = dlm.generate(prompts, max_new_tokens=max_new_tokens, strategy="steps", tokens_per_step=1).token_ids
    got = dlm.generate(prompts, max_new_tokens=max_new_tokens, strategy="lossless",
                       draft_depth=draft_depth).token_ids
    return sum(a == b for a, b in zip(ref, got, strict=True)), len(prompts)


def main(argv=None) -> int:
    import torch

    from edlm import DiffusionLM
    from edlm.errors import EdlmError
    from edlm.recipes.bench import engine_runner, load_examples, markdown, measure, plot

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=str(ROOT / "models"), help="dir holding ar/ and dlm/")
    ap.add_argument("--limit", type=int, default=100, help="held-out reasoning problems")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--draft-depth", type=int, default=4, help="draft_depth of lossless and psd")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)

    models = Path(args.models)
    missing = [str(models / sub) for sub in ("ar", "dlm") if not (models / sub / "config.json").is_file()]
    if missing:
        print(f"bench/strategies.py: error: no model at {', '.join(missing)}; build them with `make models` "
              "or pass --models DIR holding ar/ and dlm/", file=sys.stderr)
        return 2
    try:
        ar = DiffusionLM.from_pretrained(models / "ar", autoregressive=True)
        dlm = DiffusionLM.from_pretrained(models / "dlm")
        examples = load_examples("reasoning", args.limit)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{torch.get_num_threads()}threads"
        rows = [measure("AR (engine)", engine_runner(ar, args.max_new_tokens), examples, progress=False)]
        skipped = []  # (label, why): strategies this model cannot run, e.g. wino on a shift model
        for label, decode in SETTINGS:
            if decode["strategy"] in ("lossless", "psd"):
                decode = {**decode, "draft_depth": args.draft_depth}
            try:
                rows.append(measure(label, engine_runner(dlm, args.max_new_tokens, **decode), examples,
                                    progress=False))
            except EdlmError as exc:
                skipped.append((label, str(exc)))
                print(f"| {label} | skipped: {exc} |", flush=True)
                continue
            print(markdown([rows[0], rows[-1]]).splitlines()[-1], flush=True)
        same, checked = lossless_agreement(dlm, [e.prompt for e in examples[:8]], args.max_new_tokens,
                                           args.draft_depth)
    except EdlmError as exc:
        print(f"bench/strategies.py: error: {exc}", file=sys.stderr)
        return 2

    table = markdown(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"decoding strategies, {models / 'dlm'} on {device}"
    md = [f"# {title}\n", f"{len(examples)} held-out reasoning problems, batch 1, max {args.max_new_tokens} "
          f"new tokens, draft depth {args.draft_depth}. Speed-up is over the AR parent on the same engine.\n",
          table, f"\nlossless == steps k=1 token for token on {same}/{checked} problems "
          "(differences can only come from floating-point near-ties between forwards).\n"]
    md += [f"Not run: {label} ({why})." for label, why in skipped]
    (out / "strategies.md").write_text("\n".join(md))
    (out / "strategies.json").write_text(json.dumps(
        {"device": device, "platform": platform.platform(), "torch": torch.__version__, "models": str(models),
         "draft_depth": args.draft_depth, "lossless_agreement": [same, checked], "skipped": skipped,
         "rows": rows}, indent=1))
    plot(rows, out / "strategies.png", title="decoding strategies")
    print(table)
    print(f"wrote {out / 'strategies.md'}, strategies.json, strategies.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
