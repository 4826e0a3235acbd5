"""Flags more than one verb shares: the decode options (declared, with their defaults, in
edlm.decode.options), the dtype models are loaded in and whether they decode compiled."""

from __future__ import annotations

from dataclasses import MISSING

from edlm.decode.options import declared_options, option_names


def add_decode_flags(p, only=option_names()) -> None:
    """A flag per decode option, from its declaration, with the default that applies when one is
    not given (None here: edlm.decode.options resolves it, so the checkpoint's config can win)."""
    unknown = sorted(set(only) - set(option_names()))
    if unknown:
        raise ValueError(f"no decode option {unknown[0]!r}")
    for spec in (s for s in declared_options() if s.name in only):
        shown = "the model's" if spec.default is MISSING else f"the model's, else {spec.default}"
        span = "" if spec.kind is str else f", {spec.span()}"
        p.add_argument("--" + spec.name.replace("_", "-"), type=spec.kind, default=None,
                       help=f"{spec.help}{span} (default: {shown})")


def decode_flags(args) -> dict:
    return {name: getattr(args, name) for name in option_names() if hasattr(args, name)}


DTYPES = ("auto", "float32", "bfloat16")


def add_dtype_flag(p) -> None:
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights and compute dtype (default auto: bfloat16 on CUDA, float32 on CPU). bfloat16 on "
                   "a CPU pays only with native bf16 dot products (AVX512-BF16, AMX): the demo dLM's batch-8 "
                   "forward is 1.5x faster on such a CPU, and bf16 is ~25x slower on AVX2-only ones")


def add_compile_flag(p) -> None:
    p.add_argument("--compile", nargs="?", const="graph", choices=["graph", "aot"], default=None,
                   help="decode through torch.compile (DiffusionLM.compile): the first calls of each shape class "
                   "compile for seconds, later forwards run faster (the demo dLM's ~0.6x the time on a CPU); "
                   "for servers, benches and long jobs. `--compile aot` also exports the decode steps' forward "
                   "as one ahead-of-time compiled program (no guards, a C++ wrapper: ~15%% less per step on a "
                   "CPU; ~15 s more to load the first time, then the program is kept in ~/.cache/edlm/aot for later "
                   "loads, EDLM_CACHE_DIR=off keeps none; fp32 or a GPU, dense text models). Needs a C++ compiler "
                   "on a CPU")


def dtype_flag(args):
    """The torch dtype --dtype names (None: the engine's default for the device)."""
    import torch

    return None if args.dtype == "auto" else getattr(torch, args.dtype)
