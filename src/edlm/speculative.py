"""Faster decoders on the block engine: self-speculation (lossless, psd), re-masking (wino),
and soft inputs (soft, in edlm.soft).

Each is a `strategy=` of `edlm.decoding.stream`; the engine calls `speculative_step` once per
iteration and it returns (tokens committed per row [B], model calls it made). All are greedy.

Verifying several candidate states of the current block costs ONE forward and no KV copy:
the C candidate blocks are fed as one sequence of C*bs tokens, every copy with the block's own
position ids, and a mask in which copy c sees the clean cache and itself only. With
block-causal attention each copy's logits are exactly those of a forward of that block alone;
its KV is cropped right after, like the current block's in `denoise_step`. A block's first
forward is always `denoise_step` (it also writes the pending clean block into the cache).

The logits of the state an iteration ends in are kept (as tokens and confidences) and seed the
next iteration's drafts, so after a block's first step every iteration costs one forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from edlm.decoding import apply_commit, candidate_logits, denoise_step
from edlm.errors import EdlmError
from edlm.masks import position_block_mask
from edlm.strategies import commit_steps, commit_threshold, pick_tokens

STRATEGIES = ("lossless", "psd", "soft", "wino")
REMASK_BELOW = 0.9  # WINO narrow-out: a drafted token whose leave-one-out confidence is lower is re-masked


def speculative_step(dlm, batch, generator=None) -> tuple[torch.Tensor, int]:
    """The engine's hook: one iteration of batch.opts.strategy on every row of the batch."""
    opts = batch.opts
    if opts.temperature > 0:
        raise EdlmError(f"strategy {opts.strategy!r} decodes greedily; use temperature 0")
    if opts.strategy == "soft":
        from edlm.soft import soft_step

        return soft_step(dlm, batch)
    if opts.strategy == "wino":
        return wino_step(dlm, batch)
    if opts.strategy == "lossless":
        return speculate(dlm, batch, lambda conf, todo: commit_steps(conf, todo, 1))
    return speculate(dlm, batch, lambda conf, todo: commit_threshold(conf, todo, opts.threshold))


# ------------------------------------------------------------------ state kept between iterations
@dataclass
class _Kept:
    rows: torch.Tensor  # [B] request ids (cpu), to follow rows leaving the batch
    block_start: torch.Tensor  # [B]
    tensors: dict


def keep_for_next_step(batch, **tensors) -> None:
    batch.spec_kept = _Kept(batch.rows, batch.block_start, tensors)


def kept_from_last_step(batch) -> dict | None:
    """What the last iteration kept, for the rows still here; None at a block's first step."""
    kept = getattr(batch, "spec_kept", None)
    if kept is None or batch.pending_ids.shape[1]:  # pending clean KV: a new block just opened
        return None
    here = torch.isin(kept.rows, batch.rows).to(batch.block_start.device)
    if not torch.equal(kept.block_start[here], batch.block_start):
        return None
    return {k: v[here] for k, v in kept.tensors.items()}


# ------------------------------------------------------------------ one forward, several blocks
@torch.no_grad()
def forward_block(dlm, batch, ids=None, embeds=None, copies: int = 1, see=None) -> torch.Tensor:
    """Logits [B, copies, bs, V] of `copies` versions of the current block, in one model call.

    ids [B, copies*bs] or embeds [B, copies*bs, H]; see [Q, Q] bool says which new queries see
    which new keys (default: each copy sees only itself). Needs the pending clean KV written.
    """
    cfg, bs = dlm.config, batch.opts.block_size
    assert batch.pending_ids.shape[1] == 0, "a block's first forward is denoise_step"
    n, dev = batch.block_ids.shape[0], batch.block_ids.device
    q_pos = (batch.block_start[:, None] + torch.arange(bs, device=dev)[None]).repeat(1, copies)  # [B, Q]
    if see is None:
        copy = torch.arange(copies, device=dev).repeat_interleave(bs)
        see = copy[:, None] == copy[None, :]
    cached = position_block_mask(q_pos, batch.cache_pos, bs, batch.cache_valid)  # [B, Q, K]
    mask = torch.cat([cached, see.to(dev).expand(n, -1, -1)], -1)
    out = dlm.model(input_ids=ids, inputs_embeds=embeds, attention_mask=dlm.backend_mask(mask),
                    position_ids=q_pos, past_key_values=batch.cache, use_cache=True)
    batch.cache.crop(-copies * bs)
    logits = out.logits.float().view(n, copies, bs, -1)
    if not cfg.shift:
        return logits
    # shift: slot j is predicted at j-1; slot 0 by the last clean position (carried by denoise_step)
    carry = batch.carry if batch.carry is not None else torch.zeros_like(logits[:, 0, 0])
    return torch.cat([carry[:, None, None].expand(-1, copies, -1, -1), logits[:, :, :-1]], 2)


