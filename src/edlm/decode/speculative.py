"""Faster decoders on the block engine: self-speculation (lossless, psd) and re-masking (wino).

Each is a strategy of `edlm.decode.strategies` (greedy only); its step returns (tokens committed
per row [B]; the batch counts its model calls).

Verifying several candidate states of the current block costs ONE forward and no KV copy
(`edlm.decode.step.forward_block`): the C candidate blocks are fed as one sequence of C*bs
tokens, every copy with the block's own position ids, each seeing the clean cache and itself
only. A block's first forward is always `denoise_step` (it also writes the pending clean block).

The logits of the state a step ends in are kept (as tokens and confidences) and seed the
next step's drafts, so after a block's first step every step costs one forward.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from edlm.decode.rules import commit_steps, commit_threshold
from edlm.decode.step import (
    apply_commit,
    denoise_step,
    forward_block,
    greedy_tokens,
    recall,
    record_logprobs,
    remember,
    slot_logprobs,
)


def lossless_step(dlm, batch, generator=None) -> torch.Tensor:
    return speculate(dlm, batch, lambda conf, todo: commit_steps(conf, todo, 1))


def psd_step(dlm, batch, generator=None) -> torch.Tensor:
    threshold = batch.opts.threshold
    return speculate(dlm, batch, lambda conf, todo: commit_threshold(conf, todo, threshold))


def _after(dlm, state, chosen, tokens) -> SimpleNamespace:
    """The block state after committing `chosen` (EOS rule included); the input is unchanged."""
    nxt = SimpleNamespace(block_ids=state.block_ids, todo=state.todo, gen=state.gen, eos_slot=state.eos_slot,
                          chosen=chosen)
    apply_commit(dlm, nxt, chosen, tokens)
    return nxt


# ------------------------------------------------------------------ lossless and PSD
def speculate(dlm, batch, rule) -> torch.Tensor:
    """Draft a chain of block states from one set of logits, verify them all in one forward.

    From state s_0 with logits L_0: s_1 = s_0 + rule(L_0); s_d = s_{d-1} + the most confident
    slot of L_0 still to do (d <= draft_depth, while some row has work left). One forward gives
    the true logits L_d of every s_d. s_{d+1} is accepted iff s_d was, and its new slot (with its
    token) is one that `rule` commits from (s_d, L_d). The row moves to its deepest accepted
    state, whose L seeds the next iteration.

    lossless: rule = the single most confident slot. Then s_1 is the greedy one-token step and an
    accepted s_{d+1} IS the greedy step from s_d, so the output equals strategy "steps" with
    tokens_per_step=1 token for token (up to floating-point differences between forwards).
    psd: rule = the threshold rule (>= threshold, and always the top-1). Every committed token
    was either in the threshold set of its state's true logits, or drafted and then found in the
    threshold set of the true logits of the state that already holds the earlier drafts.
    draft_depth=1 is plain threshold decoding.
    """
    memo = recall(batch)
    if memo is None:
        logits = denoise_step(dlm, batch)
        tokens, conf = greedy_tokens(logits)
        logprobs = slot_logprobs(batch, logits, tokens)
    else:
        tokens, conf, logprobs = memo["tokens"], memo["conf"], memo.get("logprobs")
    states, depth = draft_chain(dlm, batch, rule, tokens, conf)
    if depth == 0:  # s_1 fills every row's block: nothing left to verify
        _move_to(batch, states[0])
        record_logprobs(batch, states[0].chosen, logprobs)
        batch.memo = None
        return states[0].chosen.sum(-1)
    drafts = torch.stack([s.block_ids for s in states], 1)  # [B, depth, bs]
    v_logits = forward_block(dlm, batch, ids=drafts.flatten(1), copies=depth)
    v_tokens, v_conf = greedy_tokens(v_logits)
    pick = accepted_depth(states, rule, tokens, v_tokens, v_conf) - 1  # [B] deepest accepted state
    rows = torch.arange(pick.shape[0], device=pick.device)
    committed = torch.stack([s.chosen.sum(-1) for s in states], 1)  # [B, depth]
    committed = (committed * (torch.arange(depth, device=pick.device) <= pick[:, None])).sum(-1)
    _move_to(batch, SimpleNamespace(block_ids=drafts[rows, pick],
                                    todo=torch.stack([s.todo for s in states], 1)[rows, pick],
                                    eos_slot=torch.stack([s.eos_slot for s in states], 1)[rows, pick]))
    v_logprobs = slot_logprobs(batch, v_logits, v_tokens)
    _record_chain_logprobs(batch, states, pick, logprobs, v_logprobs)
    remember(batch, tokens=v_tokens[rows, pick], conf=v_conf[rows, pick],
             **({"logprobs": tuple(x[rows, pick] for x in v_logprobs)} if v_logprobs is not None else {}))
    return committed


def _record_chain_logprobs(batch, states, pick, logprobs, v_logprobs) -> None:
    """s_1's tokens report L_0's log-probs; the slot an accepted s_{d+1} adds reports L_d's, the
    true logits of the state it was checked in (so lossless reports what one-token steps do)."""
    if logprobs is None:
        return
    record_logprobs(batch, states[0].chosen, logprobs)
    for d in range(1, len(states)):
        record_logprobs(batch, states[d].chosen & (pick >= d)[:, None], tuple(x[:, d - 1] for x in v_logprobs))


def draft_chain(dlm, batch, rule, tokens, conf) -> tuple[list[SimpleNamespace], int]:
    """States s_1..s_depth drafted from one set of logits; depth 0 when s_1 leaves no row work."""
    states = [_after(dlm, batch, rule(conf, batch.todo), tokens)]
    depth = min(batch.opts.draft_depth, int(states[0].todo.sum(-1).max()))  # host sync, once per step
    while len(states) < depth:
        states.append(_after(dlm, states[-1], commit_steps(conf, states[-1].todo, 1), tokens))
    return states, depth


def _move_to(batch, state) -> None:
    batch.block_ids, batch.todo, batch.eos_slot = state.block_ids, state.todo, state.eos_slot


def accepted_depth(states, rule, tokens, v_tokens, v_conf) -> torch.Tensor:
    """[B] how many drafted states are accepted (>= 1: s_1 is the rule's own step)."""
    ok = torch.ones_like(v_tokens[:, 0, 0], dtype=torch.bool)
    accepted = torch.ones_like(v_tokens[:, 0, 0])
    for d in range(1, len(states)):
        new = states[d].chosen  # [B, bs]: one slot, or none when the row had no work left
        confirmed = rule(v_conf[:, d - 1], states[d - 1].todo) & (v_tokens[:, d - 1] == tokens)
        ok = ok & new.any(-1) & ~(new & ~confirmed).any(-1)
        accepted = accepted + ok
    return accepted


# ------------------------------------------------------------------ WINO
def leave_one_out_mask(bs: int) -> torch.Tensor:
    """[2bs, 2bs] for [block ; shadow of masks]: shadow slot j sees the block except slot j, and itself.

    So the shadow's logit at j predicts slot j from a mask at j and the other decoded tokens,
    for every j in the same forward (WINO's shadow block). It is exact in the first layer only:
    deeper, the other slots' states have themselves seen token j. The block never sees the
    shadow, so its own logits are unchanged.
    """
    eye = torch.eye(bs, dtype=torch.bool)
    top = torch.cat([torch.ones(bs, bs, dtype=torch.bool), torch.zeros(bs, bs, dtype=torch.bool)], 1)
    return torch.cat([top, torch.cat([~eye, eye], 1)])


def wino_step(dlm, batch, generator=None) -> torch.Tensor:
    """WINO (wide in, narrow out): draft wide, re-mask drafts that the new context no longer supports.

    Each forward commits the threshold set (threshold is the wide, low bar: 0.5-0.7) and, in the
    same forward, re-checks every token generated earlier in this block by its leave-one-out
    probability; tokens below remask_below go back to the mask, weakest first, at most (this
    step's commits - 1) per row. Every forward thus decides at least one more slot than it takes
    back, so a block ends within as many forwards as it has slots (TPF >= 1). EOS tokens and
    anything after them are never re-masked. Needs shift=False (the leave-one-out trick reads
    slot j's own logit).
    """
    if recall(batch) is None:
        logits, loo = denoise_step(dlm, batch), None
    else:
        mask_id = dlm.config.mask_token_id
        shadow = torch.full_like(batch.block_ids, mask_id)
        both = forward_block(dlm, batch, ids=torch.cat([batch.block_ids, shadow], 1), copies=2,
                             see=leave_one_out_mask(batch.opts.block_size))
        logits, loo = both[:, 0], both[:, 1]
    tokens, conf = greedy_tokens(logits)
    decided = batch.gen & ~batch.todo & batch.todo.any(-1, keepdim=True)  # rows still working
    chosen = commit_threshold(conf, batch.todo, batch.opts.threshold)
    apply_commit(dlm, batch, chosen, tokens)
    record_logprobs(batch, chosen, slot_logprobs(batch, logits, tokens))
    committed = chosen.sum(-1)
    if loo is not None:
        slot = torch.arange(chosen.shape[1], device=chosen.device)[None]
        p_kept = torch.softmax(loo, -1).gather(-1, batch.block_ids[..., None])[..., 0]
        weak = decided & (slot < batch.eos_slot[:, None]) & (p_kept < batch.opts.remask_below)
        score = p_kept.masked_fill(~weak, float("inf"))
        rank = score.argsort(-1).argsort(-1)
        remask = weak & (rank < (committed - 1)[:, None])
        batch.block_ids = batch.block_ids.masked_fill(remask, dlm.config.mask_token_id)
        batch.todo = batch.todo | remask
        committed = committed - remask.sum(-1)
    remember(batch)
    return committed
