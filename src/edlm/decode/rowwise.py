"""A verification forward's clean rows attended as the parent's own decode attends them, one query at a time.

Why: `verified` (with a drafter, the parent's exact text) computes its clean rows, the accepted token
and the drafts, in one forward with the mask blocks; the two-model mode's parent scores its drafts in
one forward too. On a CPU in bf16, norms and RoPE give a row the same bits whatever else is in the
forward, and so does the GEMM for up to ~17 rows (measured on this CPU: from 18 rows on, a few
elements in 10^4 move; block 4 with draft_depth 1 feeds 12 rows, block 32 feeds 96 and moved a
text). SDPA does not: a query sent with others and a 4-D mask gets other bits than the same query
sent alone, as HF `generate` sends it (SmolLM2-135M: logits up to 0.5 apart after 30 layers; 7 of 12
drafter texts at batch 1 left HF generate's). Here the clean rows go through HF's own SDPA function
the way HF generate calls it: the first forward's prompt in one causal call without a mask (HF's
prefill), every other clean row alone over the keys it sees (HF's one-token step); the mask blocks
keep their one masked call. One row per forward, with a cache holding only its accepted tokens, is
what makes "the keys it sees" a prefix; other batches take the one-call path. The result is
measured, not promised: it rests on the CPU's GEMM kernels (20 of 20 SmolLM2 texts at blocks 4 and
8), and CPUs differ: on another EPYC (2026-12-06) SmolLM2's bf16 down_proj gave a row other bits
from 4 rows on, and one of five chats left HF generate's text (the real tier probes this and skips).
In fp32 the CPU's GEMMs differ by row count at once (MKL's one-row path): fp32 is left as it
was, within rounding of HF generate (20 of 20 texts either way), and spared the extra calls.

The override is HF's attention registry entry "sdpa", installed once; it changes nothing unless a
forward runs inside `clean_rows_alone` (a ContextVar, so other threads and models are untouched).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch

_CLEAN_ROWS: ContextVar[tuple[int, int] | None] = ContextVar("edlm_clean_rows_alone", default=None)
_hf_sdpa = None  # HF's own sdpa_attention_forward, which the override calls


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    plan = _CLEAN_ROWS.get()
    if plan is None or query.shape[0] != 1 or kwargs.get("sliding_window") is not None:
        return _hf_sdpa(module, query, key, value, attention_mask, **kwargs)
    prefill, n = plan
    cached = key.shape[2] - query.shape[2]
    if cached:  # a later forward: every clean row is a one-token step
        prefill = 0
    outs = [_hf_sdpa(module, query[:, :, :prefill], key[:, :, :prefill], value[:, :, :prefill], None, **kwargs)[0]
            ] if prefill else []  # the first forward's prompt, in one causal call: HF's prefill
    outs += [_hf_sdpa(module, query[:, :, i: i + 1], key[:, :, : cached + i + 1], value[:, :, : cached + i + 1],
                      None, **kwargs)[0] for i in range(prefill, n)]
    if n < query.shape[2]:  # the mask blocks, one masked call as before
        outs.append(_hf_sdpa(module, query[:, :, n:], key, value, attention_mask[:, :, n:], **kwargs)[0])
    return torch.cat(outs, 1), None


def _install() -> None:
    global _hf_sdpa
    if _hf_sdpa is None:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        _hf_sdpa = sdpa_attention_forward
        AttentionInterface.register("sdpa", _sdpa)


@contextmanager
def clean_rows_alone(dlm, rows, n_new: int, n_clean: int):
    """Within: a forward of `dlm` over `rows` (edlm.decode.kv.KVRows) whose first `n_clean` queries
    are clean and token-causal right after the cache, the first `n_new` of them the tokens no forward
    has fed yet (the prompt, in the first forward), attends those queries as HF generate would, where
    that gives the parent's bits: one row, bf16 on a CPU, an sdpa model, a cache of valid keys only.
    Elsewhere the GEMMs themselves differ by row count (fp32 on a CPU, any GPU): nothing changes there."""
    if not (rows.cache_valid.shape[0] == 1 and dlm.dtype == torch.bfloat16 and dlm.device.type == "cpu"
            and dlm.attn_implementation == "sdpa" and bool(rows.cache_valid.all())):
        yield
        return
    _install()
    token = _CLEAN_ROWS.set((n_new, n_clean))
    try:
        yield
    finally:
        _CLEAN_ROWS.reset(token)
