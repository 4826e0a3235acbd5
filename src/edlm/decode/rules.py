"""Commit rules: which masked positions of the current block get decided in this step.

Each rule takes per-slot confidences [B, S] (probability of the chosen token), entropies
[B, S] and the candidate slots [B, S] (still masked, to be generated) and returns a bool
[B, S] commit mask with at least one True per row that has a candidate. Pure functions of
tensors: which rule a strategy uses, and with which option, is said once in edlm.decode.strategies.
"""

from __future__ import annotations

import torch


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None,
                entropy: bool = True):
    """logits [B, S, V] (already with forbidden ids at -inf) -> tokens, confidence, entropy [B, S]
    (entropy None unless asked for: over a 150k vocabulary it costs as much as the rest).

    Greedy confidence is exp(max - logsumexp): the probability of the argmax without
    materialising the softmax over the vocabulary."""
    logits = logits.float()
    if temperature <= 0 and not entropy:
        top, tokens = logits.max(dim=-1)
        return tokens, torch.exp(top - torch.logsumexp(logits, dim=-1)), None
    if temperature > 0:
        logits = logits / temperature
    probs = torch.softmax(logits, dim=-1)
    ent = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1) if entropy else None
    if temperature <= 0:
        conf, tokens = probs.max(dim=-1)
        return tokens, conf, ent
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # keep the smallest prefix reaching top_p (as HF)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    flat = probs.view(-1, probs.shape[-1])
    tokens = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    conf = probs.gather(-1, tokens[..., None])[..., 0]
    return tokens, conf, ent


def accepted_drafts(drafts: list[int], greedy: list[int]) -> int:
    """Greedy speculative verification: how many leading drafts equal the verifier's own tokens
    (greedy[i] is its token where drafts[i] stands; it has one more, its token after them)."""
    n = 0
    while n < len(drafts) and drafts[n] == greedy[n]:
        n += 1
    return n


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, k: int):
    """log p(tokens) [...] and the k most likely tokens with their log-probs [..., k] under logits
    [..., V] (forbidden ids already at -inf): what a generated token reports as its logprobs."""
    logp = logits.float().log_softmax(-1)
    top_lp, top_ids = logp.topk(k, dim=-1) if k else (logp[..., :0], tokens[..., None][..., :0])
    return logp.gather(-1, tokens[..., None])[..., 0], top_ids, top_lp


def cut_tokens(tokens: list[int], budget_left: int, eos: int | None) -> list[int]:
    """A row's new tokens as it emits them: at most `budget_left`, none after its first EOS (which
    is kept: the caller's text drops it)."""
    tokens = tokens[:budget_left]
    if eos is not None and eos in tokens:
        return tokens[: tokens.index(eos) + 1]
    return tokens


def opened_slots(todo: torch.Tensor, gen: torch.Tensor, blocks: int, at: float) -> torch.Tensor:
    """Multi-block decoding's candidates: the masked slots [B, W] of a window of `blocks` blocks whose
    block before has at least the fraction `at` of its generated slots decided (the first block's
    always; at 0 every block's). D2F's "add a block once the last one is this far", applied per step,
    so a rule sees one set of candidates and a block never opens ahead of the one before it."""
    if blocks == 1:
        return todo
    n, w = todo.shape
    decided = (gen & ~todo).view(n, blocks, w // blocks).sum(-1)
    share = decided / gen.view(n, blocks, w // blocks).sum(-1).clamp_min(1)
    opened = torch.cat([torch.ones_like(share[:, :1], dtype=torch.bool), share[:, :-1] >= at], 1)
    return todo & opened.repeat_interleave(w // blocks, 1)


def _top_n(score: torch.Tensor, n: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Commit the n[b] highest-scoring candidates of each row."""
    score = score.masked_fill(~candidates, float("-inf"))
    rank = score.argsort(dim=-1, descending=True).argsort(dim=-1)
    return (rank < n[:, None]) & candidates


def at_least_one(commit: torch.Tensor, conf: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    best = _top_n(conf, torch.ones(conf.shape[0], dtype=torch.long, device=conf.device), candidates)
    return commit | best


def commit_threshold(conf, candidates, threshold: float):
    """Fast-dLLM: every candidate with confidence >= threshold, and always the top-1."""
    return at_least_one(candidates & (conf >= threshold), conf, candidates)


def commit_prefix(conf, candidates, threshold: float):
    """Left-to-right threshold: the leftmost candidate always, then each next slot while every
    candidate up to it passes the threshold. An AR-initialised dLM reads its block left to right
    best (measured on the demo dLM: more accurate AND more tokens per call than `threshold`)."""
    first = candidates & (candidates.long().cumsum(-1) == 1)
    passes = (conf >= threshold) | ~candidates | first  # decided slots do not break the run
    return passes.long().cumprod(-1).bool() & candidates


def commit_factor(conf, candidates, factor: float):
    """Fast-dLLM factor rule: the top n for the largest n with (n + 1)(1 - c_n) < f."""
    c = conf.masked_fill(~candidates, -1.0).sort(dim=-1, descending=True).values
    n_idx = torch.arange(1, c.shape[-1] + 1, device=c.device)
    ok = ((n_idx + 1) * (1 - c) < factor) & (c >= 0)
    n = torch.where(ok, n_idx, torch.zeros_like(n_idx)).max(dim=-1).values.clamp_min(1)
    return _top_n(conf, n, candidates)


def commit_entropy(conf, entropy, candidates, gamma: float):
    """Entropy-bounded sampler: lowest-entropy first, the largest k with sum(H) - max(H) <= gamma."""
    h = entropy.masked_fill(~candidates, float("inf")).sort(dim=-1).values
    finite = torch.isfinite(h)
    hz = torch.where(finite, h, torch.zeros_like(h))
    ok = (hz.cumsum(-1) - hz.cummax(-1).values <= gamma) & finite
    n_idx = torch.arange(1, h.shape[-1] + 1, device=h.device)
    n = torch.where(ok, n_idx, torch.zeros_like(n_idx)).max(dim=-1).values.clamp_min(1)
    return _top_n(-entropy, n, candidates)


def commit_steps(conf, candidates, tokens_per_step):
    """A fixed number of most-confident tokens per step (LLaDA-style schedules); tokens_per_step an
    int, or one per row ([B, 1], as every rule's options may be for a batch of mixed settings)."""
    if torch.is_tensor(tokens_per_step):
        n = tokens_per_step.reshape(-1).to(device=conf.device, dtype=torch.long).expand(conf.shape[0])
    else:
        n = torch.full((conf.shape[0],), tokens_per_step, dtype=torch.long, device=conf.device)
    return _top_n(conf, n, candidates)
