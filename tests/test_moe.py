"""Mixture-of-experts dLMs: four families convert, decode exactly and train; the router balance loss;
upcycling; TEAM's expert plans (edlm.moe) and decode options (edlm.decode.team)."""

import pytest
import torch
from test_decoding import PROMPTS, reference_decode, tiny_dlm
from test_train import TEXT, losses

from edlm import moe
from edlm.decode.options import DecodeOptionError
from edlm.errors import EdlmError
from edlm.model import DiffusionLM
from edlm.testing import MOE_ARCHITECTURES, make_tiny_causal_lm, make_tiny_tokenizer
from edlm.train import TrainConfig, train
from edlm.train.convert import convert, convert_model
from edlm.train.loop import router_aux_weight
from edlm.train.noise import NoiseSettings
from edlm.train.objective import LossSettings, diffusion_loss, row_generators

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_moe_dlm(arch, block_size=8, shift=False):
    return tiny_dlm(arch, block_size=block_size, shift=shift)  # float64: no near-tie flips


@pytest.fixture(scope="module", params=MOE_ARCHITECTURES)
def family(request):
    return request.param


# ------------------------------------------------------------------ conversion, exact decoding, training
def test_each_family_converts_keeping_every_weight(family, tmp_path):
    base = make_tiny_causal_lm(family)
    base.save_pretrained(tmp_path / "ar")
    make_tiny_tokenizer().save_pretrained(tmp_path / "ar")
    dlm = convert(tmp_path / "ar", tmp_path / "dlm", block_size=4)  # runs the behavioural self-check
    assert moe.moe_shape(dlm.model) == (4, 2)
    loaded = DiffusionLM.from_pretrained(tmp_path / "dlm")
    before, after = base.state_dict(), loaded.model.state_dict()
    assert before.keys() == after.keys()
    keep = torch.arange(128) != loaded.config.mask_token_id  # only the free row taken by the mask token changes
    for name, value in before.items():
        vocab_rows = value.shape[0] == 128 and ("embed" in name or "lm_head" in name)
        assert torch.equal(after[name][keep], value[keep]) if vocab_rows else torch.equal(after[name], value), name


@pytest.mark.parametrize("shift", [False, True])
def test_cached_decoding_equals_the_no_cache_reference(family, shift):
    dlm = tiny_moe_dlm(family, block_size=4, shift=shift)
    for prompt in PROMPTS:
        if shift and len(prompt) < 4:
            continue  # the reference needs a clean token before the first block under shift
        got = dlm.generate(prompt, max_new_tokens=10, threshold=0.5).token_ids[0]
        assert got == reference_decode(dlm, prompt, 10, 4, threshold=0.5), prompt


@pytest.mark.parametrize("team", ["off", "all"])
def test_batched_equals_alone(family, team):
    dlm = tiny_moe_dlm(family)
    together = dlm.generate(PROMPTS, max_new_tokens=20, threshold=0.2, team=team)
    for i, prompt in enumerate(PROMPTS):
        alone = dlm.generate(prompt, max_new_tokens=20, threshold=0.2, team=team)
        assert together.token_ids[i] == alone.token_ids[0], (team, prompt)
        if team == "off":  # exploration moves rows on together: a row may wait, computed, for the others
            assert together.stats[i].expert_pairs == alone.stats[0].expert_pairs


def test_training_lowers_the_loss_with_the_router_balance_loss(family, tmp_path):
    base = make_tiny_causal_lm(family)
    base.save_pretrained(tmp_path / "ar")
    make_tiny_tokenizer().save_pretrained(tmp_path / "ar")
    (tmp_path / "train.txt").write_text(TEXT)
    cfg = TrainConfig(model=str(tmp_path / "ar"), data=[str(tmp_path / "train.txt")], out=str(tmp_path / "run"),
                      block_size=4, seq_len=32, batch_size=4, steps=30, lr=3e-3, min_lr=3e-4, warmup_steps=3,
                      save_every=1000, progress=False, log_every=1)
    assert router_aux_weight(cfg, base) == base.config.router_aux_loss_coef > 0  # unset: the base config's
    final = train(cfg)
    assert sum(losses(tmp_path / "run")[-5:]) < 0.8 * sum(losses(tmp_path / "run")[:5])
    assert moe.is_moe(DiffusionLM.from_pretrained(final).model)


def test_the_balance_loss_is_transformers_own_and_enters_the_diffusion_loss(family):
    dlm = tiny_moe_dlm(family)
    ids = torch.randint(4, 100, (2, 16))
    with moe.router_logits(dlm.model) as routed:
        out = dlm.model(input_ids=ids)
    hf = dlm.model(input_ids=ids, output_router_logits=True).aux_loss
    assert len(routed) == dlm.model.config.num_hidden_layers and out.logits.shape[:2] == (2, 16)
    assert torch.allclose(moe.router_balance_loss(routed, dlm.model), hf)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    noise = NoiseSettings()

    def loss(weight):  # the same noise both times (per-row generators)
        with moe.router_logits(dlm.model) as seen:
            value, _ = diffusion_loss(dlm, ids, maskable, noise, row_generators(0, 0, torch.arange(2)),
                                      LossSettings(router_aux_weight=weight))
        return value, seen

    plain, _ = loss(0.0)
    weighted, seen = loss(0.5)
    assert len(seen) == dlm.model.config.num_hidden_layers  # one forward
    assert torch.allclose(weighted - plain, 0.5 * moe.router_balance_loss(seen, dlm.model))


