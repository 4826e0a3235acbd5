"""Cached block decoding vs a no-cache reference, batching, strategies, EOS and stop strings."""

import pytest
import torch

from edlm.decode.options import ENGINE_DEFAULTS
from edlm.decode.rules import pick_tokens
from edlm.decode.strategies import STRATEGIES
from edlm.errors import EdlmError
from edlm.masks import block_causal_mask
from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer
from edlm.train.convert import convert_model

PLAIN = [name for name, s in STRATEGIES.items() if s.rule is not None]


def commit(strategy, conf, entropy, todo, **opts):
    """Each plain strategy's commit rule written out again in plain Python (loops over lists, nothing
    from edlm.decode.rules or the registry), with engine defaults for unset options.
    conf, entropy [B, S] float, todo [B, S] bool (the candidates) -> commit [B, S] bool."""
    o = {**ENGINE_DEFAULTS, **opts}
    out = []
    for c, h, cand in zip(conf.tolist(), entropy.tolist(), todo.tolist(), strict=True):
        slots = [j for j, is_cand in enumerate(cand) if is_cand]
        by_conf = sorted(slots, key=lambda j: -c[j])  # most confident first; ties: leftmost first
        if not slots:
            chosen = []
        elif strategy == "threshold":  # every candidate >= threshold, and always the top-1
            chosen = [j for j in slots if c[j] >= o["threshold"]] + by_conf[:1]
        elif strategy == "prefix":  # leftmost always, then each next candidate while all pass
            chosen = [slots[0]]
            for j in slots[1:]:
                if c[j] < o["threshold"]:
                    break
                chosen.append(j)
        elif strategy == "factor":  # top n, largest n with (n + 1)(1 - c_n) < factor, at least 1
            n = max([k for k in range(1, len(by_conf) + 1) if (k + 1) * (1 - c[by_conf[k - 1]]) < o["factor"]],
                    default=1)
            chosen = by_conf[:n]
        elif strategy == "entropy":  # lowest entropy first, largest k with sum(H) - max(H) <= gamma
            by_ent = sorted(slots, key=lambda j: h[j])
            ks = [k for k in range(1, len(by_ent) + 1)
                  if sum(h[j] for j in by_ent[:k]) - max(h[j] for j in by_ent[:k]) <= o["gamma"]]
            chosen = by_ent[:max(ks, default=1)]
        elif strategy == "steps":  # the tokens_per_step most confident
            chosen = by_conf[: o["tokens_per_step"]]
        else:
            raise AssertionError(f"no reference commit rule for plain strategy {strategy!r}: add one here")
        out.append([j in chosen for j in range(len(cand))])
    return torch.tensor(out, dtype=torch.bool).reshape(todo.shape)


@pytest.fixture(params=["head on every slot", "head on undecided slots"])
def head(request, monkeypatch):
    """Both ways a plain step can run the LM head (edlm.decode.step.skips_decided_slots): the tiny
    test vocabulary is below the size where skipping decided slots is the default."""
    if request.param == "head on undecided slots":
        monkeypatch.setattr("edlm.decode.step.SKIP_DECIDED_MIN_VOCAB", 0)
    return request.param


def tiny_dlm(arch="llama", block_size=4, shift=False, seed=0):
    model = make_tiny_causal_lm(arch, dtype=torch.float64, seed=seed)  # float64: no near-tie flips
    return convert_model(model, make_tiny_tokenizer(), block_size=block_size, shift=shift)


def text_forward(dlm, ids: list[int], mask: torch.Tensor) -> torch.Tensor:
    """[L, V] logits of one sequence under `mask` [L, L], logical positions 0..L-1."""
    return dlm.model(input_ids=torch.tensor([ids]), attention_mask=dlm.backend_mask(mask),
                     position_ids=torch.arange(len(ids))[None]).logits[0].float()


