"""Decode options: their defaults, their precedence and their checks, stated once.

Precedence, field by field: what the caller sets (None = unset) > the checkpoint's own `decoding`
config (`config.json` -> "edlm" -> "decoding", like transformers' generation_config) > the engine
defaults below. Every entrance (Python API, `edlm generate`, `edlm serve`, lm-eval, bench, demo,
export) resolves through `DecodeOptions.resolve`, so a default or a rule is never restated.

Checks against the model bound the work of one call: the block size fits the context, prompt +
budget fits the context, and one forward never feeds more tokens than the context holds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from edlm.decode.state import encode_prompts
from edlm.decode.strategies import STRATEGIES, Strategy
from edlm.errors import EdlmError

DEFAULT_MAX_NEW_TOKENS = 128
ENGINE_DEFAULTS = {"strategy": "threshold", "threshold": 0.9, "temperature": 0.0, "top_p": 1.0, "factor": 1.0,
                   "gamma": 0.5, "tokens_per_step": 1, "draft_depth": 4, "seed": None}


class DecodeOptionError(EdlmError):
    """A decode option a user set is out of range or does not fit the model; names the option."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class DecodeOptions:
    """What every row of one engine call shares, resolved and checked (build it with `resolve`)."""

    block_size: int
    strategy: str
    threshold: float
    temperature: float
    top_p: float
    factor: float
    gamma: float
    tokens_per_step: int
    draft_depth: int
    seed: int | None = None

    @property
    def algorithm(self) -> Strategy:
        return STRATEGIES[self.strategy]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def resolve(cls, dlm, **given) -> DecodeOptions:
        """Caller values (None = unset) > the checkpoint's `decoding` config > engine defaults."""
        names = option_names()
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise EdlmError(f"unknown decode option {unknown[0]!r}; options are {', '.join(names)}")
        given = {k: v for k, v in given.items() if v is not None}
        stored = {k: v for k, v in (dlm.config.decoding or {}).items() if k in names}
        opts = cls(**{**ENGINE_DEFAULTS, "block_size": dlm.config.block_size, **stored, **given})
        opts.check(dlm)
        return opts

    def check(self, dlm) -> None:
        """Ranges (of every option, read or not: a typo never waits for the strategy that reads it),
        the strategy's constraints and the model's context."""
        if isinstance(self.block_size, int) and not isinstance(self.block_size, bool) and self.block_size < 1:
            raise DecodeOptionError("block_size", f"block size must be >= 1, got {self.block_size}")
        _integer("block_size", self.block_size, 1)
        limit = dlm.max_positions
        if limit is not None and self.block_size > limit:
            raise DecodeOptionError("block_size", f"block size {self.block_size} exceeds the model's {limit} positions")
        if not dlm.config.diffusion and self.block_size != 1:
            raise DecodeOptionError("block_size", "an autoregressive model decodes with block size 1")
        if self.strategy not in STRATEGIES:
            raise DecodeOptionError("strategy", f"unknown strategy {self.strategy!r}; choose from "
                                    f"{', '.join(STRATEGIES)}")
        _number("threshold", self.threshold, 0.0, 1.0, low_open=True)
        _number("temperature", self.temperature, 0.0, 2.0)
        _number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _number("factor", self.factor, 0.0, math.inf, low_open=True)
        _number("gamma", self.gamma, 0.0, math.inf)
        _integer("tokens_per_step", self.tokens_per_step, 1)
        _integer("draft_depth", self.draft_depth, 1)
        if self.seed is not None:
            _integer("seed", self.seed, 0)
        algo = self.algorithm
        if algo.greedy_only and self.temperature > 0:
            raise DecodeOptionError("temperature", f"strategy {algo.name!r} decodes greedily: use temperature 0 "
                                    "(or leave it unset)")
        if algo.needs_no_shift and dlm.config.shift:
            raise DecodeOptionError("strategy", f"strategy {algo.name!r} needs a model trained without token "
                                    "shift; this one predicts token i at position i-1")
        if algo.needs_ar_stream and not (dlm.config.causal_clean or dlm.config.shift):
            raise DecodeOptionError("strategy", f"strategy {algo.name!r} verifies with the model's clean stream as an "
                                    "AR model: train it with --ar-loss-weight (or use a --shift model)")
        if "draft_depth" in algo.reads and limit is not None and self.draft_depth * self.block_size > limit:
            raise DecodeOptionError("draft_depth", f"draft_depth {self.draft_depth} x block size {self.block_size} "
                                    f"tokens in one forward exceed the model's {limit} positions")


def option_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(DecodeOptions))


def _integer(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodeOptionError(name, f"{name} must be an integer, got {value!r}")
    if value < low:
        raise DecodeOptionError(name, f"{name} must be >= {low}, got {value}")


def _number(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DecodeOptionError(name, f"{name} must be a number, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high) else f"> {low:g}"
        raise DecodeOptionError(name, f"{name} must be in {span}, got {value}")


# ------------------------------------------------------------------ per-row inputs
def resolve_rows(dlm, prompts, max_new_tokens, stop) -> tuple[list[list[int]], list[int], list[list[str]]]:
    """Token ids, budget and stop strings of each row, checked against the model's context.

    max_new_tokens: one for all rows or one per row; None = until EOS or the end of the context.
    A prompt + budget beyond the context is an error, not a silent cut. stop: a string, one list
    for all rows, or one list per row.
    """
    ids = encode_prompts(dlm, prompts)
    n = len(ids)
    budget = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * n
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    stops = [list(x) for x in stop] if stop and isinstance(stop[0], (list, tuple)) else [stop] * n
    if len(budget) != n or len(stops) != n:
        raise EdlmError(f"{n} prompts but {len(budget)} max_new_tokens and {len(stops)} stop lists")
    if any(not isinstance(s, str) for row in stops for s in row):
        raise EdlmError("stop strings must be strings")
    limit = dlm.max_positions
    for i, (b, p) in enumerate(zip(budget, ids, strict=True)):
        if limit is not None and len(p) >= limit:
            raise DecodeOptionError("prompt", f"prompt has {len(p)} tokens; the model handles at most {limit} "
                                    "positions")
        if b is None:
            budget[i] = limit - len(p) if limit is not None else DEFAULT_MAX_NEW_TOKENS
            continue
        _integer("max_new_tokens", b, 1)
        if limit is not None and len(p) + b > limit:
            raise DecodeOptionError("max_new_tokens", f"prompt of {len(p)} tokens + max_new_tokens {b} exceed the "
                                    f"model's {limit} positions (at most {limit - len(p)} new tokens fit)")
    return ids, budget, stops
