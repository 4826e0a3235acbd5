"""The dLM drafts, its AR parent verifies: output token-identical to the parent's greedy decode.

Each step the dLM drafts the rest of its current block in ONE forward (every masked slot's
argmax, from the accepted prefix), and the AR parent scores [last accepted token ; drafts] in ONE
forward. The longest prefix of drafts equal to the parent's own greedy tokens is kept, plus the
parent's next token (standard greedy speculative verification, as DFlash does with a
block-diffusion drafter), so every step commits at least one token and the text is exactly the
parent's greedy text. Both KV caches stay exact: the parent's cache keeps only accepted tokens
(rejected drafts are cropped), the dLM's holds clean finished blocks, as in edlm.decode.engine.

Rows are batched: both forwards serve every row of a batch; rows accept different numbers of
drafts, so the parent keeps each row's rejected drafts' KV masked out (as `verified` does) and
the dLM keeps per row how far its clean blocks are cached. Reached as
`dlm.generate(prompts, verifier=ar)` (edlm.decode.engine.stream drives `ParentVerifiedDecoder`
through the one loop).
"""

from __future__ import annotations

import torch

from edlm.decode.kv import KVRows, lag
from edlm.decode.loop import Step
from edlm.decode.rowwise import clean_rows_alone
from edlm.decode.selfverify import AcceptedRows, clean_inputs
from edlm.errors import EdlmError
from edlm.masks import position_block_mask
from edlm.vision import vision_of


def check_pair(drafter, verifier) -> None:
    if verifier.config.diffusion:
        raise EdlmError("the verifier must be the AR model (load it with autoregressive=True)")
    if not drafter.config.diffusion:
        raise EdlmError("the drafter must be a converted dLM")
    ours = drafter.tokenizer.get_vocab()  # the parent's vocabulary plus the mask token
    if any(ours.get(token) != i for token, i in verifier.tokenizer.get_vocab().items()):
        raise EdlmError("the dLM and its verifier must share a tokenizer (the dLM is converted from the verifier)")


class BlockDrafts(KVRows):
    """The dLM's side, batched: per row, a cache of its clean finished blocks ([0, cached[r])) and
    one-forward drafts of the rest of its current block."""

    def __init__(self, dlm, block_size: int):
        self.dlm, self.bs, self.cached = dlm, block_size, []
        self.init_cache(0, dlm.device)

    def add(self, n: int, vision=None) -> None:
        self.compact_keys()
        self.add_cache_rows(n, vision)
        self.cached += [0] * n

    def select(self, idx: list[int]) -> None:
        if len(idx) == len(self.cached):
            return
        self.select_cache_rows(torch.tensor(idx, dtype=torch.long, device=self.cache_pos.device))
        self.cached = [self.cached[i] for i in idx]
        self.compact_keys()

    @torch.no_grad()
    def draft(self, seqs: list[list[int]]) -> list[list[int]]:
        """Per row, argmax tokens for every slot of its current block after its accepted prefix.

        One forward feeds, per row, its finished blocks not cached yet (clean, left-padded) and its
        current block [decided slots ; masks] (right-padded where the context ends); the block's
        KV is cropped after, the finished blocks' stays, as in the engine's denoise_step."""
        dlm, bs = self.dlm, self.bs
        limit = dlm.max_positions or 1 << 30
        starts = [len(s) // bs * bs for s in seqs]
        ids, pos, n_clean = self._inputs(seqs, starts, limit)
        k_pos, k_valid = self.keys_with(pos)
        clean_q = None
        if dlm.config.causal_clean:  # fed finished blocks are the clean stream: token-causal
            clean_q = torch.arange(pos.shape[1], device=pos.device)[None].expand(len(seqs), -1) < n_clean
        mask = position_block_mask(pos, k_pos, bs, k_valid, clean_q)
        first = 1 if n_clean else 0  # logits of the last clean position (if fed), then of the blocks
        best = self.forward(dlm, pos, mask, n_clean, ids=ids, logits_to_keep=first + bs,
                            noisy=n_clean).argmax(-1).tolist()
        self.cached = starts
        # slot i of a block is predicted at its slot i - 1 (shift; slot 0 at the last clean position,
        # always fed when a row's accepted prefix ends on a block) or at slot i
        slot0 = first - lag(dlm)  # the index of the logits predicting slot 0
        return [best[r][slot0 + len(s) - b: slot0 + min(b + bs, limit) - b]
                for r, (s, b) in enumerate(zip(seqs, starts, strict=True))]

    def _inputs(self, seqs, starts, limit):
        """Ids and positions [B, Q]: each row's finished blocks not cached yet, then its block."""
        bs, mask_id = self.bs, self.dlm.config.mask_token_id
        clean = [s[c:b] for s, c, b in zip(seqs, self.cached, starts, strict=True)]
        n_clean = max(len(x) for x in clean)
        ids, pos = [], []
        for s, c, b, x in zip(seqs, self.cached, starts, clean, strict=True):
            end = min(b + bs, limit)
            block_pos = [q if q < end else -1 for q in range(b, b + bs)]
            ids.append([mask_id] * (n_clean - len(x)) + x + s[b:] + [mask_id] * (b + bs - len(s)))
            pos.append([-1] * (n_clean - len(x)) + list(range(c, b)) + block_pos)
        dev = self.dlm.device
        return torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev), n_clean


