"""The model calls of decoding and the commit bookkeeping every strategy shares.

`denoise_step` is a block's first forward (it also writes the pending clean KV) and every later
plain step; `forward_block` feeds one or more versions of the current block against the clean
cache (speculative verification, soft inputs); both call the model through the batch's
`KVRows.forward` (edlm.decode.kv). `apply_commit` writes chosen tokens into the block state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edlm.decode.kv import lag
from edlm.decode.rules import logprobs_of, pick_tokens
from edlm.masks import position_block_mask

# Below this vocabulary the LM head on a block's decided slots costs less than leaving it out
# (masks, gathers and host syncs: +0.3 ms a step on the demo's 495 tokens, measured); real LLM
# vocabularies (32k-256k) are far above it: on SmolLM2's 49k, a batch-1 call at block 8 went from
# 2.13 to 1.67 AR steps (bench/results/real-cpu).
SKIP_DECIDED_MIN_VOCAB = 8192


def skips_decided_slots(dlm, batch) -> bool:
    """Whether plain steps should compute logits for undecided slots only (denoise_step's want): on
    large vocabularies, where a block is fed (an AR step's one logit is all it computes anyway)."""
    return dlm.text_config.vocab_size >= SKIP_DECIDED_MIN_VOCAB and feeds_block(dlm, batch)


def feeds_block(dlm, batch) -> bool:
    """Whether a step feeds the current block: an AR step (shift, block size 1) needs no mask slot."""
    return not (lag(dlm) and batch.opts.block_size == 1)


@torch.no_grad()
def denoise_step(dlm, batch, want: torch.Tensor | None = None, experts=None) -> torch.Tensor:
    """One model call: write pending clean KV, return candidate logits [B, W, V] for the current window
    (W = batch.width: the block, or the blocks of multi-block decoding).

    want [B, W] bool: only these slots' logits, as [N, V] in row-major order. The LM head and
    everything after it cost as much as the vocabulary is large (151k rows on Qwen), and a
    block's decided slots need none: on average half a block's slots per step. experts: an MoE
    model's plan for the block's forward (edlm.decode.team), never for a causal prefill of its own."""
    w, shift = batch.width, lag(dlm)
    feed_block = feeds_block(dlm, batch)
    if feed_block and causal_prefill(dlm, batch) and batch.pending_ids.shape[1] >= CAUSAL_PREFILL_MIN:
        _prefill_causally(dlm, batch)  # a long prompt: its own forward through the causal fast path
    n_pending = batch.pending_ids.shape[1]
    ids, q_pos, mask = _step_inputs(dlm, batch, feed_block)
    has_pending = batch.pending_pos[:, -1] >= 0 if n_pending else None  # [B]: rows writing a finished block
    wanted = want is not None and feed_block
    if wanted:
        logits_for = _wanted_positions(ids.shape, w, shift, want, has_pending)  # [B, Q] bool
    else:  # the window's queries, and with shift the last pending one (it predicts slot 0)
        logits_for = w + (shift if n_pending else 0) if feed_block else 1
    logits = batch.forward(dlm, q_pos, mask, n_pending, ids=ids, logits_to_keep=logits_for,
                           noisy=n_pending if feed_block else None, experts=experts)  # the block's slots, after the clean ones
    batch.pending_ids, batch.pending_pos = batch.pending_ids[:, :0], batch.pending_pos[:, :0]
    if not shift or not feed_block:  # slot j at query j; an AR step's one logit predicts its one slot
        return logits
    if wanted:
        return _wanted_logits(batch, logits, logits_for, want, has_pending)
    if n_pending:  # rows that wrote a finished block: its last position predicts slot 0 from now on
        fresh = logits[:, 0]
        batch.carry = fresh if batch.carry is None else torch.where(has_pending[:, None], fresh, batch.carry)
        logits = logits[:, 1:]
    return with_carry(batch, logits[:, None])[:, 0]


# A prompt this long (in complete blocks) is written by a forward of its own when the causal fast
# path is exact (causal_prefill): one more model call, but no [Q, K] mask and the backend's causal
# kernel for the part that costs most. Shorter prompts go with their first block as before.
CAUSAL_PREFILL_MIN = 256


def causal_prefill(dlm, batch) -> bool:
    """Whether the pending prompt tokens may go through the attention backend's causal fast path (no
    mask built, HF's is_causal): the first forward (nothing cached), clean tokens attending token-
    causally (an AR model, or a causal-clean stream), and no row left-padded (known on the host)."""
    causal = not dlm.config.diffusion or dlm.config.causal_clean
    return causal and batch.unpadded_prompts and batch.cache.get_seq_length() == 0 and batch.pending_ids.shape[1] > 1


def _prefill_causally(dlm, batch) -> None:
    """Write the pending prompt tokens' KV in a forward of their own (mask None: causal); with
    shift, its last position's logits are the carry that predicts the first block's slot 0."""
    logits = batch.forward(dlm, batch.pending_pos, None, batch.pending_ids.shape[1], ids=batch.pending_ids,
                           logits_to_keep=1)
    if lag(dlm):
        batch.carry = logits[:, -1]
    batch.pending_ids, batch.pending_pos = batch.pending_ids[:, :0], batch.pending_pos[:, :0]
    batch.block_mask = None


def _step_inputs(dlm, batch, feed_block: bool):
    """Ids, positions [B, Q] and mask of a step: [pending clean tokens ; the current block].

    A block's first step (pending clean tokens + block) leaves the block's rows of its mask to
    the later steps: their keys (cache ; pending ; block) are exactly the next step's (cache with
    pending ; block), so a block builds its mask once."""
    n_pending = batch.pending_ids.shape[1]
    if n_pending == 0 and batch.block_mask is not None:
        q_pos, mask = batch.block_mask
        return batch.block_ids, q_pos, mask
    ids, q_pos = [batch.pending_ids], [batch.pending_pos]
    if feed_block:
        ids.append(batch.block_ids)
        q_pos.append(batch.block_start[:, None] + torch.arange(batch.width, device=batch.block_ids.device)[None])
    ids, q_pos = torch.cat(ids, 1), torch.cat(q_pos, 1)
    if not feed_block and causal_prefill(dlm, batch):  # an AR model's prompt: HF's own causal path
        return ids, q_pos, None
    k_pos, k_valid = batch.keys_with(q_pos)
    clean_q = None
    if dlm.config.causal_clean:  # pending tokens are clean: token-causal, as the clean stream was trained
        clean_q = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1) < n_pending
    # block-causal by position: a window's later blocks see its earlier ones as they stand
    mask = dlm.backend_mask(position_block_mask(q_pos, k_pos, batch.opts.block_size, k_valid, clean_q))  # [B, 1, Q, K]
    if feed_block and not n_pending:
        batch.block_mask = (q_pos, mask)
    elif feed_block and torch.is_tensor(mask):
        batch.block_mask = (q_pos[:, n_pending:], mask[:, :, n_pending:])
    return ids, q_pos, mask


def _wanted_positions(shape, width: int, shift: int, want, has_pending) -> torch.Tensor:
    """The queries whose logits the wanted slots need (HF's boolean `logits_to_keep`): slot j at
    the window's query j, or j - 1 with shift; there, slot 0 comes from the carry, refreshed at the
    last pending position of the rows that have one."""
    first = shape[1] - width  # the window's first query
    logits_for = torch.zeros(shape, dtype=torch.bool, device=want.device)
    if not shift:
        logits_for[:, first:] = want
        return logits_for
    logits_for[:, first:-1] = want[:, 1:]
    if has_pending is not None:
        logits_for[:, first - 1] = has_pending
    return logits_for


def _wanted_logits(batch, logits, logits_for, want, has_pending) -> torch.Tensor:
    """A shift model's wanted slots from the kept logits [M, V] (row-major over `logits_for`): the
    carry rows refresh the carry, slot 0 is read from it; [N, V], N = want.sum(), row-major."""
    fresh = logits_for.nonzero()[:, 1] == logits_for.shape[1] - batch.width - 1  # carry rows of M
    carry = batch.carry.clone() if batch.carry is not None else logits.new_zeros(want.shape[0], logits.shape[-1])
    if has_pending is not None:
        carry[has_pending] = logits[fresh]
    batch.carry = carry
    place = (want.flatten().cumsum(0) - 1).view(want.shape)  # each wanted slot's row in the result
    result = logits.new_empty(int(want.sum()), logits.shape[-1])
    result[place[:, 0][want[:, 0]]] = carry[want[:, 0]]
    result[place[:, 1:][want[:, 1:]]] = logits[~fresh]
    return result


def with_carry(batch, logits: torch.Tensor) -> torch.Tensor:
    """A shift model's slot logits [B, C, bs, V] from its block queries' [B, C, bs, V]: slot j is
    predicted at query j - 1, slot 0 by the clean position before the block (the carry, which the
    block's later steps cannot change)."""
    carry = batch.carry if batch.carry is not None else torch.zeros_like(logits[:, 0, 0])
    return torch.cat([carry[:, None, None].expand(-1, logits.shape[1], -1, -1), logits[:, :, :-1]], 2)


@torch.no_grad()
def forward_block(dlm, batch, ids=None, embeds=None, copies: int = 1, see=None, experts=None) -> torch.Tensor:
    """Candidate logits [B, copies, bs, V] of `copies` versions of the current block, in one model call.

    ids [B, copies*bs] or embeds [B, copies*bs, H]; see [Q, Q] bool says which new queries see
    which new keys (default: each copy sees only itself). Needs the pending clean KV written.
    Every copy has the block's own position ids and sees the clean cache, so with block-causal
    attention each copy's logits are exactly those of a forward of that block alone; the copies'
    KV is cropped right after, like the current block's in `denoise_step`.
    """
    bs = batch.opts.block_size
    assert batch.pending_ids.shape[1] == 0, "a block's first forward is denoise_step"
    n, dev = batch.block_ids.shape[0], batch.block_ids.device
    q_pos = (batch.block_start[:, None] + torch.arange(bs, device=dev)[None]).repeat(1, copies)  # [B, Q]
    if see is None:
        copy = torch.arange(copies, device=dev).repeat_interleave(bs)
        see = copy[:, None] == copy[None, :]
    cached = position_block_mask(q_pos, batch.cache_pos, bs, batch.cache_valid)  # [B, Q, K]
    mask = torch.cat([cached, see.to(dev).expand(n, -1, -1)], -1)
    logits = batch.forward(dlm, q_pos, mask, 0, ids=ids, embeds=embeds, noisy=0, experts=experts)
    logits = logits.view(n, copies, bs, -1)
    return with_carry(batch, logits) if lag(dlm) else logits


def greedy_tokens(logits):
    tokens, conf, _ = pick_tokens(logits, temperature=0.0, top_p=1.0, entropy=False)
    return tokens, conf


def apply_commit(dlm, batch, chosen: torch.Tensor, tokens: torch.Tensor) -> None:
    """Write the chosen slots' tokens; after an EOS nothing more of the block is filled."""
    batch.block_ids = torch.where(chosen, tokens, batch.block_ids)
    batch.todo = batch.todo & ~chosen
    eos = dlm.tokenizer.eos_token_id if dlm.tokenizer is not None else None
    if eos is None:
        return
    # eos_slot (reset when a block opens) is the first decided EOS; without a host sync, so always
    slot = torch.arange(chosen.shape[1], device=chosen.device)[None]
    first = torch.where(chosen & (tokens == eos), slot, chosen.shape[1]).amin(-1)
    batch.eos_slot = torch.minimum(batch.eos_slot, first)
    batch.todo = batch.todo & (slot < batch.eos_slot[:, None])  # never fill after an EOS


def slot_logprobs(batch, logits: torch.Tensor, tokens: torch.Tensor):
    """(log p(tokens), top ids, top log-probs) under the logits the tokens came from, where the call
    asked for logprobs (batch.logprob_k); else None and nothing is computed."""
    return None if batch.logprob_k is None else logprobs_of(logits, tokens, batch.logprob_k)


def record_logprobs(batch, chosen: torch.Tensor, logprobs) -> None:
    """What the chosen slots' tokens report as their logprobs (from slot_logprobs): their values at
    the step that committed them."""
    if logprobs is None:
        return
    token_lp, top_ids, top_lp = logprobs
    batch.slot_lp = torch.where(chosen, token_lp, batch.slot_lp)
    batch.slot_top_ids = torch.where(chosen[..., None], top_ids, batch.slot_top_ids)
    batch.slot_top_lp = torch.where(chosen[..., None], top_lp, batch.slot_top_lp)


# ------------------------------------------------------------------ a strategy's memo between steps
@dataclass
class Memo:
    rows: torch.Tensor  # [B] request ids (cpu), to follow rows leaving the batch
    block_start: torch.Tensor  # [B]
    tensors: dict


def remember(batch, **tensors) -> None:
    """What this step leaves to the next step of the same blocks (e.g. drafts from its logits)."""
    batch.memo = Memo(batch.rows, batch.block_start, tensors)


def recall(batch) -> dict | None:
    """What the last step remembered, for the rows still here; None at a block's first step."""
    memo = batch.memo
    if memo is None or batch.pending_ids.shape[1]:  # pending clean KV: a new block just opened
        return None
    here = torch.isin(memo.rows, batch.rows).to(batch.block_start.device)
    if not torch.equal(memo.block_start[here], batch.block_start):
        return None
    return {k: tuple(x[here] for x in v) if isinstance(v, tuple) else v[here] for k, v in memo.tensors.items()}
