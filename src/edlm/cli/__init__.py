"""`edlm <verb>`: one small module per verb in this package, each with `add_parser(sub)` (its flags,
help and defaults) and `run(args)` (calls one recipe). EdlmError becomes one line + exit code 2.

Modules import only argparse and their recipe's defaults at top level, so `edlm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from edlm.errors import EdlmError

VERBS = ("convert", "train", "generate", "demo", "bench", "eval", "study", "serve", "embed", "export")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edlm", description="Turn an AR language model into a fast "
                                     "block-diffusion LM: convert, train, generate, benchmark, serve.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for verb in VERBS:
        importlib.import_module(f"edlm.cli.{verb}").add_parser(sub)
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
