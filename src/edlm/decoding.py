"""Block-parallel decoding with an exact KV cache of finished blocks.

The loop, per block: every step feeds [pending clean tokens ; current block] through the model.
Pending tokens are the prompt's complete blocks (first step) or the block just finished: their
KV is written into the cache by that same forward, so writing a finished block costs no extra
call (the fused form of "one more forward writes its clean KV"). The current block's KV is
cropped right after, so the cache only ever holds clean, finished blocks; with block-causal
attention this is exactly the computation of a full forward (tests check token identity).

Blocks are aligned to absolute positions from 0 (SDAR / Fast-dLLM v2 / SGLang): if the prompt
ends mid-block, its tail sits in the first block as already-decided slots.

Batches are block-synchronous: every row works on its own current block, a row that finishes
its block waits for the others, and rows that are done (EOS, stop string, budget) leave the
batch at once. Left padding with logical position ids; pad keys are masked out.

New rows join a running batch at a block boundary (every row's block finished; `stream`'s
`admit`): their prompt blocks become pending tokens next to the running rows' finished blocks,
and both sides' cache and pending tokens are padded with masked keys (`_Batch.join`), so each
row still attends exactly the keys it would alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from edlm.errors import EdlmError
from edlm.masks import position_block_mask
from edlm.strategies import STRATEGIES, commit, pick_tokens


@dataclass
class RowStats:
    model_calls: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    steps_histogram: dict = field(default_factory=dict)  # tokens committed per step -> count

    @property
    def tpf(self) -> float:
        return self.generated_tokens / max(1, self.model_calls)

    def to_dict(self) -> dict:
        return {"model_calls": self.model_calls, "generated_tokens": self.generated_tokens,
                "tpf": self.tpf, "seconds": self.seconds}


@dataclass
class GenerationResult:
    texts: list[str]
    token_ids: list[list[int]]
    stats: list[RowStats]
    finish_reasons: list[str]


@dataclass
class BlockEvent:
    row: int
    text: str
    token_ids: list[int]
    done: bool = False
    # set on a row's last event only: lets a server answer each row as soon as it is done
    finish_reason: str | None = None  # "stop" or "length"
    stats: RowStats | None = None
    final_text: str | None = None  # the row's whole text (a stop string may cut into earlier blocks)


@dataclass
class DecodeOptions:
    max_new_tokens: int | list[int] = 128  # one budget for all rows, or one per row
    block_size: int = 32
    threshold: float = 0.9
    strategy: str = "threshold"
    temperature: float = 0.0
    top_p: float = 1.0
    factor: float = 1.0
    gamma: float = 0.5
    tokens_per_step: int = 1
    seed: int | None = None
    draft_depth: int = 4  # states drafted per verification forward (speculative strategies)

    def validate(self) -> None:
        budgets = self.max_new_tokens if isinstance(self.max_new_tokens, list) else [self.max_new_tokens]
        if min(budgets) < 1:
            raise EdlmError(f"max_new_tokens must be >= 1, got {min(budgets)}")
        if self.block_size < 1:
            raise EdlmError(f"block size must be >= 1, got {self.block_size}")
        if not 0.0 < self.threshold <= 1.0:
            raise EdlmError(f"threshold must be in (0, 1], got {self.threshold}")
        names = STRATEGIES + speculative_strategies()
        if self.strategy not in names:
            raise EdlmError(f"unknown strategy {self.strategy!r}; choose from {', '.join(names)}")
        if self.temperature < 0:
            raise EdlmError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise EdlmError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.tokens_per_step < 1:
            raise EdlmError(f"tokens_per_step must be >= 1, got {self.tokens_per_step}")
        if self.draft_depth < 1:
            raise EdlmError(f"draft_depth must be >= 1, got {self.draft_depth}")


def speculative_strategies() -> tuple[str, ...]:
    """Strategies whose step lives in edlm.speculative (imported lazily: it builds on this module)."""
    from edlm.speculative import STRATEGIES as names

    return names


def __getattr__(name: str):
    if name == "SPECULATIVE":  # decoding.SPECULATIVE, without an import cycle
        return speculative_strategies()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------ prompts
def encode_prompts(dlm, prompts) -> list[list[int]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    if not prompts:
        raise EdlmError("no prompt given")
    out = []
    for p in prompts:
        if isinstance(p, str):
            if not p:
                raise EdlmError("empty prompt")
            ids = dlm.tokenizer(p, add_special_tokens=True)["input_ids"]
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise EdlmError("empty prompt")
        out.append(ids)
    return out


# ------------------------------------------------------------------ batch state
class _Batch:
    """Tensors of the rows still decoding; row r of every tensor is the same request."""

    PER_ROW = ("cache_pos", "cache_valid", "pending_ids", "pending_pos", "block_start", "block_ids", "todo", "gen",
               "eos_slot", "prompt_tail")  # plus rows (cpu), the cache and carry

    def __init__(self, dlm, prompts: list[list[int]], opts: DecodeOptions, first_row: int = 0):
        from transformers import DynamicCache

        self.dlm, self.opts = dlm, opts
        bs = opts.block_size
        dev = dlm.device
        n = len(prompts)
        self.rows = torch.arange(first_row, first_row + n)  # request ids
        self.cache = DynamicCache()
        self.cache_pos = torch.zeros(n, 0, dtype=torch.long, device=dev)
        self.cache_valid = torch.zeros(n, 0, dtype=torch.bool, device=dev)
        starts = [len(p) // bs * bs for p in prompts]  # prompt tokens in complete blocks
        width = max(starts)
        self.pending_ids = torch.zeros(n, width, dtype=torch.long, device=dev)
        self.pending_pos = torch.full((n, width), -1, dtype=torch.long, device=dev)
        for r, (p, s) in enumerate(zip(prompts, starts, strict=True)):
            if s:
                self.pending_ids[r, width - s:] = torch.tensor(p[:s], device=dev)
                self.pending_pos[r, width - s:] = torch.arange(s, device=dev)
        self.block_start = torch.tensor(starts, device=dev)
        self.block_ids = torch.zeros(n, bs, dtype=torch.long, device=dev)
        self.todo = torch.zeros(n, bs, dtype=torch.bool, device=dev)  # masked, to generate
        self.gen = torch.zeros(n, bs, dtype=torch.bool, device=dev)  # generated (not prompt) slots
        self.carry = None  # [n, V] logits predicting slot 0 (shift models only)
        self.eos_slot = torch.full((n,), bs, dtype=torch.long, device=dev)
        for r, (p, s) in enumerate(zip(prompts, starts, strict=True)):
            tail = p[s:]
            self.block_ids[r, : len(tail)] = torch.tensor(tail, dtype=torch.long, device=dev)
        self.prompt_tail = torch.tensor([len(p) - s for p, s in zip(prompts, starts, strict=True)], device=dev)

    def open_blocks(self, budgets: torch.Tensor) -> None:
        """Fill every row's current block: slots after the prompt tail, up to the budget, are todo."""
        bs = self.opts.block_size
        slot = torch.arange(bs, device=self.block_ids.device)[None]
        first = self.prompt_tail[:, None]
        self.gen = (slot >= first) & (slot < first + budgets[:, None])
        self.todo = self.gen.clone()
        fill = self.dlm.config.mask_token_id if self.dlm.config.mask_token_id is not None else 0
        self.block_ids = torch.where(slot >= first, torch.full_like(self.block_ids, fill), self.block_ids)
        self.eos_slot.fill_(bs)

    def keep(self, idx: torch.Tensor) -> None:
        """Drop finished rows everywhere (cache included): they cost nothing from now on."""
        self.rows = self.rows[idx.cpu()]
        self._select_cache_rows(idx)
        for name in self.PER_ROW:
            setattr(self, name, getattr(self, name)[idx])
        if self.carry is not None:
            self.carry = self.carry[idx]
        self._drop_unseen_keys()

    def _drop_unseen_keys(self) -> None:
        """Drop cache columns no remaining row attends (the left padding that rows of other
        lengths or joins put there), so a long-lived batch stops paying for rows that left.
        Positions are explicit (RoPE is applied when a key is written), so this is exact."""
        seen = self.cache_valid.any(0)
        layers = getattr(self.cache, "layers", [])
        if seen.all() or any(getattr(layer, "is_sliding", False) for layer in layers):
            return
        if self.cache.get_seq_length() != seen.numel():
            return  # nothing cached yet
        cols = seen.nonzero().squeeze(1)
        for layer in layers:
            layer.keys, layer.values = layer.keys[:, :, cols], layer.values[:, :, cols]
        self.cache_pos, self.cache_valid = self.cache_pos[:, cols], self.cache_valid[:, cols]

    def join(self, new: _Batch) -> None:
        """Append the rows of a fresh batch; only at a block boundary, when every row has pending tokens.

        The new rows get the running rows' cache width of invalid keys (copies of row 0's KV,
        masked out) and every row's pending tokens are left-padded to the widest, so each row
        attends exactly the keys it would alone.
        """
        n_old, n_new, dev = self.rows.numel(), new.rows.numel(), self.block_ids.device
        self._select_cache_rows(torch.cat([torch.arange(n_old), torch.zeros(n_new, dtype=torch.long)]).to(dev))
        new.cache_pos = torch.full((n_new, self.cache_pos.shape[1]), -1, dtype=torch.long, device=dev)
        new.cache_valid = new.cache_pos >= 0
        width = max(self.pending_ids.shape[1], new.pending_ids.shape[1])
        for b in (self, new):
            pad = width - b.pending_ids.shape[1]
            b.pending_ids = torch.nn.functional.pad(b.pending_ids, (pad, 0))
            b.pending_pos = torch.nn.functional.pad(b.pending_pos, (pad, 0), value=-1)
        self.rows = torch.cat([self.rows, new.rows])
        for name in self.PER_ROW:
            setattr(self, name, torch.cat([getattr(self, name), getattr(new, name)]))
        self.carry = None  # the next forward writes pending tokens and sets it anew (shift models)

    def _select_cache_rows(self, idx: torch.Tensor) -> None:
        if self.cache.get_seq_length() == 0:
            # nothing cached yet (every prompt shorter than a block); DynamicCache leaves empty
            # layers at their old batch size here, which the next forward cannot extend
            from transformers import DynamicCache

            self.cache = DynamicCache()
        else:
            self.cache.batch_select_indices(idx)


