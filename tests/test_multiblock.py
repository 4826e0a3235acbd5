"""Multi-block decoding (`blocks` > 1): a window of blocks decoded at once, against a no-cache reference."""

import pytest
import torch
from test_decoding import PLAIN, PROMPTS, commit, text_forward, tiny_dlm

from edlm.decode.rules import opened_slots, pick_tokens
from edlm.decode.strategies import STRATEGIES
from edlm.errors import EdlmError
from edlm.masks import block_causal_mask

VALUES = {"threshold": 0.3, "factor": 2.0, "gamma": 1.0, "tokens_per_step": 2}


def options(strategy, **extra):
    return {"strategy": strategy, **{k: v for k, v in VALUES.items() if k in STRATEGIES[strategy].reads}, **extra}


@torch.no_grad()
def reference_multiblock(dlm, prompt, max_new, bs, blocks, next_block_at=0.0, seen=None, **opts):
    """Recompute the whole sequence at every step, no cache: the finished blocks, then a window of
    `blocks` blocks under the block-causal mask (a later block of the window sees the earlier ones,
    masks and all). A block's slots are candidates once the block before it is `next_block_at`
    decided; the window's decided leading blocks leave it and fresh blocks open at its end. A row
    stops at an EOS among its finished blocks, or once the slots its budget keeps are decided.
    seen: a list that gets "forward" per model call and "eos carried" where an EOS decided in a later
    block stays in the window as it slides."""
    seen = [] if seen is None else seen
    tok, mask_id, eos = dlm.tokenizer, dlm.config.mask_token_id, dlm.tokenizer.eos_token_id
    seq = list(prompt) if isinstance(prompt, list) else tok(prompt)["input_ids"]
    w = bs * blocks
    start = len(seq) // bs * bs
    tail = seq[start:]
    win = tail + [mask_id] * (w - len(tail))
    gen = [j >= len(tail) for j in range(w)]
    todo = list(gen)
    out = []
    while True:
        ids = seq[:start] + win
        n = len(ids)
        mask = block_causal_mask(n, bs)
        if dlm.config.causal_clean:
            mask[:start] = torch.ones(n, n, dtype=torch.bool).tril()[:start]
        logits = text_forward(dlm, ids, mask)
        seen.append("forward")
        slot_logits = (logits[start - 1: start + w - 1] if dlm.config.shift else logits[start:]).clone()
        slot_logits[:, mask_id] = float("-inf")
        slot_logits[:, len(tok):] = float("-inf")
        tokens, conf, ent = pick_tokens(slot_logits[None], 0.0, 1.0)
        cand = list(todo)
        for b in range(1, blocks):  # a block opens once the one before is far enough
            before = range((b - 1) * bs, b * bs)
            share = sum(gen[j] and not todo[j] for j in before) / max(1, sum(gen[j] for j in before))
            if share < next_block_at:
                cand[b * bs:] = [False] * (w - b * bs)
                break
        chosen = commit(opts.get("strategy", "threshold"), conf, ent, torch.tensor([cand]),
                        **{k: v for k, v in opts.items() if k != "strategy"})[0].tolist()
        for j in range(w):
            if chosen[j]:
                win[j], todo[j] = int(tokens[0, j]), False
        eos_slot = next((j for j in range(w) if gen[j] and not todo[j] and win[j] == eos), w)
        todo = [t and j < eos_slot for j, t in enumerate(todo)]
        left = max_new - len(out)
        kept = [g and sum(gen[: j + 1]) <= left for j, g in enumerate(gen)]
        lead = 0
        while lead < blocks and not any(todo[lead * bs:(lead + 1) * bs]):
            lead += 1
        if left <= sum(gen) and not any(t and k for t, k in zip(todo, kept, strict=True)):
            lead = blocks  # every slot the budget keeps is decided
        if not lead:
            continue
        new = [win[j] for j in range(lead * bs) if gen[j]][:left]
        if eos in new:
            return out + new[: new.index(eos) + 1]
        out += new
        if len(out) >= max_new:
            return out
        seq, start = seq[:start] + win[: lead * bs], start + lead * bs
        win = win[lead * bs:] + [mask_id] * (lead * bs)
        todo = todo[lead * bs:] + [True] * (lead * bs)
        gen = gen[lead * bs:] + [True] * (lead * bs)
        if eos_slot < w:
            seen.append("eos carried")
        eos_slot = eos_slot - lead * bs if eos_slot < w else w
        todo = [t and j < eos_slot for j, t in enumerate(todo)]


