"""Training windows (D2F-style, for multi-block decoding): which block sees which, and what the
model computes under them, against an independent construction."""

import pytest
import torch

from edlm.errors import EdlmError
from edlm.masks import block_causal_mask, block_copies_mask
from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer
from edlm.train import TrainConfig
from edlm.train.convert import convert_model
from edlm.train.noise import NoiseSettings
from edlm.train.objective import LossSettings, diffusion_loss, row_generators
from edlm.train.parallelism import window_starts


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_window_starts_follow_each_rows_offset_and_stop_at_blocks_without_loss():
    active = torch.ones(40, 7, dtype=torch.bool)
    active[:, 2] = False  # a block without loss (not fed): no window reaches back past it
    got = window_starts(active, 3, _gens(range(40)))
    offsets = [int(torch.randint(3, (), generator=g)) for g in _gens(range(40))]
    for row, o in enumerate(offsets):
        for b in range(7):
            want = max(0, (b - o) // 3 * 3 + o)
            if b > 2:
                want = max(want, 3)
            assert int(got[row, b]) == (b if b == 2 else want), (row, b, o)
    assert len(set(offsets)) == 3  # every offset occurs: each block trains first and later in a window
    assert torch.equal(window_starts(active, 1, _gens(range(40))), torch.arange(7).expand(40, -1))
    halves = window_starts(torch.ones(8, 5, dtype=torch.bool), 2, _gens(range(4)))  # complementary pairs
    assert torch.equal(halves[:4], halves[4:])


def test_window_mask_truth_table():
    """Copies see clean keys of blocks before their window's start, their own copy and the copies
    of the blocks from the window's start up to theirs; clean queries are unchanged."""
    bs = 2
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])
    group = torch.tensor([[0, 0, 1, 1, 2, 2, -1, -1, -1, -1, -1, -1]])
    ws = torch.tensor([[0, 0, 0, 0, 2, 2, -1, -1, -1, -1, -1, -1]])  # windows {0, 1} and {2}
    got = block_copies_mask(pos, group, bs, window_start=ws)[0]
    plain = block_copies_mask(pos, group, bs)[0]
    for q in range(12):
        for k in range(12):
            qb, kb = int(pos[0, q]) // bs, int(pos[0, k]) // bs
            if group[0, q] < 0:
                want = bool(plain[q, k])
            elif group[0, k] < 0:
                want = kb < int(ws[0, q])
            else:
                want = int(ws[0, q]) <= kb <= qb
            assert bool(got[q, k]) == want, (q, k)
    same = block_copies_mask(pos, group, bs, window_start=torch.where(group >= 0, group, -1))[0]
    assert torch.equal(same, plain)  # every block its own window: the plain layout


@pytest.mark.parametrize("shift", [False, True])
def test_a_window_block_sees_what_multiblock_decoding_shows_it(shift):
    """forward_noisy with windows {0, 1} {2, 3}: each block's logits equal a plain block-causal
    forward of [clean tokens before its window ; the window's noisy blocks up to it], which is the
    state of a two-block decoding window (with shift: each token from the position before it)."""
    bs, n = 4, 4
    dlm = convert_model(make_tiny_causal_lm("llama", dtype=torch.float64, seed=3), make_tiny_tokenizer(),
                        block_size=bs, shift=shift)
    x_0 = torch.randint(5, 90, (1, bs * n), generator=torch.Generator().manual_seed(2))
    masked = torch.rand(1, bs * n, generator=torch.Generator().manual_seed(4)) < 0.6
    x_t = torch.where(masked, dlm.config.mask_token_id, x_0)
    ws = torch.tensor([[0, 0, 2, 2]])
    with torch.no_grad():
        got = dlm.forward_noisy(x_t, x_0, window_start=ws)
        plain = dlm.forward_noisy(x_t, x_0)
        for b in range(n):
            w0 = int(ws[0, b]) * bs
            ids = torch.cat([x_0[:, :w0], x_t[:, w0: (b + 1) * bs]], 1)
            mask = block_causal_mask(ids.shape[1], bs)[None]
            out = dlm.model(input_ids=ids, attention_mask=dlm.backend_mask(mask)).logits.double()
            if shift:
                out = torch.cat([out[:, :1], out[:, :-1]], 1)
            span = slice(b * bs + (1 if shift and b == 0 else 0), (b + 1) * bs)  # position 0: nothing predicts it
            assert torch.allclose(got[:, span], out[:, span], atol=1e-9), b
        assert torch.allclose(got[:, :bs], plain[:, :bs], atol=1e-9)  # a window's first block: the plain layout
        assert not torch.allclose(got[:, bs: 2 * bs], plain[:, bs: 2 * bs])


def test_window_loss_trains_and_is_refused_where_it_means_nothing(tmp_path):
    dlm = convert_model(make_tiny_causal_lm("llama", dtype=torch.float64), make_tiny_tokenizer(), block_size=4,
                        shift=True)
    ids = torch.randint(5, 90, (4, 16), generator=torch.Generator().manual_seed(1))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, :6] = False  # a prompt block and a half: windows start after it
    noise = NoiseSettings(t_per_block=True)
    losses = {w: diffusion_loss(dlm, ids, maskable, noise, row_generators(0, 1, torch.arange(4)),
                                LossSettings(window=w))[0] for w in (1, 2)}
    assert torch.isfinite(losses[2]) and not torch.isclose(losses[1], losses[2])
    data = tmp_path / "d.txt"
    data.write_text("some text")
    for kw, msg in [(dict(window=0), "--window must be"), (dict(window=2, attention="noisy"), "--attention clean"),
                    (dict(window=2, objective="ar"), "apply to --objective diffusion")]:
        with pytest.raises(EdlmError, match=msg):
            TrainConfig(model="m", data=[str(data)], out=str(tmp_path / "out"), **kw).validate()
