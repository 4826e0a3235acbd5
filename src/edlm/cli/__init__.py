"""`edlm <verb>`: one small module per verb in this package, each with `add_parser(sub)` (its flags,
help and defaults) and `run(args)` (calls one recipe). EdlmError becomes one line + exit code 2.

Only the verb being run is imported (its module pulls in torch and transformers), so `edlm --help`
and `edlm --version` import none; VERBS holds the one-line help they list.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import typing

from edlm.errors import EdlmError

VERBS = {  # verb -> its one-line help, equal to the one its module declares (tests/test_cli_habits.py)
    "convert": "turn a HF causal LM into an edlm block-diffusion checkpoint",
    "train": "continuous pretraining (block diffusion) on accelerate",
    "generate": "generate text with parallel block decoding",
    "demo": "AR vs dLM on the built-in reasoning set: table + plot",
    "bench": "accuracy vs tokens/s of a dLM against its AR base, in one run",
    "eval": "evaluate on lm-evaluation-harness tasks (local data only)",
    "study": "the paper's attention / masking / block-size studies at small scale",
    "serve": "OpenAI-compatible server: completions, chat, embeddings",
    "embed": "embed texts (mean-pooled, bidirectional attention)",
    "export": "export for SGLang / LMDeploy (SDAR format) or as a plain HF checkpoint",
    "distill-data": "write a model's own answers to prompts as training data (jsonl prompt/response)",
}
SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a tool whose reader went away


class HelpWithDefaults(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless the text already states one, or there is
    none to show (None: the help says what applies; a switch: off unless given)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.required or action.nargs == 0 or default is None
                or default is argparse.SUPPRESS or "default" in text):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class _OneLineErrors(argparse.ArgumentParser):
    """A bad flag is one line on stderr and exit 2, like every other user mistake."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _VerbParser(_OneLineErrors):
    """A verb's parser: shows defaults in --help unless its module picks another formatter."""

    def __init__(self, *args, formatter_class=HelpWithDefaults, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edlm")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "unknown (not installed)"


def _quiet_libraries() -> None:
    """No hub at run time, no library chatter. Set through the environment variables the libraries
    read at import, so nothing is imported for it (datasets alone costs ~0.4 s, and most verbs never
    use it); a library already imported (a caller's own, a test's) is told directly."""
    for var, value in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
                       "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' bars too ("Writing model shards")
                       "DATASETS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}.items():
        os.environ.setdefault(var, value)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


def build_parser(verbs=None) -> argparse.ArgumentParser:
    """The whole CLI; with `verbs`, only those verbs' flags and a bare entry (name, help) for the others."""
    parser = _OneLineErrors(prog="edlm", description="Turn an AR language model into a fast "
                                     "block-diffusion LM: convert, train, generate, benchmark, serve.")
    parser.add_argument("--version", action="version", version=f"edlm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>", parser_class=_VerbParser)
    for verb, help_line in VERBS.items():
        if verbs is None or verb in verbs:
            importlib.import_module(f"edlm.cli.{verb.replace('-', '_')}").add_parser(sub)  # distill-data: distill_data.py
        else:
            sub.add_parser(verb, help=help_line)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in VERBS else None  # the verb is the first word, if any
    try:
        _quiet_libraries()  # first: huggingface_hub reads HF_HUB_OFFLINE when a verb's module imports it
        args = build_parser(verbs=[command] if command else []).parse_args(argv)
        args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers, not at interpreter exit
    except EdlmError as exc:
        print(f"edlm {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # also while the verb's libraries are still importing
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `edlm embed ... | head -c 300`: the reader has what it wanted
        _drop_stdout()
        return SIGPIPE_EXIT
    return 0


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit cannot fail a second time."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file behind stdout (a test's capture)
        pass
