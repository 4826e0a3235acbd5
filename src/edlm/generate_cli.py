"""`edlm generate`: stream a completion block by block and print a stats line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edlm.errors import EdlmError


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with parallel block decoding",
                       description="Decode PROMPT with MODEL (a converted edlm dir; --ar for a plain AR dir). "
                       "Example: edlm generate models/dlm --prompt 'Question: ...' --threshold 0.9")
    p.add_argument("model", help="converted edlm model directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threshold", type=float, default=None,
                   help="commit confidence threshold in (0, 1] (default: the model's, else 0.9)")
    p.add_argument("--strategy", default=None,
                   help="threshold | prefix | factor | entropy | steps | lossless | psd | soft | wino "
                        "(default: the model's, else threshold)")
    p.add_argument("--block-size", type=int, default=None, help="decode block size (default: the model's)")
    p.add_argument("--factor", type=float, default=1.0, help="f of the factor strategy")
    p.add_argument("--gamma", type=float, default=0.5, help="entropy budget of the entropy strategy")
    p.add_argument("--tokens-per-step", type=int, default=1, help="k of the steps strategy")
    p.add_argument("--draft-depth", type=int, default=4, help="states drafted per verification (lossless, psd)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ar", action="store_true", help="MODEL is a plain AR checkpoint (block size 1 baseline)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=run)


def run(args) -> None:
    from edlm.model import DiffusionLM

    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise EdlmError(f"prompt file not found: {path}")
        prompt = path.read_text()
    else:
        prompt = args.prompt
    dlm = DiffusionLM.from_pretrained(args.model, autoregressive=args.ar)
    kwargs = dict(max_new_tokens=args.max_new_tokens, threshold=args.threshold, strategy=args.strategy,
                  block_size=args.block_size, temperature=args.temperature, top_p=args.top_p, stop=args.stop,
                  factor=args.factor, gamma=args.gamma, tokens_per_step=args.tokens_per_step, seed=args.seed,
                  draft_depth=args.draft_depth)
    if args.json:
        res = dlm.generate(prompt, **kwargs)
        print(json.dumps({"text": res.texts[0], "token_ids": res.token_ids[0],
                          "finish_reason": res.finish_reasons[0], **res.stats[0].to_dict()}))
        return

    def show(event):
        sys.stdout.write(event.text)
        sys.stdout.flush()

    res = dlm.generate(prompt, on_block=show, **kwargs)
    s = res.stats[0]
    print()
    print(f"[{s.generated_tokens} tokens, {s.model_calls} model calls, TPF {s.tpf:.2f}, "
          f"{s.generated_tokens / max(s.seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
