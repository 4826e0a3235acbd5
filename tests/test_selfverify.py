"""`verified`: one model drafts and verifies with its own AR stream; token-identical to its greedy AR decode."""

from pathlib import Path

import pytest
import torch

from edlm import DiffusionLM
from edlm.decode.kv import candidate_logits
from edlm.decode.options import DecodeOptionError
from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer
from edlm.train.convert import convert_model

PROMPTS = ["The cat sat", "Hello, wor", "ab", "Once upon a time there"]  # 11, 10, 2, 22 tokens
DEMO_DLM = Path(__file__).resolve().parents[1] / "models" / "dlm"


def causal_dlm(arch, shift, block_size=4, seed=0):
    dlm = convert_model(make_tiny_causal_lm(arch, dtype=torch.float64, seed=seed), make_tiny_tokenizer(),
                        block_size=block_size, shift=shift)
    dlm.config.causal_clean = True
    return dlm


@torch.no_grad()
def greedy_ar(dlm, prompt: str, max_new: int) -> list[int]:
    """The model's own greedy AR decode, independently: a full causal forward per token (the HF
    model's own mask), the mask token never a candidate, stopping at EOS."""
    seq = dlm.tokenizer(prompt)["input_ids"]
    out = []
    while len(out) < max_new:
        logits = dlm.model(input_ids=torch.tensor([seq])).logits[0, -1].float()
        tok = int(candidate_logits(dlm, logits[None])[0].argmax())
        out.append(tok)
        seq.append(tok)
        if tok == dlm.tokenizer.eos_token_id:
            break
    return out


@pytest.mark.parametrize(("arch", "shift", "block_size"), [("llama", True, 4), ("qwen3", False, 4),
                                                           ("qwen3", True, 3)])
def test_verified_equals_own_greedy_ar_single_and_batched(arch, shift, block_size):
    dlm = causal_dlm(arch, shift, block_size)
    ref = [greedy_ar(dlm, p, 13) for p in PROMPTS]
    batched = dlm.generate(PROMPTS, max_new_tokens=13, strategy="verified")
    assert batched.token_ids == ref
    for i, (p, want) in enumerate(zip(PROMPTS, ref, strict=True)):
        alone = dlm.generate(p, max_new_tokens=13, strategy="verified")
        assert alone.token_ids[0] == want
        assert batched.stats[i].model_calls == alone.stats[0].model_calls  # a batch changes no row's drafts
        s = alone.stats[0]
        assert s.generated_tokens == len(want) and 1 <= s.model_calls <= len(want) and all(k >= 1 for k in s.steps_histogram)


@pytest.mark.parametrize("depth", [0, 1, 2, 8])
def test_fewer_draft_blocks_change_speed_never_tokens(depth):
    """draft_depth keeps mask blocks for acceptance lengths 0 and the `depth` likeliest only: the
    output stays the model's greedy AR decode, batched and alone."""
    dlm = causal_dlm("qwen3", True, block_size=4)
    ref = [greedy_ar(dlm, p, 12) for p in PROMPTS]
    batched = dlm.generate(PROMPTS, max_new_tokens=12, strategy="verified", draft_depth=depth)
    alone = dlm.generate(PROMPTS[3], max_new_tokens=12, strategy="verified", draft_depth=depth)
    assert batched.token_ids == ref and alone.token_ids == ref[3:]
    assert batched.stats[3].model_calls == alone.stats[0].model_calls  # blocks are chosen per row


def test_covered_lengths_are_the_likeliest():
    from edlm.decode.selfverify import covered_lengths

    conf = [0.99, 0.98, 0.2, 0.9, 0.9]  # acceptance will most likely stop at draft 2, next after all of them...
    # chances: m=0 .01, m=1 .0198, m=2 .776, m=3 .0194, m=4 .0175, m=5 .157
    assert covered_lengths(conf, 1) == [2, 5]
    assert covered_lengths(conf, 2) == [1, 2, 5]
    assert covered_lengths(conf, None) == covered_lengths(conf, 5) == covered_lengths(conf, 9) == [0, 1, 2, 3, 4, 5]
    assert covered_lengths([], 1) == [0]
    assert covered_lengths([0.1, 0.5], 1) == [0, 1]  # no accepted draft is the likeliest, then one


@pytest.mark.parametrize(("shift", "drafts"), [(False, 3), (True, 4)])
def test_a_mask_block_drafts_every_slot_that_predicts_past_the_verifiers_token(shift, drafts):
    """Block 4: without shift slot 0 is the AR token's own position, so 3 drafts; with shift every
    slot predicts the position after it, so 4 (the last one beyond the block)."""
    from edlm.decode.selfverify import AcceptedRows, verified_step

    dlm = causal_dlm("qwen3", shift, block_size=4)
    rows = AcceptedRows(dlm.device)
    rows.add(0, [dlm.tokenizer(PROMPTS[0])["input_ids"]], [64])
    verified_step(dlm, rows, 4, depth=1)
    assert len(rows.drafts[0]) == len(rows.draft_conf[0]) == drafts


