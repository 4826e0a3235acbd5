"""`verified`: one model drafts by diffusion and verifies autoregressively, in one forward per step.

The TiDAR idea (arXiv 2511.08923) on an edlm model: the clean stream, token-causal (a
`--causal-clean` model, trained with an AR loss), is the model's own AR decoder, and its mask
blocks are its drafter. Each forward feeds, per row:

  [accepted tokens not cached yet ; drafts d_1..d_k]   clean, token-causal: AR logits
  [mask block M_0] ... [mask block M_k]                  M_j starts at p + j, sees the clean tokens
                                                         before it (the prefix and d_1..d_j)

where p is the accepted length. The AR logits verify the drafts greedily: the longest prefix equal
to the AR argmax is kept, plus the AR's own next token (so every step commits >= 1 token and the
output is token for token the model's greedy AR decode). The next drafts come from M_n, the block
that assumed exactly the n accepted drafts, so no second pass is needed: TiDAR's structured masks,
all acceptance lengths at once, k + 1 = block_size mask blocks per forward (`draft_depth` D keeps
those of the D + 1 likeliest lengths, chosen per row from the drafts' own probabilities). M_j's
first slot sits where the AR's own token goes, so it drafts the block_size - 1 tokens after it;
under token shift each slot predicts the position after it, so it drafts block_size tokens (the
last one beyond the block: a step may then accept block_size + 1).
With `blocks` B each mask block is B model blocks wide, block-causal inside, and drafts
B * block_size - 1 tokens (its first block's drafts are exactly the one-block ones).

Draft blocks are placed right after the prefix, not on the block grid: with RoPE only relative
positions matter, and a block seeing "every clean token before my start" is what training's
"clean earlier blocks" rule is, moved. Only accepted tokens' KV is kept (the mask blocks and
rejected drafts are cropped, or masked out when the rows of a batch reject different numbers).
Greedy only. Rows leave when done; joins take part from the next step (edlm.decode.loop drives
`SelfVerifiedDecoder`).
"""

from __future__ import annotations

import torch

from edlm.decode.kv import KVRows, lag
from edlm.decode.loop import Step
from edlm.decode.rowwise import clean_rows_alone
from edlm.decode.rules import accepted_drafts, cut_tokens, logprobs_of
from edlm.decode.state import token_logprobs
from edlm.errors import EdlmError
from edlm.masks import draft_blocks_mask
from edlm.vision import vision_of


