"""`edlm train`: its flags are generated from edlm.train.TrainConfig (help and defaults included)."""

from __future__ import annotations

import argparse
import os
import types
import typing
from dataclasses import MISSING, fields

from edlm.train.config import TrainConfig, flag, flag_fields
from edlm.train.data import DataFields

FIELD_FLAGS = {f.name: f"--{f.name}-field" for f in fields(DataFields)}  # --text-field etc.


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Show a field's default unless it is None (then the help says what applies)."""

    def _get_help_string(self, action):
        if action.default is None or action.required or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="continuous pretraining (block diffusion) on accelerate",
                       formatter_class=_Defaults,
                       description="Train MODEL (converted dir, or AR dir converted on the fly) on local data. "
                       "Multi-GPU: accelerate launch --config_file configs/ddp.yaml -m edlm.cli train ... "
                       "Example: edlm train ./qwen3-dlm --data corpus.jsonl --out runs/q --steps 1000")
    for f in flag_fields():
        if f.name == "fields":
            continue
        _add(p, f)
    for name, option in FIELD_FLAGS.items():
        p.add_argument(option, default=getattr(DataFields(), name), help=f"data column holding the {name}")
    p.set_defaults(func=run)
    p.error = types.MethodType(_one_line_error, p)


def _one_line_error(parser, message: str) -> typing.NoReturn:
    """A bad flag is one line on stderr and exit 2, like every other `edlm train` input error."""
    import sys

    print(f"edlm train: error: {message} (see edlm train --help)", file=sys.stderr)
    raise SystemExit(2)


def _add(p, f) -> None:
    """One flag from one dataclass field: its type, default, help and choices."""
    meta, kind = f.metadata, _base_type(f.name)
    kwargs = {"help": meta.get("help", "").replace("%", "%%")}
    if "choices" in meta:
        kwargs["choices"] = meta["choices"]
    if meta.get("positional"):
        p.add_argument(f.name, **kwargs)
        return
    required = f.default is MISSING and f.default_factory is MISSING
    default = None if required else (f.default if f.default is not MISSING else f.default_factory())
    if kind is bool:
        p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default, **kwargs)
    elif kind is list:
        p.add_argument(flag(f.name), nargs="+", required=required, default=default, **kwargs)
    else:
        p.add_argument(flag(f.name), type=kind, required=required, default=default, **kwargs)


def _base_type(name: str) -> type:
    """The flag type of a field: int | None -> int, list[str] | None -> list."""
    annotation = typing.get_type_hints(TrainConfig)[name]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return list if typing.get_origin(annotation) is list else annotation


def run(args) -> None:
    from edlm.train import train

    values = {f.name: getattr(args, f.name) for f in flag_fields() if f.name != "fields"}
    data_fields = DataFields(**{name: getattr(args, option[2:].replace("-", "_"))
                                for name, option in FIELD_FLAGS.items()})
    final = train(TrainConfig(**values, fields=data_fields))
    if os.environ.get("RANK", "0") == "0":
        print(f"trained model written to {final}")