@pytest.mark.parametrize("strategy", PLAIN)
@pytest.mark.parametrize("head", ["head on every slot", "head on undecided slots"])
def test_every_plain_rule_matches_the_no_cache_reference(strategy, head, monkeypatch):
    if head == "head on undecided slots":
        monkeypatch.setattr("edlm.decode.step.SKIP_DECIDED_MIN_VOCAB", 0)
    dlm = tiny_dlm("qwen3", block_size=4)
    kw = options(strategy, blocks=2)
    res = dlm.generate(PROMPTS, max_new_tokens=11, **kw)  # 11: not a multiple of the block
    for i, prompt in enumerate(PROMPTS):
        assert res.token_ids[i] == reference_multiblock(dlm, prompt, 11, 4, **kw), prompt
        assert all(k >= 1 for k in res.stats[i].steps_histogram)


@pytest.mark.parametrize("shift,causal_clean", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("blocks,next_block_at", [(2, 0.5), (3, 0.0), (3, 0.75)])
def test_shift_causal_clean_and_gated_windows_match_the_reference(shift, causal_clean, blocks, next_block_at):
    dlm = tiny_dlm("llama", block_size=4, shift=shift)
    dlm.config.causal_clean = causal_clean
    prompts = [p for p in PROMPTS if len(p) >= 4 or not shift]  # the reference needs a clean token under shift
    kw = dict(strategy="threshold", threshold=0.2, blocks=blocks, next_block_at=next_block_at)
    res = dlm.generate(prompts, max_new_tokens=13, **kw)
    for i, prompt in enumerate(prompts):
        assert res.token_ids[i] == reference_multiblock(dlm, prompt, 13, 4, **kw), prompt


def test_a_window_commits_in_later_blocks_and_saves_forwards():
    """The point of it: steps commit past the current block (more tokens a forward than one block
    allows), and the gate holds later blocks back until the one before is far enough."""
    dlm = tiny_dlm("qwen3", block_size=4)
    kw = dict(max_new_tokens=16, strategy="threshold", threshold=1e-6)  # every slot passes: a window a step
    one, two = dlm.generate(PROMPTS, **kw), dlm.generate(PROMPTS, blocks=2, **kw)
    assert [s.model_calls for s in two.stats] == [(s.model_calls + 1) // 2 for s in one.stats]
    assert max(k for s in two.stats for k in s.steps_histogram) > 4  # one step filled slots of two blocks
    gated = dlm.generate(PROMPTS, blocks=2, next_block_at=0.99, **kw)  # the next block waits: one block's pace
    assert [s.steps_histogram for s in gated.stats] == [s.steps_histogram for s in one.stats]


def test_batched_rows_joins_and_budgets_decode_as_alone():
    dlm = tiny_dlm("llama", block_size=4, shift=True)
    kw = dict(strategy="prefix", threshold=0.2, blocks=2)
    joins = [([PROMPTS[1], PROMPTS[3]], [9, 13], None), (["Hello, world"], 6, None)]
    result = []
    for _ in dlm.stream(["ab", "cd"], max_new_tokens=[2, 24], admit=lambda: joins.pop(0) if joins else None,
                        result=result, **kw):
        pass
    expected = [("ab", 2), ("cd", 24), (PROMPTS[1], 9), (PROMPTS[3], 13), ("Hello, world", 6)]
    assert not joins
    for row, (prompt, budget) in enumerate(expected):
        assert result[0].token_ids[row] == dlm.generate(prompt, max_new_tokens=budget, **kw).token_ids[0], row
    longest = dlm.generate(PROMPTS[3], max_new_tokens=20, **kw).token_ids[0]
    for budget in (1, 5, 8, 13):  # a budget only cuts
        assert dlm.generate(PROMPTS[3], max_new_tokens=budget, **kw).token_ids[0] == longest[:budget]


def test_eos_in_a_later_block_ends_the_row_once_the_blocks_before_are_done():
    """An EOS decided in the window's second block while the first still has masks stays in force as
    the window slides: nothing after it is decoded (the forwards are the reference's), and the row
    ends with it once the blocks before are done."""
    dlm = tiny_dlm("llama", block_size=4)
    kw = dict(strategy="steps", tokens_per_step=3, blocks=2)  # three a step: often in both blocks
    free = dlm.generate(PROMPTS, max_new_tokens=12, **kw).token_ids
    carried = 0
    for token in sorted({t for ids in free for t in ids[4:12]}):  # each generated token as the EOS
        dlm.tokenizer.eos_token = dlm.tokenizer.convert_ids_to_tokens(token)
        res = dlm.generate(PROMPTS, max_new_tokens=12, **kw)
        for i, prompt in enumerate(PROMPTS):
            seen = []
            assert res.token_ids[i] == reference_multiblock(dlm, prompt, 12, 4, seen=seen, **kw), prompt
            assert res.stats[i].model_calls == seen.count("forward"), prompt
            carried += "eos carried" in seen
            if token in res.token_ids[i]:
                assert res.token_ids[i][-1] == token and res.finish_reasons[i] == "stop"
    assert carried  # the case this test is about happened


def test_logprobs_follow_their_tokens_through_the_window():
    dlm = tiny_dlm("qwen3", block_size=4)
    kw = dict(strategy="threshold", threshold=0.05, max_new_tokens=10)
    res = dlm.generate(PROMPTS, logprobs=2, blocks=2, **kw)
    for ids, lps in zip(res.token_ids, res.logprobs, strict=True):
        assert [lp.token_id for lp in lps] == ids
        assert all(lp.top[0][1] >= lp.logprob - 1e-9 and len(lp.top) == 2 for lp in lps)


def test_opened_slots_truth_table():
    todo = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)  # 3 blocks of 3
    gen = torch.ones_like(todo)
    assert opened_slots(todo, gen, 1, 0.5).equal(todo)
    assert opened_slots(todo, gen, 3, 0.0).equal(todo)
    half = opened_slots(todo, gen, 3, 0.3)  # block 0 is 1/3 decided: block 1 opens, block 2 not (0/3)
    assert half.tolist() == [[False, True, True, True, True, True, False, False, False]]
    assert opened_slots(todo, gen, 3, 0.5).tolist() == [[False, True, True] + [False] * 6]
    prompt = torch.tensor([[0, 0, 1, 1, 1, 1]], dtype=torch.bool)  # 2 prompt slots then one masked slot
    gen = torch.tensor([[0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    assert opened_slots(prompt, gen, 2, 0.1).tolist() == [[False, False, True, False, False, False]]


@pytest.mark.parametrize("kwargs,msg", [
    (dict(strategy="psd", blocks=2), "blocks does not apply"),
    (dict(strategy="verified", blocks=2, next_block_at=0.5), "next_block_at does not apply"),
    (dict(strategy="lossless", next_block_at=0.5), "next_block_at does not apply"),
    (dict(blocks=2, block_size=1), "at least 2 tokens"),
    (dict(blocks=0), "blocks must be >= 1"),
    (dict(blocks=2, next_block_at=1.0), r"next_block_at must be in \[0, 1\)"),
    (dict(blocks=2, commit_times=True), "commit times"),
])
def test_bad_multiblock_options_are_one_line_errors(kwargs, msg):
    dlm = tiny_dlm("llama", block_size=4, shift=True)
    dlm.config.causal_clean = True
    with pytest.raises(EdlmError, match=msg):
        dlm.generate(PROMPTS[0], max_new_tokens=4, **kwargs)


def test_a_window_slides_past_its_done_blocks():
    """Batch.next_blocks: the done blocks become pending clean tokens (right-aligned, padding for rows
    that stay), the rest of the window moves to its front with its decided slots and an EOS's place,
    and fresh masked blocks open at its end (none of their slots todo after the EOS)."""
    from edlm.decode.options import DecodeOptions
    from edlm.decode.state import Batch

    dlm = tiny_dlm("llama", block_size=4)
    mask = dlm.config.mask_token_id
    batch = Batch(dlm, [[5, 6, 7, 8, 9], [5, 6, 7, 8]], DecodeOptions.resolve(dlm, blocks=3), [40, 40])
    batch.open_blocks()
    assert batch.gen[0].tolist() == [False] + [True] * 11 and batch.block_start.tolist() == [4, 4]
    batch.block_ids = torch.arange(100, 112).repeat(2, 1)
    batch.block_ids[0, 0] = 9  # the prompt's tail
    batch.todo = torch.tensor([[0] * 8 + [1, 0, 0, 0], [0, 1] + [1] * 10], dtype=torch.bool)
    batch.eos_slot = torch.tensor([9, 12])  # row 0: an EOS decided in its third block
    batch.pending_ids = batch.pending_ids[:, :0]
    batch.next_blocks([2, 0])
    assert batch.pending_ids.tolist() == [[9, *range(101, 108)], [0] * 8]
    assert batch.pending_pos.tolist() == [list(range(4, 12)), [-1] * 8]
    assert batch.block_start.tolist() == [12, 4] and batch.eos_slot.tolist() == [1, 12]
    assert batch.block_ids[0].tolist() == [108, 109, 110, 111] + [mask] * 8
    assert batch.todo[0].tolist() == [True] + [False] * 11  # nothing opens after the EOS
    assert batch.gen[0].all() and batch.prompt_tail.tolist() == [0, 0]
    assert batch.block_ids[1].tolist() == list(range(100, 112))  # row 1 stays as it was