def test_router_aux_loss_is_refused_on_a_dense_model(tiny_ar_dir, tmp_path):
    (tmp_path / "train.txt").write_text(TEXT)
    cfg = TrainConfig(model=str(tiny_ar_dir), data=[str(tmp_path / "train.txt")], out=str(tmp_path / "run"),
                      steps=1, seq_len=32, batch_size=2, block_size=4, router_aux_loss=0.01, progress=False)
    with pytest.raises(EdlmError, match="--router-aux-loss applies to mixture-of-experts models"):
        train(cfg)


# ------------------------------------------------------------------ expert plans
def test_a_counting_plan_changes_nothing_and_counts_what_the_routers_chose(family):
    model = make_tiny_causal_lm(family, dtype=torch.float64)
    ids = torch.randint(4, 100, (3, 12))
    plain = model(input_ids=ids).logits
    chosen = []
    hooks = [b.gate.register_forward_hook(lambda _m, _i, out: chosen.append(out[2])) for b in moe.expert_layers(model)]
    plan = moe.ExpertPlan(rows=3)
    with moe.routing_of(model).planned(plan):
        planned = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    assert torch.equal(plain, planned)
    by_hand = [sum(len(set(layer.view(3, 12, -1)[r].flatten().tolist())) for layer in chosen) for r in range(3)]
    assert plan.activations.tolist() == by_hand
    assert plan.pairs.tolist() == [12 * 2 * len(chosen)] * 3


def test_reusing_the_memo_of_an_unchanged_input_is_exact(family):
    """Delayed caching reuses a slot's MoE output from the last step: where nothing the slot attends
    changed, that is exactly what it would compute."""
    model = make_tiny_causal_lm(family, dtype=torch.float64)
    ids = torch.randint(4, 100, (2, 10))
    routing = moe.routing_of(model)
    first = moe.ExpertPlan(rows=2, tail=6, record=True)
    with routing.planned(first):
        plain = model(input_ids=ids).logits
    reuse = torch.zeros(2, 6, dtype=torch.bool)
    reuse[:, ::2] = True
    again = moe.ExpertPlan(rows=2, tail=6, reuse=reuse, memo=tuple(first.outputs[i] for i in sorted(first.outputs)),
                           slots=torch.arange(6))
    with routing.planned(again):
        reused = model(input_ids=ids).logits
    assert torch.allclose(reused, plain, atol=1e-12, rtol=0)
    assert (again.pairs < first.pairs).all()  # reused slots ran no expert


def test_limited_routing_keeps_cold_tokens_within_their_rows_warm_experts(family):
    model = make_tiny_causal_lm(family, dtype=torch.float64, num_hidden_layers=1)
    router = moe.expert_layers(model)[0].gate
    hidden = torch.randn(12, 64, dtype=torch.float64)
    logits, weights, index = router(hidden)
    rows = torch.arange(2).repeat_interleave(6)
    none = torch.zeros(12, dtype=torch.bool)
    w, i = moe.limited_route(router, logits, weights, index, rows, none, 2)
    assert torch.equal(w, weights) and torch.equal(i, index)  # nothing cold: the router's own choice
    cold = torch.tensor([False, True, True, True, True, True] * 2)  # one warm token a row: its k experts
    w, i = moe.limited_route(router, logits, weights, index, rows, cold, 2)
    for r in range(2):
        warm = set(index[r * 6].tolist())
        assert all(set(i[r * 6 + j].tolist()) == warm for j in range(1, 6))
    probs = torch.softmax(logits.float(), -1)
    picked = probs.gather(-1, i)
    if getattr(router, "norm_topk_prob", True):
        picked = picked / picked.sum(-1, keepdim=True)
    assert torch.allclose(w[cold].double(), picked[cold].double(), atol=1e-6)


# ------------------------------------------------------------------ TEAM decode options
def test_exploration_at_one_token_a_step_is_plain_decoding_in_fewer_forwards(family):
    """At one commit a step an accepted version is exactly the state the plain step would reach next,
    so exploration returns plain decoding's tokens and saves forwards."""
    dlm = tiny_moe_dlm(family)
    plain = dlm.generate(PROMPTS, max_new_tokens=24, strategy="steps", tokens_per_step=1)
    explored = dlm.generate(PROMPTS, max_new_tokens=24, strategy="steps", tokens_per_step=1, team="explore")
    assert explored.token_ids == plain.token_ids
    assert explored.stats[0].model_calls < plain.stats[0].model_calls