# ------------------------------------------------------------------ one step
@torch.no_grad()
def denoise_step(dlm, batch: _Batch) -> torch.Tensor:
    """One model call: write pending clean KV, return logits [B, bs, V] for the current block."""
    opts, cfg = batch.opts, dlm.config
    bs = opts.block_size
    feed_block = not (cfg.shift and bs == 1)  # an AR step needs no mask slot in its input
    slot_pos = batch.block_start[:, None] + torch.arange(bs, device=batch.block_ids.device)[None]
    parts_ids, parts_pos = [batch.pending_ids], [batch.pending_pos]
    if feed_block:
        parts_ids.append(batch.block_ids)
        parts_pos.append(slot_pos)
    ids, q_pos = torch.cat(parts_ids, 1), torch.cat(parts_pos, 1)
    q_valid = q_pos >= 0
    k_pos = torch.cat([batch.cache_pos, q_pos], 1)
    k_valid = torch.cat([batch.cache_valid, q_valid], 1)
    mask = position_block_mask(q_pos, k_pos, bs, k_valid)  # [B, Q, K]
    n_pending = batch.pending_ids.shape[1]
    keep = bs + (1 if cfg.shift and n_pending and feed_block else 0) if feed_block else 1
    out = dlm.model(input_ids=ids, attention_mask=dlm.backend_mask(mask), position_ids=q_pos.clamp_min(0),
                    past_key_values=batch.cache, use_cache=True, logits_to_keep=keep)
    logits = out.logits.float()
    if feed_block:
        batch.cache.crop(-bs)  # the current block is not clean yet: keep only pending KV
    batch.cache_pos = torch.cat([batch.cache_pos, batch.pending_pos], 1)
    batch.cache_valid = torch.cat([batch.cache_valid, batch.pending_pos >= 0], 1)
    batch.pending_ids = batch.pending_ids[:, :0]
    batch.pending_pos = batch.pending_pos[:, :0]
    if not cfg.shift:
        return logits
    # shift: slot j is predicted at position j-1; slot 0 by the last pending (clean) position,
    # which later steps of this block cannot change, so it is carried over.
    if not feed_block:
        return logits  # [B, 1, V]: the last pending position predicts the single slot
    if keep == bs + 1:
        batch.carry = logits[:, 0]
        body = logits[:, 1:-1]
    else:
        body = logits[:, :-1]
    carry = batch.carry if batch.carry is not None else torch.zeros_like(logits[:, 0])
    return torch.cat([carry[:, None], body], 1)