class AcceptedRows(KVRows):
    """Per row: the accepted tokens (`seq`), how many of them have KV in the cache (`fed`), the
    drafts that follow them and the new tokens it may still emit (`budget_left`). Row r of every
    list and cache row r are the same request (`ids`)."""

    def __init__(self, device, logprob_k: int | None = None):
        self.init_cache(0, device)
        self.logprob_k = logprob_k  # report TokenLogprobs of accepted tokens (the verifier's)
        self.ids: list[int] = []  # request ids
        self.seq: list[list[int]] = []
        self.fed: list[int] = []
        self.drafts: list[list[int]] = []
        self.draft_conf: list[list[float]] = []  # each draft's probability under its mask block
        self.budget_left: list[int] = []

    def add(self, first_row: int, prompts: list[list[int]], budgets: list[int]) -> None:
        self.compact_keys()  # the keys earlier joins wrote are padding to every other row
        self.add_cache_rows(len(prompts), vision_of(prompts))
        self.ids += range(first_row, first_row + len(prompts))
        self.seq += [list(p) for p in prompts]
        self.fed += [0] * len(prompts)
        self.drafts += [[] for _ in prompts]
        self.draft_conf += [[] for _ in prompts]
        self.budget_left += budgets

    def accept(self, greedy: list[list[int]]) -> tuple[list[list[int]], list[int]]:
        """Greedy verification of every row's drafts against the verifier's tokens there: per row,
        the tokens accepted (its drafts up to the first mismatch, then the verifier's own) and how
        many drafts it accepted. The accepted drafts' KV stays; the verifier's token is fed next step."""
        accepted, n_accepted = [], []
        for r, (drafts, g) in enumerate(zip(self.drafts, greedy, strict=True)):
            m = accepted_drafts(drafts, g)
            accepted.append(drafts[:m] + [g[m]])
            n_accepted.append(m)
            self.fed[r] = len(self.seq[r]) + m
        return accepted, n_accepted

    def emit(self, accepted: list[list[int]], eos: int | None) -> dict[int, list[int]]:
        """Each row's accepted tokens cut to its budget and after its EOS, appended to its sequence."""
        emitted = {}
        for i, tokens in enumerate(accepted):
            emitted[i] = cut_tokens(tokens, self.budget_left[i], eos)
            self.seq[i] += emitted[i]
        return emitted

    def verifier_logprobs(self, logits: torch.Tensor, emitted: dict[int, list[int]]) -> dict:
        """TokenLogprobs of each row's emitted tokens from the verifier's logits [B, >= n, V] at
        them (accepted token j is the verifier's own token at position j)."""
        if self.logprob_k is None:
            return {}
        width = max(len(t) for t in emitted.values())
        tokens = logits[:, :width].argmax(-1)
        lp, top_ids, top_lp = (x.tolist() for x in logprobs_of(logits[:, :width], tokens, self.logprob_k))
        return {i: token_logprobs(t, lp[i][: len(t)], top_ids[i][: len(t)], top_lp[i][: len(t)])
                for i, t in emitted.items()}

    def trim_to_accepted(self, n_new: int, n_drafts: int, n_accepted: list[int]) -> None:
        """After a verification forward that cached [accepted tokens not cached yet (n_new wide) ;
        drafts (n_drafts wide)]: the rejected drafts' KV goes, cropped where every row rejected
        them, masked out where only some rows did (rows of a batch accept different numbers)."""
        self.drop_last_keys(n_drafts - max(n_accepted))
        width = n_new + max(n_accepted)
        if width and min(n_accepted) < max(n_accepted):  # else every kept key is an accepted one
            slot = torch.arange(width, device=self.cache_pos.device)[None]
            accepted = torch.tensor(n_accepted, device=self.cache_pos.device)[:, None]
            tail = self.cache_valid[:, -width:] & (slot < n_new + accepted)
            self.cache_valid = torch.cat([self.cache_valid[:, :-width], tail], 1)

    def select(self, idx: list[int], budget_left: list[int]) -> None:
        """Keep rows `idx` (the others are done), with the new tokens each may still emit."""
        self.budget_left = budget_left
        if len(idx) == len(self.ids):
            return
        self.select_cache_rows(torch.tensor(idx, dtype=torch.long, device=self.cache_pos.device))
        for name in ("ids", "seq", "fed", "drafts", "draft_conf"):
            setattr(self, name, [getattr(self, name)[i] for i in idx])
        self.compact_keys()


def clean_inputs(rows: AcceptedRows, pad_id: int) -> tuple[list[list[int]], list[list[int]], int, int]:
    """Per row, the clean tokens a verification forward feeds: the accepted tokens not cached yet
    (left-padded to n_new) then the drafts (right-padded to n_drafts); ids and positions (-1: padding)."""
    new = [s[f:] for s, f in zip(rows.seq, rows.fed, strict=True)]
    n_new, n_drafts = max(len(x) for x in new), max(len(x) for x in rows.drafts)
    ids, pos = [], []
    for r, x in enumerate(new):
        k, pad, p = len(rows.drafts[r]), n_new - len(x), len(rows.seq[r])
        ids.append([pad_id] * pad + x + rows.drafts[r] + [pad_id] * (n_drafts - k))
        pos.append([-1] * pad + list(range(rows.fed[r], p + k)) + [-1] * (n_drafts - k))
    return ids, pos, n_new, n_drafts


