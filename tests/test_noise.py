import math

import pytest
import torch

from edlm.train.noise import position_weights, sample_block_mask, sample_noise_level


def test_position_weights_formula():
    w = position_weights(torch.tensor([0.0, 1.0]), block_size=8, half_life=0.25)
    beta = math.log(2) / (0.25 * 8)
    assert torch.allclose(w[0], torch.exp(beta * torch.arange(8.0)))
    assert torch.allclose(w[1], torch.ones(8))  # t = 1: uniform
    assert w[0, -1] / w[0, 0] == pytest.approx(2 ** (7 / 2), rel=1e-5)


@pytest.mark.parametrize("t", [0.1, 0.37, 0.5, 0.93, 1.0])
def test_exact_count_per_full_block(t):
    g = torch.Generator().manual_seed(1)
    m = sample_block_mask(torch.full((16,), t), 40, 8, half_life=0.1, generator=g)
    counts = m.view(16, 5, 8).sum(-1)
    assert (counts == math.floor(t * 8 + 0.5)).all()


def test_partial_block_and_per_block_t():
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([[0.5, 1.0, 0.25]])
    m = sample_block_mask(t, 10, 4, generator=g)  # blocks of 4, 4, 2
    assert m[0, :4].sum() == 2 and m[0, 4:8].sum() == 4 and m[0, 8:].sum() == 1  # round(0.25*2)=1 (half up)


def test_maskable_respected_and_counts_use_maskable_positions():
    g = torch.Generator().manual_seed(3)
    maskable = torch.ones(64, 8, dtype=torch.bool)
    maskable[:, :3] = False
    m = sample_block_mask(torch.full((64,), 0.6), 8, 8, generator=g, maskable=maskable)
    assert not m[:, :3].any()
    assert (m.sum(-1) == 3).all()  # round(0.6 * 5)


def test_uniform_when_half_life_none():
    g = torch.Generator().manual_seed(4)
    m = sample_block_mask(torch.full((20000,), 0.25), 8, 8, half_life=None, generator=g)
    freq = m.float().mean(0)
    assert torch.allclose(freq, torch.full((8,), 0.25), atol=0.015)


def test_position_dependent_matches_gumbel_top_k_law():
    """At small t later positions are masked more; frequencies match an independent
    sequential sampler of Eq. 2 (draw without replacement proportional to w)."""
    n, t, bs, hl = 20000, 0.25, 8, 0.1
    g = torch.Generator().manual_seed(5)
    freq = sample_block_mask(torch.full((n,), t), bs, bs, half_life=hl, generator=g).float().mean(0)
    assert (freq[1:] >= freq[:-1] - 0.01).all() and freq[-1] > 3 * freq[0]
    w = position_weights(torch.tensor(t), bs, hl)
    rng = torch.Generator().manual_seed(6)
    ref = torch.zeros(bs)
    for _ in range(4000):
        avail = torch.ones(bs, dtype=torch.bool)
        for _ in range(round(t * bs)):
            p = torch.where(avail, w, torch.zeros_like(w))
            i = torch.multinomial(p / p.sum(), 1, generator=rng).item()
            avail[i] = False
            ref[i] += 1
    ref /= 4000
    assert torch.allclose(freq, ref, atol=0.035)


def test_noise_level_range():
    t = sample_noise_level(1000, 3, t_min=0.2, generator=torch.Generator().manual_seed(0))
    assert t.shape == (1000, 3) and t.min() >= 0.2 and t.max() <= 1.0


def test_negative_half_life_masks_earlier_positions_more():
    g = torch.Generator().manual_seed(7)
    freq = sample_block_mask(torch.full((5000,), 0.25), 8, 8, half_life=-0.1, generator=g).float().mean(0)
    assert freq[0] > 3 * freq[-1]


def test_noise_settings_masking_kinds():
    """NoiseSettings names the masking kind: reverse is position masking mirrored, full masks every
    maskable token, uniform ignores the half-life."""
    from edlm.train.noise import NoiseSettings, sample_masks

    ids = torch.zeros(3, 16, dtype=torch.long)
    maskable = torch.ones(3, 16, dtype=torch.bool)
    maskable[:, :3] = False
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    assert torch.equal(sample_masks(ids, maskable, 4, NoiseSettings(masking="full"), gens()), maskable)
    for kind, half_life in (("position", 0.25), ("reverse", -0.25), ("uniform", None)):
        noise = NoiseSettings(masking=kind, half_life=0.25)
        assert noise.signed_half_life == half_life
        got = sample_masks(ids, maskable, 4, noise, gens())
        want = []
        for i, g in enumerate(gens()):
            t = sample_noise_level(1, None, noise.t_min, g)
            want.append(sample_block_mask(t, 16, 4, half_life, g, maskable[i : i + 1]))
        assert torch.equal(got, torch.cat(want)) and not (got & ~maskable).any()