def candidate_logits(dlm, logits: torch.Tensor) -> torch.Tensor:
    """The mask token is never a candidate, nor are padded vocabulary rows beyond the tokenizer."""
    limit = len(dlm.tokenizer) if dlm.tokenizer is not None else logits.shape[-1]
    if limit < logits.shape[-1]:
        logits[..., limit:] = float("-inf")
    if dlm.config.mask_token_id is not None:
        logits[..., dlm.config.mask_token_id] = float("-inf")
    return logits


def commit_step(dlm, batch: _Batch, logits: torch.Tensor, generator) -> torch.Tensor:
    """Choose tokens, commit by the strategy; returns the number committed per row [B]."""
    opts = batch.opts
    tokens, conf, entropy = pick_tokens(candidate_logits(dlm, logits), opts.temperature, opts.top_p, generator)
    chosen = commit(opts.strategy, conf, entropy, batch.todo, opts.threshold, opts.factor, opts.gamma,
                    opts.tokens_per_step)
    apply_commit(dlm, batch, chosen, tokens)
    return chosen.sum(-1)


def apply_commit(dlm, batch: _Batch, chosen: torch.Tensor, tokens: torch.Tensor) -> None:
    batch.block_ids = torch.where(chosen, tokens, batch.block_ids)
    batch.todo = batch.todo & ~chosen
    eos = dlm.tokenizer.eos_token_id if dlm.tokenizer is not None else None
    if eos is not None:
        is_eos = batch.gen & ~batch.todo & (batch.block_ids == eos)
        slot = torch.arange(is_eos.shape[1], device=is_eos.device)[None]
        first = torch.where(is_eos, slot, torch.full_like(slot, is_eos.shape[1])).min(-1).values
        batch.eos_slot = torch.minimum(batch.eos_slot, first)
        batch.todo = batch.todo & (slot < batch.eos_slot[:, None])  # never fill after an EOS


