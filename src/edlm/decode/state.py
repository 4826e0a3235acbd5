"""The decoding state of a batch: per-row tensors, results and events.

Every per-row tensor has the batch's rows as its first dimension; row r of each is the same
request. Rows leave (`select_rows`) the moment they are done and join (`join`) between two steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from edlm.decode.kv import KVRows
from edlm.errors import EdlmError
from edlm.vision import ImagePrompt, vision_of


@dataclass
class RowStats:
    model_calls: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    steps_histogram: dict = field(default_factory=dict)  # tokens committed per step -> count
    # MoE models: distinct (layer, expert) weights run for this row over its forwards (what a forward
    # loads), and token-expert pairs computed (what it multiplies); 0 on a dense model
    expert_activations: int = 0
    expert_pairs: int = 0

    @property
    def tpf(self) -> float:
        return self.generated_tokens / max(1, self.model_calls)

    def to_dict(self) -> dict:
        out = {"model_calls": self.model_calls, "generated_tokens": self.generated_tokens,
               "tpf": self.tpf, "seconds": self.seconds}
        if self.expert_pairs:
            out.update(expert_activations=self.expert_activations, expert_pairs=self.expert_pairs)
        return out

    def add_step(self, committed: int, calls: int, experts: list[int] | None = None) -> None:
        """One step of this row: `committed` tokens for `calls` model calls (and an MoE model's
        [activations, pairs] in them)."""
        self.model_calls += calls
        self.steps_histogram[committed] = self.steps_histogram.get(committed, 0) + 1
        if experts:
            self.expert_activations += experts[0]
            self.expert_pairs += experts[1]


@dataclass
class TokenLogprob:
    """A generated token's log-probability: the dLM's at the step it was committed (for `verified`
    and the two-model mode the AR verifier's, so in AR mode HF's), and the `top` most likely
    tokens there with theirs, over the decoder's candidates (never the mask token)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def token_logprobs(ids: list[int], logprob: list[float], top_ids: list[list[int]],
                   top_lp: list[list[float]]) -> list[TokenLogprob]:
    return [TokenLogprob(t, lp, list(zip(ti, tl, strict=True)))
            for t, lp, ti, tl in zip(ids, logprob, top_ids, top_lp, strict=True)]


@dataclass
class GenerationResult:
    texts: list[str]
    token_ids: list[list[int]]
    stats: list[RowStats]
    finish_reasons: list[str]
    logprobs: list[list[TokenLogprob]] | None = None  # per row, aligned with token_ids (logprobs=k asked)
    # per row, aligned with token_ids (commit_times=True asked): when the decoder committed each token
    # within its block, the fraction of the block's steps done then, (step + 1) / steps in (0, 1] (1/steps:
    # its first forward; 1: its last); the order a block was unmasked in, d3LLM's pseudo-trajectory
    # (edlm distill-data --trajectory)
    commit_times: list[list[float]] | None = None


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
    logprobs: list[TokenLogprob] | None = None  # aligned with token_ids, when logprobs were asked for


