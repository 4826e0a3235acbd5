"""The dLM drafts, its AR parent verifies: output token-identical to the parent's greedy decode.

Each step the dLM drafts the rest of its current block in ONE forward (every masked slot's
argmax, from the accepted prefix), and the AR parent scores [last accepted token ; drafts] in ONE
forward. The longest prefix of drafts equal to the parent's own greedy tokens is kept, plus the
parent's next token (standard greedy speculative verification, as DFlash does with a
block-diffusion drafter), so every step commits at least one token and the text is exactly the
parent's greedy text. Both KV caches stay exact: the parent's cache keeps only accepted tokens
(rejected drafts are cropped), the dLM's holds clean finished blocks, as in edlm.decode.engine.

Rows are decoded one after another (a verification step's accepted length differs per row).
"""

from __future__ import annotations

import time

import torch

from edlm.decode.options import DEFAULT_MAX_NEW_TOKENS, resolve_rows
from edlm.decode.rules import accepted_drafts
from edlm.decode.state import BlockEvent, GenerationResult, Outputs
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


class _Drafter:
    """The dLM's side of one row: a cache of clean finished blocks and one-forward block drafts."""

    def __init__(self, dlm, block_size: int):
        from transformers import DynamicCache

        self.dlm, self.bs = dlm, block_size
        self.cache, self.cached = DynamicCache(), 0  # clean KV of positions [0, cached)

    @torch.no_grad()
    def draft(self, seq: list[int]) -> list[int]:
        """Argmax tokens for every slot of the current block after the accepted prefix `seq`."""
        dlm, bs, p = self.dlm, self.bs, len(seq)
        start = p // bs * bs  # the current block: decided slots seq[start:p], masks after
        end = min(start + bs, dlm.max_positions or start + bs)
        ids = seq[self.cached:p] + [dlm.config.mask_token_id] * (end - p)
        pos = torch.arange(self.cached, end, device=dlm.device)[None]
        clean = pos < start if dlm.config.causal_clean else None  # fed finished blocks: clean stream
        mask = position_block_mask(pos, torch.arange(end, device=dlm.device)[None], bs, causal_q=clean)
        out = dlm.model(input_ids=torch.tensor([ids], device=dlm.device), attention_mask=dlm.backend_mask(mask),
                        position_ids=pos, cache=self.cache, use_cache=True)
        self.cache.crop(-(end - start))  # keep only the clean pending blocks
        self.cached = start
        logits = candidate_logits(dlm, out.logits[0].float())  # [Q, V], Q = start + bs - old cached
        first = p - pos[0, 0].item()  # index of slot p among the fed positions
        rows = range(first - 1, len(ids) - 1) if dlm.config.shift else range(first, len(ids))
        return logits[list(rows)].argmax(-1).tolist()


class _Verifier:
    """The AR side of one row: KV of every accepted token but the last."""

    def __init__(self, ar):
        from transformers import DynamicCache

        self.ar, self.cache, self.cached = ar, DynamicCache(), 0

    @torch.no_grad()
    def greedy_after(self, seq: list[int], drafts: list[int]) -> list[int]:
        """The parent's greedy token after seq and after each draft prefix: len(drafts) + 1 tokens."""
        ar = self.ar
        ids = seq[self.cached:] + drafts
        pos = torch.arange(self.cached, self.cached + len(ids), device=ar.device)[None]
        out = ar.model(input_ids=torch.tensor([ids], device=ar.device), position_ids=pos, cache=self.cache,
                       use_cache=True, logits_to_keep=len(drafts) + 1)
        self._fed = len(ids)
        return candidate_logits(ar, out.logits[0].float()).argmax(-1).tolist()

    def keep(self, n_drafts_kept: int, n_drafts: int) -> None:
        """Crop the rejected drafts' KV (the parent's own next token is fed next step)."""
        drop = n_drafts - n_drafts_kept
        if drop:
            self.cache.crop(-drop)  # crop(0) would empty the cache
        self.cached += self._fed - drop


def stream_verified(drafter, verifier, prompts, max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS, stop=None,
                    block_size: int | None = None, result: list | None = None):
    """Greedy decoding of `verifier` (the AR parent), drafted by `drafter` (its dLM): one BlockEvent
    per row when it is done (the engine's event shape, so a server can use either); the
    GenerationResult is appended to `result`.

    stats: model_calls counts verification steps (one AR forward each; the dLM's draft forward
    per step comes on top), so tpf = tokens per verification step.
    """
    check_pair(drafter, verifier)
    ids, budgets, stops = resolve_rows(verifier, prompts, max_new_tokens, stop)
    bs = block_size or drafter.config.block_size
    out = Outputs(verifier)  # EOS, stop strings and budget end a row as in the engine
    out.add_rows(budgets, stops)
    for row, prompt in enumerate(ids):
        out.started[row] = time.perf_counter()  # rows are decoded one after another
        d, v, seq, done = _Drafter(drafter, bs), _Verifier(verifier), list(prompt), False
        while not done:
            drafts = d.draft(seq)
            greedy = v.greedy_after(seq, drafts)
            n = accepted_drafts(drafts, greedy)
            step, hit_eos = out.cut(row, drafts[:n] + [greedy[n]])
            v.keep(n, len(drafts))
            seq += step
            out.stats[row].add_step(len(step), 1)
            _, done = out.add_block(row, step, hit_eos)
        stats = out.stats[row]
        stats.seconds = time.perf_counter() - out.started[row]
        yield BlockEvent(row, out.text[row], out.tokens[row], True, out.reason[row], stats, out.text[row])
    if result is not None:
        result.append(GenerationResult(out.text, out.tokens, out.stats, out.reason))


def generate_verified(drafter, verifier, prompts, max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS, stop=None,
                      block_size: int | None = None) -> GenerationResult:
    """All rows of `stream_verified` at once."""
    result: list[GenerationResult] = []
    for _ in stream_verified(drafter, verifier, prompts, max_new_tokens, stop, block_size, result):
        pass
    return result[0]
