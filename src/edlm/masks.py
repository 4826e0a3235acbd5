"""Attention masks for block diffusion, and their translation for each attention backend.

Convention everywhere: a bool tensor, True = the query may attend to the key, shape [Q, K]
(or [B, Q, K]). Blocks are aligned to absolute positions from 0: position p is in block
p // block_size, so a last partial block is simply a shorter block.
"""

from __future__ import annotations

import torch


def block_index(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return torch.arange(seq_len, device=device) // block_size


def block_causal_mask(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """[L, L]: a query sees every key in its own block and in earlier blocks (prefill/decoding)."""
    b = block_index(seq_len, block_size, device)
    return b[None, :] <= b[:, None]


def noisy_context_mask(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """[L, L]: the paper's "block-wise attention, noisy context" study variant.

    The noisy sequence alone, block-causal: a noisy block sees the *noisy* earlier blocks.
    """
    return block_causal_mask(seq_len, block_size, device)


def bidirectional_mask(seq_len: int, device=None) -> torch.Tensor:
    """[L, L]: everything sees everything (LLaDA/Dream style; also used for embeddings)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)


def clean_context_mask(seq_len: int, block_size: int, device=None, causal_clean: bool = False) -> torch.Tensor:
    """[2L, 2L] mask for concat(x_t, x_0) (BD3-LM layout, paper Sec. 3).

    noisy->noisy: same block only; noisy->clean: strictly earlier blocks; clean->noisy: never;
    clean->clean: block-causal (the paper's), or token-causal with causal_clean: then the clean
    stream *is* an AR model (TiDAR): its logits give an AR loss at no extra forward, and its KV
    is exactly an AR prefix cache, so the model can verify its own drafts.
    """
    b = block_index(seq_len, block_size, device)
    same = b[:, None] == b[None, :]
    earlier = b[None, :] < b[:, None]
    if causal_clean:
        pos = torch.arange(seq_len, device=device)
        causal = pos[None, :] <= pos[:, None]
    else:
        causal = b[None, :] <= b[:, None]
    top = torch.cat([same, earlier], dim=1)
    bottom = torch.cat([torch.zeros_like(same), causal], dim=1)
    return torch.cat([top, bottom], dim=0)


def block_copies_mask(pos: torch.Tensor, group: torch.Tensor, block_size: int,
                      causal_clean: bool = False, window_start: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, T] bool (True = attend) for rows of a clean stream plus noisy block copies
    (likelihood scoring: several noisy versions of one block are scored in one forward; training
    feeds the noisy blocks that carry loss this way).

    clean_context_mask's rule with positions and groups given per token (group -1 = clean,
    >= 0 = a copy, -2 = padding):
    clean -> clean block-causal (token-causal with causal_clean); copy -> clean strictly earlier
    blocks; copy -> its own copy only.
    window_start [B, T] (training in windows, edlm.train.parallelism.window_starts): the first
    block of each noisy token's window. A copy then sees clean blocks before its window's start,
    and the copies of the blocks from that start up to its own (the blocks of a multi-block
    decoding window: the later ones see the undecided ones before them). Equal to the token's own
    block, it is the rule above.
    """
    blk = torch.div(pos, block_size, rounding_mode="floor")
    q_blk, k_blk = blk[:, :, None], blk[:, None, :]
    q_grp, k_grp = group[:, :, None], group[:, None, :]
    k_clean = k_grp == -1
    clean_seen = (pos[:, None, :] <= pos[:, :, None]) if causal_clean else (k_blk <= q_blk)
    clean_query = (q_grp == -1) & k_clean & clean_seen
    if window_start is None:
        copy_query = (q_grp >= 0) & ((k_clean & (k_blk < q_blk)) | (k_grp == q_grp))
    else:
        q_ws = window_start[:, :, None]
        earlier_copy = (k_grp >= 0) & (k_blk >= q_ws) & (k_blk < q_blk)
        copy_query = (q_grp >= 0) & ((k_clean & (k_blk < q_ws)) | (k_grp == q_grp) | earlier_copy)
    return clean_query | copy_query  # pad groups (-2) match nothing; to_backend_mask opens pad rows


def position_block_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, block_size: int, k_valid: torch.Tensor | None = None,
    causal_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, Q, K] block-causal mask from logical positions (decoding with a padded KV cache).

    q_pos [B, Q], k_pos [B, K] are logical positions; k_valid [B, K] marks real (non-pad) keys.
    causal_q [B, Q] marks clean queries of a causal-clean model: they see keys at positions <= their
    own (token-causal), as in training, so their KV is an exact AR prefix cache.
    """
    allowed = (k_pos[:, None, :] // block_size) <= (q_pos[:, :, None] // block_size)
    if causal_q is not None:
        causal = k_pos[:, None, :] <= q_pos[:, :, None]
        allowed = torch.where(causal_q[:, :, None], causal, allowed)
    if k_valid is not None:
        allowed = allowed & k_valid[:, None, :]
    return allowed


def draft_blocks_mask(
    q_pos: torch.Tensor, q_start: torch.Tensor, k_pos: torch.Tensor, k_start: torch.Tensor,
    k_valid: torch.Tensor, sub_block: int | None = None,
) -> torch.Tensor:
    """[B, Q, K] for AR-verified drafting in one forward (TiDAR-style, edlm.decode.selfverify).

    Every token is clean (start -1: AR verification, token-causal) or in a draft block of masks
    that starts at `start` (not block-aligned: it follows a possible accepted prefix). A clean
    query sees clean keys at positions <= its own; a draft-block query sees clean keys before its
    block's start and its own block's keys (which share its start). The rule of
    clean_context_mask(causal_clean=True) with the block placed where the prefix ends.

    sub_block: a draft block wider than the model's block is cut into sub-blocks of this many
    tokens from its start, block-causal among themselves (multi-block drafting): a query sees its
    own and the earlier sub-blocks of its draft block, as a later block of a multi-block window
    sees the undecided ones before it, and the first sub-block is exactly a one-block draft.
    """
    qs, ks = q_start[:, :, None], k_start[:, None, :]
    k_clean = ks < 0
    clean_q = (qs < 0) & k_clean & (k_pos[:, None, :] <= q_pos[:, :, None])
    same = ks == qs
    if sub_block is not None:
        same = same & ((k_pos[:, None, :] - ks) // sub_block <= (q_pos[:, :, None] - qs) // sub_block)
    draft_q = (qs >= 0) & ((k_clean & (k_pos[:, None, :] < qs)) | same)
    return (clean_q | draft_q) & k_valid[:, None, :]


def to_backend_mask(
    mask: torch.Tensor,
    attn_implementation: str,
    key_padding: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Turn a bool mask [Q, K] or [B, Q, K] into what the model's attention backend expects.

    key_padding [B, K]: True for real tokens. Returns [B, 1, Q, K]:
    - eager: additive float (0 / dtype min). transformers' eager attention ADDS the mask to the
      scores, so a bool mask there is silently wrong (True becomes +1).
    - sdpa (and anything else dense): bool, True = attend.
    - flex_attention: a BlockMask (CUDA only in practice; BLOCK_SIZE is always passed).
    A query row with no allowed key (a pad query) is opened to all keys: its output is never
    used, and an all-masked softmax row would produce NaN that leaks through later layers.
    """
    if mask.dim() == 2:
        mask = mask[None]
    if key_padding is not None:
        mask = mask & key_padding[:, None, :].bool()
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    if attn_implementation == "flex_attention":
        return _flex_block_mask(mask)
    if attn_implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
        return torch.where(mask, zero, neg)[:, None]
    return mask[:, None]


def _flex_block_mask(mask: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    dense = mask.contiguous()
    batch, q_len, k_len = dense.shape

    def mask_mod(b, h, q, k):
        return dense[b, q, k]

    # BLOCK_SIZE must be passed explicitly: the default silently assumes 128-aligned shapes.
    return create_block_mask(
        mask_mod, batch, None, q_len, k_len, device=dense.device, BLOCK_SIZE=128
    )