class Outputs:
    """Per-request token lists, text, stats and finish reason, with stop-string handling: every
    decoder ends its rows through it (edlm.decode.loop)."""

    def __init__(self, dlm, logprobs: bool = False, commit_times: bool = False):
        self.dlm = dlm
        self.logprobs: list[list[TokenLogprob]] | None = [] if logprobs else None
        self.times: list[list[float]] | None = [] if commit_times else None
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
        if self.logprobs is not None:
            self.logprobs += [[] for _ in range(n)]
        if self.times is not None:
            self.times += [[] for _ in range(n)]
        return first

    def add_block(self, row: int, new: list[int], hit_eos: bool, logprobs: list[TokenLogprob] | None = None,
                  times: list[float] | None = None) -> tuple[str, bool]:
        """Append a finished block's tokens (already cut to the budget); returns (new text, row is done)."""
        tok = self.dlm.tokenizer
        old_text = self.text[row]
        self.tokens[row].extend(new)
        if self.logprobs is not None:
            self.logprobs[row].extend(logprobs or [])
        if self.times is not None:
            self.times[row].extend(times or [])
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

    def event(self, row: int, new: list[int], hit_eos: bool, logprobs: list[TokenLogprob] | None = None,
              times: list[float] | None = None) -> BlockEvent:
        """add_block, then the row's event: with its finish reason and stats when it is done."""
        text, done = self.add_block(row, new, hit_eos, logprobs, times)
        self.stats[row].seconds = time.perf_counter() - self.started[row]
        if done:
            return BlockEvent(row, text, new, True, self.reason[row], self.stats[row], self.text[row], logprobs)
        return BlockEvent(row, text, new, logprobs=logprobs)

    def _trim_tokens(self, row: int, text: str) -> None:
        toks = self.tokens[row]
        for n in range(len(toks) + 1):
            if len(self.dlm.tokenizer.decode(toks[:n], skip_special_tokens=True)) >= len(text):
                self.tokens[row] = toks[:n]
                if self.logprobs is not None:
                    self.logprobs[row] = self.logprobs[row][:n]
                if self.times is not None:
                    self.times[row] = self.times[row][:n]
                return


