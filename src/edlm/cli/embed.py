"""`edlm embed`: print embedding vectors (JSON) or a dims + norm summary per text."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("embed", help="embed texts (mean-pooled, bidirectional attention)",
                       description="Embed each --text with MODEL (a converted edlm dir): mean-pooled last hidden "
                       "state under a bidirectional mask, L2-normalised (paper Sec. 5.3). "
                       "Example: edlm embed models/dlm --text 'a cat' --text 'a dog' --json")
    p.add_argument("model", help="converted edlm model directory")
    p.add_argument("--text", action="append", required=True, help="text to embed (repeatable)")
    p.add_argument("--json", action="store_true", help="print the vectors as one JSON object")
    p.set_defaults(func=run)


def run(args) -> None:
    from edlm.model import DiffusionLM

    dlm = DiffusionLM.from_pretrained(args.model)
    vectors = dlm.embed(args.text)
    if args.json:
        print(json.dumps({"model": args.model, "dim": vectors.shape[1], "embeddings": vectors.tolist()}))
        return
    for text, v in zip(args.text, vectors, strict=True):
        head = " ".join(f"{x:+.4f}" for x in v[:4].tolist())
        print(f"dim {v.numel()}  norm {v.norm():.4f}  [{head} ...]  {text!r}")
    if len(args.text) > 1:
        sims = vectors @ vectors.T
        print("cosine similarity:")
        for row in sims.tolist():
            print("  " + " ".join(f"{s:.3f}" for s in row))
