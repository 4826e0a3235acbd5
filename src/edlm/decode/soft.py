"""DMax-style soft parallel decoding: unsure drafts are fed back as blends of token and mask.

A slot still to decide is not a bare mask after the block's first step: its input embedding is
p * E[t] + (1 - p) * E[mask], where t is the slot's current top-1 token and p its probability
(DMax, "soft parallel decoding"). The model thus sees its own drafts, weighted by how sure it
was, and revises them in the next forward. A slot is committed (and fed as a hard token from
then on) by the threshold rule; each forward commits at least one slot, so TPF >= 1.
The on-policy training that teaches a model to repair its drafts (DMax's other half) is not
here: on a model trained only on hard masks the blends are out of distribution.
"""

from __future__ import annotations

import torch

from edlm.decode.rules import commit_threshold
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


def soft_embeddings(dlm, block_ids: torch.Tensor, tokens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[B, bs, H]: E[block_ids], with slot j moved towards E[tokens_j] by weight_j (0 = unchanged)."""
    embed = dlm.model.get_input_embeddings()
    mask = embed.weight[dlm.config.mask_token_id]
    base = embed(block_ids)
    return base + weight[..., None].to(base.dtype) * (embed(tokens) - mask)


@torch.no_grad()
def soft_step(dlm, batch, generator=None) -> torch.Tensor:
    """One forward on the soft block, then the threshold rule commits; returns committed [B]."""
    drafts = recall(batch)
    if drafts is None:  # the block's first forward: nothing drafted yet, and it writes pending KV
        logits = denoise_step(dlm, batch)
    else:
        weight = drafts["conf"] * batch.todo  # committed and out-of-budget slots stay hard
        embeds = soft_embeddings(dlm, batch.block_ids, drafts["tokens"], weight)
        logits = forward_block(dlm, batch, embeds=embeds)[:, 0]
    tokens, conf = greedy_tokens(logits)
    chosen = commit_threshold(conf, batch.todo, batch.opts.threshold)
    apply_commit(dlm, batch, chosen, tokens)
    record_logprobs(batch, chosen, slot_logprobs(batch, logits, tokens))
    remember(batch, tokens=tokens, conf=conf)
    return chosen.sum(-1)