def encode_prompts(dlm, prompts) -> list[list[int]]:
    """Token ids of each prompt: a str, a list of str, a list of token-id lists, or a tensor."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    if not prompts:
        raise EdlmError("no prompt given")
    if all(isinstance(t, int) for t in prompts):
        prompts = [prompts]  # one prompt as a flat list of token ids
    out = []
    for p in prompts:
        if isinstance(p, ImagePrompt):  # token ids with their images (edlm.vision.encode)
            out.append(p)
            continue
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


class Batch(KVRows):
    """Tensors of the rows still decoding, plus the KV cache of their finished blocks.

    pending_*: clean tokens whose KV the next forward writes (the prompt's complete blocks, or the
    blocks just finished). block_*: the current window of `opts.blocks` blocks (`width` slots; one
    block unless multi-block decoding); `todo` marks its slots still masked, `gen` the generated (not
    prompt) slots. Every slot of a window is a candidate even when a row's budget ends inside it, so
    a budget never changes the tokens it keeps (as in SGLang: decode the whole block, then cut);
    only slots past the model's last position are left out. A window's blocks attend block-causally
    (a later block sees the earlier ones as they stand, masks included); once its first blocks are
    decided they leave it as pending clean tokens and fresh blocks open at its end (`next_blocks`).
    `memo` is what a strategy remembers between the steps of one block (edlm.decode.step.remember).
    """

    PER_ROW = ("pending_ids", "pending_pos", "block_start", "block_ids", "todo", "gen",
               "eos_slot", "prompt_tail", "budget_left")  # plus rows (cpu), the cache and carry

    LOGPROB_ROWS = ("slot_lp", "slot_top_ids", "slot_top_lp")  # per slot: what its token reports (logprobs=k)
    # commit_times=True: the step of its block at which each slot was committed, and the steps the
    # current block has taken so far (edlm.decode.engine.BlockDecoder records them)
    TIME_ROWS = ("slot_step", "block_step")
    SLOT_ROWS = ("block_ids", "todo", "gen")  # per window slot: they slide with the window (with the logprob
    # and commit-step slots where kept)

    def __init__(self, dlm, prompts: list[list[int]], opts, budgets: list[int] | None = None, first_row: int = 0,
                 logprob_k: int | None = None, commit_times: bool = False):
        self.dlm, self.opts, self.logprob_k, self.commit_times = dlm, opts, logprob_k, commit_times
        bs = opts.block_size
        self.width = w = bs * opts.blocks  # slots of the current window
        dev = dlm.device
        n = len(prompts)
        self.rows = torch.arange(first_row, first_row + n)  # request ids
        self.init_cache(n, dev, vision_of(prompts))
        starts = [len(p) // bs * bs for p in prompts]  # prompt tokens in complete blocks
        width = max(starts)
        self.unpadded_prompts = len(set(starts)) == 1  # no row's pending tokens are padding (host-known)
        self.pending_ids = torch.zeros(n, width, dtype=torch.long, device=dev)
        self.pending_pos = torch.full((n, width), -1, dtype=torch.long, device=dev)
        for r, (p, s) in enumerate(zip(prompts, starts, strict=True)):
            if s:
                self.pending_ids[r, width - s:] = torch.tensor(p[:s], device=dev)
                self.pending_pos[r, width - s:] = torch.arange(s, device=dev)
        self.block_start = torch.tensor(starts, device=dev)
        self.block_ids = torch.zeros(n, w, dtype=torch.long, device=dev)
        self.todo = torch.zeros(n, w, dtype=torch.bool, device=dev)  # masked, to generate
        self.gen = torch.zeros(n, w, dtype=torch.bool, device=dev)  # generated (not prompt) slots
        self.carry = None  # [n, V] logits predicting slot 0 (shift models only)
        self.memo = None  # a strategy's state between steps of a block
        self.block_mask = None  # (positions, backend mask) of the current blocks, while the cache is unchanged
        # rows of mixed plain settings (set by edlm.decode.engine.BlockDecoder): {strategy: [B] bool}, and
        # each row's options as [B, 1] tensors; None while every row has the call's own options
        self.mixed_rules: dict | None = None
        self.row_options = None
        self.eos_slot = torch.full((n,), w, dtype=torch.long, device=dev)  # the window's first decided EOS
        for r, (p, s) in enumerate(zip(prompts, starts, strict=True)):
            tail = p[s:]
            self.block_ids[r, : len(tail)] = torch.tensor(tail, dtype=torch.long, device=dev)
        self.prompt_tail = torch.tensor([len(p) - s for p, s in zip(prompts, starts, strict=True)], device=dev)
        # new tokens each row may still emit (its budget left); the engine cuts a block's output to it
        self.budget_left = torch.tensor(budgets if budgets is not None else [bs] * n, device=dev)
        if logprob_k is not None:
            self.slot_lp = torch.zeros(n, w, device=dev)
            self.slot_top_ids = torch.zeros(n, w, logprob_k, dtype=torch.long, device=dev)
            self.slot_top_lp = torch.zeros(n, w, logprob_k, device=dev)
        if commit_times:
            self.slot_step = torch.zeros(n, w, dtype=torch.long, device=dev)
            self.block_step = torch.zeros(n, dtype=torch.long, device=dev)

    @property
    def per_row(self) -> tuple[str, ...]:
        return self.PER_ROW + (self.LOGPROB_ROWS if self.logprob_k is not None else ()) \
            + (self.TIME_ROWS if self.commit_times else ())

    def open_blocks(self) -> None:
        """Open the first window of every row: every slot after the prompt tail is masked and todo
        (up to the model's last position). Later windows open as they slide (next_blocks)."""
        self._open(torch.ones_like(self.todo))

    def _open(self, slots: torch.Tensor) -> None:
        """Mask `slots` ([B, width] bool) and make them todo, except the prompt tail's and those past
        the model's last position."""
        slot = torch.arange(self.width, device=self.block_ids.device)[None]
        after_prompt = slot >= self.prompt_tail[:, None]
        gen = after_prompt
        limit = self.dlm.max_positions
        if limit is not None:
            gen = gen & (self.block_start[:, None] + slot < limit)
        fill = self.dlm.config.mask_token_id if self.dlm.config.mask_token_id is not None else 0
        self.gen = torch.where(slots, gen, self.gen)
        self.todo = torch.where(slots, gen, self.todo)
        self.block_ids = torch.where(slots & after_prompt, fill, self.block_ids)

    def next_blocks(self, lead: list[int]) -> None:
        """Each row's first lead[r] blocks (decided) become pending clean tokens, written by the next
        forward; its window slides past them and opens as many fresh blocks at its end. Rows with
        lead 0 get padding there and go on with their window as it is."""
        self.block_mask = None
        self.unpadded_prompts = False  # rows that did not finish a block get padding here
        bs, w, dev = self.opts.block_size, self.width, self.block_ids.device
        leaving = torch.tensor(lead, device=dev) * bs  # [B] slots leaving each window
        k = max(lead) * bs
        col = torch.arange(k, device=dev)[None] - (k - leaving[:, None])  # pending column -> its slot (< 0: pad)
        real = col >= 0
        self.pending_ids = torch.where(real, self.block_ids.gather(1, col.clamp_min(0)), 0)
        self.pending_pos = torch.where(real, self.block_start[:, None] + col, -1)
        src = torch.arange(w, device=dev)[None] + leaving[:, None]  # slot s now holds slot s + leaving
        fresh = src >= w
        src = src.clamp_max(w - 1)
        slot_rows = self.SLOT_ROWS + (self.LOGPROB_ROWS if self.logprob_k is not None else ()) \
            + (("slot_step",) if self.commit_times else ())
        for name in slot_rows:
            t = getattr(self, name)
            setattr(self, name, t.gather(1, src.view(*src.shape, *[1] * (t.dim() - 2)).expand_as(t)))
        moved = leaving > 0
        self.eos_slot = torch.where(self.eos_slot < w, (self.eos_slot - leaving).clamp_min(0), w)
        self.block_start = self.block_start + leaving
        self.prompt_tail = torch.where(moved, 0, self.prompt_tail)
        self._open(fresh)
        slot = torch.arange(w, device=dev)[None]
        self.todo = self.todo & (slot < self.eos_slot[:, None])  # an EOS carried along: nothing after it opens
        if self.commit_times:
            self.block_step = torch.where(moved, 0, self.block_step)

    def select_rows(self, idx: list[int]) -> None:
        """Keep only rows `idx` everywhere (cache included): finished rows cost nothing from now on."""
        self.block_mask = None
        self.rows = self.rows[idx]
        idx = torch.tensor(idx, dtype=torch.long, device=self.block_ids.device)
        self.select_cache_rows(idx)
        for name in self.per_row:
            setattr(self, name, getattr(self, name)[idx])
        if self.carry is not None:
            self.carry = self.carry[idx]
        self.compact_keys()

    def join(self, new: Batch) -> None:
        """Append the rows of a fresh batch (blocks opened) between two steps of a running call.

        The new rows get the running rows' cache width of invalid keys (copies of row 0's KV,
        masked out) and every row's pending tokens are left-padded to the widest, so each row
        attends exactly the keys it would alone. Shift models: the running rows keep the logits
        that predict their block's first slot (carry); the new rows' come with their pending blocks.
        """
        self.block_mask = None
        self.unpadded_prompts = False
        self.compact_keys()  # the keys earlier joins wrote are padding to every other row
        n_new = new.rows.numel()
        self.add_cache_rows(n_new, new.vision.rows if new.vision is not None else None)
        width = max(self.pending_ids.shape[1], new.pending_ids.shape[1])
        for b in (self, new):
            pad = width - b.pending_ids.shape[1]
            b.pending_ids = torch.nn.functional.pad(b.pending_ids, (pad, 0))
            b.pending_pos = torch.nn.functional.pad(b.pending_pos, (pad, 0), value=-1)
        self.rows = torch.cat([self.rows, new.rows])
        for name in self.per_row:
            setattr(self, name, torch.cat([getattr(self, name), getattr(new, name)]))
        if self.carry is not None:
            self.carry = torch.cat([self.carry, self.carry.new_zeros(n_new, self.carry.shape[1])])