@torch.no_grad()
def reference_decode(dlm, prompt, max_new, bs, forward=text_forward, times=None, **opts):
    """Recompute the whole sequence with the block-causal mask at every step; no cache.
    Every block is decoded whole and the output cut to the budget (a budget never changes text);
    a block stops once the slots the budget keeps are decided. prompt: text or token ids;
    forward(dlm, ids, mask) -> [L, V] logits (a VLM's places its images); times: a list that gets
    each token's commit time ((its step in the block + 1) / the block's steps)."""
    tok, mask_id, eos = dlm.tokenizer, dlm.config.mask_token_id, dlm.tokenizer.eos_token_id
    seq = list(prompt) if isinstance(prompt, list) else tok(prompt)["input_ids"]
    out = []
    start = len(seq) // bs * bs
    while len(out) < max_new:
        tail = seq[start:]
        block = tail + [mask_id] * (bs - len(tail))
        todo = torch.tensor([len(tail) <= j for j in range(bs)])
        gen = todo.clone()
        eos_slot = bs
        kept = gen & (gen.cumsum(0) <= max_new - len(out))
        stamp, step = [0] * bs, 0
        while (todo & kept).any():
            ids = seq[:start] + block
            n = len(ids)
            mask = block_causal_mask(n, bs)
            if dlm.config.causal_clean:  # finished blocks are the clean stream: token-causal
                mask[:start] = torch.ones(n, n, dtype=torch.bool).tril()[:start]
            logits = forward(dlm, ids, mask)
            slot_logits = logits[start - 1 : start + bs - 1] if dlm.config.shift else logits[start:]
            slot_logits = slot_logits.clone()
            slot_logits[:, mask_id] = float("-inf")
            slot_logits[:, len(tok):] = float("-inf")
            tokens, conf, ent = pick_tokens(slot_logits[None], 0.0, 1.0)
            rule_opts = {k: v for k, v in opts.items() if k != "strategy"}
            chosen = commit(opts.get("strategy", "threshold"), conf, ent, todo[None], **rule_opts)[0]
            for j in torch.nonzero(chosen).flatten().tolist():
                block[j] = int(tokens[0, j])
                stamp[j] = step
            step += 1
            todo &= ~chosen
            for j in range(bs):
                if gen[j] and not todo[j] and block[j] == eos:
                    eos_slot = min(eos_slot, j)
            todo &= torch.arange(bs) < eos_slot
        new = [block[j] for j in range(bs) if gen[j] and j <= eos_slot][: max_new - len(out)]
        if times is not None:
            times += [(stamp[j] + 1) / step for j in range(bs) if gen[j] and j <= eos_slot][: len(new)]
        out += new
        if eos_slot < bs and new and new[-1] == eos:
            break
        seq = seq[:start] + block
        start += bs
    return out


PROMPTS = ["The cat sat", "Hello, wor", "ab", "Once upon a time there"]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("threshold", [1.0, 0.5, 0.05])
@pytest.mark.usefixtures("head")
def test_cached_equals_uncached_reference(arch, threshold):
    dlm = tiny_dlm(arch, block_size=4)
    for prompt in PROMPTS:  # lengths 11, 10, 2, 22: aligned and not aligned to blocks of 4
        got = dlm.generate(prompt, max_new_tokens=10, threshold=threshold).token_ids[0]
        assert got == reference_decode(dlm, prompt, 10, 4, threshold=threshold), prompt


@pytest.mark.parametrize("shift", [False, True])
def test_causal_clean_model_writes_finished_blocks_causally(shift):
    """A --causal-clean model's finished blocks are written token-causally (as its clean stream was
    trained), which changes what later blocks see: the cache still equals a full recompute."""
    dlm = tiny_dlm("qwen3", block_size=4, shift=shift)
    prompts = [p for p in PROMPTS if len(p) >= 4 or not shift]  # the reference needs a clean token under shift
    block_causal = [dlm.generate(p, max_new_tokens=10, threshold=0.5).token_ids[0] for p in prompts]
    dlm.config.causal_clean = True
    for prompt in prompts:
        got = dlm.generate(prompt, max_new_tokens=10, threshold=0.5).token_ids[0]
        assert got == reference_decode(dlm, prompt, 10, 4, threshold=0.5), prompt
    assert any(dlm.generate(p, max_new_tokens=10, threshold=0.5).token_ids[0] != o
               for p, o in zip(prompts, block_causal, strict=True))  # the mask really changed


@pytest.mark.usefixtures("head")
def test_cached_equals_reference_with_shift_and_other_block_size():
    dlm = tiny_dlm("llama", block_size=4, shift=True)
    for prompt in PROMPTS[:2]:
        got = dlm.generate(prompt, max_new_tokens=9, threshold=0.3, block_size=3).token_ids[0]
        assert got == reference_decode(dlm, prompt, 9, 3, threshold=0.3)


