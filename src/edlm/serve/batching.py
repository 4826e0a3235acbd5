"""The batching worker behind `edlm serve`: one thread owns the model and decodes requests together.

Requests wait in a bounded FIFO queue. Whenever the model is free, the worker takes the oldest
waiting request plus every other waiting request with the same decode settings (up to max_batch
rows) and runs them as ONE engine call (`DiffusionLM.stream` on the list of prompts): one forward
per step for all of them, so concurrent requests cost little more than one.

While a call runs, requests that arrive join it at its next step (the engine's `admit`
hook): the waiting requests at the head of the queue, as long as they have the call's settings,
or any plain greedy setting at its block size when the call's is one too (rows then commit by
their own rule and options: DecodeOptions.shares_calls_with), and fit in max_batch rows. The first one that does not (other settings, an embedding, too many
rows) stops joining, so it waits only until the running rows finish, never behind an endless
stream of newer compatible requests.

- Requests batch together when their decode options (edlm.decode.options) match; max_tokens and stop may differ (the
  engine takes one budget and one stop list per row, and a row decodes exactly as it would alone,
  whether it started the call or joined it).
- Rows that finish early (EOS, stop, budget) leave the engine's batch at once and cost no compute;
  a request is answered as soon as all of its rows are done, not when the whole call ends.

Cancellation: a request whose client left before its batch starts is dropped undecoded; a running
call whose unanswered requests' clients have all left is stopped at its next committed block (the
one thing `abandoned` counts: a request already answered is never a client that left).

Log-probabilities: the call asks the engine for the largest k of its requests (`logprobs=k`) and
each request gets its own k of them; a request that wants logprobs joins only a call that computes
at least as many.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, replace

from edlm.errors import first_line

log = logging.getLogger("edlm.serve")


class QueueFull(Exception):
    """The bounded queue is full: the caller should answer 429."""


@dataclass
class RowResult:
    text: str
    completion_tokens: int
    finish_reason: str
    model_calls: int
    logprobs: list | None = None  # [TokenLogprob] of the tokens of `text` (a closing EOS left out)


class Job:
    """One HTTP request: its inputs and a channel from the worker thread back to its event loop.

    Messages: ("block", row, text, logprobs) when streaming, ("done", [RowResult]) or
    ("embeddings", tensor), ("error", message).
    """

    def __init__(self, kind: str, inputs: list[list[int]], options=None, budgets: list[int] | None = None,
                 stop: tuple[str, ...] = (), streaming: bool = False, logprobs: int | None = None):
        self.kind = kind  # "generate" | "embed"
        self.inputs = inputs  # token ids per row
        self.options = options  # DecodeOptions (resolved): what an engine call shares
        self.budgets = budgets or []  # max new tokens per row
        self.stop = stop
        self.streaming = streaming
        self.logprobs = logprobs  # top-k log-probs per token (None: none)
        self.cancelled = False
        self.answered = False  # set by the worker with its "done": its client leaving later abandons nothing
        self._loop = asyncio.get_running_loop()
        self._messages: asyncio.Queue = asyncio.Queue()

    def put(self, message: tuple) -> None:
        """Called from the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._messages.put_nowait, message)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    async def get(self) -> tuple:
        return await self._messages.get()

    def cancel(self) -> None:
        self.cancelled = True

    def batches_with(self, other: Job) -> bool:
        """Whether `other` starts in the same engine call (the call's options are this job's)."""
        return (self.kind == other.kind == "generate" and self.options == other.options
                and (self.logprobs is None) == (other.logprobs is None))

    def joins(self, other: Job) -> bool:
        """Whether `other` may join this job's running call at a step: with its own options where the
        engine mixes them (plain greedy rules at one block size: DecodeOptions.shares_calls_with)."""
        return (self.kind == other.kind == "generate" and (self.logprobs is None) == (other.logprobs is None)
                and self.options is not None and other.options is not None
                and self.options.shares_calls_with(other.options))


