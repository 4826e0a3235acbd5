"""The strategy registry: every decoding strategy, its step function and its constraints, once.

A strategy's step runs one iteration on every row of a batch and returns (tokens committed per
row [B]; the batch counts the model calls, edlm.decode.kv.KVRows.forward). The engine looks strategies up here by name and never imports a
strategy module itself; options are checked against `reads`, `greedy_only` and `needs_no_shift`
in edlm.decode.options. Adding a strategy means adding one entry below (and naming it in the
`read_by` of the options it reads: each option declares its readers, in edlm.decode.options).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from edlm.decode import rules
from edlm.decode.selfverify import SelfVerifiedDecoder
from edlm.decode.soft import soft_step
from edlm.decode.speculative import lossless_step, psd_step, wino_step
from edlm.decode.step import apply_commit, denoise_step, record_logprobs, skips_decided_slots, slot_logprobs
from edlm.decode.team import explore_step
from edlm.decode.team import mechanisms as team_mechanisms
from edlm.decode.team import plan_for as team_plan
from edlm.decode.team import recall as team_recall
from edlm.decode.team import remember as team_remember


@dataclass(frozen=True)
class Strategy:
    name: str
    step: Callable | None  # (dlm, batch, generator) -> committed [B]
    help: str
    greedy_only: bool = False
    needs_no_shift: bool = False
    revises: bool = False  # may re-mask committed slots: a row's block must then be decoded to its end
    rule: Callable | None = None  # plain strategies: (conf, entropy, todo, opts) -> commit mask
    # a strategy that is not block by block brings its own decoder for edlm.decode.loop instead of `step`
    decoder: Callable | None = None  # (dlm, opts, generator) -> a decoder (rows, add, step, advance)
    needs_ar_stream: bool = False  # verifies with the clean stream as an AR model (causal-clean or shift)

    @property
    def reads(self) -> tuple[str, ...]:
        """The decode options it reads, derived from each option's `read_by` (see `declare_reads`)."""
        return _READS[self.name]


def rule_step(rule: Callable) -> Callable:
    """A plain denoising step: one forward, then `rule(conf, entropy, todo, opts)` commits; in a
    batch of mixed plain settings (batch.mixed_rules), each row's own rule and options do."""

    def step(dlm, batch, generator=None) -> torch.Tensor:
        opts = batch.opts  # the candidates: masked slots of the window's opened blocks (multi-block decoding)
        todo = rules.opened_slots(batch.todo, batch.gen, opts.blocks, opts.next_block_at)
        mixed = batch.mixed_rules  # None, or {strategy name: [B] bool rows} (edlm.decode.engine)
        needs_entropy = any("gamma" in STRATEGIES[name].reads for name in mixed) if mixed else \
            "gamma" in opts.algorithm.reads

        def pick(logits):
            return rules.pick_tokens(logits, opts.temperature, opts.top_p, generator, entropy=needs_entropy)

        def commit_rows(conf, entropy, todo):
            return rule(conf, entropy, todo, opts)

        team = team_mechanisms(opts.team)
        memo = team_recall(batch) if team else None
        if "explore" in team and (done := explore_step(dlm, batch, team, memo, pick, commit_rows)) is not None:
            return done
        plan = None
        if team:  # the block's one version, as fed
            fed = batch.block_ids
            plan = team_plan(dlm, batch, team, memo, fed[:, None], todo[:, None], fed != dlm.config.mask_token_id)
        want = todo if skips_decided_slots(dlm, batch) else None  # [N, V]: undecided slots only
        logits = denoise_step(dlm, batch, want=want, experts=plan)
        tokens, conf, entropy = pick(logits)
        logprobs = slot_logprobs(batch, logits, tokens)
        if want is not None:  # back to [B, bs]: decided slots are no candidates, what they hold is never read
            tokens, conf = _on_slots(todo, tokens, 0), _on_slots(todo, conf, 0.0)
            entropy = _on_slots(todo, entropy, float("inf")) if entropy is not None else None
            logprobs = tuple(_on_slots(todo, x, 0) for x in logprobs) if logprobs is not None else None
        if team:
            team_remember(batch, fed, conf, tokens, plan)
        if mixed:
            chosen = torch.zeros_like(todo)
            for name, rows in mixed.items():
                chosen = chosen | (rows[:, None] & STRATEGIES[name].rule(conf, entropy, todo, batch.row_options))
        else:
            chosen = rule(conf, entropy, todo, opts)
        apply_commit(dlm, batch, chosen, tokens)
        record_logprobs(batch, chosen, logprobs)
        return chosen.sum(-1)

    return step


