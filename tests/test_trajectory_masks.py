"""Trajectory masking (d3LLM): masks are states the decoder passed through, the data carries each
token's decode time from `edlm distill-data --trajectory`, and a run trains on it."""

import json
import math

import pytest
import torch

from edlm.errors import EdlmError
from edlm.testing import make_tiny_tokenizer
from edlm.train import TrainConfig, train
from edlm.train import loop as train_loop
from edlm.train.data import DataFields, build_dataset, pack, tokenize_examples
from edlm.train.noise import NoiseSettings, sample_masks, sample_noise_level
from edlm.train.objective import row_generators

B, L, BLOCK = 6, 16, 4


def _orders(known_fraction=1.0, seed=0):
    """[B, L] random decode times in (0, 1] on steps of 1/4, -1 for the unknown; 3 prompt tokens a row."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randint(1, 5, (B, L), generator=g).float() / 4
    order[torch.rand(B, L, generator=g) >= known_fraction] = -1.0
    maskable = torch.ones(B, L, dtype=torch.bool)
    maskable[:, :3] = False
    order[:, :3] = -1.0
    return torch.zeros(B, L, dtype=torch.long), maskable, order


@pytest.mark.parametrize("t_per_block", [False, True])
def test_masks_are_decode_states(t_per_block):
    ids, maskable, order = _orders()
    noise = NoiseSettings(masking="trajectory", t_per_block=t_per_block)
    gens = lambda: row_generators(0, 5, torch.arange(B))  # noqa: E731
    masked = sample_masks(ids, maskable, BLOCK, noise, gens(), order)
    assert not masked[:, :3].any()  # prompt never masked
    for i, g in enumerate(gens()):  # each position's t, drawn as the row's generator does
        t = sample_noise_level(1, L // BLOCK if t_per_block else None, noise.t_min, g)[0]
        for j in range(3, L):
            s = 1.0 - float(t[j // BLOCK] if t_per_block else t)
            assert bool(masked[i, j]) == (float(order[i, j]) > s), (i, j)
    # a state of the decode: in a block, every token committed at or after a masked one is masked too
    for i in range(B):
        for span in (slice(b, b + BLOCK) for b in range(0, L, BLOCK)):
            m, u = masked[i, span], order[i, span]
            if m.any():
                assert m[u >= u[m].min()].all()


def test_fixed_ratio_masks_exactly_the_late_tokens():
    ids, maskable, order = _orders()
    masked = sample_masks(ids, maskable, BLOCK, NoiseSettings(masking="trajectory", mask_ratio=0.5),
                          row_generators(0, 0, torch.arange(B)), order)
    assert torch.equal(masked, maskable & (order > 0.5))


def test_unknown_orders_fall_back_to_position_masking():
    ids, maskable, order = _orders(known_fraction=0.0)
    gens = lambda: row_generators(0, 2, torch.arange(B))  # noqa: E731
    for t_per_block in (False, True):
        position = sample_masks(ids, maskable, BLOCK, NoiseSettings(half_life=0.3, t_per_block=t_per_block), gens())
        trajectory = NoiseSettings(masking="trajectory", half_life=0.3, t_per_block=t_per_block)
        assert torch.equal(sample_masks(ids, maskable, BLOCK, trajectory, gens(), order), position)
        assert torch.equal(sample_masks(ids, maskable, BLOCK, trajectory, gens(), None), position)
    # mixed rows: the unknown tokens of a block get round(t * their count) masks, the known their state
    ids, maskable, order = _orders(known_fraction=0.5, seed=3)
    trajectory = NoiseSettings(masking="trajectory", t_per_block=True)
    masked = sample_masks(ids, maskable, BLOCK, trajectory, gens(), order)
    unknown = maskable & (order < 0)
    for i, g in enumerate(gens()):
        t = sample_noise_level(1, L // BLOCK, trajectory.t_min, g)[0]
        for b in range(L // BLOCK):
            span = slice(b * BLOCK, (b + 1) * BLOCK)
            assert int(masked[i, span][unknown[i, span]].sum()) == int(torch.floor(t[b] * unknown[i, span].sum() + 0.5))
            known = maskable[i, span] & ~unknown[i, span]
            assert torch.equal(masked[i, span][known], order[i, span][known] > 1.0 - t[b])


def _tokenize(rows, fields=DataFields()):
    columns = {k: [r.get(k) for r in rows] for k in rows[0]}
    return tokenize_examples(columns, make_tiny_tokenizer(), "sft", fields)


def test_tokenize_aligns_trajectories():
    rows = [{"prompt": "ab", "response": "xyz", "trajectory": [1.0, 0.5, 0.25, 0.75]},  # EOS generated
            {"prompt": "ab", "response": "xyz", "trajectory": [1.0, 0.5, 0.25]},  # the budget ended it
            {"prompt": "ab", "response": "xyz", "trajectory": [1.0, 0.5]},  # did not round-trip
            {"prompt": "ab", "response": "xyz", "trajectory": None}]
    out = _tokenize(rows)
    assert [len(o) for o in out["order"]] == [len(i) for i in out["input_ids"]] == [6] * 4
    assert out["order"][0] == [-1.0, -1.0, 1.0, 0.5, 0.25, 0.75]
    assert out["order"][1] == [-1.0, -1.0, 1.0, 0.5, 0.25, -1.0]
    assert out["order"][2] == out["order"][3] == [-1.0] * 6
    no_field = _tokenize([{"prompt": "ab", "response": "xyz"}])
    assert set(no_field) == {"input_ids", "maskable"}
    renamed = _tokenize([{"prompt": "a", "response": "x", "times": [0.5, 0.0]}], DataFields(trajectory="times"))  # 0: no time
    assert renamed["order"] == [[-1.0, 0.5, -1.0]]


def test_pack_carries_order_with_its_tokens():
    ids = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    batch = {"input_ids": ids, "maskable": [[True] * len(r) for r in ids],
             "order": [[t / 100 for t in r] for r in ids]}
    packed = pack(batch, 4)
    assert packed["input_ids"] == [[5, 6, 7, 8], [9, 10, 11, 12]]
    assert packed["order"] == [[t / 100 for t in r] for r in packed["input_ids"]]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("traj")
    rows = []
    for i in range(60):  # a left-to-right decode of 4-token blocks, one token a step, and its EOS
        response = f" {i + 2}"
        rows.append({"prompt": f"Q{i}: add {i} and 2?", "response": response,
                     "trajectory": [(j % 4 + 1) / 4 for j in range(len(response) + 1)]})
    (d / "traj.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (d / "plain.jsonl").write_text("\n".join(json.dumps({"prompt": r["prompt"], "response": r["response"]})
                                             for r in rows))
    return d


def test_dataset_columns(data):
    tok = make_tiny_tokenizer()
    ds = build_dataset([str(data / "traj.jsonl")], tok, seq_len=32)
    batch = ds[:4]
    assert batch["order"].dtype == torch.float32 and batch["order"].shape == batch["input_ids"].shape
    assert not (batch["order"][~batch["maskable"]] >= 0).any()  # prompt tokens have no time
    assert (batch["order"][batch["maskable"]] >= 0).all()
    assert "order" not in build_dataset([str(data / "plain.jsonl")], tok, seq_len=32).column_names


def test_trains_on_trajectory_masks(tiny_dlm_dir, data, tmp_path, monkeypatch, one_torch_thread):
    seen = []
    real = train_loop.diffusion_loss

    def spy(*args, order=None, **kw):
        seen.append(order)
        return real(*args, order=order, **kw)

    monkeypatch.setattr(train_loop, "diffusion_loss", spy)
    cfg = dict(model=str(tiny_dlm_dir), data=[str(data / "traj.jsonl")], out=str(tmp_path / "run"), seq_len=32,
               batch_size=4, steps=30, lr=3e-3, min_lr=3e-4, warmup_steps=2, save_every=1000, progress=False,
               log_every=1, masking="trajectory")
    train(TrainConfig(**cfg))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(map(math.isfinite, losses))
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert all(o is not None and (o >= 0).any() for o in seen)  # the batch's times reached the noise
    with pytest.raises(EdlmError, match="--masking trajectory needs .* 'trajectory' field"):
        train(TrainConfig(**{**cfg, "data": [str(data / "plain.jsonl")], "out": str(tmp_path / "plain")}))
    with pytest.raises(EdlmError, match="--half-life"):
        TrainConfig(**{**cfg, "half_life": 0.0}).validate()