@torch.no_grad()
def parent_greedy(ar, rows: AcceptedRows) -> tuple[list[list[int]], int, int]:
    """One AR forward for every row over [accepted tokens not cached ; drafts]: per row, the
    parent's greedy token after its prefix and after each draft prefix (its drafts + 1 tokens);
    and the widths of the fed clean part (new accepted tokens, drafts) for trim_to_accepted."""
    ids, pos, n_new, n_drafts = clean_inputs(rows, ar.tokenizer.pad_token_id or 0)
    ids, pos = (torch.tensor(v, dtype=torch.long, device=ar.device) for v in (ids, pos))
    k_pos, k_valid = rows.keys_with(pos)
    # token-causal over valid keys: the block-causal rule at block size 1, as the engine's AR steps
    mask = position_block_mask(pos, k_pos, 1, k_valid)
    with clean_rows_alone(ar, rows, n_new, n_new + n_drafts):  # alone, the parent's bits (edlm.decode.rowwise)
        logits = rows.forward(ar, pos, mask, n_new + n_drafts, ids=ids, logits_to_keep=n_drafts + 1)
    rows.verifier_logits = logits if rows.logprob_k is not None else None
    greedy = logits.argmax(-1).tolist()
    return [g[: len(x) + 1] for g, x in zip(greedy, rows.drafts, strict=True)], n_new, n_drafts


class ParentVerifiedDecoder:
    """Greedy decoding of `verifier` (the AR parent), drafted by `drafter` (its dLM), as a decoder
    of edlm.decode.loop: every row in the same two forwards per step.

    stats: model_calls counts verification steps (one AR forward each; the dLM's draft forward
    per step comes on top), so tpf = tokens per verification step."""

    joinable = True

    def __init__(self, drafter, verifier, block_size: int, logprobs: int | None = None):
        check_pair(drafter, verifier)
        self.verifier = verifier
        self.accepted, self.drafts = AcceptedRows(verifier.device, logprobs), BlockDrafts(drafter, block_size)
        self.eos = verifier.tokenizer.eos_token_id

    @property
    def rows(self) -> list[int]:
        return self.accepted.ids

    def add(self, first_row: int, ids: list[list[int]], budgets: list[int], options=None) -> None:
        if options is not None:
            raise EdlmError("the two-model mode has no decode options of its own to mix")
        self.accepted.add(first_row, ids, budgets)
        self.drafts.add(len(ids), vision_of(ids))  # a VLM pair: both read the parent's image features (conversion keeps them the dLM's too)

    def step(self) -> Step:
        rows = self.accepted
        rows.drafts = self.drafts.draft(rows.seq)
        greedy, n_new, n_drafts = parent_greedy(self.verifier, rows)
        accepted, n_accepted = rows.accept(greedy)
        rows.trim_to_accepted(n_new, n_drafts, n_accepted)
        emitted = rows.emit(accepted, self.eos)
        logprobs = rows.verifier_logprobs(rows.verifier_logits, emitted) if rows.logprob_k is not None else {}
        return Step(1, [len(emitted[i]) for i in range(len(emitted))], emitted, logprobs)

    def advance(self, stay: list[int], room: list[int]) -> None:
        self.accepted.select(stay, room)
        self.drafts.select(stay)
