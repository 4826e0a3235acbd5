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
edlm.decode.options' decision.
"""

from __future__ import annotations

import torch

from edlm.decode.options import DEFAULT_MAX_NEW_TOKENS, DecodeOptions, resolve_rows
from edlm.decode.state import Batch, GenerationResult, Outputs


def _finished_tokens(batch: Batch, i: int, room: int) -> tuple[list[int], bool]:
    """Row i's generated tokens of its finished block, cut at its EOS and to `room` tokens."""
    slots = batch.gen[i].nonzero().squeeze(1)
    eos = int(batch.eos_slot[i])
    slots = slots[slots <= eos][:room]
    hit_eos = bool(slots.numel()) and int(slots[-1]) == eos
    return batch.block_ids[i, slots].tolist(), hit_eos


def stream(dlm, prompts, max_new_tokens: int | list[int] | None = DEFAULT_MAX_NEW_TOKENS, stop=None,
           result: list | None = None, admit=None, options: DecodeOptions | None = None, **given):
    """Yield a BlockEvent per committed block and row; append the GenerationResult to `result`.

    given: decode options (block_size, strategy, threshold, temperature, top_p, factor, gamma,
    tokens_per_step, draft_depth, seed), resolved by edlm.decode.options: unset ones follow the
    checkpoint, then the engine. options: an already resolved DecodeOptions instead (a server).
    admit: called after every step (speculative strategies: every block boundary) while rows are
    decoding; returns None or more requests
    for this call as (prompts, max_new_tokens, stop), in the forms the arguments take. They get
    the next row ids and decode exactly as they would alone, under this call's options.
    """
    opts = options if options is not None else DecodeOptions.resolve(dlm, **given)
    ids, budget, stops = resolve_rows(dlm, prompts, max_new_tokens, stop)
    if opts.algorithm.loop is not None:  # a strategy that is not block by block (`verified`)
        yield from opts.algorithm.loop(dlm, ids, budget, stops, opts, result, admit,
                                  resolve=lambda *joining: resolve_rows(dlm, *joining))
        return
    step = opts.algorithm.step
    generator = torch.Generator(device=dlm.device).manual_seed(opts.seed) if opts.seed is not None else None

    out = Outputs(dlm)
    out.add_rows(budget, stops)
    batch = Batch(dlm, ids, opts, budget)
    batch.open_blocks()
    own_pace = opts.algorithm.rule is not None  # plain steps: every row moves to its next block on its own
    while batch.rows.numel():
        committed, calls = step(dlm, batch, generator)  # calls: model calls it made (each batched)
        rows = batch.rows.tolist()
        for r, c in zip(rows, committed.tolist(), strict=True):
            out.stats[r].add_step(c, calls)
        block_done = ~batch.todo.any(-1)  # [B]
        # a row whose budget ends in this block is done once the slots it keeps are decided: later
        # steps could only fill slots it cuts (unless the strategy revises committed slots)
        kept_slots = batch.gen.cumsum(-1) <= batch.room[:, None]
        ends_here = batch.room <= batch.gen.sum(-1)
        budget_done = ends_here & ~(batch.todo & (kept_slots | opts.algorithm.revises)).any(-1)
        finishing = (block_done & (batch.eos_slot < opts.block_size)) | budget_done
        if own_pace:
            moving = block_done | finishing
        else:  # speculative strategies keep state across a block's steps: rows move on together
            moving = block_done | finishing if bool((block_done | finishing).all()) else finishing
        moving_rows = moving.tolist()  # host sync: once per step, by design
        if not any(moving_rows):
            continue
        keep_rows, advance = [], []
        for i, r in enumerate(rows):
            if not moving_rows[i]:
                keep_rows.append(i)
                advance.append(False)
                continue
            new, hit_eos = _finished_tokens(batch, i, out.budget[r] - len(out.tokens[r]))
            event = out.event(r, new, hit_eos)
            if not event.done:
                keep_rows.append(i)
                advance.append(True)
            yield event
        if len(keep_rows) < len(rows):
            batch.keep(torch.tensor(keep_rows, dtype=torch.long, device=dlm.device))
        if not batch.rows.numel():
            break
        if any(advance):
            moved = torch.tensor(advance, device=dlm.device)
            room = [out.budget[r] - len(out.tokens[r]) for r in batch.rows.tolist()]
            batch.room = torch.where(moved, torch.tensor(room, device=dlm.device), batch.room)
            batch.next_blocks(moved)
            batch.open_blocks(moved)
        if admit is not None and (own_pace or all(advance)) and (joining := admit()):
            new_ids, new_budget, new_stops = resolve_rows(dlm, *joining)
            fresh = Batch(dlm, new_ids, opts, new_budget, first_row=out.add_rows(new_budget, new_stops))
            fresh.open_blocks()
            batch.join(fresh)
    res = GenerationResult(out.text, out.tokens, out.stats, out.reason)
    if result is not None:
        result.append(res)


def generate(dlm, prompts, max_new_tokens: int | list[int] | None = DEFAULT_MAX_NEW_TOKENS, on_block=None,
             **kwargs) -> GenerationResult:
    """Decode prompts (str, list of str, or token ids) block by block.

    kwargs: stop (strings), and the decode options of edlm.decode.options (block_size, strategy,
    threshold, temperature, top_p, factor, gamma, tokens_per_step, draft_depth, seed); unset ones
    follow the checkpoint's `decoding` config, then the engine defaults (strategies: see
    edlm.decode.strategies). `on_block(BlockEvent)` streams each committed block's text.
    Returns texts, token ids and per-row stats (model calls, generated tokens, TPF, seconds).
    """
    result: list[GenerationResult] = []
    for event in stream(dlm, prompts, max_new_tokens, result=result, **kwargs):
        if on_block is not None:
            on_block(event)
    return result[0]