@pytest.mark.parametrize(("arch", "shift", "blocks", "depth"), [("qwen3", False, 2, 1), ("llama", True, 2, 8),
                                                                ("qwen3", True, 3, 2)])
def test_multiblock_drafts_keep_the_greedy_ar_text(arch, shift, blocks, depth):
    """verified drafting `blocks` model blocks a step: still token for token the model's greedy AR
    decode, batched and alone, with the same calls per row."""
    dlm = causal_dlm(arch, shift, block_size=3)
    ref = [greedy_ar(dlm, p, 14) for p in PROMPTS]
    batched = dlm.generate(PROMPTS, max_new_tokens=14, strategy="verified", blocks=blocks, draft_depth=depth)
    assert batched.token_ids == ref
    for i, p in enumerate(PROMPTS):
        alone = dlm.generate(p, max_new_tokens=14, strategy="verified", blocks=blocks, draft_depth=depth)
        assert alone.token_ids[0] == ref[i] and alone.stats[0].model_calls == batched.stats[i].model_calls


def test_first_block_of_a_multiblock_draft_is_the_one_block_draft():
    """The sub-blocks of a wide draft block are block-causal: its first block_size - 1 drafts, and
    their probabilities, are those of a one-block draft from the same state."""
    from edlm.decode.selfverify import AcceptedRows, verified_step

    dlm = causal_dlm("qwen3", False, block_size=4)
    got = {}
    for blocks in (1, 2):
        rows = AcceptedRows(dlm.device)
        rows.add(0, [dlm.tokenizer(p)["input_ids"] for p in PROMPTS], [64] * len(PROMPTS))
        verified_step(dlm, rows, 4, depth=1, blocks=blocks)  # the first step: no drafts to verify yet
        got[blocks] = rows
    assert got[1].seq == got[2].seq and all(len(d) == 7 for d in got[2].drafts)
    for one, two, c1, c2 in zip(got[1].drafts, got[2].drafts, got[1].draft_conf, got[2].draft_conf, strict=True):
        assert two[:3] == one and torch.allclose(torch.tensor(c2[:3]), torch.tensor(c1), atol=1e-9)


def test_verified_agrees_with_the_engine_ar_path():
    """On the demo dLM (drafts that are mostly right, so steps accept several tokens, EOS among
    them): the same tokens as `--ar` decoding of the same checkpoint, in fewer model calls."""
    dlm = DiffusionLM.from_pretrained(DEMO_DLM, device="cpu")
    ar = DiffusionLM.from_pretrained(DEMO_DLM, device="cpu", autoregressive=True)
    from edlm.recipes.bench import load_examples

    prompts = [e.prompt for e in load_examples("reasoning", 4)]
    events, result = [], []
    for e in dlm.stream(prompts, max_new_tokens=64, strategy="verified", draft_depth=8, result=result):
        events.append(e)
    ref = ar.generate(prompts, max_new_tokens=64)
    assert result[0].token_ids == ref.token_ids and result[0].texts == ref.texts
    assert all(r == "stop" for r in result[0].finish_reasons)
    last_steps = []
    for row in range(len(prompts)):
        mine = [e for e in events if e.row == row]
        assert sum(len(e.token_ids) for e in mine) == len(ref.token_ids[row])
        assert "".join(e.text for e in mine) == ref.texts[row]  # streamed pieces add up to the text
        assert mine[-1].done and mine[-1].token_ids[-1] == dlm.tokenizer.eos_token_id
        last_steps.append(len(mine[-1].token_ids))
        assert result[0].stats[row].tpf > 2
    assert max(last_steps) > 1  # an EOS accepted inside a multi-token step
    # a shift model drafts all 8 slots of a block (the last one beyond it): a step may commit 9
    assert max(k for s in result[0].stats for k in s.steps_histogram) == dlm.config.block_size + 1


