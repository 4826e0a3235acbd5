"""`edlm <verb>`: parse arguments, call one recipe, turn EdlmError into one line + exit 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from edlm.errors import EdlmError


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


# ---------------------------------------------------------------- verbs
def cmd_convert(args) -> None:
    from edlm.convert import convert

    dlm = convert(args.base, args.out, block_size=args.block_size, mask_token=args.mask_token,
                  shift=args.shift, force=args.force)
    mask = dlm.tokenizer.convert_ids_to_tokens(dlm.config.mask_token_id)
    print(f"converted {args.base} -> {args.out} (block_size={dlm.config.block_size}, "
          f"mask token {mask!r} id {dlm.config.mask_token_id}, shift={dlm.config.shift})")


def cmd_train(args) -> None:
    from edlm.data import DataFields
    from edlm.train import TrainConfig, train

    fields = DataFields(args.text_field, args.prompt_field, args.response_field, args.messages_field)
    names = [f for f in TrainConfig.__dataclass_fields__ if f != "fields"]
    cfg = TrainConfig(**{n: getattr(args, n) for n in names if hasattr(args, n)}, fields=fields)
    final = train(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"trained model written to {final}")


# ---------------------------------------------------------------- parser
# Each module defines add_parser(sub): its sub-parser, with set_defaults(func=callable(args)).
# Modules import only argparse at top level, so `edlm --help` stays fast.
VERB_MODULES = [
    "edlm.generate_cli",
    "edlm.demo",
    "edlm.eval_cli",
    "edlm.bench",
    "edlm.study",
    "edlm.serve_cli",
    "edlm.embed_cli",
    "edlm.export",
]

def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="turn a HF causal LM into an edlm block-diffusion checkpoint",
                       description="Convert BASE (a local HF causal-LM dir) into a dLM checkpoint at OUT. "
                       "Example: edlm convert ./Qwen3-0.6B ./qwen3-dlm --block-size 32")
    p.add_argument("base", help="local Hugging Face checkpoint directory of a causal LM")
    p.add_argument("out", help="output directory (a normal HF checkpoint + edlm settings)")
    p.add_argument("--block-size", type=int, default=32, help="diffusion block size L' (default 32)")
    p.add_argument("--mask-token", default=None,
                   help="token to use as mask: an existing token, or a new one to add (default: the "
                   "tokenizer's mask_token, else a new <|mask|>; <|MASK|> on Qwen3, as SDAR)")
    p.add_argument("--shift", action="store_true", help="predict token i from position i-1 (default: no shift)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty OUT")
    p.set_defaults(func=cmd_convert)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="continuous pretraining (block diffusion) on accelerate",
                       description="Train MODEL (converted dir, or AR dir converted on the fly) on local data. "
                       "Multi-GPU: accelerate launch --config_file configs/ddp.yaml -m edlm.cli train ... "
                       "Example: edlm train ./qwen3-dlm --data corpus.jsonl --out runs/q --steps 1000")
    p.add_argument("model", help="converted edlm dir, or a HF AR dir (converted with --block-size etc.)")
    p.add_argument("--data", nargs="+", required=True, help=".txt/.jsonl/.parquet files or one HF dataset dir")
    p.add_argument("--out", required=True, help="run directory: checkpoints/, metrics.jsonl, model/")
    p.add_argument("--val-data", nargs="+", default=None, help="held-out files for validation loss")
    p.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction of --data instead")
    p.add_argument("--objective", default="diffusion", choices=["diffusion", "ar"],
                   help="diffusion (default) or ar: plain causal-LM training (baseline / AR parent)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--mask-token", default=None)
    p.add_argument("--shift", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--attention", default="clean", help="clean (default) | noisy | bidirectional")
    p.add_argument("--masking", default="position", help="position (default) | uniform | reverse (right-to-left study)")
    p.add_argument("--half-life", type=float, default=0.1, help="lambda of position-dependent masking")
    p.add_argument("--t-per-block", action="store_true", help="one noise level per block, not per sequence")
    p.add_argument("--t-min", type=float, default=1e-3)
    p.add_argument("--complementary", action="store_true", help="also train each sample with the inverse mask")
    p.add_argument("--repair-fraction", type=float, default=0.0,
                   help="DMax-style on-policy training: fill this fraction of masked tokens with the model's own "
                   "argmax draft (still scored), teaching it to repair its drafts (for --strategy soft/wino)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="per process and micro-step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--min-lr", type=float, default=3e-6)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0 = full training)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--attn-implementation", default="sdpa")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--text-field", default="text")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--response-field", default="response")
    p.add_argument("--messages-field", default="messages")
    p.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edlm", description="Turn an AR language model into a fast "
                                     "block-diffusion LM: convert, train, generate, benchmark, serve.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    _add_convert(sub)
    _add_train(sub)
    for name in VERB_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        args.func(args)
    except EdlmError as exc:
        print(f"edlm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