def _on_slots(todo: torch.Tensor, values: torch.Tensor, fill) -> torch.Tensor:
    """Values [N, ...] of the todo slots (row-major) placed on their slots [B, bs, ...]."""
    shape = (*todo.shape, *values.shape[1:])
    where = todo.view(*todo.shape, *[1] * (values.dim() - 1)).expand(shape)
    return torch.full(shape, fill, dtype=values.dtype, device=values.device).masked_scatter(where, values)


def plain(name: str, rule: Callable, help: str) -> Strategy:
    return Strategy(name, rule_step(rule), help, rule=rule)


_ALL = [
    plain("threshold", lambda c, h, todo, o: rules.commit_threshold(c, todo, o.threshold),
          "Fast-dLLM: every slot whose confidence passes the threshold (at least one)"),
    plain("prefix", lambda c, h, todo, o: rules.commit_prefix(c, todo, o.threshold),
          "left to right while slots pass the threshold (at least one)"),
    plain("factor", lambda c, h, todo, o: rules.commit_factor(c, todo, o.factor),
          "Fast-dLLM factor rule: the top n with (n + 1)(1 - c_n) < factor"),
    plain("entropy", lambda c, h, todo, o: rules.commit_entropy(c, h, todo, o.gamma),
          "entropy-bounded sampler: lowest entropy first while sum(H) - max(H) <= gamma"),
    plain("steps", lambda c, h, todo, o: rules.commit_steps(c, todo, o.tokens_per_step),
          "a fixed number of most confident slots per step"),
    Strategy("lossless", lossless_step, "self-speculation equal to one-token-per-step greedy decoding",
             greedy_only=True),
    Strategy("psd", psd_step, "parallel speculative decoding: threshold drafts verified in one forward",
             greedy_only=True),
    Strategy("soft", soft_step, "DMax soft inputs: unsure drafts fed back as token/mask blends",
             greedy_only=True),
    Strategy("verified", None, "one model drafts by diffusion and verifies with its own AR stream in one forward "
             "(TiDAR): token-identical to its greedy AR decode", greedy_only=True, decoder=SelfVerifiedDecoder,
             needs_ar_stream=True),
    Strategy("wino", wino_step, "WINO: commit wide at the threshold, re-mask drafts the context no longer supports",
             greedy_only=True, needs_no_shift=True, revises=True),
]
STRATEGIES: dict[str, Strategy] = {s.name: s for s in _ALL}


def strategy_names() -> tuple[str, ...]:
    return tuple(STRATEGIES)


def strategies_reading(option: str) -> tuple[str, ...]:
    """Names of the strategies that read `option` (e.g. the ones a threshold sweep applies to)."""
    return tuple(s.name for s in _ALL if option in s.reads)


# strategy -> the options it reads. Each option declares its readers once (`read_by` in
# edlm.decode.options, which imports this module, so it cannot be asked from here); importing
# edlm.decode loads options, which fills this table.
_READS: dict[str, tuple[str, ...]] = {}


def declare_reads(reads: dict[str, tuple[str, ...]]) -> None:
    """Record which options each strategy reads (called once by edlm.decode.options)."""
    missing = sorted(set(STRATEGIES) - set(reads))
    if missing:
        raise ValueError(f"no reads declared for strategies {missing}")
    _READS.update(reads)