@pytest.mark.parametrize("strategy", PLAIN)
@pytest.mark.usefixtures("head")
def test_every_strategy_matches_reference_and_commits(strategy):
    dlm = tiny_dlm("qwen3", block_size=4)
    values = {"threshold": 0.3, "factor": 2.0, "gamma": 1.0, "tokens_per_step": 2}
    kw = {"strategy": strategy, **{k: v for k, v in values.items() if k in STRATEGIES[strategy].reads}}
    res = dlm.generate(PROMPTS[0], max_new_tokens=11, **kw)  # 11: not a multiple of the block
    assert res.token_ids[0] == reference_decode(dlm, PROMPTS[0], 11, 4, **kw)
    s = res.stats[0]
    assert s.generated_tokens == 11 and 1 <= s.model_calls <= 13  # 13 slots: the last block is decoded whole
    assert all(k >= 1 for k in s.steps_histogram)


@pytest.mark.parametrize("strategy", PLAIN)
def test_commit_times_are_the_references_and_batched_equals_alone(strategy):
    """commit_times (d3LLM's pseudo-trajectories, edlm distill-data --trajectory): each token's step in
    its block over the block's steps, as the no-cache reference counts them, batched as alone."""
    dlm = tiny_dlm("llama", block_size=4)
    values = {"threshold": 0.3, "factor": 2.0, "gamma": 1.0, "tokens_per_step": 1}
    kw = {"strategy": strategy, **{k: v for k, v in values.items() if k in STRATEGIES[strategy].reads}}
    batched = dlm.generate(PROMPTS, max_new_tokens=11, commit_times=True, **kw)
    for i, prompt in enumerate(PROMPTS):
        times = []
        assert batched.token_ids[i] == reference_decode(dlm, prompt, 11, 4, times=times, **kw)
        assert batched.commit_times[i] == times
        assert all(0 < t <= 1 for t in times)
    if strategy == "steps":  # one token a step: a whole block's times are a permutation of its steps
        whole = batched.commit_times[2][2:6]  # prompt "ab": its second block, 4 slots
        assert sorted(whole) == [0.25, 0.5, 0.75, 1.0]


def test_commit_times_only_where_recorded():
    dlm = tiny_dlm("llama", block_size=4, shift=True)
    assert dlm.generate(PROMPTS[0], max_new_tokens=4).commit_times is None
    with pytest.raises(EdlmError, match="commit times"):  # verified commits by acceptance, left to right
        dlm.generate(PROMPTS[0], max_new_tokens=4, strategy="verified", commit_times=True)


@pytest.mark.usefixtures("head")
def test_batched_equals_one_by_one():
    dlm = tiny_dlm("llama", block_size=4)
    batched = dlm.generate(PROMPTS, max_new_tokens=9, threshold=0.4)
    for i, prompt in enumerate(PROMPTS):
        single = dlm.generate(prompt, max_new_tokens=9, threshold=0.4)
        assert batched.token_ids[i] == single.token_ids[0]
        assert batched.texts[i] == single.texts[0]


def test_eos_inside_block_truncates_row_and_stops_early():
    dlm = tiny_dlm("llama", block_size=4)
    free = dlm.generate(PROMPTS, max_new_tokens=12, threshold=0.4)
    eos_char = dlm.tokenizer.convert_ids_to_tokens(free.token_ids[0][5])
    dlm.tokenizer.eos_token = eos_char
    eos = dlm.tokenizer.eos_token_id
    res = dlm.generate(PROMPTS, max_new_tokens=12, threshold=0.4)
    first = res.token_ids[0]
    assert eos in first and first[-1] == eos and first.count(eos) == 1 and len(first) <= 6
    assert res.finish_reasons[0] == "stop" and eos_char not in res.texts[0]
    assert first == reference_decode(dlm, PROMPTS[0], 12, 4, threshold=0.4)
    assert res.stats[0].model_calls < free.stats[0].model_calls
    for i, prompt in enumerate(PROMPTS):  # other rows are unaffected by row 0 leaving the batch
        assert res.token_ids[i] == dlm.generate(prompt, max_new_tokens=12, threshold=0.4).token_ids[0]


