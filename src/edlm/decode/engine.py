"""Block-parallel decoding with an exact KV cache of finished blocks: the loop.

Per block, every step feeds [pending clean tokens ; current block] through the model. Pending
tokens are the prompt's complete blocks (first step) or the block just finished: their KV is
written into the cache by that same forward, so writing a finished block costs no extra call
(the fused form of "one more forward writes its clean KV"). The current block's KV is cropped
right after, so the cache only ever holds clean, finished blocks; with block-causal attention
this is exactly the computation of a full forward (tests check token identity).

Blocks are aligned to absolute positions from 0 (SDAR / Fast-dLLM v2 / SGLang): if the prompt
ends mid-block, its tail sits in the first block as already-decided slots. Every slot of a block
is a candidate even where the budget ends inside it, and the output is cut to the budget (as
SGLang decodes the whole block and cuts), so the tokens of a budget n are a prefix of the tokens
of any larger budget. A row stops once the slots it keeps are decided: later steps could only
fill slots it cuts, so this costs no extra calls (a strategy that revises commits decodes on).

Rows move at their own pace: every row works on its own current block, and a row that finishes
its block feeds it as pending clean tokens in the next forward and opens its next block, while
the other rows go on with theirs (positions, cache validity and masks are per row, so each row
attends exactly what it would alone). Speculative strategies, which keep drafts across a block's
steps, move rows on together at block boundaries. Rows that are done (EOS, stop string, budget)
leave the batch at once. Left padding with logical position ids; pad keys are masked out. New
rows join a running call at its next step (`stream`'s `admit`; see `Batch.join`).

What a step does is the strategy's (edlm.decode.strategies); which options apply is
edlm.decode.options' decision; rows joining and leaving, budgets, stop strings and events are the
one loop's (edlm.decode.loop), which drives this module's `BlockDecoder` as it drives `verified`
and the two-model drafter. A plain step reads the device once (`BlockDecoder.step`).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from edlm.decode.loop import Step, decode_loop
from edlm.decode.options import DEFAULT_MAX_NEW_TOKENS, DecodeOptions, resolve_parent_verified, resolve_rows
from edlm.decode.rules import cut_tokens
from edlm.decode.state import Batch, GenerationResult, Outputs, token_logprobs
from edlm.decode.team import mechanisms as team_mechanisms
from edlm.errors import EdlmError
from edlm.moe import routing_of

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


class BlockDecoder:
    """The block engine as a decoder of edlm.decode.loop: a Batch and its strategy's step."""

    def __init__(self, dlm, opts: DecodeOptions, generator=None, logprobs: int | None = None):
        self.dlm, self.opts, self.generator, self.logprob_k = dlm, opts, generator, logprobs
        self.commit_times = False  # record when each slot was committed (Batch.TIME_ROWS); set by `stream`
        self.batch: Batch | None = None
        self.rows: list[int] = []
        self.budget_left: list[int] = []  # new tokens each row may still emit (batch.budget_left on the host)
        self.row_opts: list[DecodeOptions] = []  # each row's options (joins may bring their own)
        self.lead: list[int] = []  # per row, the blocks the last step finished (edlm.decode.state.Batch.next_blocks)
        # plain steps: each row opens its next block alone (TEAM's exploration keeps rows together)
        self.own_pace = opts.algorithm.rule is not None and "explore" not in team_mechanisms(opts.team)
        self.joinable = True
        self.eos = dlm.tokenizer.eos_token_id if dlm.tokenizer is not None else None

    def add(self, first_row: int, ids: list[list[int]], budgets: list[int], options=None) -> None:
        """Rows join; `options` (one for all, or one per row) of their own where the call's allow
        mixing (DecodeOptions.shares_calls_with)."""
        per_row = options if isinstance(options, list) else [options or self.opts] * len(ids)
        for own in per_row:
            if not self.opts.shares_calls_with(own):
                raise EdlmError(f"rows decoding with strategy {own.strategy!r} cannot join a call of "
                                f"{self.opts.strategy!r} with other options")
        fresh = Batch(self.dlm, ids, self.opts, budgets, first_row=first_row, logprob_k=self.logprob_k,
                      commit_times=self.commit_times)
        fresh.open_blocks()
        if self.batch is None:
            self.batch = fresh
        else:
            self.batch.join(fresh)
        self.rows += range(first_row, first_row + len(ids))
        self.budget_left += budgets
        self.row_opts += per_row
        self._mix()

    def _mix(self) -> None:
        """Per-row rules and options for the plain step while some row's options are not the call's."""
        batch = self.batch
        if all(o == self.opts for o in self.row_opts):
            batch.mixed_rules = batch.row_options = None
            return
        dev = batch.block_ids.device
        names = {o.strategy for o in self.row_opts}
        batch.mixed_rules = {n: torch.tensor([o.strategy == n for o in self.row_opts], device=dev) for n in names}

        def column(name, dtype=torch.float32):
            return torch.tensor([[getattr(o, name)] for o in self.row_opts], dtype=dtype, device=dev)

        batch.row_options = SimpleNamespace(threshold=column("threshold"), factor=column("factor"),
                                            gamma=column("gamma"), tokens_per_step=column("tokens_per_step", torch.long))

    def step(self) -> Step:
        batch, w = self.batch, self.batch.width
        calls = batch.calls
        moe = routing_of(self.dlm.inner_model) is not None
        batch.experts_used = torch.zeros(len(self.rows), 2, dtype=torch.long, device=batch.block_ids.device) \
            if moe else None  # an MoE model's expert counts of this step (KVRows.forward adds them up)
        todo = batch.todo.clone() if self.commit_times else None
        committed = self.opts.algorithm.step(self.dlm, batch, self.generator)
        if self.commit_times:  # slots committed now (a re-masked slot is stamped again when it recommits)
            batch.slot_step = torch.where(todo & ~batch.todo, batch.block_step[:, None], batch.slot_step)
            batch.block_step = batch.block_step + 1
        lead = self._lead()
        # the step's one host read: what each row committed, how many blocks it finished, and its window
        # (and an MoE model's expert counts, and the slots' commit steps where they are recorded)
        host = torch.cat([committed[:, None], lead[:, None], batch.block_ids, batch.gen]
                         + ([batch.slot_step, batch.block_step[:, None]] if self.commit_times else [])
                         + ([batch.experts_used] if moe else []), 1).tolist()
        experts = [h[-2:] for h in host] if moe else None
        self.lead = [h[1] for h in host]
        out = [self.opts.block_size * n for n in self.lead]  # slots each row emits
        emitted = {i: cut_tokens([t for t, g in zip(host[i][2:2 + out[i]], host[i][2 + w:2 + w + out[i]], strict=True)
                                  if g], self.budget_left[i], self.eos) for i in self.moved}
        return Step(batch.calls - calls, [h[0] for h in host], emitted, self._logprobs(host, emitted), experts,
                    self._times(host, emitted))

    @property
    def moved(self) -> list[int]:
        """Rows that finished a block in the last step."""
        return [i for i, n in enumerate(self.lead) if n]

    def _times(self, host: list[list[int]], emitted: dict[int, list[int]]) -> dict[int, list[float]]:
        """The emitted tokens' commit times ((step + 1) / the block's steps), where the call records them."""
        if not self.commit_times:
            return {}
        w = self.batch.width
        out = {}
        for i, tokens in emitted.items():
            gen, steps, taken = host[i][2 + w:2 + 2 * w], host[i][2 + 2 * w:2 + 3 * w], host[i][2 + 3 * w]
            out[i] = [(s + 1) / taken for s, g in zip(steps, gen, strict=True) if g][: len(tokens)]
        return out

    def _logprobs(self, host: list[list[int]], emitted: dict[int, list[int]]) -> dict:
        """The emitted tokens' TokenLogprobs (a second host read, only when the call asked for them)."""
        if self.logprob_k is None or not emitted:
            return {}
        batch, w = self.batch, self.batch.width
        lp, top_ids, top_lp = (getattr(batch, name).tolist() for name in batch.LOGPROB_ROWS)
        out = {}
        for i, tokens in emitted.items():
            slots = [j for j in range(w) if host[i][2 + w + j]][: len(tokens)]
            out[i] = token_logprobs(tokens, [lp[i][j] for j in slots], [top_ids[i][j] for j in slots],
                                    [top_lp[i][j] for j in slots])
        return out

    def _lead(self) -> torch.Tensor:
        """[B] how many leading blocks of its window each row is done with (0: it goes on as it is).

        A block is done once all of it is decided (with multi-block decoding, every block before it
        too); a row's whole window once an EOS is decided in its done blocks, or once every slot it
        keeps is decided where its budget ends inside the window (later steps could only fill slots
        it cuts, unless the strategy revises committed slots)."""
        batch, bs, blocks = self.batch, self.opts.block_size, self.opts.blocks
        decided = ~batch.todo.view(-1, blocks, bs).any(-1)  # [B, blocks]
        lead = decided.long().cumprod(-1).sum(-1)
        kept_slots = batch.gen.cumsum(-1) <= batch.budget_left[:, None]
        ends_here = batch.budget_left <= batch.gen.sum(-1)
        budget_done = ends_here & ~(batch.todo & (kept_slots | self.opts.algorithm.revises)).any(-1)
        finishing = (batch.eos_slot < lead * bs) | budget_done
        lead = torch.where(budget_done, blocks, lead)
        if self.own_pace:
            return lead
        # speculative strategies keep state across a block's steps: rows move on together
        return torch.where((lead > 0).all(), lead, torch.where(finishing, lead, 0))

    def advance(self, stay: list[int], budget_left: list[int]) -> None:
        batch, moved = self.batch, set(self.moved)
        if len(stay) < len(self.rows):
            batch.select_rows(stay)
            self.rows = [self.rows[i] for i in stay]
            self.row_opts = [self.row_opts[i] for i in stay]
            if stay:
                self._mix()
        self.budget_left = budget_left
        advancing = [i in moved for i in stay]
        self.joinable = self.own_pace or all(advancing)
        if stay and any(advancing):
            dev = batch.block_ids.device
            step_on = torch.tensor(advancing, device=dev)
            batch.budget_left = torch.where(step_on, torch.tensor(budget_left, device=dev), batch.budget_left)
            batch.next_blocks([self.lead[i] for i in stay])