class BatchingWorker:
    def __init__(self, dlm, max_batch: int = 64, max_queue: int = 256, verifier=None):
        self.dlm = dlm
        self.verifier = verifier  # an AR parent: the dLM drafts, it verifies (edlm.decode.verify)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        # counters for /health (and tests): largest_batch > 1 shows requests really batched; batches
        # counts engine calls, joined the requests that entered a call already running, running the
        # rows decoding now
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "running": 0, "joined": 0, "dropped": 0,
                      "abandoned": 0}

    # ---- lifecycle (called from the server) ----
    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve_forever, name="edlm-batching", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()

    def submit(self, job: Job) -> None:
        with self._cv:
            self._drop_cancelled()  # a client that left holds no queue slot
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(job)
            self._cv.notify()

    @property
    def queued(self) -> int:
        return sum(not j.cancelled for j in self._waiting)

    def _drop_cancelled(self) -> None:
        live = deque(j for j in self._waiting if not j.cancelled)
        self.stats["dropped"] += len(self._waiting) - len(live)
        self._waiting = live

    # ---- the worker thread ----
    def _next_batch(self) -> list[Job] | None:
        """Block until work exists; the oldest live job plus every compatible waiting job."""
        with self._cv:
            while True:
                self._drop_cancelled()
                if self._waiting:
                    break
                if self._closing:
                    return None
                self._cv.wait()
            first = self._waiting.popleft()
            batch, rows, rest = [first], len(first.inputs), deque()
            for job in self._waiting:
                if first.batches_with(job) and rows + len(job.inputs) <= self.max_batch:
                    batch.append(job)
                    rows += len(job.inputs)
                else:
                    rest.append(job)
            self._waiting = rest
            return batch

    def _joining(self, first: Job, logprobs: int | None) -> list[Job]:
        """Jobs from the head of the queue that join the running call of `first` (between two steps);
        the call computes `logprobs` top log-probs per token.

        Under a backlog (more compatible rows waiting than there is room) joins wait until half the
        batch is free: a step that prefills joining prompts feeds every running row their width of
        padding, so one such step per row that leaves made a long-lived call several times slower
        than calls started afresh (bench/serve_mixed.py); with room for all that wait they join at once."""
        with self._cv:
            self._drop_cancelled()
            running = self.stats["running"]
            joining, rows = [], running
            while self._waiting and (first.batches_with(self._waiting[0]) if self.verifier is not None
                                     else first.joins(self._waiting[0])) and \
                    (self._waiting[0].logprobs or 0) <= (logprobs or 0) and \
                    rows + len(self._waiting[0].inputs) <= self.max_batch:
                joining.append(self._waiting.popleft())
                rows += len(joining[-1].inputs)
            backlog = bool(self._waiting) and first.joins(self._waiting[0])
            if joining and backlog and self.max_batch - running < self.max_batch // 2:
                self._waiting.extendleft(reversed(joining))  # not yet: wait for room for a group
                return []
            return joining

    def _count_rows(self, rows: int) -> None:
        running = self.stats["running"] + rows
        self.stats.update(rows=self.stats["rows"] + rows, running=running,
                          largest_batch=max(self.stats["largest_batch"], running))

    def _serve_forever(self) -> None:
        while (batch := self._next_batch()) is not None:
            rows = sum(len(j.inputs) for j in batch)
            self.stats["batches"] += 1
            self._count_rows(rows)
            try:
                if batch[0].kind == "embed":
                    self._embed(batch[0])
                else:
                    self._decode(batch)
            except Exception as exc:  # noqa: BLE001 - one failed batch must not stop the server
                log.exception("batch of %d rows failed", rows)
                for job in batch:
                    job.put(("error", first_line(exc)))
            finally:
                self.stats["running"] = 0

    def _embed(self, job: Job) -> None:
        from edlm.embed import embed_ids

        job.put(("embeddings", embed_ids(self.dlm, job.inputs)))

    def _decode(self, jobs: list[Job]) -> None:
        owners: list[tuple[Job, int]] = []  # engine row -> (job, row in job); the engine numbers rows in order
        finished: dict[int, dict[int, RowResult]] = {}
        top_k = max((j.logprobs for j in jobs if j.logprobs is not None), default=None)
        row_logprobs: dict[int, list] = {}  # engine row -> its tokens' log-probs so far

        def engine_rows(new: list[Job]) -> tuple:
            for job in new:
                owners.extend((job, i) for i in range(len(job.inputs)))
                finished[id(job)] = {}
            return ([ids for job in new for ids in job.inputs],
                    [b for job in new for b in job.budgets],
                    [list(job.stop) for job in new for _ in job.inputs],
                    [job.options for job in new for _ in job.inputs])  # joins bring their own options

        def admit():  # called by the engine between steps
            joining = self._joining(jobs[0], top_k)
            if not joining:
                return None
            jobs.extend(joining)  # the caller's list: if the call fails, joined jobs get the error too
            self.stats["joined"] += len(joining)
            self._count_rows(sum(len(j.inputs) for j in joining))
            rows = engine_rows(joining)
            return rows[:3] if self.verifier is not None else rows

        prompts, budgets, stops, _ = engine_rows(jobs)
        extra = {} if top_k is None else {"logprobs": top_k}
        if self.verifier is not None:
            events = self.dlm.stream(prompts, max_new_tokens=budgets, stop=stops, admit=admit, verifier=self.verifier,
                                     block_size=jobs[0].options.block_size, **extra)
        else:
            events = self.dlm.stream(prompts, max_new_tokens=budgets, stop=stops, admit=admit,
                                     options=jobs[0].options, **extra)
        try:
            for event in events:
                job, row = owners[event.row]
                lps = self._block_logprobs(job, event, row_logprobs.setdefault(event.row, []))
                if job.streaming and (event.text or lps) and not job.cancelled:
                    job.put(("block", row, event.text, lps))
                if event.done:
                    self.stats["running"] -= 1
                    done = finished[id(job)]
                    kept = row_logprobs.pop(event.row)
                    done[row] = RowResult(event.final_text, event.stats.generated_tokens, event.finish_reason,
                                          event.stats.model_calls, kept if job.logprobs is not None else None)
                    if len(done) == len(job.inputs):  # answer this request now, whatever the others do
                        job.answered = True
                        job.put(("done", [done[i] for i in range(len(job.inputs))]))
                waiting = [j for j in jobs if not j.answered]
                if waiting and all(j.cancelled for j in waiting):
                    self.stats["abandoned"] += 1
                    return  # nobody is listening: stop paying for this call
        finally:
            events.close()

    def _block_logprobs(self, job: Job, event, kept: list) -> list | None:
        """The log-probs of the block's tokens that made it into the row's text, each cut to the job's
        own k; appended to `kept` (the row's so far). A stop string or EOS ends the text early: the
        row's final token count (stats.generated_tokens) says where, and a closing special token
        (EOS) has no text, so it has no entry."""
        if job.logprobs is None or getattr(event, "logprobs", None) is None:
            return None
        start = len(kept)
        kept.extend(replace(lp, top=lp.top[: job.logprobs]) for lp in event.logprobs)
        if event.done:
            del kept[event.stats.generated_tokens:]
            if kept and event.finish_reason == "stop" and kept[-1].token_id in self.dlm.tokenizer.all_special_ids:
                kept.pop()
        return kept[start:]
