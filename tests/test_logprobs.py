"""Logprobs of generated tokens: what each decoder reports, against independent computations."""

import math

import pytest
import torch

from edlm import DiffusionConfig, DiffusionLM
from edlm.decode.scoring import left_to_right_row, score_rows
from edlm.errors import EdlmError
from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer
from edlm.train.convert import convert_model

PROMPTS = ["The cat sat", "Hello, wor", "Once upon a time there"]


def ar_model(arch="llama"):
    """An AR model whose vocabulary is exactly its tokenizer's (as most real checkpoints), so its
    candidates are every row and its logprobs must be HF's log_softmax as they are."""
    tok = make_tiny_tokenizer()
    return DiffusionLM(make_tiny_causal_lm(arch, vocab_size=len(tok), dtype=torch.float64), tok,
                       DiffusionConfig.autoregressive())


def dlm_model(shift=False, causal_clean=False, arch="llama"):
    dlm = convert_model(make_tiny_causal_lm(arch, dtype=torch.float64), make_tiny_tokenizer(), block_size=4,
                        shift=shift)
    dlm.config.causal_clean = causal_clean
    return dlm


@torch.no_grad()
def hf_logprobs(model, tokenizer, prompt: str, generated: list[int], excluded=()) -> torch.Tensor:
    """log_softmax of a causal LM's own logits at each generated token (one teacher-forced forward,
    plain HF), with `excluded` ids taken out of the distribution."""
    ids = tokenizer(prompt)["input_ids"]
    logits = model(input_ids=torch.tensor([ids + generated])).logits[0, len(ids) - 1: -1].float()
    logits[:, list(excluded)] = -math.inf
    return logits.log_softmax(-1)


def check_against(logp: torch.Tensor, reported, k: int) -> None:
    assert len(reported) == logp.shape[0]
    for row, tok in zip(logp, reported, strict=True):
        assert math.isclose(tok.logprob, float(row[tok.token_id]), abs_tol=1e-5)
        top = row.topk(k)
        assert [t for t, _ in tok.top] == top.indices.tolist()
        assert all(math.isclose(a, float(b), abs_tol=1e-5) for (_, a), b in zip(tok.top, top.values, strict=True))


def test_ar_logprobs_equal_hf_log_softmax():
    ar = ar_model()
    res = ar.generate(PROMPTS, max_new_tokens=9, logprobs=3)
    for prompt, ids, lps in zip(PROMPTS, res.token_ids, res.logprobs, strict=True):
        assert [t.token_id for t in lps] == ids
        check_against(hf_logprobs(ar.model, ar.tokenizer, prompt, ids), lps, 3)


@pytest.mark.parametrize("exact_mode", ["parent", "verified"])
def test_exact_modes_report_the_ar_verifiers_logprobs(exact_mode):
    """Two-model mode: the parent's HF logprobs. verified: its own AR stream's, i.e. the dLM's clean
    stream run as an AR model (which, with a causal clean stream and shift, is a plain causal LM)."""
    ar = ar_model()
    if exact_mode == "parent":
        dlm = convert_model(make_tiny_causal_lm("llama", vocab_size=len(ar.tokenizer), dtype=torch.float64),
                            make_tiny_tokenizer(), block_size=4, shift=True)
        res = dlm.generate(PROMPTS, max_new_tokens=9, logprobs=2, verifier=ar)
        model, excluded = ar.model, ()
    else:
        dlm = dlm_model(shift=True, causal_clean=True)
        res = dlm.generate(PROMPTS, max_new_tokens=9, logprobs=2, strategy="verified")
        vocab = dlm.model.config.vocab_size  # candidates: the tokenizer's rows, never the mask token
        model, excluded = dlm.model, [dlm.config.mask_token_id, *range(len(dlm.tokenizer), vocab)]
    for prompt, ids, lps in zip(PROMPTS, res.token_ids, res.logprobs, strict=True):
        logp = hf_logprobs(model, dlm.tokenizer, prompt, ids, excluded)
        check_against(logp, lps, 2)


def test_left_to_right_logprobs_sum_to_the_exact_ltr_likelihood():
    """Strict left to right (prefix at threshold 1.0) commits one slot per step with the block's
    later slots masked: the sum of the reported logprobs is then the `ltr` scorer's exact
    log-likelihood of the generated text, computed in one uncached forward."""
    dlm = dlm_model()
    res = dlm.generate(PROMPTS, max_new_tokens=10, strategy="prefix", threshold=1.0, logprobs=0)
    for prompt, ids, lps in zip(PROMPTS, res.token_ids, res.logprobs, strict=True):
        x = dlm.tokenizer(prompt)["input_ids"]
        row = left_to_right_row(x + ids, len(x), 4, dlm.config.mask_token_id, False)
        (total, greedy), = score_rows(dlm, [row], 4, batch_size=1)
        assert greedy  # every generated token was the argmax where it was committed
        assert math.isclose(sum(t.logprob for t in lps), total, abs_tol=1e-4)
        assert all(t.top == [] for t in lps)


def test_lossless_reports_what_one_token_steps_report():
    dlm = dlm_model()
    one = dlm.generate(PROMPTS, max_new_tokens=10, strategy="steps", tokens_per_step=1, logprobs=2)
    fast = dlm.generate(PROMPTS, max_new_tokens=10, strategy="lossless", draft_depth=3, logprobs=2)
    assert fast.token_ids == one.token_ids
    for a, b in zip(fast.logprobs, one.logprobs, strict=True):
        for x, y in zip(a, b, strict=True):
            assert math.isclose(x.logprob, y.logprob, abs_tol=1e-5)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


@pytest.mark.parametrize("strategy", ["threshold", "psd", "soft"])
def test_batched_equals_alone_and_events_carry_their_tokens_logprobs(strategy):
    dlm = dlm_model()
    kw = {"strategy": strategy, "threshold": 0.3, "logprobs": 1, "max_new_tokens": 11}
    events, result = [], []
    for event in dlm.stream(PROMPTS, result=result, stop=[["wor"], [], []], **kw):
        events.append(event)
    res = result[0]
    for i, prompt in enumerate(PROMPTS):
        alone = dlm.generate(prompt, stop=[["wor"], [], []][i], **kw)
        assert res.token_ids[i] == alone.token_ids[0]
        assert [t.logprob for t in res.logprobs[i]] == pytest.approx([t.logprob for t in alone.logprobs[0]], abs=1e-9)
        assert [t.token_id for t in res.logprobs[i]] == res.token_ids[i]  # a stop string trims both alike
        streamed = [t for e in events if e.row == i for t in e.logprobs]
        assert [t.token_id for t in streamed][: len(res.token_ids[i])] == res.token_ids[i]
    for toks in res.logprobs:
        for t in toks:
            assert t.logprob <= 0 and t.top[0][1] >= t.logprob - 1e-9


def test_no_logprobs_unless_asked_and_bad_values_are_refused():
    dlm = dlm_model()
    res = dlm.generate(PROMPTS[0], max_new_tokens=4)
    assert res.logprobs is None
    events = list(dlm.stream(PROMPTS[0], max_new_tokens=4))
    assert all(e.logprobs is None for e in events)
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(EdlmError, match="logprobs"):
            dlm.generate(PROMPTS[0], max_new_tokens=4, logprobs=bad)