def stream(dlm, prompts, max_new_tokens: int | list[int] | None = DEFAULT_MAX_NEW_TOKENS, stop=None,
           result: list | None = None, admit=None, options: DecodeOptions | None = None, verifier=None,
           logprobs: int | None = None, images=None, commit_times: bool = False, **given):
    """Yield a BlockEvent per committed piece and row; append the GenerationResult to `result`.

    given: decode options (block_size, strategy, threshold, temperature, top_p, factor, gamma,
    tokens_per_step, draft_depth, seed, ...), resolved by edlm.decode.options: unset ones follow
    the checkpoint, then the engine. options: an already resolved DecodeOptions instead (a server).
    verifier: the AR parent (loaded with autoregressive=True): `dlm` drafts, the parent verifies,
    and the text is the parent's greedy text (edlm.decode.verify); only block_size applies.
    logprobs: k >= 0 to report each generated token's log-probability and its k most likely
    alternatives (TokenLogprob on events and results; None: off, nothing computed).
    images: a VLM's images (PIL images, paths, bytes or data URLs): a list for one prompt given as a
    str, else one list (or None) per prompt; see edlm.vision.encode for where they go in the text.
    commit_times: also report when each token was committed within its block (GenerationResult.
    commit_times; the block engine's strategies only: `verified` and the two-model mode commit left to
    right by acceptance).
    admit: called after every step (speculative strategies: every block boundary) while rows are
    decoding; returns None or more requests for this call as (prompts, max_new_tokens, stop), in
    the forms the arguments take. They get the next row ids and decode exactly as they would
    alone, under this call's options.
    """
    if options is not None and (set_too := [k for k, v in given.items() if v is not None]):
        raise EdlmError(f"decode options are given resolved (options=) and one by one ({set_too[0]}=): "
                        "pass one or the other")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise EdlmError(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] (top alternatives per token), "
                        f"got {logprobs!r}")
    if verifier is not None:
        from edlm.decode.verify import ParentVerifiedDecoder

        decoder = ParentVerifiedDecoder(dlm, verifier, resolve_parent_verified(dlm, **given), logprobs)
        model = verifier  # rows are the parent's: its tokenizer, context and EOS
    else:
        opts = options if options is not None else DecodeOptions.resolve(dlm, **given)
        generator = torch.Generator(device=dlm.device).manual_seed(opts.seed) if opts.seed is not None else None
        make = opts.algorithm.decoder or BlockDecoder
        decoder, model = make(dlm, opts, generator, logprobs), dlm
    if commit_times:
        if not isinstance(decoder, BlockDecoder):
            raise EdlmError("commit times are recorded by the block engine's strategies; `verified` and the "
                            "two-model mode commit by acceptance, left to right")
        if decoder.opts.blocks > 1:
            raise EdlmError("commit times are a block's own steps: record them with blocks 1")
        decoder.commit_times = True  # before its first rows: their Batch keeps the stamps
    if images is not None:
        from edlm.vision import with_images

        prompts = with_images(model, prompts, images)
    out = Outputs(model, logprobs=logprobs is not None, commit_times=commit_times)
    ids, budget, stops = resolve_rows(model, prompts, max_new_tokens, stop)
    decoder.add(out.add_rows(budget, stops), ids, budget)

    def resolve(prompts, budgets, stop, options=None):
        return (*resolve_rows(model, prompts, budgets, stop), *([options] if options is not None else []))

    yield from decode_loop(decoder, out, admit, resolve, result)


def generate(dlm, prompts, max_new_tokens: int | list[int] | None = DEFAULT_MAX_NEW_TOKENS, on_block=None,
             **kwargs) -> GenerationResult:
    """Decode prompts (str, list of str, or token ids) block by block.

    kwargs: stop (strings), verifier (the AR parent: the dLM drafts for it, its greedy text
    results), and the decode options of edlm.decode.options (block_size, strategy, threshold,
    temperature, top_p, factor, gamma, tokens_per_step, draft_depth, seed, ...); unset ones
    follow the checkpoint's `decoding` config, then the engine defaults (strategies: see
    edlm.decode.strategies). `on_block(BlockEvent)` streams each committed piece's text.
    Returns texts, token ids and per-row stats (model calls, generated tokens, TPF, seconds).
    """
    result: list[GenerationResult] = []
    for event in stream(dlm, prompts, max_new_tokens, result=result, **kwargs):
        if on_block is not None:
            on_block(event)
    return result[0]
