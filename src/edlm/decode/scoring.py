"""Likelihood scoring of a continuation under a dLM, in one forward per batch of rows.

A dLM has no single left-to-right factorisation, so a log-likelihood needs an estimator:

- "ltr" (default): the exact log-likelihood of revealing the continuation one token at a time, left
  to right. Token p is predicted from the clean blocks before its block (decoding's KV cache) and
  its own block with positions < p revealed and positions >= p masked up to the block end (how
  decoding opens a block). Computed in one forward, not one per token: every token gets its own
  noisy copy of its block, all copies share one clean stream in the same input (see ScoringRow),
  so a request costs len(context) + block_size * len(continuation) input tokens.
  Chosen as default because it is deterministic (multiple-choice accuracy does not move with a
  sample count or seed), exact rather than a bound, follows the order the decoder roughly takes,
  is cheap for the short continuations of multiple-choice tasks, and at block size 1
  (`autoregressive=True`) is exactly the usual AR log-likelihood, so AR and dLM are comparable.
- "elbo": the masked-diffusion lower bound (LLaDA's estimator, per block): for each sample and each
  block holding continuation tokens, mask k ~ U{1..m} of its m continuation tokens and add
  (m / k) * sum of their log-probabilities; averaged over `mc_samples`. Closer to the training
  objective, but a bound with Monte-Carlo noise.

Both score with the decoder's candidate set: the mask token and padded vocabulary rows are excluded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from edlm.decode.kv import model_forward
from edlm.masks import block_copies_mask

ESTIMATORS = ("ltr", "elbo")
_PAD_GROUP = -2


@dataclass
class ScoringRow:
    """One input row: a clean stream, noisy copies of blocks, and which outputs to score.

    The order of inputs in a row is free: who sees whom is fixed by the mask and the position ids,
    not by the index. So the queries we score are moved to the end and only their logits are
    computed (logits_to_keep), while every copy shares one clean stream in one forward.
    """

    clean: list[int]  # clean tokens at positions 0..len-1
    copies: list[tuple[int, list[int]]] = field(default_factory=list)  # (block index, tokens with masks)
    queries: list[tuple[int, int]] = field(default_factory=list)  # (copy index or -1 = clean, position)
    targets: list[tuple[int, int, float]] = field(default_factory=list)  # (query index, token, weight)
    _index: dict = field(default_factory=dict, repr=False)

    def query(self, group: int, position: int) -> int:
        """Index of a scored query; a clean query shared by several targets is computed once."""
        key = (group, position)
        if key not in self._index:
            self._index[key] = len(self.queries)
            self.queries.append(key)
        return self._index[key]

    def scored_query(self, copy: int, position: int, block_size: int, shift: bool) -> int:
        """The output that predicts the token at `position` inside `copy`.

        With shift, position i is predicted at i-1; a block's first token is predicted by the clean
        stream's last position of the previous block (as in training and decoding).
        """
        if not shift:
            return self.query(copy, position)
        if position % block_size == 0:
            return self.query(-1, position - 1)
        return self.query(copy, position - 1)

    def tensors(self, block_size: int) -> tuple[list[int], list[int], list[int]]:
        """Token ids, positions and groups (-1 clean, c = copy c), scored queries last."""
        ids, pos, group = list(self.clean), list(range(len(self.clean))), [-1] * len(self.clean)
        for c, (block, tokens) in enumerate(self.copies):
            ids += tokens
            pos += range(block * block_size, block * block_size + len(tokens))
            group += [c] * len(tokens)
        where = {(g, p): i for i, (g, p) in enumerate(zip(group, pos, strict=True))}
        last = [where[q] for q in self.queries]
        moved = set(last)
        order = [i for i in range(len(ids)) if i not in moved] + last
        return [ids[i] for i in order], [pos[i] for i in order], [group[i] for i in order]


def left_to_right_row(x: list[int], start: int, block_size: int, mask_id: int | None, shift: bool) -> ScoringRow:
    """Exact log p(x[start:] | x[:start]) when tokens are revealed one at a time, left to right.

    One noisy copy of the block per scored token (its earlier positions revealed, the rest masked
    to the block end), except where shift predicts a block's first token from the clean stream.
    """
    last_block = (len(x) - 1) // block_size
    row = ScoringRow(clean=x[: last_block * block_size])
    for p in range(start, len(x)):
        block = p // block_size
        if shift and p % block_size == 0:
            q = row.query(-1, p - 1)
        else:
            first = block * block_size
            row.copies.append((block, x[first:p] + [mask_id] * (first + block_size - p)))
            q = row.scored_query(len(row.copies) - 1, p, block_size, shift)
        row.targets.append((q, x[p], 1.0))
    return row


def masked_elbo_row(x: list[int], start: int, block_size: int, mask_id: int, shift: bool, samples: int,
                    rng: random.Random) -> ScoringRow:
    """Monte-Carlo masked ELBO of x[start:]: per sample and block, mask k ~ U{1..m}, weight m / k."""
    last_block = (len(x) - 1) // block_size
    padded = x + [mask_id] * (-len(x) % block_size)  # decoding's view: a block is full, masks at its end
    row = ScoringRow(clean=x[: last_block * block_size])
    for _ in range(samples):
        for block in range(start // block_size, last_block + 1):
            first = block * block_size
            candidates = list(range(max(start, first), min(len(x), first + block_size)))
            masked = rng.sample(candidates, rng.randint(1, len(candidates)))
            tokens = padded[first : first + block_size]
            for p in masked:
                tokens[p - first] = mask_id
            row.copies.append((block, tokens))
            weight = len(candidates) / len(masked) / samples
            for p in masked:
                q = row.scored_query(len(row.copies) - 1, p, block_size, shift)
                row.targets.append((q, x[p], weight))
    return row


@torch.no_grad()
def score_rows(dlm, rows: list[ScoringRow], block_size: int, batch_size: int,
               progress: bool = False) -> list[tuple[float, bool]]:
    """Per row: (sum of weight * log p(target), every target is the argmax at its query)."""
    dev = dlm.device
    built = [r.tensors(block_size) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: -len(built[i][0]))  # similar lengths share a batch
    out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    for s in tqdm(range(0, len(order), batch_size), disable=not progress, desc="edlm loglikelihood"):
        chunk = order[s : s + batch_size]
        width = max(len(built[i][0]) for i in chunk)
        n_query = max(len(rows[i].queries) for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        pos = torch.full((len(chunk), width), -1, dtype=torch.long)
        group = torch.full((len(chunk), width), _PAD_GROUP, dtype=torch.long)
        for r, i in enumerate(chunk):  # left padding keeps every row's queries at the end
            n = len(built[i][0])
            ids[r, width - n :], pos[r, width - n :], group[r, width - n :] = map(torch.tensor, built[i])
        ids, pos, group = ids.to(dev), pos.to(dev), group.to(dev)
        mask = block_copies_mask(pos, group, block_size, causal_clean=dlm.config.causal_clean)
        logp = model_forward(dlm, pos, mask, ids=ids, logits_to_keep=n_query,
                             noisy=group >= 0).log_softmax(-1)  # [B, n_query, V]; copies are noisy
        greedy = logp.argmax(-1)
        for r, i in enumerate(chunk):
            row = rows[i]
            base = n_query - len(row.queries)
            q = torch.tensor([base + t[0] for t in row.targets], device=dev)
            tok = torch.tensor([t[1] for t in row.targets], device=dev)
            weight = torch.tensor([t[2] for t in row.targets], device=dev)
            lp = (logp[r, q, tok] * weight).sum().item()
            out[i] = (lp, bool((greedy[r, q] == tok).all()))
    return out