# ------------------------------------------------------------------ the loop
class _Outputs:
    """Per-request token lists, text, stats and finish reason, with stop-string handling."""

    def __init__(self, dlm):
        self.dlm = dlm
        self.budget: list[int] = []
        self.stops: list[list[str]] = []
        self.tokens: list[list[int]] = []
        self.text: list[str] = []
        self.stats: list[RowStats] = []
        self.reason: list[str] = []
        self.started: list[float] = []  # perf_counter when the row entered the batch

    def add_rows(self, budget: list[int], stops: list[list[str]]) -> int:
        """Open outputs for new requests; returns the first new row id."""
        first, n = len(self.budget), len(budget)
        self.budget += budget
        self.stops += stops
        self.tokens += [[] for _ in range(n)]
        self.text += [""] * n
        self.stats += [RowStats() for _ in range(n)]
        self.reason += ["length"] * n
        self.started += [time.perf_counter()] * n
        return first

    def add_block(self, row: int, new: list[int], hit_eos: bool) -> tuple[str, bool]:
        """Append a finished block's tokens; returns (new text, row is done)."""
        tok = self.dlm.tokenizer
        old_text = self.text[row]
        self.tokens[row].extend(new)
        body = self.tokens[row][:-1] if hit_eos else self.tokens[row]
        text = tok.decode(body, skip_special_tokens=True)
        done = hit_eos
        if hit_eos:
            self.reason[row] = "stop"
        for s in self.stops[row]:
            cut = text.find(s, max(0, len(old_text) - len(s)))
            if cut >= 0:
                text, done, self.reason[row] = text[:cut], True, "stop"
                self._trim_tokens(row, text)
        self.text[row] = text
        if len(self.tokens[row]) >= self.budget[row]:
            done = True
        self.stats[row].generated_tokens = len(self.tokens[row])
        return text[len(old_text):], done

    def _trim_tokens(self, row: int, text: str) -> None:
        toks = self.tokens[row]
        for n in range(len(toks) + 1):
            if len(self.dlm.tokenizer.decode(toks[:n], skip_special_tokens=True)) >= len(text):
                self.tokens[row] = toks[:n]
                return