def test_stop_string_and_streaming():
    dlm = tiny_dlm("llama", block_size=4)
    full = dlm.generate(PROMPTS[0], max_new_tokens=16, threshold=0.4).texts[0]
    stop = full[6:8]
    events = []
    res = dlm.generate(PROMPTS[0], max_new_tokens=16, threshold=0.4, stop=[stop], on_block=events.append)
    assert res.texts[0] == full[: full.find(stop)] and res.finish_reasons[0] == "stop"
    assert "".join(e.text for e in events) == res.texts[0]
    assert events[-1].done
    assert "".join(e.text for e in dlm.stream(PROMPTS[1], max_new_tokens=8)) == \
        dlm.generate(PROMPTS[1], max_new_tokens=8).texts[0]


@pytest.mark.usefixtures("head")  # an AR step computes one logit: it must not take the head-skip path
def test_ar_baseline_matches_hf_generate():
    from edlm import DiffusionConfig, DiffusionLM

    model = make_tiny_causal_lm("llama", dtype=torch.float64)
    ar = DiffusionLM(model, make_tiny_tokenizer(), DiffusionConfig.autoregressive())
    res = ar.generate(PROMPTS, max_new_tokens=8)
    for i, p in enumerate(PROMPTS):
        ids = ar.tokenizer(p, return_tensors="pt")["input_ids"]
        hf = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=ar.tokenizer.eos_token_id,
                            pad_token_id=0)
        assert res.token_ids[i] == hf[0, ids.shape[1]:].tolist()
        assert res.stats[i].model_calls == len(res.token_ids[i])  # one call per AR token


def test_sampling_is_seeded_and_valid():
    dlm = tiny_dlm("llama", block_size=4)
    a = dlm.generate(PROMPTS[0], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=1).token_ids[0]
    b = dlm.generate(PROMPTS[0], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=1).token_ids[0]
    eos = dlm.tokenizer.eos_token_id
    assert a == b and (len(a) == 8 or a[-1] == eos) and dlm.config.mask_token_id not in a