def test_stop_strings_budgets_and_joins():
    dlm = causal_dlm("llama", True)
    full = dlm.generate(PROMPTS[2], max_new_tokens=16, strategy="verified").texts[0]
    stop = full[5:7]
    got = dlm.generate(PROMPTS[2], max_new_tokens=16, strategy="verified", stop=[stop])
    engine_ar = greedy_ar(dlm, PROMPTS[2], 16)
    assert got.texts[0] == dlm.tokenizer.decode(engine_ar)[: dlm.tokenizer.decode(engine_ar).find(stop)]
    assert got.finish_reasons == ["stop"]
    # budgets only cut; rows joining mid-call decode as alone
    joins = [([PROMPTS[1], PROMPTS[3]], [9, 5], None)]
    result = []
    for _ in dlm.stream(["cd"], max_new_tokens=[14], strategy="verified", result=result,
                        admit=lambda: joins.pop(0) if joins else None):
        pass
    for row, (p, n) in enumerate([("cd", 14), (PROMPTS[1], 9), (PROMPTS[3], 5)]):
        assert result[0].token_ids[row] == greedy_ar(dlm, p, n), row


def test_only_accepted_tokens_keep_kv():
    """After every step the cache holds exactly the accepted tokens but the last (whose KV the next
    step writes), at their positions: drafts that were rejected and mask blocks are gone."""
    from edlm.decode.selfverify import AcceptedRows, verified_step

    dlm = causal_dlm("qwen3", False)
    prompt = dlm.tokenizer(PROMPTS[0])["input_ids"]
    rows = AcceptedRows(dlm.device)
    rows.add(0, [prompt], [64])
    for _ in range(4):
        step = verified_step(dlm, rows, 4)[0]
        rows.seq[0] += step
        n = len(rows.seq[0]) - 1
        assert rows.cache.get_seq_length() == n and rows.cache_valid.all()
        assert rows.cache_pos[0].tolist() == list(range(n))


def test_draft_depth_zero_is_verifieds_only():
    dlm = causal_dlm("llama", True)
    for strategy in ("lossless", "psd"):
        with pytest.raises(DecodeOptionError, match="draft_depth >= 1"):
            dlm.generate("ab", max_new_tokens=4, strategy=strategy, draft_depth=0)
    with pytest.raises(DecodeOptionError, match="draft_depth must be"):
        dlm.generate("ab", max_new_tokens=4, strategy="verified", draft_depth=-1)


def test_needs_an_ar_stream_and_greedy():
    dlm = causal_dlm("llama", False)
    dlm.config.causal_clean = False
    with pytest.raises(DecodeOptionError, match="ar-loss-weight"):
        dlm.generate("ab", max_new_tokens=4, strategy="verified")
    dlm.config.causal_clean = True
    with pytest.raises(DecodeOptionError, match="greedily"):
        dlm.generate("ab", max_new_tokens=4, strategy="verified", temperature=0.7)


@pytest.mark.parametrize(("shift", "k"), [(False, 3), (True, 4)])
def test_a_row_below_every_covered_length_drafts_the_verifiers_own_tokens(shift, k):
    """A row that rejects its first draft where the one mask block assumed it would accept all of
    them gets the verifier's tokens after its bonus token as drafts (Jacobi's guess), confidence 0,
    so the next step covers acceptance length 0; the decode stays the model's greedy AR text."""
    from edlm.decode.selfverify import AcceptedRows, covered_lengths, verified_step

    dlm = causal_dlm("qwen3", shift, block_size=4)  # a block drafts k tokens (3 unshifted, 4 shifted)
    prompt = dlm.tokenizer(PROMPTS[0])["input_ids"]
    first = greedy_ar(dlm, PROMPTS[0], 1)[0]
    mask_id = dlm.config.mask_token_id
    drafts = [t for t in range(dlm.model.config.vocab_size) if t not in (first, mask_id)][:k]  # the first one is wrong
    with torch.no_grad():  # the verifier's tokens, independently: one causal forward over prompt + drafts
        logits = dlm.model(input_ids=torch.tensor([prompt + drafts])).logits[0].float()
    verifier = candidate_logits(dlm, logits).argmax(-1).tolist()[len(prompt) - 1:]
    assert verifier[0] == first
    rows = AcceptedRows(dlm.device)
    rows.add(0, [prompt], [64])
    rows.drafts[0], rows.draft_conf[0] = list(drafts), [0.99] * k
    assert covered_lengths(rows.draft_conf[0], 0) == [k]  # its only mask block assumes all accepted
    assert verified_step(dlm, rows, 4, depth=0) == [[first]]
    assert rows.drafts[0] == verifier[1 : k + 1] and rows.draft_conf[0] == [0.0] * k
    assert covered_lengths(rows.draft_conf[0], 0) == [0]
    ref = greedy_ar(dlm, PROMPTS[0], 12)
    rows.seq[0] += [first]
    while len(rows.seq[0]) < len(prompt) + len(ref):
        rows.seq[0] += verified_step(dlm, rows, 4, depth=0)[0]
    assert rows.seq[0][len(prompt) : len(prompt) + len(ref)] == ref