def prepare_rows(dlm, prompts, max_new_tokens, stop) -> tuple[list[list[int]], list[int], list[list[str]]]:
    """Token ids, budget (clamped to the context left) and stop strings of each row.

    max_new_tokens: one for all rows or one per row; stop: a string, one list for all rows, or
    one list per row.
    """
    ids = encode_prompts(dlm, prompts)
    n = len(ids)
    budget = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * n
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    stops = [list(x) for x in stop] if stop and isinstance(stop[0], (list, tuple)) else [stop] * n
    if len(budget) != n or len(stops) != n:
        raise EdlmError(f"{n} prompts but {len(budget)} max_new_tokens and {len(stops)} stop lists")
    limit = dlm.max_positions
    if limit is not None:
        longest = max(len(p) for p in ids)
        if longest >= limit:
            raise EdlmError(f"prompt has {longest} tokens; the model handles at most {limit} positions")
        budget = [min(b, limit - len(p)) for b, p in zip(budget, ids, strict=True)]
    return ids, budget, stops


def model_defaults(dlm) -> dict:
    """strategy and threshold to use when the caller gives none: the checkpoint's `decoding`
    config over the engine's defaults."""
    base = DecodeOptions()
    return {"strategy": base.strategy, "threshold": base.threshold, **(dlm.config.decoding or {})}


