"""The model calls of decoding and the commit bookkeeping every strategy shares.

`denoise_step` is a block's first forward (it also writes the pending clean KV); `forward_block`
feeds one or more versions of the current block against the clean cache (speculative
verification, soft inputs); `apply_commit` writes chosen tokens into the block state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edlm.decode.rules import pick_tokens
from edlm.masks import position_block_mask

# Below this vocabulary the LM head on a block's decided slots costs less than leaving it out
# (masks, gathers and host syncs: +0.3 ms a step on the demo's 495 tokens, measured); real LLM
# vocabularies (32k-256k) are far above it: on SmolLM2's 49k, a batch-1 call at block 8 went from
# 2.13 to 1.67 AR steps (bench/results/real-cpu).
SKIP_DECIDED_MIN_VOCAB = 8192


def skips_decided_slots(dlm) -> bool:
    """Whether plain steps should compute logits for undecided slots only (denoise_step's want)."""
    return dlm.inner_model.config.vocab_size >= SKIP_DECIDED_MIN_VOCAB


@torch.no_grad()
def denoise_step(dlm, batch, want: torch.Tensor | None = None) -> torch.Tensor:
    """One model call: write pending clean KV, return logits [B, bs, V] for the current block.

    want [B, bs] bool: only these slots' logits, as [N, V] in row-major order. The LM head and
    everything after it cost as much as the vocabulary is large (151k rows on Qwen), and a
    block's decided slots need none: on average half a block's slots per step."""
    opts, cfg = batch.opts, dlm.config
    bs = opts.block_size
    feed_block = not (cfg.shift and bs == 1)  # an AR step needs no mask slot in its input
    n_pending = batch.pending_ids.shape[1]
    if n_pending == 0 and batch.block_mask is not None:
        # a later step of the same block: the cache and the block's positions did not change
        ids, (q_pos, mask) = batch.block_ids, batch.block_mask
    else:
        slot_pos = batch.block_start[:, None] + torch.arange(bs, device=batch.block_ids.device)[None]
        parts_ids, parts_pos = [batch.pending_ids], [batch.pending_pos]
        if feed_block:
            parts_ids.append(batch.block_ids)
            parts_pos.append(slot_pos)
        ids, q_pos = torch.cat(parts_ids, 1), torch.cat(parts_pos, 1)
        k_pos = torch.cat([batch.cache_pos, q_pos], 1)
        k_valid = torch.cat([batch.cache_valid, q_pos >= 0], 1)
        causal_q = None
        if cfg.causal_clean:  # pending tokens are clean: token-causal, as the clean stream was trained
            causal_q = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1) < n_pending
        mask = dlm.backend_mask(position_block_mask(q_pos, k_pos, bs, k_valid, causal_q))  # [B, 1, Q, K]
        q_pos = q_pos.clamp_min(0)
        if feed_block and not n_pending:
            batch.block_mask = (q_pos, mask)
        elif feed_block and torch.is_tensor(mask):  # the block's later steps: the block's rows of this
            # mask, whose keys (cache ; pending ; block) are the next step's (cache with pending ; block)
            batch.block_mask = (q_pos[:, n_pending:], mask[:, :, n_pending:])
    has_pending = batch.pending_pos[:, -1] >= 0 if n_pending else None  # [B]: rows writing a finished block
    wanted = want is not None and feed_block
    if wanted:
        keep = _wanted_positions(ids.shape, bs, cfg.shift, want, has_pending)  # [B, Q] bool
    else:
        keep = bs + (1 if cfg.shift and n_pending and feed_block else 0) if feed_block else 1
    out = dlm.model(input_ids=ids, attention_mask=mask, position_ids=q_pos,
                    cache=batch.cache, use_cache=True, logits_to_keep=keep)
    logits = out.logits.float()
    _keep_pending(batch, feed_block)
    if wanted:
        return _wanted_logits(batch, logits, keep, want, has_pending) if cfg.shift else logits
    if not cfg.shift:
        return logits
    # shift: slot j is predicted at position j-1; slot 0 by the last pending (clean) position,
    # which later steps of this block cannot change, so it is carried over.
    if not feed_block:
        return logits  # [B, 1, V]: the last pending position predicts the single slot
    if keep == bs + 1:  # rows without a pending block keep the carry of their current block
        fresh = logits[:, 0]
        batch.carry = fresh if batch.carry is None else torch.where(has_pending[:, None], fresh, batch.carry)
        body = logits[:, 1:-1]
    else:
        body = logits[:, :-1]
    carry = batch.carry if batch.carry is not None else torch.zeros_like(logits[:, 0])
    return torch.cat([carry[:, None], body], 1)


def _keep_pending(batch, feed_block: bool) -> None:
    """After a denoising forward: the current block's KV goes (it is not clean yet), the pending
    clean tokens' KV stays and is now the cache's."""
    if feed_block:
        batch.cache.crop(-batch.opts.block_size)
    batch.cache_pos = torch.cat([batch.cache_pos, batch.pending_pos], 1)
    batch.cache_valid = torch.cat([batch.cache_valid, batch.pending_pos >= 0], 1)
    batch.pending_ids = batch.pending_ids[:, :0]
    batch.pending_pos = batch.pending_pos[:, :0]