def covered_lengths(conf: list[float], depth: int | None) -> list[int]:
    """The acceptance lengths that get a mask block: the `depth` + 1 likeliest (None: all).

    conf: each draft's probability under the block that drafted it. Read as the chance that the
    verifier agrees, acceptance length m has chance conf[0] * ... * conf[m-1] * (1 - conf[m]) (all n
    drafts: the whole product). Covering where acceptance will likely stop gives the next step
    drafts that assumed exactly what was accepted. The rule this replaced covered 0 and the `depth`
    longest lengths, which left every partial acceptance with stale drafts from block 0; on the demo
    dLM at depth 1 (two mask blocks) it made 4.87 tokens per forward, 0 and the likeliest 5.26, the
    two likeliest 5.53, lossless in every case. Length 0 is covered only where it is likely: a row
    that accepts fewer drafts than every covered length has only `jacobi_drafts` for one step."""
    n = len(conf)
    if depth is None or depth >= n:
        return list(range(n + 1))
    chance, run = [], 1.0
    for c in conf:
        chance.append(run * (1.0 - c))
        run *= c
    chance.append(run)
    return sorted(sorted(range(n + 1), key=lambda m: -chance[m])[: depth + 1])


def jacobi_drafts(greedy: list[int], m: int, k: int) -> list[int]:
    """A row's next drafts where no mask block assumed what it accepted (m of its k drafts): the
    verifier's own tokens after its bonus token, greedy[m + 1 : k + 1] (Jacobi decoding's guess).

    They were conditioned on the rejected draft, so they are weak, but they cost nothing: the
    forward computed them. With confidence 0 the next step covers acceptance length 0 with a mask
    block, as a row with no drafts would, so a guess can only add accepted tokens. On the demo
    drafter (500 held-out problems, the parent's text on every one) this took TPF from 5.01 to
    5.10 at depth 0 and from 5.41 to 5.45 at depth 1; taking a verifier token over a mask block's
    draft wherever it is more confident lost 0.05-1.5 TPF (200 problems), so they fill only what
    is empty."""
    return greedy[m + 1 : k + 1]


@torch.no_grad()
def verified_step(dlm, rows: AcceptedRows, bs: int, depth: int | None = None, blocks: int = 1) -> list[list[int]]:
    """One forward for every row; returns the tokens each row accepted (the drafts it accepted, then the
    AR's own token), and leaves each row's next drafts in rows.drafts.

    depth: mask blocks for the `depth` + 1 likeliest acceptance lengths only (None: all k + 1;
    `covered_lengths`). Fewer blocks make the forward cheaper where compute, not memory,
    bounds it (CPUs); after an acceptance length without its own block, the next drafts come from
    the block of the longest covered length below it (conditioned on fewer accepted drafts, so
    they are fewer), or, below every covered length, the verifier's own guesses (`jacobi_drafts`).
    blocks: each mask block is `blocks` model blocks wide, block-causal inside (multi-block
    drafting: up to blocks * bs - 1 drafts a step).
    """
    width = bs * blocks
    covered = [covered_lengths(c, depth) for c in rows.draft_conf]
    ids, pos, start, n_new, n_drafts = _verification_inputs(dlm, rows, covered, width)
    k_pos, k_valid = rows.keys_with(pos)
    k_start = torch.cat([torch.full_like(rows.cache_pos, -1), start], 1)
    mask = draft_blocks_mask(pos, start, k_pos, k_start, k_valid, sub_block=bs if blocks > 1 else None)
    n_blocks = max(len(x) for x in covered)
    with clean_rows_alone(dlm, rows, n_new, n_new + n_drafts):
        logits = rows.forward(dlm, pos, mask, n_new + n_drafts, ids=ids, noisy=n_new + n_drafts,  # the mask blocks
                              logits_to_keep=1 + n_drafts + n_blocks * width)  # from the last accepted token on
    rows.verifier_logits = logits[:, : n_drafts + 1] if rows.logprob_k is not None else None
    conf, best = logits.float().softmax(-1).max(-1)
    best, conf = best.tolist(), conf.tolist()  # the step's host reads
    accepted, n_accepted = rows.accept([b[: n_drafts + 1] for b in best])  # the AR's token at p + j, j <= n_drafts
    limit = dlm.max_positions or 1 << 30
    first = 1 - lag(dlm)  # block slot i predicts p + j + i + 1 (shift) or p + j + i
    for r, m in enumerate(n_accepted):
        below = [i for i, j in enumerate(covered[r]) if j <= m]
        fits = max(0, limit - (len(rows.seq[r]) + m + 1))  # positions left in the context
        if not below:  # it accepted fewer drafts than any block assumed: no block drafted from here
            rows.drafts[r] = jacobi_drafts(best[r], m, len(rows.drafts[r]))[:fits]
            rows.draft_conf[r] = [0.0] * len(rows.drafts[r])
            continue
        b = below[-1]  # the block that assumed the most of what was accepted
        at = slice(n_drafts + 1 + b * width + m - covered[r][b] + first, n_drafts + 1 + (b + 1) * width)  # shift: all
        rows.drafts[r], rows.draft_conf[r] = best[r][at][:fits], conf[r][at][:fits]
    rows.trim_to_accepted(n_new, n_drafts, n_accepted)
    return accepted


