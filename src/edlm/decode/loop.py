"""The one decode loop: rows joining and leaving, budgets, stop strings, EOS, events and results.

A decoder (the block engine's `BlockDecoder`, `verified`'s `SelfVerifiedDecoder`, the two-model
`ParentVerifiedDecoder`) owns its tensors and model calls and supplies four things, as an
algorithm supplies a `step` to SGLang's dllm base:

- `rows`: the request ids of its rows, in its row order;
- `add(first_row, ids, budgets)`: new requests (token ids, budgets), row ids from first_row on;
- `step() -> Step`: one iteration on every row: the model calls it made, the tokens each row
  committed, and the tokens each row emits now, already cut to its budget and after its EOS;
- `advance(stay, budget_left)`: the rows at these indices go on (the others are done and
  leave), each with `budget_left` new tokens still allowed; `joinable` says whether requests may
  join now.

Everything a request sees (text, stop strings, finish reasons, stats) is the loop's, through
`Outputs`, so every decoder ends rows the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edlm.decode.state import GenerationResult, Outputs


@dataclass
class Step:
    calls: int  # model calls of this step (each serves every row)
    committed: list[int]  # tokens each row committed in it (the tokens-per-step histogram)
    emitted: dict[int, list[int]] = field(default_factory=dict)  # row index -> tokens it emits now
    logprobs: dict[int, list] = field(default_factory=dict)  # row index -> their TokenLogprobs (when asked)
    experts: list[list[int]] | None = None  # an MoE model's [activations, pairs] per row (edlm.moe.ExpertPlan)
    times: dict[int, list[float]] = field(default_factory=dict)  # row index -> their commit times (when asked)


def decode_loop(decoder, out: Outputs, admit=None, resolve=None, result: list | None = None):
    """Drive `decoder` until its rows are done; yield a BlockEvent per row and emitted piece.

    admit: called after a step in which some row emitted, while the decoder is joinable; returns
    None or (prompts, max_new_tokens, stop[, options]) of requests joining this call, which
    `resolve` turns into (ids, budgets, stops[, options]): options of their own where the decoder
    can mix them (DecodeOptions.shares_calls_with). The GenerationResult is appended to `result`.
    """
    eos = out.dlm.tokenizer.eos_token_id if out.dlm.tokenizer is not None else None
    while decoder.rows:
        step = decoder.step()
        rows = decoder.rows
        for i, (r, committed) in enumerate(zip(rows, step.committed, strict=True)):
            out.stats[r].add_step(committed, step.calls, step.experts[i] if step.experts else None)
        done = set()
        for i, tokens in sorted(step.emitted.items()):
            event = out.event(rows[i], tokens, eos is not None and bool(tokens) and tokens[-1] == eos,
                              step.logprobs.get(i), step.times.get(i))
            if event.done:
                done.add(i)
            yield event
        stay = [i for i in range(len(rows)) if i not in done]
        decoder.advance(stay, [out.budget[rows[i]] - len(out.tokens[rows[i]]) for i in stay])
        # joins are asked for where a row emitted (the block engine: a block boundary), and the
        # decoder allows them (speculative strategies: every row at a boundary)
        if admit is not None and step.emitted and decoder.rows and decoder.joinable and (joining := admit()):
            ids, budgets, stops, *options = resolve(*joining)
            decoder.add(out.add_rows(budgets, stops), ids, budgets, *options)
    if result is not None:
        result.append(GenerationResult(out.text, out.tokens, out.stats, out.reason, out.logprobs, out.times))