def _wanted_positions(shape, bs: int, shift: bool, want, has_pending) -> torch.Tensor:
    """The queries whose logits the wanted slots need (HF's boolean `logits_to_keep`): slot j at
    the block's query j, or j - 1 with shift; there, slot 0 comes from the carry, refreshed at the
    last pending position of the rows that have one."""
    o = shape[1] - bs  # the block's first query
    keep = torch.zeros(shape, dtype=torch.bool, device=want.device)
    if not shift:
        keep[:, o:] = want
        return keep
    keep[:, o:-1] = want[:, 1:]
    if has_pending is not None:
        keep[:, o - 1] = has_pending
    return keep


def _wanted_logits(batch, logits, keep, want, has_pending) -> torch.Tensor:
    """A shift model's wanted slots from the kept logits [M, V] (row-major over `keep`): the carry
    rows refresh the carry, slot 0 is read from it; [N, V], N = want.sum(), row-major."""
    fresh = keep.nonzero()[:, 1] == keep.shape[1] - batch.opts.block_size - 1  # which of the M rows are carries
    carry = batch.carry.clone() if batch.carry is not None else logits.new_zeros(want.shape[0], logits.shape[-1])
    if has_pending is not None:
        carry[has_pending] = logits[fresh]
    batch.carry = carry
    place = (want.flatten().cumsum(0) - 1).view(want.shape)  # each wanted slot's row in the result
    result = logits.new_empty(int(want.sum()), logits.shape[-1])
    result[place[:, 0][want[:, 0]]] = carry[want[:, 0]]
    result[place[:, 1:][want[:, 1:]]] = logits[~fresh]
    return result


@torch.no_grad()
def forward_block(dlm, batch, ids=None, embeds=None, copies: int = 1, see=None) -> torch.Tensor:
    """Logits [B, copies, bs, V] of `copies` versions of the current block, in one model call.

    ids [B, copies*bs] or embeds [B, copies*bs, H]; see [Q, Q] bool says which new queries see
    which new keys (default: each copy sees only itself). Needs the pending clean KV written.
    Every copy has the block's own position ids and sees the clean cache, so with block-causal
    attention each copy's logits are exactly those of a forward of that block alone; the copies'
    KV is cropped right after, like the current block's in `denoise_step`.
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
                    position_ids=q_pos, cache=batch.cache, use_cache=True)
    batch.cache.crop(-copies * bs)
    logits = out.logits.float().view(n, copies, bs, -1)
    if not cfg.shift:
        return logits
    # shift: slot j is predicted at j-1; slot 0 by the last clean position (carried by denoise_step)
    carry = batch.carry if batch.carry is not None else torch.zeros_like(logits[:, 0, 0])
    return torch.cat([carry[:, None, None].expand(-1, copies, -1, -1), logits[:, :, :-1]], 2)


def candidate_logits(dlm, logits: torch.Tensor) -> torch.Tensor:
    """The mask token is never a candidate, nor are padded vocabulary rows beyond the tokenizer."""
    limit = len(dlm.tokenizer) if dlm.tokenizer is not None else logits.shape[-1]
    if limit < logits.shape[-1]:
        logits[..., limit:] = float("-inf")
    if dlm.config.mask_token_id is not None:
        logits[..., dlm.config.mask_token_id] = float("-inf")
    return logits


def greedy_tokens(dlm, logits):
    tokens, conf, _ = pick_tokens(candidate_logits(dlm, logits), temperature=0.0, top_p=1.0, entropy=False)
    return tokens, conf


def apply_commit(dlm, batch, chosen: torch.Tensor, tokens: torch.Tensor) -> None:
    """Write the chosen slots' tokens; after an EOS nothing more of the block is filled."""
    batch.block_ids = torch.where(chosen, tokens, batch.block_ids)
    batch.todo = batch.todo & ~chosen
    eos = dlm.tokenizer.eos_token_id if dlm.tokenizer is not None else None
    # most steps neither commit an EOS nor have one in their block: skip the bookkeeping then
    if eos is not None and bool((chosen & (tokens == eos)).any() | (batch.eos_slot < chosen.shape[1]).any()):
        is_eos = batch.gen & ~batch.todo & (batch.block_ids == eos)
        slot = torch.arange(is_eos.shape[1], device=is_eos.device)[None]
        first = torch.where(is_eos, slot, torch.full_like(slot, is_eos.shape[1])).min(-1).values
        batch.eos_slot = torch.minimum(batch.eos_slot, first)
        batch.todo = batch.todo & (slot < batch.eos_slot[:, None])  # never fill after an EOS


# ------------------------------------------------------------------ state kept between steps
@dataclass
class Kept:
    rows: torch.Tensor  # [B] request ids (cpu), to follow rows leaving the batch
    block_start: torch.Tensor  # [B]
    tensors: dict


def keep_for_next_step(batch, **tensors) -> None:
    batch.kept = Kept(batch.rows, batch.block_start, tensors)


def kept_from_last_step(batch) -> dict | None:
    """What the last step kept, for the rows still here; None at a block's first step."""
    kept = batch.kept
    if kept is None or batch.pending_ids.shape[1]:  # pending clean KV: a new block just opened
        return None
    here = torch.isin(kept.rows, batch.rows).to(batch.block_start.device)
    if not torch.equal(kept.block_start[here], batch.block_start):
        return None
    return {k: v[here] for k, v in kept.tensors.items()}