def test_delayed_caching_computes_fewer_experts_and_leaves_one_step_blocks_alone(family):
    dlm = tiny_moe_dlm(family)
    plain = dlm.generate(PROMPTS, max_new_tokens=24, threshold=0.05)
    cached = dlm.generate(PROMPTS, max_new_tokens=24, threshold=0.05, team="cache")
    assert sum(s.expert_pairs for s in cached.stats) < sum(s.expert_pairs for s in plain.stats)
    # a block decided in its first forward never reaches a later step: TEAM changes nothing, and the
    # finished blocks the next ones read are the plain model's
    one_step = dlm.generate(PROMPTS, max_new_tokens=24, threshold=1e-9)
    assert dlm.generate(PROMPTS, max_new_tokens=24, threshold=1e-9, team="all").token_ids == one_step.token_ids


def test_cold_tokens_appear_and_change_only_later_steps(family):
    dlm = tiny_moe_dlm(family)
    from edlm.decode.team import cold_slots

    todo = torch.tensor([[False, True, True, True, True, True, True, True]])
    conf = torch.tensor([[1.0, 0.9, 0.8, 0.1, 0.2, 0.3, 0.6, 0.65]])
    cold = cold_slots(todo, ~todo, conf)
    # slots 1-3 are within 3 of the decided slot 0; 1, 2 are the two most confident anyway
    assert cold.tolist() == [[False, False, False, False, True, True, True, True]]
    assert not cold_slots(todo, torch.zeros_like(todo), conf).any()  # nothing decided: nothing cold
    assert not cold_slots(todo, ~todo, torch.full_like(conf, 0.8)).any()  # confident: warm
    out = dlm.generate(PROMPTS, max_new_tokens=16, threshold=0.05, team="cold")
    assert all(len(ids) == 16 for ids in out.token_ids)


def test_team_is_refused_where_it_cannot_act(tiny_dlm_dir):
    dense = DiffusionLM.from_pretrained(tiny_dlm_dir)
    with pytest.raises(DecodeOptionError, match="team applies to mixture-of-experts models"):
        dense.generate("ab", max_new_tokens=4, team="cache")
    dlm = tiny_moe_dlm("qwen3_moe")
    with pytest.raises(DecodeOptionError, match="team does not apply to strategy 'lossless'"):
        dlm.generate("ab", max_new_tokens=4, strategy="lossless", team="cache")
    with pytest.raises(DecodeOptionError, match="unknown team 'fast'; choose from off, cache"):
        dlm.generate("ab", max_new_tokens=4, team="fast")


# ------------------------------------------------------------------ upcycling
def test_an_upcycled_model_computes_its_dense_parent():
    dense = make_tiny_causal_lm("llama")
    up = moe.upcycle(dense, experts=4, top_k=2)
    assert moe.moe_shape(up) == (4, 2)
    ids = torch.randint(4, 100, (2, 12))
    assert torch.allclose(up(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5)
    with pytest.raises(EdlmError, match="upcycling reads a llama or mistral model"):
        moe.upcycle(make_tiny_causal_lm("qwen3"))
    with pytest.raises(EdlmError, match="1 <= top_k <= experts"):
        moe.upcycle(dense, experts=2, top_k=3)


def test_cold_tokens_of_a_row_follow_only_its_own_experts_in_a_batch():
    """16 experts: the warm tokens of a row choose a few, so limiting the cold ones changes what runs;
    a row's choice must not depend on its batch mates (nor on their padding)."""
    model = make_tiny_causal_lm("qwen3_moe", dtype=torch.float64, num_experts=16)
    dlm = convert_model(model, make_tiny_tokenizer(), block_size=8)
    plain = dlm.generate(PROMPTS, max_new_tokens=24, threshold=0.05)
    cold = dlm.generate(PROMPTS, max_new_tokens=24, threshold=0.05, team="cold")
    assert sum(s.expert_activations for s in cold.stats) < sum(s.expert_activations for s in plain.stats)
    for i, prompt in enumerate(PROMPTS):
        alone = dlm.generate(prompt, max_new_tokens=24, threshold=0.05, team="cold")
        assert cold.token_ids[i] == alone.token_ids[0], prompt
        assert cold.stats[i].expert_activations == alone.stats[0].expert_activations, prompt


def test_every_strategy_decodes_an_moe_dlm_with_rows_leaving(family):
    """Rows of other budgets leave a batch at other steps: every decoder keeps its counts per row."""
    dlm = tiny_moe_dlm(family, shift=True)
    budgets = [3, 9, 14, 20]
    for strategy in ("verified", "psd", "prefix"):
        out = dlm.generate(PROMPTS, max_new_tokens=budgets, strategy=strategy)
        alone = [dlm.generate(p, max_new_tokens=b, strategy=strategy).token_ids[0]
                 for p, b in zip(PROMPTS, budgets, strict=True)]
        assert out.token_ids == alone, strategy
