import pytest
import torch

from edlm.masks import (
    bidirectional_mask,
    block_causal_mask,
    block_copies_mask,
    clean_context_mask,
    noisy_context_mask,
    position_block_mask,
    to_backend_mask,
)

SHAPES = [(8, 4), (10, 4), (7, 3), (5, 8), (6, 1), (9, 9)]


def definition(seq_len, block_size):
    """The method.md truth table, written as plain loops."""
    n = 2 * seq_len
    m = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            q_noisy, k_noisy = q < seq_len, k < seq_len
            bq, bk = (q % seq_len) // block_size, (k % seq_len) // block_size
            if q_noisy and k_noisy:
                m[q, k] = bq == bk
            elif q_noisy and not k_noisy:
                m[q, k] = bk < bq
            elif not q_noisy and not k_noisy:
                m[q, k] = bk <= bq
    return m


@pytest.mark.parametrize("seq_len,block_size", SHAPES)
def test_clean_context_truth_table(seq_len, block_size):
    assert torch.equal(clean_context_mask(seq_len, block_size), definition(seq_len, block_size))


@pytest.mark.parametrize("seq_len,block_size", SHAPES)
def test_block_causal_and_noisy_context(seq_len, block_size):
    want = torch.tensor([[k // block_size <= q // block_size for k in range(seq_len)] for q in range(seq_len)])
    assert torch.equal(block_causal_mask(seq_len, block_size), want)
    assert torch.equal(noisy_context_mask(seq_len, block_size), want)
    assert bidirectional_mask(seq_len).all()


def test_partial_last_block_is_its_own_block():
    m = clean_context_mask(10, 4)  # blocks [0..3], [4..7], [8, 9]
    assert m[8, 9] and m[9, 8]  # the partial block is bidirectional
    assert m[8, 10 + 7] and not m[8, 10 + 8]  # sees clean earlier blocks, not its own clean copy


def test_block_size_must_be_positive():
    with pytest.raises(ValueError):
        block_causal_mask(4, 0)


def test_position_mask_matches_dense_with_padding():
    pos = torch.tensor([[-1, -1, 0, 1, 2, 3]])
    valid = pos >= 0
    m = position_block_mask(pos.clamp_min(0), pos.clamp_min(0), 2, valid)
    dense = block_causal_mask(4, 2)
    assert torch.equal(m[0, 2:, 2:], dense)
    assert not m[0, :, :2].any()


def test_backend_translation():
    mask = block_causal_mask(4, 2)
    pad = torch.tensor([[False, True, True, True]])
    eager = to_backend_mask(mask, "eager", pad, torch.float32)
    sdpa = to_backend_mask(mask, "sdpa", pad)
    assert eager.shape == sdpa.shape == (1, 1, 4, 4)
    assert eager.dtype == torch.float32 and sdpa.dtype == torch.bool
    assert torch.equal(eager == 0, sdpa)
    assert (eager[0, 0, 1:, 0] == torch.finfo(torch.float32).min).all()  # pad key masked
    # the pad query's row would be all-masked except itself: it must not be empty (NaN)
    only_pad = to_backend_mask(torch.zeros(2, 2, dtype=torch.bool), "sdpa")
    assert only_pad.all()


@pytest.mark.parametrize("seq_len,block_size", SHAPES)
def test_block_copies_with_one_copy_per_block_is_the_training_layout(seq_len, block_size):
    """Likelihood scoring's mask reduces to training's when every block has one noisy copy."""
    pos = torch.arange(seq_len).repeat(2)[None]
    group = torch.cat([torch.arange(seq_len) // block_size, torch.full((seq_len,), -1)])[None]
    assert torch.equal(block_copies_mask(pos, group, block_size)[0], definition(seq_len, block_size))
    padded = block_copies_mask(torch.cat([pos, torch.zeros(1, 1, dtype=torch.long)], 1),
                               torch.cat([group, torch.full((1, 1), -2)], 1), block_size)[0]
    assert not padded[-1].any() and not padded[:, -1].any()  # padding attends to and is seen by nothing


def test_causal_clean_mask_truth_table():
    """clean_context_mask(causal_clean=True) against a loop over every (query, key) pair of the
    concat(x_t, x_0) layout: the clean half is an AR model, the noisy half is unchanged."""
    seq_len, bs = 10, 4
    got = clean_context_mask(seq_len, bs, causal_clean=True)
    for q in range(2 * seq_len):
        for k in range(2 * seq_len):
            qc, kc = q >= seq_len, k >= seq_len  # clean halves
            qi, ki = q % seq_len, k % seq_len
            if qc:
                want = kc and ki <= qi
            elif kc:
                want = ki // bs < qi // bs
            else:
                want = ki // bs == qi // bs
            assert bool(got[q, k]) == want, (q, k)
    block = clean_context_mask(seq_len, bs)
    assert torch.equal(got[:seq_len], block[:seq_len])  # noisy queries see exactly what they did
    assert got[seq_len + 4, seq_len + 5] == 0 and block[seq_len + 4, seq_len + 5] == 1


def test_block_copies_mask_causal_clean_matches_the_concat_layout():
    seq_len, bs = 8, 4
    pos = torch.cat([torch.arange(seq_len), torch.arange(seq_len)])[None]
    group = torch.cat([torch.arange(seq_len) // bs, torch.full((seq_len,), -1)])[None]
    got = block_copies_mask(pos, group, bs, causal_clean=True)[0]
    assert torch.equal(got, clean_context_mask(seq_len, bs, causal_clean=True))


def test_draft_blocks_mask_truth_table():
    """Clean tokens (start -1) are token-causal; a draft block sees clean tokens before its start
    and its own block, never another block, never a pad key."""
    from edlm.masks import draft_blocks_mask

    pos = torch.tensor([[5, 6, 7, 8, 7, 8, 9, 8, 9, 10, 99]])
    start = torch.tensor([[-1, -1, -1, -1, 7, 7, 7, 8, 8, 8, -1]])
    valid = torch.tensor([[True] * 10 + [False]])
    cache_pos = torch.arange(5)[None]
    k_pos, k_start = torch.cat([cache_pos, pos], 1), torch.cat([torch.full((1, 5), -1), start], 1)
    k_valid = torch.cat([torch.ones(1, 5, dtype=torch.bool), valid], 1)
    got = draft_blocks_mask(pos, start, k_pos, k_start, k_valid)[0]
    for q in range(pos.shape[1]):
        for k in range(k_pos.shape[1]):
            qp, qs, kp, ks = int(pos[0, q]), int(start[0, q]), int(k_pos[0, k]), int(k_start[0, k])
            if not k_valid[0, k]:
                want = False
            elif qs < 0:
                want = ks < 0 and kp <= qp
            else:
                want = (ks < 0 and kp < qs) or ks == qs
            assert bool(got[q, k]) == want, (q, k)


def test_draft_blocks_mask_sub_blocks_are_block_causal():
    """A draft block two model blocks wide (sub_block 3 from its start): a query sees clean keys
    before the block's start, its own sub-block and the earlier one, never the later one; clean
    queries are unchanged."""
    from edlm.masks import draft_blocks_mask

    pos = torch.tensor([[4, 5, 4, 5, 6, 7, 8, 9, 5, 6, 7, 8]])  # clean 4 5; block @4 (6 wide); block @5 (4 of 6)
    start = torch.tensor([[-1, -1] + [4] * 6 + [5] * 4])
    k_pos, k_start = torch.cat([torch.arange(4)[None], pos], 1), torch.cat([torch.full((1, 4), -1), start], 1)
    k_valid = torch.ones_like(k_pos, dtype=torch.bool)
    got = draft_blocks_mask(pos, start, k_pos, k_start, k_valid, sub_block=3)[0]
    plain = draft_blocks_mask(pos, start, k_pos, k_start, k_valid)[0]
    for q in range(pos.shape[1]):
        for k in range(k_pos.shape[1]):
            qp, qs, kp, ks = int(pos[0, q]), int(start[0, q]), int(k_pos[0, k]), int(k_start[0, k])
            if qs < 0:
                want = ks < 0 and kp <= qp
            else:
                want = (ks < 0 and kp < qs) or (ks == qs and (kp - ks) // 3 <= (qp - qs) // 3)
            assert bool(got[q, k]) == want, (q, k)
    assert (got <= plain).all() and (got != plain).any()  # only keys of later sub-blocks are taken away
