"""The dLM drafts, its AR parent verifies: token-identical to the parent's greedy decode."""

import pytest
import torch

from edlm import DiffusionConfig, DiffusionLM
from edlm.errors import EdlmError
from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer
from edlm.train.convert import convert_model

PROMPTS = ["The cat sat", "Hello, wor", "ab", "Once upon a time there"]  # 11, 10, 2, 22 tokens


def pair(arch, shift, block_size=4, seed=0):
    """float64 AR parent and a dLM drafter that share its tokenizer (a differently seeded model,
    so drafts are sometimes right and sometimes wrong)."""
    tok = make_tiny_tokenizer()
    ar = DiffusionLM(make_tiny_causal_lm(arch, dtype=torch.float64, seed=seed), tok,
                     DiffusionConfig.autoregressive())
    dlm = convert_model(make_tiny_causal_lm(arch, dtype=torch.float64, seed=seed), make_tiny_tokenizer(),
                        block_size=block_size, shift=shift)
    return dlm, ar


@pytest.mark.parametrize(("arch", "shift"), [("llama", True), ("qwen3", False)])
def test_verified_equals_parent_greedy_single_and_batched(arch, shift):
    dlm, ar = pair(arch, shift)
    ref = ar.generate(PROMPTS, max_new_tokens=13)  # the parent alone, through the engine's AR path
    got = dlm.generate(PROMPTS, max_new_tokens=13, verifier=ar)
    assert got.token_ids == ref.token_ids and got.texts == ref.texts
    for i, p in enumerate(PROMPTS):
        assert dlm.generate(p, max_new_tokens=13, verifier=ar).token_ids[0] == ref.token_ids[i]
    for s, ids in zip(got.stats, ref.token_ids, strict=True):
        assert s.generated_tokens == len(ids) and 1 <= s.model_calls <= len(ids)  # >= 1 token per step


def test_the_parent_as_its_own_drafter_accepts_whole_blocks():
    """A drafter that always agrees with the parent commits a block per step: the verification
    accepts every draft. (The AR model converted with shift drafts its first slot exactly.)"""
    dlm, ar = pair("llama", True, block_size=4)
    got = dlm.generate(PROMPTS[1], max_new_tokens=12, verifier=ar)
    assert got.token_ids == ar.generate(PROMPTS[1], max_new_tokens=12).token_ids
    assert got.stats[0].model_calls < 12


def test_eos_inside_a_draft_and_stop_strings():
    dlm, ar = pair("llama", True)
    free = ar.generate(PROMPTS[0], max_new_tokens=12)
    eos_char = ar.tokenizer.convert_ids_to_tokens(free.token_ids[0][5])
    for model in (ar, dlm):
        model.tokenizer.eos_token = eos_char
    ref = ar.generate(PROMPTS, max_new_tokens=12)
    got = dlm.generate(PROMPTS, max_new_tokens=12, verifier=ar)
    assert got.token_ids == ref.token_ids and got.finish_reasons == ref.finish_reasons
    assert got.finish_reasons[0] == "stop" and got.token_ids[0][-1] == ar.tokenizer.eos_token_id
    full = ar.generate(PROMPTS[2], max_new_tokens=16).texts[0]
    stop = full[5:7]
    ref = ar.generate(PROMPTS[2], max_new_tokens=16, stop=[stop])
    got = dlm.generate(PROMPTS[2], max_new_tokens=16, stop=[stop], verifier=ar)
    assert got.texts == ref.texts and got.token_ids == ref.token_ids and got.finish_reasons == ["stop"]


def test_the_pair_is_checked():
    dlm, ar = pair("llama", True)
    with pytest.raises(EdlmError, match="AR model"):
        dlm.generate("ab", verifier=dlm)
    with pytest.raises(EdlmError, match="converted dLM"):
        ar.generate("ab", verifier=ar)


@pytest.mark.parametrize(("arch", "shift"), [("llama", True), ("qwen3", False)])
def test_batched_rows_draft_as_alone_and_requests_join_mid_call(arch, shift):
    """Both forwards serve every row: each row makes exactly the verification steps it makes
    alone (so its drafts are the same), and a request joining after the first step decodes the
    parent's greedy text too."""
    dlm, ar = pair(arch, shift)
    alone = [dlm.generate(p, max_new_tokens=13, verifier=ar) for p in PROMPTS]
    batched = dlm.generate(PROMPTS, max_new_tokens=13, verifier=ar)
    for i, one in enumerate(alone):
        assert batched.token_ids[i] == one.token_ids[0]
        assert batched.stats[i].model_calls == one.stats[0].model_calls
        assert batched.stats[i].steps_histogram == one.stats[0].steps_histogram
    joining = [(["Once upon a time there"], [9], [[]])]
    result = []
    events = list(dlm.stream(PROMPTS[:2], max_new_tokens=13, verifier=ar, result=result,
                             admit=lambda: joining.pop() if joining else None))
    res = result[0]
    assert res.token_ids[2] == ar.generate("Once upon a time there", max_new_tokens=9).token_ids[0]
    assert res.token_ids[:2] == batched.token_ids[:2]
    assert {e.row for e in events if e.done} == {0, 1, 2}
    assert "".join(e.text for e in events if e.row == 2) == res.texts[2]  # streamed per step


@pytest.mark.parametrize(("arch", "shift", "causal_clean"), [("llama", True, False), ("qwen3", False, False),
                                                             ("llama", True, True)])
def test_batched_drafts_equal_a_full_forward_without_cache(arch, shift, causal_clean):
    """The dLM's drafts for rows of different lengths, step after step (its cache of finished
    blocks growing per row), equal the argmax of one uncached forward of [prefix's finished blocks ;
    current block with masks] per row."""
    from edlm.decode.verify import BlockDrafts
    from edlm.masks import position_block_mask

    dlm, _ = pair(arch, shift)
    dlm.config.causal_clean = causal_clean
    bs, mask_id = 4, dlm.config.mask_token_id

    def reference(seq):
        b = len(seq) // bs * bs
        ids = torch.tensor([seq + [mask_id] * (b + bs - len(seq))])
        pos = torch.arange(b + bs)[None]
        mask = position_block_mask(pos, pos, bs, causal_q=pos < b if causal_clean else None)
        logits = dlm.model(input_ids=ids, attention_mask=dlm.backend_mask(mask), position_ids=pos).logits[0]
        lead = -1 if shift else 0
        return [int(logits[b + i + lead, :mask_id].argmax()) for i in range(len(seq) - b, bs)]

    full = [dlm.tokenizer(p)["input_ids"] + list(range(40, 60)) for p in ("ab", "Hello, wor")]
    drafts = BlockDrafts(dlm, bs)
    drafts.add(2)
    for n in ([2, 10], [3, 12], [4, 13], [7, 15], [8, 16], [13, 19]):  # accepted prefixes, as verification grows them
        seqs = [f[:k] for f, k in zip(full, n, strict=True)]
        assert drafts.draft(seqs) == [reference(s) for s in seqs], n
