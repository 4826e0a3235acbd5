"""The batching worker behind `edlm serve`: one thread owns the model and decodes requests together.

Requests wait in a bounded FIFO queue. Whenever the model is free, the worker takes the oldest
waiting request plus every other waiting request with the same decode settings (up to max_batch
rows) and runs them as ONE engine call (`DiffusionLM.stream` on the list of prompts): one forward
per step for all of them, so concurrent requests cost little more than one.

Honest limits, all from the engine's call shape (`edlm.decoding.stream`):
- A running call cannot take new rows, so a request that arrives mid-batch joins at the next
  *batch* boundary (when the call in flight ends), not at the next block boundary.
- Requests batch together when their decode settings match; max_tokens and stop may differ (the
  engine takes one budget and one stop list per row, and a row decodes exactly as it would alone).
- Rows that finish early (EOS, stop, budget) leave the engine's batch at once and cost no compute;
  a request is answered as soon as all of its rows are done, not when the whole call ends.

Cancellation: a request whose client left before its batch starts is dropped undecoded; a running
call whose clients have all left is stopped at its next committed block.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass

from edlm.errors import first_line

log = logging.getLogger("edlm.serve")


class QueueFull(Exception):
    """The bounded queue is full: the caller should answer 429."""


@dataclass(frozen=True)
class DecodeSettings:
    """Everything one engine call shares; requests batch together only when these are equal."""

    max_tokens: int
    block_size: int
    threshold: float
    strategy: str
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()

    def shared(self) -> tuple:
        """What one engine call must share (budget and stop strings are per row)."""
        return (self.block_size, self.threshold, self.strategy, self.temperature, self.top_p)

    def engine_kwargs(self) -> dict:
        return dict(block_size=self.block_size, threshold=self.threshold, strategy=self.strategy,
                    temperature=self.temperature, top_p=self.top_p)


@dataclass
class RowResult:
    text: str
    completion_tokens: int
    finish_reason: str
    model_calls: int


class Job:
    """One HTTP request: its inputs and a channel from the worker thread back to its event loop.

    Messages: ("block", row, text) when streaming, ("done", [RowResult]) or ("embeddings", tensor),
    ("error", message).
    """

    def __init__(self, kind: str, inputs: list[list[int]], settings: DecodeSettings | None = None,
                 streaming: bool = False):
        self.kind = kind  # "generate" | "embed"
        self.inputs = inputs  # token ids per row
        self.settings = settings
        self.streaming = streaming
        self.cancelled = False
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
        return self.kind == other.kind == "generate" and self.settings.shared() == other.settings.shared()


class BatchingWorker:
    def __init__(self, dlm, max_batch: int = 64, max_queue: int = 256):
        self.dlm = dlm
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        # counters for /health (and tests): largest_batch > 1 shows requests really batched
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "running": 0, "dropped": 0, "abandoned": 0}

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

    def _serve_forever(self) -> None:
        while (batch := self._next_batch()) is not None:
            rows = sum(len(j.inputs) for j in batch)
            self.stats.update(batches=self.stats["batches"] + 1, rows=self.stats["rows"] + rows, running=rows,
                              largest_batch=max(self.stats["largest_batch"], rows))
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
        owners = [(job, i) for job in jobs for i in range(len(job.inputs))]  # engine row -> (job, row)
        prompts = [ids for job in jobs for ids in job.inputs]
        budgets = [job.settings.max_tokens for job in jobs for _ in job.inputs]
        stops = [list(job.settings.stop) for job in jobs for _ in job.inputs]
        finished: dict[int, dict[int, RowResult]] = {id(job): {} for job in jobs}
        events = self.dlm.stream(prompts, max_new_tokens=budgets, stop=stops, **jobs[0].settings.engine_kwargs())
        try:
            for event in events:
                job, row = owners[event.row]
                if job.streaming and event.text and not job.cancelled:
                    job.put(("block", row, event.text))
                if event.done:
                    done = finished[id(job)]
                    done[row] = RowResult(event.final_text, event.stats.generated_tokens, event.finish_reason,
                                          event.stats.model_calls)
                    if len(done) == len(job.inputs):  # answer this request now, whatever the others do
                        job.put(("done", [done[i] for i in range(len(job.inputs))]))
                if all(j.cancelled for j in jobs):
                    self.stats["abandoned"] += 1
                    return  # nobody is listening: stop paying for this call
        finally:
            events.close()