def stream(dlm, prompts, max_new_tokens: int = 128, block_size: int | None = None, threshold: float | None = None,
           strategy: str | None = None, temperature: float = 0.0, top_p: float = 1.0, stop=None,
           factor: float = 1.0, gamma: float = 0.5, tokens_per_step: int = 1, seed: int | None = None,
           draft_depth: int = 4, result: list | None = None, admit=None):
    """Yield a BlockEvent per committed block and row; append the GenerationResult to `result`.

    admit: called at every block boundary while rows are decoding; returns None or more requests
    for this call as (prompts, max_new_tokens, stop), in the forms the arguments take. They get
    the next row ids and decode exactly as they would alone, under this call's options.
    """
    if block_size is None:
        block_size = dlm.config.block_size
    defaults = model_defaults(dlm)
    threshold = defaults["threshold"] if threshold is None else threshold
    strategy = defaults["strategy"] if strategy is None else strategy
    # stop strings and budgets are per row (prepare_rows); the options are what every row shares
    opts = DecodeOptions(max_new_tokens, block_size, threshold, strategy, temperature, top_p, factor, gamma,
                         tokens_per_step, seed, draft_depth)
    opts.validate()
    if dlm.config.diffusion is False and block_size != 1:
        raise EdlmError("an autoregressive model decodes with block size 1")
    ids, budget, stops = prepare_rows(dlm, prompts, max_new_tokens, stop)
    if strategy in speculative_strategies():
        from edlm.speculative import speculative_step as step_fn
    else:
        step_fn = None
    generator = torch.Generator(device=dlm.device).manual_seed(seed) if seed is not None else None

    out = _Outputs(dlm)
    out.add_rows(budget, stops)
    batch = _Batch(dlm, ids, opts)
    batch.open_blocks(torch.tensor(budget, device=dlm.device).clamp_max(block_size))
    while batch.rows.numel():
        if step_fn is None:
            logits = denoise_step(dlm, batch)
            committed, calls = commit_step(dlm, batch, logits, generator), 1
        else:
            committed, calls = step_fn(dlm, batch, generator)  # calls: model calls it made (each batched)
        for r in batch.rows.tolist():
            out.stats[r].model_calls += calls
        for r, c in zip(batch.rows.tolist(), committed.tolist(), strict=True):
            h = out.stats[r].steps_histogram
            h[c] = h.get(c, 0) + 1
        block_done = ~batch.todo.any(-1)  # [B]  (host sync: once per step, by design)
        hit_eos = batch.eos_slot < block_size
        finishing = block_done & hit_eos
        round_over = bool(block_done.all())
        if not (finishing.any() or round_over):
            continue
        keep_rows, budgets = [], []
        for i, r in enumerate(batch.rows.tolist()):
            if not (finishing[i] or round_over):
                keep_rows.append(i)
                continue
            new = batch.block_ids[i][batch.gen[i]]
            if hit_eos[i]:
                new = batch.block_ids[i][batch.gen[i] & (torch.arange(block_size, device=new.device) <= batch.eos_slot[i])]
            text, done = out.add_block(r, new.tolist(), bool(hit_eos[i]))
            out.stats[r].seconds = time.perf_counter() - out.started[r]
            if done:
                yield BlockEvent(r, text, new.tolist(), True, out.reason[r], out.stats[r], out.text[r])
            else:
                yield BlockEvent(r, text, new.tolist())
            if not done:
                keep_rows.append(i)
                budgets.append(out.budget[r] - len(out.tokens[r]))
        if len(keep_rows) < batch.rows.numel():
            batch.keep(torch.tensor(keep_rows, dtype=torch.long, device=dlm.device))
        if round_over and batch.rows.numel():
            # the finished blocks become pending clean tokens, written by the next forward
            bs_range = torch.arange(block_size, device=dlm.device)[None]
            batch.pending_ids = batch.block_ids.clone()
            batch.pending_pos = batch.block_start[:, None] + bs_range
            batch.block_start = batch.block_start + block_size
            batch.prompt_tail = torch.zeros_like(batch.prompt_tail)
            if admit is not None and (joining := admit()):
                new_ids, new_budget, new_stops = prepare_rows(dlm, *joining)
                batch.join(_Batch(dlm, new_ids, opts, first_row=out.add_rows(new_budget, new_stops)))
                budgets += new_budget
            batch.open_blocks(torch.tensor(budgets, device=dlm.device).clamp_max(block_size))
    res = GenerationResult(out.text, out.tokens, out.stats, out.reason)
    if result is not None:
        result.append(res)


def generate(dlm, prompts, max_new_tokens: int = 128, on_block=None, **kwargs) -> GenerationResult:
    """Decode prompts (str, list of str, or token ids) block by block.

    Options: block_size (default: the model's), threshold and strategy ("threshold", "prefix", "factor",
    "entropy", "steps", and edlm.speculative's "lossless", "psd", "soft", "wino"; default: the
    model's `decoding` config, else threshold 0.9), temperature,
    top_p, stop, factor, gamma, tokens_per_step, seed, draft_depth (speculative strategies).
    `on_block(BlockEvent)` streams each committed block's text.
    Returns texts, token ids and per-row stats (model calls, generated tokens, TPF, seconds).
    """
    result: list[GenerationResult] = []
    for event in stream(dlm, prompts, max_new_tokens, result=result, **kwargs):
        if on_block is not None:
            on_block(event)
    return result[0]
