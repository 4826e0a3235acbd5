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
those of lengths 0 and the D longest, chosen per row). M_j's first slot sits where the AR's own
token goes, so it drafts the block_size - 1 tokens after it.

Draft blocks are placed right after the prefix, not on the block grid: with RoPE only relative
positions matter, and a block seeing "every clean token before my start" is what training's
"clean earlier blocks" rule is, moved. Only accepted tokens' KV is kept (the mask blocks and
rejected drafts are cropped, or masked out when the rows of a batch reject different numbers).
Greedy only. Rows leave when done; joins take part from the next step.
"""

from __future__ import annotations

import torch

from edlm.decode.rules import accepted_drafts
from edlm.decode.state import CacheRows, GenerationResult, Outputs
from edlm.decode.step import candidate_logits
from edlm.masks import draft_blocks_mask


class AcceptedRows(CacheRows):
    """Per row: the accepted tokens (`seq`), how many of them have KV in the cache (`fed`), and
    the drafts that follow them. Row r of every list and cache row r are the same request."""

    def __init__(self, device):
        self.init_cache(0, device)
        self.ids: list[int] = []  # request ids
        self.seq: list[list[int]] = []
        self.fed: list[int] = []
        self.drafts: list[list[int]] = []

    def add(self, first_row: int, prompts: list[list[int]]) -> None:
        self.add_cache_rows(len(prompts))
        self.ids += range(first_row, first_row + len(prompts))
        self.seq += [list(p) for p in prompts]
        self.fed += [0] * len(prompts)
        self.drafts += [[] for _ in prompts]

    def accept(self, greedy: list[list[int]]) -> tuple[list[list[int]], list[int]]:
        """Greedy verification of every row's drafts against the verifier's tokens there: per row,
        the tokens accepted (its drafts up to the first mismatch, then the verifier's own) and how
        many drafts that kept. The kept drafts' KV stays; the verifier's token is fed next step."""
        accepted, kept = [], []
        for r, (drafts, g) in enumerate(zip(self.drafts, greedy, strict=True)):
            m = accepted_drafts(drafts, g)
            accepted.append(drafts[:m] + [g[m]])
            kept.append(m)
            self.fed[r] = len(self.seq[r]) + m
        return accepted, kept

    def keep(self, idx: list[int]) -> None:
        self.select_cache_rows(torch.tensor(idx, dtype=torch.long, device=self.cache_pos.device))
        for name in ("ids", "seq", "fed", "drafts"):
            setattr(self, name, [getattr(self, name)[i] for i in idx])
        self.drop_unseen_keys()


@torch.no_grad()
def verified_step(dlm, rows: AcceptedRows, bs: int, depth: int | None = None) -> list[list[int]]:
    """One forward for every row; returns the tokens each row accepted (its drafts kept, then the
    AR's own token).

    depth: mask blocks for acceptance lengths 0 and the `depth` longest ones only (None: all
    k + 1). Fewer blocks make the forward cheaper where compute, not memory, bounds it (CPUs);
    after an acceptance length without its own block, the next drafts come from the block of the
    longest covered length below it (conditioned on fewer accepted drafts, so they are fewer).
    """
    dev, n = dlm.device, len(rows.seq)
    limit = dlm.max_positions or 1 << 30
    mask_id = dlm.config.mask_token_id
    clean_ids, clean_pos, w, d = clean_inputs(rows, mask_id)
    # per row, the acceptance lengths that get a mask block: 0 and the `depth` longest of its own drafts
    lengths = [sorted({0, *range(max(1, len(x) + 1 - depth) if depth else 1, len(x) + 1)}) for x in rows.drafts]
    n_blocks = max(len(x) for x in lengths)
    ids, pos, start = [], [], []  # per row, as lists (one tensor each below): start -1 = clean
    for r in range(n):  # the clean part, then the mask blocks
        p = len(rows.seq[r])
        covered = lengths[r] + [None] * (n_blocks - len(lengths[r]))  # None: a padding block
        blocks = [(p + j + i if j is not None and p + j + i < limit else -1, p + (j or 0))
                  for j in covered for i in range(bs)]
        ids.append(clean_ids[r] + [mask_id] * (n_blocks * bs))
        pos.append(clean_pos[r] + [q for q, _ in blocks])
        start.append([-1] * (w + d) + [b for _, b in blocks])
    ids, pos, start = (torch.tensor(x, dtype=torch.long, device=dev) for x in (ids, pos, start))
    valid = pos >= 0
    k_pos = torch.cat([rows.cache_pos, pos], 1)
    k_start = torch.cat([torch.full_like(rows.cache_pos, -1), start], 1)
    mask = draft_blocks_mask(pos, start, k_pos, k_start, torch.cat([rows.cache_valid, valid], 1))
    keep = 1 + d + n_blocks * bs  # from the last accepted token on
    out = dlm.model(input_ids=ids, attention_mask=dlm.backend_mask(mask), position_ids=pos.clamp_min(0),
                    cache=rows.cache, use_cache=True, logits_to_keep=keep)
    logits = candidate_logits(dlm, out.logits.float())
    ar = logits[:, : d + 1].argmax(-1).tolist()  # ar[r][j]: the AR's token at position p + j
    blocks = logits[:, d + 1:].argmax(-1).view(n, n_blocks, bs).tolist()
    lead = 0 if dlm.config.shift else 1  # slot i predicts p + j + i + 1 (shift) or p + j + i
    results, kept_drafts = rows.accept(ar)
    for r, m in enumerate(kept_drafts):
        b = max(i for i, j in enumerate(lengths[r]) if j <= m)  # the block that assumed the most of what was kept
        room = max(0, limit - (len(rows.seq[r]) + m + 1))
        rows.drafts[r] = blocks[r][b][m - lengths[r][b] + lead:lead + bs - 1][:room]
    keep_accepted_kv(rows, pos[:, :w + d], w, d, kept_drafts, n_blocks * bs)
    return results


def clean_inputs(rows: AcceptedRows, pad_id: int) -> tuple[list[list[int]], list[list[int]], int, int]:
    """Per row, the clean tokens a verification forward feeds: the accepted tokens not cached yet
    (left-padded to w) then the drafts (right-padded to d); ids and positions (-1: padding)."""
    new = [s[f:] for s, f in zip(rows.seq, rows.fed, strict=True)]
    w, d = max(len(x) for x in new), max(len(x) for x in rows.drafts)
    ids, pos = [], []
    for r, x in enumerate(new):
        k, pad, p = len(rows.drafts[r]), w - len(x), len(rows.seq[r])
        ids.append([pad_id] * pad + x + rows.drafts[r] + [pad_id] * (d - k))
        pos.append([-1] * pad + list(range(rows.fed[r], p + k)) + [-1] * (d - k))
    return ids, pos, w, d


def keep_accepted_kv(rows: AcceptedRows, clean_pos: torch.Tensor, w: int, d: int, kept: list[int],
                     blocks: int = 0) -> None:
    """After a verification forward of the clean part (and `blocks` mask slots after it): crop the
    mask slots' KV, and the rejected drafts' where every row rejected them; mask out the rest
    (rows of a batch accept different numbers)."""
    if blocks:
        rows.cache.crop(-blocks)  # crop(0) would empty the cache
    common = d - max(kept) if kept else 0
    if common:
        rows.cache.crop(-common)
    clean_pos = clean_pos[:, : w + d - common]
    slot = torch.arange(clean_pos.shape[1], device=clean_pos.device)[None]
    accepted = torch.tensor(kept, device=clean_pos.device)[:, None]
    valid = (clean_pos >= 0) & (slot < w + accepted)
    rows.cache_pos = torch.cat([rows.cache_pos, clean_pos], 1)
    rows.cache_valid = torch.cat([rows.cache_valid, valid], 1)


def emit_accepted(rows: AcceptedRows, out: Outputs, accepted: list[list[int]]):
    """Append each row's accepted tokens (cut to its budget and after an EOS) and yield its event;
    returns the indices of the rows still decoding. One step of a verifying loop, for `verified`
    and the two-model drafter alike."""
    stay = []
    for i, tokens in enumerate(accepted):
        r = rows.ids[i]
        step, hit_eos = out.cut(r, tokens)
        rows.seq[i] += step
        out.stats[r].add_step(len(step), 1)
        event = out.event(r, step, hit_eos)
        if not event.done:
            stay.append(i)
        yield event
    return stay


def stream_self_verified(dlm, ids: list[list[int]], budgets: list[int], stops: list[list[str]], opts,
                         result: list | None = None, admit=None, resolve=None):
    """The `verified` strategy's loop (edlm.decode.engine.stream hands it the resolved rows).

    Yields a BlockEvent per row and step with the tokens that step accepted; `admit` is called
    after every step and its requests (resolved by `resolve`) join from the next one.
    """
    out = Outputs(dlm)
    rows = AcceptedRows(dlm.device)
    rows.add(out.add_rows(budgets, stops), ids)
    while rows.seq:
        stay = yield from emit_accepted(rows, out, verified_step(dlm, rows, opts.block_size, opts.draft_depth))
        if len(stay) < len(rows.seq):
            rows.keep(stay)
        if admit is not None and (joining := admit()):
            new_ids, new_budgets, new_stops = resolve(*joining)
            rows.add(out.add_rows(new_budgets, new_stops), new_ids)
    if result is not None:
        result.append(GenerationResult(out.text, out.tokens, out.stats, out.reason))
