"""Flags more than one verb shares: the decode options (their defaults live in edlm.decode.options)
and the dtype models are loaded in."""

from __future__ import annotations

from edlm.decode.options import ENGINE_DEFAULTS
from edlm.decode.strategies import STRATEGIES

DECODE_FLAGS = {  # flag -> help; defaults are ENGINE_DEFAULTS, shown, and applied by edlm.decode.options
    "strategy": "commit rule: " + " | ".join(STRATEGIES),
    "threshold": "commit confidence threshold in (0, 1]",
    "block_size": "decode block size",
    "factor": "f of the factor strategy",
    "gamma": "entropy budget of the entropy strategy",
    "tokens_per_step": "k of the steps strategy",
    "draft_depth": "states drafted per verification forward (lossless, psd); verified: draft blocks beyond "
                   "the one for no accepted draft",
    "temperature": "sampling temperature (0 = greedy)",
    "top_p": "nucleus sampling mass",
    "seed": "sampling seed",
}
TYPES = {"strategy": str, "block_size": int, "tokens_per_step": int, "draft_depth": int, "seed": int}


def add_decode_flags(p, only=tuple(DECODE_FLAGS)) -> None:
    """The decode-option flags, with the defaults that apply when one is not given."""
    for name in only:
        default = ENGINE_DEFAULTS.get(name)
        shown = "the model's" if name == "block_size" else f"the model's, else {default}"
        p.add_argument("--" + name.replace("_", "-"), type=TYPES.get(name, float), default=None,
                       help=f"{DECODE_FLAGS[name]} (default: {shown})")


def decode_flags(args) -> dict:
    return {name: getattr(args, name) for name in DECODE_FLAGS if hasattr(args, name)}


DTYPES = ("auto", "float32", "bfloat16")


def add_dtype_flag(p) -> None:
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights and compute dtype (default auto: bfloat16 on CUDA, float32 on CPU). bfloat16 on "
                   "a CPU pays only with native bf16 dot products (AVX512-BF16, AMX): the demo dLM's batch-8 "
                   "forward is 1.5x faster on such a CPU, and bf16 is ~25x slower on AVX2-only ones")


def dtype_flag(args):
    """The torch dtype --dtype names (None: the engine's default for the device)."""
    import torch

    return None if args.dtype == "auto" else getattr(torch, args.dtype)