def _verification_inputs(dlm, rows: AcceptedRows, covered: list[list[int]], bs: int):
    """Ids, positions and block starts [B, Q] (start -1 = clean) of a verification forward: per
    row its clean part, then a mask block per covered acceptance length (padding blocks where a
    row covers fewer); and the widths of the clean part (new accepted tokens, drafts)."""
    limit = dlm.max_positions or 1 << 30
    mask_id = dlm.config.mask_token_id
    clean_ids, clean_pos, n_new, n_drafts = clean_inputs(rows, mask_id)
    n_blocks = max(len(x) for x in covered)
    ids, pos, start = [], [], []
    for r in range(len(rows.seq)):
        p = len(rows.seq[r])
        lengths = covered[r] + [None] * (n_blocks - len(covered[r]))  # None: a padding block
        blocks = [(p + j + i if j is not None and p + j + i < limit else -1, p + (j or 0))
                  for j in lengths for i in range(bs)]
        ids.append(clean_ids[r] + [mask_id] * (n_blocks * bs))
        pos.append(clean_pos[r] + [q for q, _ in blocks])
        start.append([-1] * (n_new + n_drafts) + [b for _, b in blocks])
    ids, pos, start = torch.tensor([ids, pos, start], dtype=torch.long, device=rows.cache_pos.device).unbind(0)
    return ids, pos, start, n_new, n_drafts


class SelfVerifiedDecoder:
    """`verified` as a decoder of edlm.decode.loop: AcceptedRows and one verified_step per step."""

    joinable = True  # every step ends on accepted tokens: a request may join at any step

    def __init__(self, dlm, opts, generator=None, logprobs: int | None = None):
        self.dlm, self.opts = dlm, opts
        self.accepted = AcceptedRows(dlm.device, logprobs)
        self.eos = dlm.tokenizer.eos_token_id if dlm.tokenizer is not None else None

    @property
    def rows(self) -> list[int]:
        return self.accepted.ids

    def add(self, first_row: int, ids: list[list[int]], budgets: list[int], options=None) -> None:
        if options is not None and any(o != self.opts for o in (options if isinstance(options, list) else [options])):
            raise EdlmError("rows joining a `verified` call decode with its options")
        self.accepted.add(first_row, ids, budgets)

    def step(self) -> Step:
        rows = self.accepted
        opts = self.opts
        emitted = rows.emit(verified_step(self.dlm, rows, opts.block_size, opts.draft_depth, opts.blocks), self.eos)
        logprobs = rows.verifier_logprobs(rows.verifier_logits, emitted) if rows.logprob_k is not None else {}
        return Step(1, [len(emitted[i]) for i in range(len(emitted))], emitted, logprobs)

    def advance(self, stay: list[int], budget_left: list[int]) -> None:
        self.accepted.select(stay, budget_left)
