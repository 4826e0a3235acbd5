"""Decode options: each one declared once, with its default, range, help and readers; their
precedence and their checks.

Every option is one field of `DecodeOptions` made by `_option` (as TrainConfig's fields are):
its engine default, type, range, help text and the strategies that read it (`read_by`). The engine
defaults, the range checks, the `edlm generate` flags (edlm.cli.common), the server's request
fields (edlm.serve.app) and each strategy's `reads` (edlm.decode.strategies) are derived from
that declaration, so adding an option is adding one field.

Precedence, field by field: what the caller sets (None = unset) > the checkpoint's own `decoding`
config (`config.json` -> "edlm" -> "decoding", like transformers' generation_config) > the engine
defaults. Every entrance (Python API, `edlm generate`, `edlm serve`, lm-eval, bench, demo,
export) resolves through `DecodeOptions.resolve`, so a default or a rule is never restated; the
two-model mode (a dLM drafts, its AR parent verifies) resolves through `resolve_parent_verified`.

Checks against the model bound the work of one call: the block size fits the context, prompt +
budget fits the context, and one forward never feeds more tokens than the context holds.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields

from edlm.decode.state import encode_prompts
from edlm.decode.strategies import STRATEGIES, Strategy, declare_reads, strategies_reading, strategy_names
from edlm.decode.team import SETTINGS as TEAM_SETTINGS
from edlm.decode.team import mechanisms as team_mechanisms
from edlm.errors import EdlmError
from edlm.moe import is_moe

DEFAULT_MAX_NEW_TOKENS = 128
_EVERY = strategy_names()
_SAMPLING = tuple(n for n, s in STRATEGIES.items() if not s.greedy_only)  # where temperature / top_p / seed act
_PLAIN = tuple(n for n, s in STRATEGIES.items() if s.rule is not None)  # one forward and a commit rule a step


class DecodeOptionError(EdlmError):
    """A decode option a user set is out of range or does not fit the model; names the option."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class OptionSpec:
    """What one decode option's declaration says; every entrance reads it from here."""

    name: str
    kind: type  # int | float | str
    default: object  # the engine default; MISSING: the model's (block_size)
    help: str
    read_by: tuple[str, ...]  # the strategies that read it
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    label: str = ""  # how range messages name it (default: its name)

    @property
    def nullable(self) -> bool:
        """None is a value of its own (seed None = unseeded), not just "unset"."""
        return self.default is None

    def span(self) -> str:
        """The range as messages print it: (0, 1], [0, 2], > 0, >= 1."""
        fmt = (lambda v: str(v)) if self.kind is int else (lambda v: f"{v:g}")
        if math.isfinite(self.high):
            return f"in {'(' if self.low_open else '['}{fmt(self.low)}, {fmt(self.high)}{')' if self.high_open else ']'}"
        return f"{'>' if self.low_open else '>='} {fmt(self.low)}"

    def check(self, value) -> None:
        """Type and range; the message names the option."""
        name, label = self.name, self.label or self.name
        if value is None and self.nullable:
            return
        if self.kind is str:
            if not isinstance(value, str) or (self.choices is not None and value not in self.choices):
                raise DecodeOptionError(name, f"unknown {label} {value!r}; choose from {', '.join(self.choices or ())}")
            return
        if self.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise DecodeOptionError(name, f"{name} must be an integer, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DecodeOptionError(name, f"{name} must be a number, got {value!r}")
        if (value < self.low or (self.low_open and value == self.low) or value > self.high
                or (self.high_open and value == self.high)):
            raise DecodeOptionError(name, f"{label} must be {self.span()}, got {value}")


def _option(default, help: str, *, kind: type = float, read_by: tuple[str, ...], **spec):
    """A DecodeOptions field carrying its declaration (spec: low, high, low_open, high_open,
    choices, label). default MISSING: no engine default, the model's own value applies."""
    unknown = sorted(set(read_by) - set(STRATEGIES))
    if unknown:  # a typo fails at import, not when the strategy silently ignores the option
        raise ValueError(f"read_by names no strategy: {unknown}")
    meta = {"spec": dict(kind=kind, default=default, help=help, read_by=tuple(read_by), **spec)}
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


@dataclass(frozen=True)
class DecodeOptions:
    """What every row of one engine call shares, resolved and checked (build it with `resolve`).

    Each field is one option's only declaration; see the module docstring for what derives from it."""

    block_size: int = _option(MISSING, "decode block size", kind=int, low=1, label="block size", read_by=_EVERY)
    strategy: str = _option("threshold", "commit rule: " + " | ".join(STRATEGIES), kind=str,
                            choices=strategy_names(), read_by=())  # it picks the strategy
    threshold: float = _option(0.9, "commit confidence threshold", low=0.0, high=1.0, low_open=True,
                               read_by=("threshold", "prefix", "psd", "soft", "wino"))
    temperature: float = _option(0.0, "sampling temperature (0 = greedy)", low=0.0, high=2.0, read_by=_SAMPLING)
    top_p: float = _option(1.0, "nucleus sampling mass", low=0.0, high=1.0, low_open=True, read_by=_SAMPLING)
    factor: float = _option(1.0, "f of the factor strategy", low=0.0, low_open=True, read_by=("factor",))
    gamma: float = _option(0.5, "entropy budget of the entropy strategy", low=0.0, read_by=("entropy",))
    tokens_per_step: int = _option(1, "k of the steps strategy", kind=int, low=1, read_by=("steps",))
    draft_depth: int = _option(4, "states drafted per verification forward (lossless, psd); verified: draft "
                               "blocks for the depth + 1 likeliest acceptance lengths", kind=int, low=0,
                               read_by=("lossless", "psd", "verified"))
    remask_below: float = _option(0.9, "WINO narrow-out: an earlier draft whose leave-one-out confidence is "
                                  "lower goes back to the mask", low=0.0, high=1.0, low_open=True, read_by=("wino",))
    blocks: int = _option(1, "blocks decoded at once (multi-block decoding, as d3LLM and D2F): the next block opens "
                          "while the current one still has masks, and sees it as it stands; verified: each draft "
                          "block is this many blocks wide, block-causal inside", kind=int, low=1,
                          read_by=(*_PLAIN, "verified"))
    next_block_at: float = _option(0.0, "multi-block decoding: a block's slots may commit once this fraction of the "
                                   "block before it is decided (0: at once)", low=0.0, high=1.0, high_open=True,
                                   read_by=_PLAIN)
    team: str = _option("off", "TEAM for mixture-of-experts dLMs (fewer expert activations per token): cache "
                        "(reuse decided tokens' MoE outputs), cold (limit far, unsure masked tokens to the experts "
                        "the others chose), explore (four block versions per forward), two joined by +, or all",
                        kind=str, choices=TEAM_SETTINGS, read_by=_PLAIN)
    seed: int | None = _option(None, "sampling seed", kind=int, low=0, high=2**63 - 1, read_by=_SAMPLING)

    @property
    def algorithm(self) -> Strategy:
        return STRATEGIES[self.strategy]

    def shares_calls_with(self, other: DecodeOptions) -> bool:
        """Whether rows with `other` may decode in the same engine call as rows with these: the same
        options, or two plain rules decoding greedily at one block size (each row then commits by its
        own rule and options: edlm.decode.strategies.rule_step), so a server mixes settings."""
        if self == other:
            return True
        plain = self.algorithm.rule is not None and other.algorithm.rule is not None
        same_window = (self.block_size, self.blocks, self.next_block_at) == \
            (other.block_size, other.blocks, other.next_block_at)
        return plain and same_window and self.temperature == other.temperature == 0 and self.team == other.team \
            and "explore" not in team_mechanisms(self.team)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def resolve(cls, dlm, **given) -> DecodeOptions:
        """Caller values (None = unset) > the checkpoint's `decoding` config for the chosen strategy
        (`stored_for`) > engine defaults. An option the caller sets that the chosen strategy does
        not read is an error naming both (CLI, Python, server alike), never silently ignored."""
        given = _known(given)
        decoding = dlm.config.decoding or {}
        strategy = given.get("strategy", decoding.get("strategy", ENGINE_DEFAULTS["strategy"]))
        OPTIONS["strategy"].check(strategy)
        _refuse_unread(strategy, given)
        opts = cls(**{"block_size": dlm.config.block_size, **stored_for(decoding, strategy), **given,
                      "strategy": strategy})
        opts.check(dlm)
        return opts

    def check(self, dlm) -> None:
        """Ranges (of every option, read or not: a typo never waits for the strategy that reads it),
        the strategy's constraints and the model's context."""
        for spec in OPTIONS.values():
            spec.check(getattr(self, spec.name))
        _check_block_size(dlm, self.block_size)
        limit = dlm.max_positions
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
        if self.team != "off" and not is_moe(dlm.inner_model):
            raise DecodeOptionError("team", "team applies to mixture-of-experts models; this one has no expert layers")
        if self.blocks > 1:
            _check_blocks(self, limit)
        if self.draft_depth == 0 and algo.name != "verified" and "draft_depth" in algo.reads:
            raise DecodeOptionError("draft_depth", f"strategy {algo.name!r} drafts at least one state: use draft_depth "
                                    ">= 1 (0 is verified's: one mask block, at the likeliest acceptance length)")
        if "draft_depth" in algo.reads and limit is not None and self.draft_depth * self.block_size > limit:
            raise DecodeOptionError("draft_depth", f"draft_depth {self.draft_depth} x block size {self.block_size} "
                                    f"tokens in one forward exceed the model's {limit} positions")


OPTIONS: dict[str, OptionSpec] = {f.name: OptionSpec(f.name, **f.metadata["spec"]) for f in fields(DecodeOptions)}
ENGINE_DEFAULTS = {s.name: s.default for s in OPTIONS.values() if s.default is not MISSING}
declare_reads({name: tuple(s.name for s in OPTIONS.values() if name in s.read_by) for name in STRATEGIES})


_NO_OPS = {"temperature": 0.0, "top_p": 1.0}  # sampling settings that are greedy decoding: fine anywhere


def _refuse_unread(strategy: str, given: dict) -> None:
    """An option set for a strategy that does not read it would change nothing: say so. block_size
    and seed apply to every call (a seed under greedy decoding is simply moot); temperature on a
    greedy-only strategy gets check()'s own message."""
    algo = STRATEGIES[strategy]
    for name, value in given.items():
        if name in ("strategy", "block_size", "seed") or name in algo.reads or _NO_OPS.get(name) == value:
            continue
        if name == "temperature" and algo.greedy_only:
            continue
        readers = ", ".join(strategies_reading(name))
        raise DecodeOptionError(name, f"{name} does not apply to strategy {strategy!r}: choose a strategy that "
                                f"reads it ({readers}) or leave it unset")


def stored_for(decoding: dict, strategy: str) -> dict:
    """The checkpoint's stored settings (config.json -> "edlm" -> "decoding") that apply to `strategy`.

    "strategy" is the checkpoint's default strategy and the other top-level keys its settings;
    "strategies": {name: {option: value}} holds settings of other strategies. A top-level setting
    applies to the default strategy where it reads it, and to every strategy that reads it where
    the default does not (e.g. a threshold stored beside `verified`): so one strategy's setting
    never leaks into another that reads it too (verified's draft_depth into lossless and psd)."""
    names = option_names()
    default = decoding.get("strategy", ENGINE_DEFAULTS["strategy"])
    default_reads = STRATEGIES[default].reads if default in STRATEGIES else ()
    reads = STRATEGIES[strategy].reads
    out = {}
    for name, value in decoding.items():
        if name not in names or name == "strategy":
            continue
        if name == "block_size" or (name in default_reads and strategy == default) or \
                (name not in default_reads and name in reads):
            out[name] = value
    per_strategy = decoding.get("strategies", {})
    if not isinstance(per_strategy, dict) or not all(isinstance(v, dict) for v in per_strategy.values()):
        raise EdlmError(f"config.json: edlm.decoding.strategies must map strategy names to settings, got {per_strategy!r}")
    out.update({k: v for k, v in per_strategy.get(strategy, {}).items() if k in names})
    return out


def declared_options() -> tuple[OptionSpec, ...]:
    """Every decode option's declaration, in field order: what the CLI and the server build from."""
    return tuple(OPTIONS.values())


def option_names() -> tuple[str, ...]:
    return tuple(OPTIONS)


def resolve_parent_verified(drafter, **given) -> int:
    """The block size the two-model mode drafts with (edlm.decode.verify: `drafter`, a dLM, drafts;
    its AR parent verifies): the one rule the CLI's and the server's --verifier share.

    The answer is the parent's greedy decode, so block_size (given, else the drafter's own) is the
    only option that acts; any other one set is refused by name, never silently ignored.
    """
    given = _known(given)
    for name in given:
        if name != "block_size":
            raise DecodeOptionError(name, f"{name} does not apply: the two-model mode (--verifier) decodes the "
                                    "AR parent greedily; leave it unset")
    block_size = given.get("block_size", drafter.config.block_size)
    _check_block_size(drafter, block_size)
    return block_size


def _known(given: dict) -> dict:
    """The options set (None = unset), in declaration order; an unknown name is an error."""
    names = option_names()
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise EdlmError(f"unknown decode option {unknown[0]!r}; options are {', '.join(names)}")
    return {k: given[k] for k in names if given.get(k) is not None}


def _check_block_size(dlm, block_size) -> None:
    """block_size's declared range, then what the model allows."""
    OPTIONS["block_size"].check(block_size)
    limit = dlm.max_positions
    if limit is not None and block_size > limit:
        raise DecodeOptionError("block_size", f"block size {block_size} exceeds the model's {limit} positions")
    if not dlm.config.diffusion and block_size != 1:
        raise DecodeOptionError("block_size", "an autoregressive model decodes with block size 1")


def _check_blocks(opts: DecodeOptions, limit: int | None) -> None:
    """Multi-block decoding: several blocks of a dLM in one window, by a plain rule, without TEAM
    (its caches and cold tokens are a block's)."""
    if opts.block_size == 1:
        raise DecodeOptionError("blocks", "multi-block decoding needs blocks of at least 2 tokens (block size 1 "
                                "decodes one token at a time)")
    if opts.team != "off":
        raise DecodeOptionError("blocks", "team works on one block at a time: use blocks 1 with team")
    if limit is not None and opts.blocks * opts.block_size > limit:
        raise DecodeOptionError("blocks", f"blocks {opts.blocks} x block size {opts.block_size} tokens in one forward "
                                f"exceed the model's {limit} positions")


def _integer(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodeOptionError(name, f"{name} must be an integer, got {value!r}")
    if value < low:
        raise DecodeOptionError(name, f"{name} must be >= {low}, got {value}")


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
    if any(s == "" for row in stops for s in row):
        raise DecodeOptionError("stop", "an empty stop string would end every completion before its first token: "
                                "remove it")
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