@pytest.mark.parametrize("kwargs,msg", [
    ({"threshold": 0.0}, "threshold"), ({"threshold": 1.5}, "threshold"), ({"block_size": 0}, "block size"),
    ({"strategy": "nope"}, "unknown strategy"), ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_options(kwargs, msg):
    dlm = tiny_dlm()
    opts = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(EdlmError, match=msg):
        dlm.generate("hi", **opts)


def test_bad_prompts():
    dlm = tiny_dlm()
    with pytest.raises(EdlmError, match="empty prompt"):
        dlm.generate("", max_new_tokens=4)
    with pytest.raises(EdlmError, match="at most 256 positions"):
        dlm.generate("x" * 300, max_new_tokens=4)


def test_per_row_budgets_and_stops_equal_separate_calls():
    dlm = tiny_dlm("llama", block_size=4)
    full = dlm.generate(PROMPTS[1], max_new_tokens=12, threshold=0.4).texts[0]
    stop = full[3:5]
    events = []
    res = dlm.generate(PROMPTS[:3], max_new_tokens=[5, 12, 9], stop=[[], [stop], []], threshold=0.4,
                       on_block=events.append)
    for i, (budget, stops) in enumerate([(5, []), (12, [stop]), (9, [])]):
        alone = dlm.generate(PROMPTS[i], max_new_tokens=budget, stop=stops, threshold=0.4)
        assert res.texts[i] == alone.texts[0] and res.finish_reasons[i] == alone.finish_reasons[0]
    last = {e.row: e for e in events}
    assert all(e.done and e.stats is not None for e in last.values())
    assert last[1].finish_reason == "stop" and last[0].stats.generated_tokens == 5


@pytest.mark.parametrize("strategy,shift", [("threshold", False), ("threshold", True), ("lossless", False),
                                            ("wino", False)])
def test_rows_joining_at_block_boundaries_decode_as_alone(strategy, shift):
    dlm = tiny_dlm("llama", block_size=4, shift=shift)
    kw = {"strategy": strategy, **({"threshold": 0.4} if "threshold" in STRATEGIES[strategy].reads else {})}
    # joining prompts of 10, 22 and 12 tokens (12: aligned to the block); budgets not multiples of it
    joins = [([PROMPTS[1], PROMPTS[3]], [9, 13], None), (["Hello, world"], 6, None)]
    asked = []

    def admit():
        asked.append(len(events))  # events streamed so far
        return joins.pop(0) if joins else None

    events, result = [], []
    # both first prompts are shorter than a block: at the first boundary nothing is cached yet,
    # and "ab" leaves the batch just as the first rows join
    for event in dlm.stream(["ab", "cd"], max_new_tokens=[2, 24], admit=admit, result=result, **kw):
        events.append(event)
    expected = [("ab", 2), ("cd", 24), (PROMPTS[1], 9), (PROMPTS[3], 13), ("Hello, world", 6)]
    for row, (prompt, budget) in enumerate(expected):
        alone = dlm.generate(prompt, max_new_tokens=budget, **kw)
        assert result[0].token_ids[row] == alone.token_ids[0], (row, prompt)
        assert result[0].texts[row] == alone.texts[0]
    assert not joins and len(asked) >= 3 and asked == sorted(set(asked))  # asked once per block boundary
    rows = [e.row for e in events]
    last_of_first_call = max(i for i, r in enumerate(rows) if r == 1)
    for joined in (2, 3, 4):  # joined rows stream their blocks while the original row still decodes
        assert rows.index(joined) < last_of_first_call
    assert result[0].stats[4].model_calls < result[0].stats[1].model_calls  # counted from the join on


def test_row_leaving_before_anything_is_cached():
    dlm = tiny_dlm("llama", block_size=4)  # both prompts < one block: the cache is empty when "ab" leaves
    res = dlm.generate(["ab", "cd"], max_new_tokens=[2, 9], threshold=0.4)
    assert res.token_ids == [dlm.generate(p, max_new_tokens=n, threshold=0.4).token_ids[0]
                             for p, n in (("ab", 2), ("cd", 9))]


def test_prefix_rule_commits_a_left_to_right_run():
    t = torch.tensor
    cand = t([[True, True, True, True], [False, True, True, True], [True, True, True, True]])
    conf = t([[0.95, 0.50, 0.99, 0.99],   # run stops at the first slot below the threshold
              [0.10, 0.20, 0.95, 0.95],   # decided slot 0 is skipped; leftmost candidate always goes
              [0.99, 0.99, 0.99, 0.99]])  # everything passes: the whole block
    got = commit("prefix", conf, torch.zeros_like(conf), cand, threshold=0.9)
    assert got.tolist() == [[True, False, False, False], [False, True, True, True], [True, True, True, True]]
    # threshold 1.0: exactly one token per step, the leftmost: strict left-to-right decoding
    assert commit("prefix", conf, torch.zeros_like(conf), cand, threshold=1.0).sum(-1).tolist() == [1, 1, 1]


def test_checkpoint_decoding_defaults_apply_when_caller_sets_none(tmp_path):
    from edlm import DiffusionLM

    dlm = tiny_dlm("llama", block_size=4)
    engine_default = dlm.generate(PROMPTS[0], max_new_tokens=8)
    dlm.config.decoding = {"strategy": "prefix", "threshold": 0.01}  # commits a whole block per step
    dlm.save_pretrained(tmp_path)
    loaded = DiffusionLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert loaded.config.decoding == {"strategy": "prefix", "threshold": 0.01}
    res = loaded.generate(PROMPTS[0], max_new_tokens=8)
    explicit = loaded.generate(PROMPTS[0], max_new_tokens=8, strategy="prefix", threshold=0.01)
    calls = res.stats[0].model_calls
    assert res.token_ids == explicit.token_ids and calls == explicit.stats[0].model_calls
    assert calls <= 3  # 8 tokens touch at most 3 blocks of 4, and each is committed in one call
    assert engine_default.stats[0].model_calls > calls
    overridden = loaded.generate(PROMPTS[0], max_new_tokens=8, strategy="threshold", threshold=0.9)
    assert overridden.token_ids == engine_default.token_ids
    assert overridden.stats[0].model_calls == engine_default.stats[0].model_calls


def test_rows_leaving_drop_cache_columns_nobody_sees():
    from edlm.decode.options import DecodeOptions, resolve_rows
    from edlm.decode.state import Batch
    from edlm.decode.step import denoise_step

    dlm = tiny_dlm("llama", block_size=4)
    ids, _, _ = resolve_rows(dlm, [PROMPTS[3], "abcdefghi"], 8, None)
    batch = Batch(dlm, ids, DecodeOptions.resolve(dlm, block_size=4))
    batch.open_blocks()
    denoise_step(dlm, batch)
    short = int(batch.cache_valid[1].sum())
    assert 0 < short < batch.cache_valid.shape[1]  # the short row sees the long row's width as padding
    batch.select_rows([1])
    assert batch.cache.get_seq_length() == batch.cache_valid.shape[1] == short and batch.cache_valid.all()


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_budget_only_cuts_never_changes_earlier_tokens(strategy):
    """max_new_tokens truncates, as users of AR models expect (and as SGLang decodes): the output
    of budget n is a prefix of the output of any larger budget, for budgets ending at every slot."""
    dlm = tiny_dlm("llama", block_size=4)
    dlm.config.causal_clean = STRATEGIES[strategy].needs_ar_stream
    kw = {"strategy": strategy, **({"threshold": 0.3} if "threshold" in STRATEGIES[strategy].reads else {})}
    full = dlm.generate(PROMPTS, max_new_tokens=9, **kw).token_ids
    for n in range(1, 6):  # prompts of 11, 10, 2, 22 tokens: the budgets end at every slot of a block
        batched = dlm.generate(PROMPTS, max_new_tokens=n, **kw).token_ids
        assert batched == [f[:n] for f in full], n
    assert dlm.generate(PROMPTS[0], max_new_tokens=2, **kw).token_ids[0] == full[0][:2]  # single row


@pytest.mark.usefixtures("head")
def test_rows_move_on_at_their_own_pace_and_waste_no_steps():
    """A row that finished its block opens the next one in the next forward instead of waiting
    for the slowest row: no 0-token steps, the same tokens as alone, and fewer calls per row."""
    dlm = tiny_dlm("llama", block_size=4)
    kw = {"max_new_tokens": 12, "threshold": 0.2}
    batched = dlm.generate(PROMPTS, **kw)
    for i, prompt in enumerate(PROMPTS):
        alone = dlm.generate(prompt, **kw)
        assert batched.token_ids[i] == alone.token_ids[0]
        assert batched.stats[i].model_calls == alone.stats[0].model_calls  # nobody waits for anybody
        assert 0 not in batched.stats[i].steps_histogram


def test_greedy_confidence_without_the_softmax_equals_it():
    logits = torch.randn(2, 5, 300, generator=torch.Generator().manual_seed(0)) * 4
    logits[0, 0, 7] = float("-inf")  # forbidden ids stay forbidden
    tok_a, conf_a, ent_a = pick_tokens(logits, 0.0, 1.0)
    tok_b, conf_b, ent_b = pick_tokens(logits, 0.0, 1.0, entropy=False)
    assert torch.equal(tok_a, tok_b) and ent_b is None and ent_a.shape == (2, 5)
    torch.testing.assert_close(conf_b, torch.softmax(logits, -1).max(-1).values)


@pytest.mark.parametrize("shift", [False, True])
def test_logits_of_wanted_slots_only_equal_the_full_blocks_logits(shift):
    """denoise_step(want=...) runs the LM head on the wanted slots only; they must be exactly the
    full step's logits at those slots (shift models: slot 0 from the carry), on a block's first
    step (pending clean KV written, rows with and without a pending block) and on a later one."""
    from edlm.decode.options import DecodeOptions, resolve_rows
    from edlm.decode.state import Batch
    from edlm.decode.step import denoise_step

    dlm = tiny_dlm("llama", block_size=4, shift=shift)
    ids, _, _ = resolve_rows(dlm, PROMPTS, 8, None)
    ids.append(ids[0][:8])  # a prompt ending on a block: its first block's slot 0 is undecided

    def fresh():
        batch = Batch(dlm, ids, DecodeOptions.resolve(dlm, block_size=4))
        batch.open_blocks()
        return batch

    full_b, part_b = fresh(), fresh()
    # slots a step may read are undecided ones: some of them, all of them (the last row, slot 0
    # included), none (row 1)
    want = (torch.rand(part_b.todo.shape, generator=torch.Generator().manual_seed(1)) < 0.6) & part_b.todo
    want[-1] = part_b.todo[-1]
    want[1] = False
    assert want[-1, 0]
    pending = part_b.pending_pos[:, -1] >= 0  # rows without a finished block have no carry to compare
    for _ in range(2):  # first step (pending KV) then a later step of the same blocks
        full = denoise_step(dlm, full_b)
        part = denoise_step(dlm, part_b, want=want)
        assert part.shape[0] == int(want.sum())
        torch.testing.assert_close(part, full[want], rtol=0, atol=1e-5)
        assert full_b.cache.get_seq_length() == part_b.cache.get_seq_length()
        if shift:
            torch.testing.assert_close(part_b.carry[pending], full_b.carry[pending], rtol=0, atol=1e-5)


@pytest.mark.parametrize("causal_clean", [False, True])
def test_a_blocks_later_steps_reuse_the_rows_of_its_first_steps_mask(causal_clean):
    """The first step of a block (pending clean tokens + block) leaves the block's rows of its
    mask for the later steps; they equal a mask built afresh then, for rows with and without a
    finished block to write."""
    from edlm.decode.options import DecodeOptions, resolve_rows
    from edlm.decode.state import Batch
    from edlm.decode.step import denoise_step

    dlm = tiny_dlm("llama", block_size=4, shift=True)
    dlm.config.causal_clean = causal_clean
    ids, _, _ = resolve_rows(dlm, PROMPTS, 8, None)
    batch = Batch(dlm, ids, DecodeOptions.resolve(dlm, block_size=4))
    batch.open_blocks()
    assert batch.pending_ids.shape[1] and not (batch.pending_pos[:, -1] >= 0).all()  # some rows write none
    denoise_step(dlm, batch)
    q_pos, mask = batch.block_mask
    batch.block_mask = None
    denoise_step(dlm, batch)  # builds it afresh (no pending tokens now) and keeps it
    fresh_pos, fresh = batch.block_mask
    assert torch.equal(q_pos, fresh_pos) and torch.equal(mask, fresh)


def test_rows_of_other_plain_settings_join_a_call_and_decode_as_alone():
    """A running call takes rows of any plain greedy setting (another rule, threshold, factor,
    gamma or k; the same block size): each commits by its own rule and options, so it decodes
    token for token, step for step, as alone, and a server never makes it wait for the call."""
    from edlm.decode.options import DecodeOptions

    dlm = tiny_dlm("llama", block_size=4)
    with torch.no_grad():
        dlm.model.get_output_embeddings().weight.mul_(8.0)  # confident enough that rules commit differently
    settings = [dict(strategy="threshold", threshold=0.4), dict(strategy="prefix", threshold=0.2),
                dict(strategy="factor", factor=2.0), dict(strategy="entropy", gamma=1.0),
                dict(strategy="steps", tokens_per_step=2), dict(strategy="threshold", threshold=0.95)]
    opts = [DecodeOptions.resolve(dlm, **s) for s in settings]
    prompts = ["ab", *PROMPTS, "xyz", "Hello"]
    budgets = [18, 9, 13, 7, 11, 10, 12]
    own = [opts[0], opts[0], *opts[1:]]  # the call's two rows share the first setting; each join brings one
    joins = [([prompts[i]], [budgets[i]], None, own[i]) for i in range(2, len(prompts))]
    result = []
    list(dlm.stream(prompts[:2], max_new_tokens=budgets[:2], result=result, options=opts[0],
                    admit=lambda: joins.pop(0) if joins else None))
    assert not joins
    seen = set()
    for row, (prompt, budget) in enumerate(zip(prompts, budgets, strict=True)):
        alone = dlm.generate(prompt, max_new_tokens=budget, options=own[row])
        assert result[0].token_ids[row] == alone.token_ids[0], own[row]
        assert result[0].stats[row].model_calls == alone.stats[0].model_calls
        assert result[0].stats[row].steps_histogram == alone.stats[0].steps_histogram
        seen.add(tuple(sorted(alone.stats[0].steps_histogram.items())))
    assert len(seen) > 2  # the settings really commit differently


def test_a_strategy_that_cannot_mix_does_not_join_another_settings_call():
    from edlm.decode.options import DecodeOptions

    dlm = tiny_dlm("llama", block_size=4)
    joins = [(["ab"], [4], None, DecodeOptions.resolve(dlm, strategy="lossless"))]
    with pytest.raises(EdlmError, match="cannot join"):
        list(dlm.stream(PROMPTS[:1], max_new_tokens=8, strategy="threshold",
                        admit=lambda: joins.pop(0) if joins else None))


def _masks_seen(model) -> list:
    """The attention_mask of every forward of `model` (None: the backend's causal fast path)."""
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    return seen


def test_an_ar_prompt_goes_through_the_causal_fast_path():
    """AR mode at batch 1 (or rows of one length): the prompt's forward builds no mask (HF's causal
    kernel), with the same tokens as HF generate; rows of different lengths keep the dense mask
    their padding needs."""
    from edlm import DiffusionConfig, DiffusionLM

    model = make_tiny_causal_lm("llama", dtype=torch.float64)
    ar = DiffusionLM(model, make_tiny_tokenizer(), DiffusionConfig.autoregressive())
    seen = _masks_seen(model)
    for p in PROMPTS:
        seen.clear()
        res = ar.generate(p, max_new_tokens=6)
        ours = list(seen)
        ids = ar.tokenizer(p, return_tensors="pt")["input_ids"]
        hf = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=ar.tokenizer.eos_token_id,
                            pad_token_id=0)
        assert res.token_ids[0] == hf[0, ids.shape[1]:].tolist()
        assert ours[0] is None and all(m is not None for m in ours[1:])
    seen.clear()
    ar.generate(PROMPTS[:2], max_new_tokens=2)  # 11 and 10 tokens: left padding
    assert seen[0] is not None


@pytest.mark.parametrize("shift", [False, True])
def test_a_long_causal_clean_prompt_is_prefilled_causally_and_exactly(shift, monkeypatch):
    """A causal-clean dLM writes a long prompt in a forward of its own through the causal fast path
    (one more model call), and decodes exactly as the no-cache reference."""
    import edlm.decode.step as step

    monkeypatch.setattr(step, "CAUSAL_PREFILL_MIN", 8)
    dlm = tiny_dlm("qwen3", block_size=4, shift=shift)
    dlm.config.causal_clean = True
    seen = _masks_seen(dlm.model)
    prompt = PROMPTS[3]  # 22 tokens: 20 in complete blocks
    got = dlm.generate(prompt, max_new_tokens=10, threshold=0.5)
    assert got.token_ids[0] == reference_decode(dlm, prompt, 10, 4, threshold=0.5)
    assert seen[0] is None and all(m is not None for m in seen[1:])
    monkeypatch.setattr(step, "CAUSAL_PREFILL_MIN", 10_000)
    dense = dlm.generate(prompt, max_new_tokens=10, threshold=0.5)
    assert dense.token_ids == got.token_ids and dense.stats[0].model_calls == got.stats[0].model_calls - 1


@pytest.mark.parametrize("strategy", ["threshold", "verified"])
def test_a_stream_of_joins_keeps_the_cache_as_narrow_as_its_longest_row(strategy, monkeypatch):
    """Each join used to add its keys as columns every other row sees as padding, so a server's
    stream of joins widened every row's attention without bound; rows' keys are packed
    (KVRows.compact_keys) and every row still decodes as alone."""
    from edlm.decode.kv import KVRows

    dlm = tiny_dlm("llama", block_size=4, shift=strategy == "verified")
    dlm.config.causal_clean = strategy == "verified"
    kw = {"strategy": strategy, **({"threshold": 0.5} if strategy == "threshold" else {})}
    widths = []
    forward = KVRows.forward

    def spy(self, *args, **kwargs):
        widths.append(self.cache_valid.shape[1])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(KVRows, "forward", spy)
    prompts = [PROMPTS[i % len(PROMPTS)] + "abcdefgh"[: i % 5] for i in range(14)]
    joins = [([p], [8], None) for p in prompts[2:]]
    result = []
    list(dlm.stream(prompts[:2], max_new_tokens=8, result=result, admit=lambda: joins.pop(0) if joins else None, **kw))
    assert not joins
    prompt_len = max(len(dlm.tokenizer(p)["input_ids"]) for p in prompts)
    # a row's own keys (prompt + budget + a block) plus what a join writes before the next packing
    assert max(widths) <= 2 * prompt_len + 8 + 4, (max(widths), prompt_len)
    for row, prompt in enumerate(prompts):
        assert result[0].token_ids[row] == dlm.generate(prompt, max_new_tokens=8, **kw).token_ids[0]