def _after(dlm, state, chosen, tokens) -> SimpleNamespace:
    """The block state after committing `chosen` (EOS rule included); the input is unchanged."""
    nxt = SimpleNamespace(block_ids=state.block_ids, todo=state.todo, gen=state.gen, eos_slot=state.eos_slot,
                          chosen=chosen)
    apply_commit(dlm, nxt, chosen, tokens)
    return nxt


def greedy_tokens(dlm, logits):
    tokens, conf, _ = pick_tokens(candidate_logits(dlm, logits))
    return tokens, conf


# ------------------------------------------------------------------ lossless and PSD
def speculate(dlm, batch, rule) -> tuple[torch.Tensor, int]:
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
    calls = 0
    kept = kept_from_last_step(batch)
    if kept is None:
        tokens, conf = greedy_tokens(dlm, denoise_step(dlm, batch))
        calls += 1
    else:
        tokens, conf = kept["tokens"], kept["conf"]
    states, depth = draft_chain(dlm, batch, rule, tokens, conf)
    if depth == 0:  # s_1 fills every row's block: nothing left to verify
        _move_to(batch, states[0])
        batch.spec_kept = None
        return states[0].chosen.sum(-1), calls
    drafts = torch.stack([s.block_ids for s in states], 1)  # [B, depth, bs]
    v_tokens, v_conf = greedy_tokens(dlm, forward_block(dlm, batch, ids=drafts.flatten(1), copies=depth))
    calls += 1
    pick = accepted_depth(states, rule, tokens, v_tokens, v_conf) - 1  # [B] deepest accepted state
    rows = torch.arange(pick.shape[0], device=pick.device)
    committed = torch.stack([s.chosen.sum(-1) for s in states], 1)  # [B, depth]
    committed = (committed * (torch.arange(depth, device=pick.device) <= pick[:, None])).sum(-1)
    _move_to(batch, SimpleNamespace(block_ids=drafts[rows, pick],
                                    todo=torch.stack([s.todo for s in states], 1)[rows, pick],
                                    eos_slot=torch.stack([s.eos_slot for s in states], 1)[rows, pick]))
    keep_for_next_step(batch, tokens=v_tokens[rows, pick], conf=v_conf[rows, pick])
    return committed, calls


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


def wino_step(dlm, batch) -> tuple[torch.Tensor, int]:
    """WINO (wide in, narrow out): draft wide, re-mask drafts that the new context no longer supports.

    Each forward commits the threshold set (threshold is the wide, low bar: 0.5-0.7) and, in the
    same forward, re-checks every token generated earlier in this block by its leave-one-out
    probability; tokens below REMASK_BELOW go back to the mask, weakest first, at most (this
    step's commits - 1) per row. Every forward thus decides at least one more slot than it takes
    back, so a block ends within as many forwards as it has slots (TPF >= 1). EOS tokens and
    anything after them are never re-masked. Needs shift=False (the leave-one-out trick reads
    slot j's own logit).
    """
    if dlm.config.shift:
        raise EdlmError("strategy 'wino' needs a model trained without token shift (shift=False)")
    if kept_from_last_step(batch) is None:
        logits, loo = denoise_step(dlm, batch), None
    else:
        mask_id = dlm.config.mask_token_id
        shadow = torch.full_like(batch.block_ids, mask_id)
        both = forward_block(dlm, batch, ids=torch.cat([batch.block_ids, shadow], 1), copies=2,
                             see=leave_one_out_mask(batch.opts.block_size))
        logits, loo = both[:, 0], both[:, 1]
    tokens, conf = greedy_tokens(dlm, logits)
    decided = batch.gen & ~batch.todo & batch.todo.any(-1, keepdim=True)  # rows still working
    chosen = commit_threshold(conf, batch.todo, batch.opts.threshold)
    apply_commit(dlm, batch, chosen, tokens)
    committed = chosen.sum(-1)
    if loo is not None:
        slot = torch.arange(chosen.shape[1], device=chosen.device)[None]
        p_kept = torch.softmax(candidate_logits(dlm, loo), -1).gather(-1, batch.block_ids[..., None])[..., 0]
        weak = decided & (slot < batch.eos_slot[:, None]) & (p_kept < REMASK_BELOW)
        score = p_kept.masked_fill(~weak, float("inf"))
        rank = score.argsort(-1).argsort(-1)
        remask = weak & (rank < (committed - 1)[:, None])
        batch.block_ids = batch.block_ids.masked_fill(remask, dlm.config.mask_token_id)
        batch.todo = batch.todo | remask
        committed = committed - remask.sum(-1)
    keep_for_next_step(batch)
    return committed, 1
