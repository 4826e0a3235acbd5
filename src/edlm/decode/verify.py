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
the dLM keeps per row how far its clean blocks are cached.
"""

from __future__ import annotations

import torch

from edlm.decode.options import DEFAULT_MAX_NEW_TOKENS, resolve_rows
from edlm.decode.selfverify import AcceptedRows, clean_inputs, emit_accepted, keep_accepted_kv
from edlm.decode.state import CacheRows, GenerationResult, Outputs
from edlm.decode.step import candidate_logits
from edlm.errors import EdlmError
from edlm.masks import position_block_mask


def check_pair(drafter, verifier) -> None:
    if verifier.config.diffusion:
        raise EdlmError("the verifier must be the AR model (load it with autoregressive=True)")
    if not drafter.config.diffusion:
        raise EdlmError("the drafter must be a converted dLM")
    ours = drafter.tokenizer.get_vocab()  # the parent's vocabulary plus the mask token
    if any(ours.get(token) != i for token, i in verifier.tokenizer.get_vocab().items()):
        raise EdlmError("the dLM and its verifier must share a tokenizer (the dLM is converted from the verifier)")


class _Drafts(CacheRows):
    """The dLM's side, batched: per row, a cache of its clean finished blocks ([0, cached[r])) and
    one-forward drafts of the rest of its current block."""

    def __init__(self, dlm, block_size: int):
        self.dlm, self.bs, self.cached = dlm, block_size, []
        self.init_cache(0, dlm.device)

    def add(self, n: int) -> None:
        self.add_cache_rows(n)
        self.cached += [0] * n

    def keep(self, idx: list[int]) -> None:
        self.select_cache_rows(torch.tensor(idx, dtype=torch.long, device=self.cache_pos.device))
        self.cached = [self.cached[i] for i in idx]
        self.drop_unseen_keys()

    @torch.no_grad()
    def draft(self, seqs: list[list[int]]) -> list[list[int]]:
        """Per row, argmax tokens for every slot of its current block after its accepted prefix.

        One forward feeds, per row, its finished blocks not cached yet (clean, left-padded) and its
        current block [decided slots ; masks] (right-padded where the context ends); the block's
        KV is cropped after, the finished blocks' stays, as in the engine's denoise_step."""
        dlm, bs, dev = self.dlm, self.bs, self.dlm.device
        limit, mask_id = dlm.max_positions or 1 << 30, dlm.config.mask_token_id
        starts = [len(s) // bs * bs for s in seqs]
        clean = [s[c:b] for s, c, b in zip(seqs, self.cached, starts, strict=True)]
        wc = max(len(x) for x in clean)
        ids, pos = [], []
        for s, c, b, x in zip(seqs, self.cached, starts, clean, strict=True):
            end = min(b + bs, limit)
            block_pos = [q if q < end else -1 for q in range(b, b + bs)]
            ids.append([mask_id] * (wc - len(x)) + x + s[b:] + [mask_id] * (b + bs - len(s)))
            pos.append([-1] * (wc - len(x)) + list(range(c, b)) + block_pos)
        ids, pos = (torch.tensor(v, dtype=torch.long, device=dev) for v in (ids, pos))
        k_pos = torch.cat([self.cache_pos, pos], 1)
        k_valid = torch.cat([self.cache_valid, pos >= 0], 1)
        clean_q = None
        if dlm.config.causal_clean:  # fed finished blocks are the clean stream: token-causal
            clean_q = torch.arange(pos.shape[1], device=dev)[None].expand(len(seqs), -1) < wc
        mask = position_block_mask(pos, k_pos, bs, k_valid, clean_q)
        first = 1 if wc else 0  # the kept logits: the last clean position (if fed), then the blocks
        out = dlm.model(input_ids=ids, attention_mask=dlm.backend_mask(mask), position_ids=pos.clamp_min(0),
                        cache=self.cache, use_cache=True, logits_to_keep=first + bs)
        self.cache.crop(-bs)  # the current blocks are not clean yet
        self.cache_pos = torch.cat([self.cache_pos, pos[:, :wc]], 1)
        self.cache_valid = torch.cat([self.cache_valid, pos[:, :wc] >= 0], 1)
        self.cached = starts
        # slot i of a block is predicted at its slot i - 1 (shift; slot 0 at the last clean position,
        # always fed when a row's accepted prefix ends on a block) or at slot i
        best = candidate_logits(dlm, out.logits.float()).argmax(-1).tolist()
        at = first - (1 if dlm.config.shift else 0)  # the kept index predicting slot 0
        return [best[r][at + len(s) - b: at + min(b + bs, limit) - b]
                for r, (s, b) in enumerate(zip(seqs, starts, strict=True))]


@torch.no_grad()
def _parent_greedy(ar, rows: AcceptedRows):
    """One AR forward for every row over [accepted tokens not cached ; drafts]: per row, the
    parent's greedy token after its prefix and after each draft prefix (its drafts + 1 tokens);
    and the fed clean part (positions, widths), which keep_accepted_kv trims once rows accepted."""
    ids, pos, w, d = clean_inputs(rows, ar.tokenizer.pad_token_id or 0)
    dev = ar.device
    ids, pos = (torch.tensor(v, dtype=torch.long, device=dev) for v in (ids, pos))
    # token-causal over valid keys: the block-causal rule at block size 1, as the engine's AR steps
    mask = position_block_mask(pos, torch.cat([rows.cache_pos, pos], 1), 1, torch.cat([rows.cache_valid, pos >= 0], 1))
    out = ar.model(input_ids=ids, attention_mask=ar.backend_mask(mask), position_ids=pos.clamp_min(0),
                   cache=rows.cache, use_cache=True, logits_to_keep=d + 1)
    greedy = candidate_logits(ar, out.logits.float()).argmax(-1).tolist()
    return [g[: len(x) + 1] for g, x in zip(greedy, rows.drafts, strict=True)], (pos, w, d)


def stream_verified(drafter, verifier, prompts, max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS, stop=None,
                    block_size: int | None = None, result: list | None = None, admit=None):
    """Greedy decoding of `verifier` (the AR parent), drafted by `drafter` (its dLM), every row
    in the same two forwards per step: a BlockEvent per row and step (the engine's event shape, so
    a server can use either); the GenerationResult is appended to `result`. `admit` is called
    after every step; its requests (prompts, max_new_tokens, stop) join from the next one.

    stats: model_calls counts verification steps (one AR forward each; the dLM's draft forward
    per step comes on top), so tpf = tokens per verification step.
    """
    check_pair(drafter, verifier)
    bs = block_size or drafter.config.block_size
    out = Outputs(verifier)  # EOS, stop strings and budget end a row as in the engine
    rows, drafts = AcceptedRows(verifier.device), _Drafts(drafter, bs)

    def add(prompts, max_new_tokens, stop):
        ids, budgets, stops = resolve_rows(verifier, prompts, max_new_tokens, stop)
        rows.add(out.add_rows(budgets, stops), ids)
        drafts.add(len(ids))

    add(prompts, max_new_tokens, stop)
    while rows.seq:
        rows.drafts = drafts.draft(rows.seq)
        greedy, (pos, w, d) = _parent_greedy(verifier, rows)
        accepted, kept = rows.accept(greedy)
        keep_accepted_kv(rows, pos, w, d, kept)
        stay = yield from emit_accepted(rows, out, accepted)
        if len(stay) < len(rows.seq):
            rows.keep(stay)
            drafts.keep(stay)
        if admit is not None and (joining := admit()):
            add(*joining)
    if result is not None:
        result.append(GenerationResult(out.text, out.tokens, out.stats, out.reason))


def generate_verified(drafter, verifier, prompts, max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS, stop=None,
                      block_size: int | None = None) -> GenerationResult:
    """All rows of `stream_verified` at once."""
    result: list[GenerationResult] = []
    for _ in stream_verified(drafter, verifier, prompts, max_new_tokens, stop, block_size, result):
        pass
    return result[0]
