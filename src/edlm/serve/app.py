"""OpenAI-compatible HTTP server for a converted dLM (FastAPI; `edlm serve MODEL`).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/embeddings,
GET|HEAD /health, GET /metrics (Prometheus text format). Every decode option of edlm.decode.options is a request field, generated from its
declaration with the same range (temperature, top_p and seed keep their OpenAI names; threshold,
block_size, strategy, ... are extensions). Usage adds model_calls to the OpenAI token counts, so
clients can compute tokens per forward. Unset decode options resolve as everywhere else (the
checkpoint's `decoding` config, then the engine's defaults), so unlike OpenAI an unset temperature
means greedy, as in `edlm generate`. With a verifier (`edlm serve --verifier`) requests follow the
two-model rule of `edlm generate --verifier` (edlm.decode.options.resolve_parent_verified).

Every field of a request is either honoured or refused with a 400 that names it: OpenAI fields
edlm does not implement (tools, penalties, ...) are declared only to be refused when set to
anything but their no-op value, and unknown fields are refused too.

logprobs (completions: `logprobs` k in 0..20; chat: `logprobs` true, `top_logprobs` k in 0..20)
come in OpenAI's shapes, streamed too. A committed token's logprob is the log-probability the dLM
gave it at the step it was committed (for `verified` and the two-model `--verifier` mode: the AR
verifier's log-probability, so in AR mode, `edlm serve --ar`, it equals HF's); top lists the k most
likely tokens at that slot. They cover the tokens of the returned text (a closing EOS is left out).
Prompt scoring (echo with logprobs) is refused.

Images (a vision-language model: edlm.vision): chat messages take OpenAI's content parts
{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}} beside text parts. Each
image stands where its part is (edlm.vision.flatten_image_parts) and is encoded with the prompt
(edlm.vision.encode, while tokenizing), so an image request is one more token-id row in the
batcher. A URL must be a data URL; http(s) URLs are fetched only by a server started with
`--allow-remote-images` (bounded in time and size), and never a path on the server's disk. A bad
image (not an image, malformed, too large, too many, a text-only model) is a 400 naming
`messages`. /v1/completions takes text only.

Exposing it (edlm.serve.app.HttpGuard, before any route runs): with an API key every /v1 endpoint
and /metrics need `Authorization: Bearer KEY` (401); a body over max_request_bytes is refused
with 413 (from Content-Length, or while it is read), one not received within body_timeout seconds
with 408 and the connection closed, so a slow or huge upload holds no worker and no memory.
Tokenizing runs off the event loop, after a length check by characters alone.

All model work goes through one `BatchingWorker` thread (edlm.serve.batching): concurrent requests with
the same settings are decoded as one batch, a request that arrives while one runs joins it at the
next step (speculative strategies: block boundary), and a full queue answers 429. Streaming sends one server-sent event per committed block.

Every bad request gets an OpenAI-style error body {"error": {message, type, param, code}} with a
4xx status, checked before it is queued, so one bad request never fails a batch; a full queue
answers 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
import urllib.error
import urllib.request
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, ClassVar, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from edlm import vision
from edlm.decode.options import (
    DecodeOptionError,
    DecodeOptions,
    OptionSpec,
    declared_options,
    resolve_parent_verified,
    resolve_rows,
)
from edlm.errors import EdlmError, first_line
from edlm.serve.batching import BatchingWorker, Job, QueueFull, RowResult
from edlm.train.data import chat_prompt

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_REQUEST_BYTES = 4 << 20  # 4 MiB: far above any prompt that fits a context, far below what hurts
BODY_TIMEOUT = 30.0  # seconds to receive a whole request body
MAX_LOGPROBS = 20  # OpenAI's bound for logprobs / top_logprobs
RETRY_AFTER = "1"  # seconds a client told 429 waits: the queue moves at the speed of one call
IMAGE_FETCH_TIMEOUT = 10.0  # seconds to fetch one remote image (--allow-remote-images), connection and body


# ------------------------------------------------------------------ errors
class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _validation_error(exc: RequestValidationError) -> ApiError:
    # the deepest error: for a value no member of a union takes (chat content: a string, or a list of
    # parts), the member that got furthest says what is wrong ("...image_url.url: Field required"),
    # not the first ("content.str: Input should be a valid string")
    err = max(exc.errors(), key=lambda e: len(e.get("loc", ())))
    if err.get("type") == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {err.get('ctx', {}).get('error', '')}".rstrip(": "),
                        code="invalid_json")
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None  # the request field; deeper parts name union members too
    where = ".".join(loc) or "body"
    return ApiError(400, f"{where}: {err.get('msg', 'invalid value')}", param=param, code="invalid_value")


# ------------------------------------------------------------------ request bodies
def _check_unicode(value):
    """JSON's \\ud800 escape parses to a lone surrogate, which no tokenizer (and no UTF-8 answer)
    can take: refuse it here, by field, instead of failing later with a 500."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"text holds a lone surrogate (U+{ord(value[exc.start]):04X}) at index {exc.start}; "
                             "send valid Unicode") from None
    elif isinstance(value, list | tuple):
        for v in value:
            _check_unicode(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k)
            _check_unicode(v)
    return value


class _Body(BaseModel):
    # strict: "8" is not an int, as in the OpenAI API; a field we do not know is refused, not ignored
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value):
        return _check_unicode(value)

    def refuse_unsupported(self, allowed: dict) -> None:
        """400 for each declared-but-unimplemented field set to anything but its no-op value."""
        for name, noop in allowed.items():
            value = getattr(self, name, None)
            if value is not None and value not in noop:
                raise ApiError(400, f"{name}={value!r} is not supported by edlm", param=name, code="invalid_value")


class StreamOptions(_Body):
    include_usage: bool = False


def _option_field(spec: OptionSpec):
    """A request field for one decode option: its declared type and range; unset (None) resolves as
    everywhere else. The model-dependent checks (block size vs context, strategy constraints) stay
    in DecodeOptions.resolve, which answers 400 too."""
    bounds = {}
    if spec.low > -float("inf"):
        bounds["gt" if spec.low_open else "ge"] = spec.low
    if spec.high < float("inf"):
        bounds["lt" if spec.high_open else "le"] = spec.high
    elif spec.kind is int:  # a seed reaches torch as a signed 64-bit integer
        bounds["le"] = 2**63 - 1
    return spec.kind | None, Field(None, description=spec.help, **bounds)


# every decode option as a request field, from its one declaration (edlm.decode.options)
_DecodeOptionFields = create_model("_DecodeOptionFields", __base__=_Body,
                                   **{s.name: _option_field(s) for s in declared_options()})


class _DecodeBody(_DecodeOptionFields):
    model: str
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # metadata: accepted, it changes nothing
    # OpenAI fields edlm does not implement: refused unless set to their no-op value
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None

    def decode_options(self) -> dict:
        return {s.name: getattr(self, s.name) for s in declared_options()}

    UNSUPPORTED: ClassVar[dict] = {"n": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},)}


class CompletionRequest(_DecodeBody):
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    UNSUPPORTED: ClassVar[dict] = {**_DecodeBody.UNSUPPORTED, "best_of": (1,), "suffix": ("",)}


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageUrl(_Body):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # OpenAI's resolution hint: only "auto" is honoured


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content if isinstance(p, TextPart))
        return self.content

    def image_urls(self) -> list[ImageUrl]:
        return [p.image_url for p in self.content if isinstance(p, ImagePart)] if isinstance(self.content, list) \
            else []

    def as_dict(self) -> dict:
        """The message as edlm.vision.flatten_image_parts reads it (content parts as OpenAI's dicts)."""
        if not isinstance(self.content, list):
            return {"role": self.role, "content": self.content}
        return {"role": self.role, "content": [{"type": "text", "text": p.text} if isinstance(p, TextPart) else
                                               {"type": "image_url", "image_url": {"url": p.image_url.url}}
                                               for p in self.content]}


class ChatRequest(_DecodeBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: until EOS or the end of the context
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None

    UNSUPPORTED: ClassVar[dict] = {**_DecodeBody.UNSUPPORTED, "tools": ([],), "tool_choice": ("none",),
                                   "response_format": ({"type": "text"},)}

    def logprobs_k(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return (self.top_logprobs or 0) if self.logprobs else None


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


# ------------------------------------------------------------------ images
def _image_error(message: str) -> ApiError:
    return ApiError(400, message, param="messages", code="invalid_value")


def check_image_urls(dlm, messages: list[ChatMessage], allow_remote: bool) -> list[ImageUrl]:
    """The request's images, in order, refused up front (before any byte is decoded or fetched)
    where the model takes none, there are too many, a URL is neither a data URL nor (with
    allow_remote) an http(s) URL, or a detail other than "auto" is asked for."""
    urls = [u for m in messages for u in m.image_urls()]
    if not urls:
        return urls
    if not vision.is_vlm(dlm.inner_model.config):
        raise _image_error(f"the request holds {len(urls)} image(s), but this model is a text-only LM: it reads "
                           "no images (serve a converted vision-language model)")
    if len(urls) > vision.MAX_IMAGES:
        raise _image_error(f"{len(urls)} images in one request; this server takes at most {vision.MAX_IMAGES}")
    for i, u in enumerate(urls, 1):
        if u.detail not in (None, "auto"):
            raise _image_error(f"image {i}: detail={u.detail!r} is not supported by edlm (images are read at the "
                               "model's own processor resolution): send 'auto' or leave it out")
        if u.url.startswith(("http://", "https://")):
            if not allow_remote:
                raise _image_error(f"image {i} is a remote URL ({u.url[:80]}): this server does not fetch "
                                   "images; send it inline as a data URL (data:image/png;base64,...), or start "
                                   "the server with --allow-remote-images")
        elif not u.url.startswith("data:"):
            raise _image_error(f"image {i}: image_url.url must be a data URL (data:image/png;base64,...)"
                               f"{' or an http(s) URL' if allow_remote else ''}, got {u.url[:40]!r}")
    return urls


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.startswith(("http://", "https://")):
            raise urllib.error.URLError(f"redirected to {newurl[:80]}, not an http(s) URL")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_image(url: str, what: str, timeout: float = IMAGE_FETCH_TIMEOUT, max_bytes: int | None = None) -> bytes:
    """An http(s) image's bytes (`edlm serve --allow-remote-images`): within `timeout` seconds in
    all and at most max_bytes (default edlm.vision.MAX_IMAGE_BYTES; refused from Content-Length, or
    while reading), else EdlmError."""
    max_bytes = vision.MAX_IMAGE_BYTES if max_bytes is None else max_bytes
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    deadline = time.monotonic() + timeout
    short = url[:80]
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "edlm"}), timeout=timeout) as r:
            length = r.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise EdlmError(f"{what} at {short} is {_size(int(length))}; at most {_size(max_bytes)}")
            chunks, size = [], 0
            while chunk := r.read(1 << 16):
                size += len(chunk)
                if size > max_bytes:
                    raise EdlmError(f"{what} at {short} is over {_size(max_bytes)}, the most an image may be")
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as exc:
        raise EdlmError(f"cannot fetch {what} from {short}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise EdlmError(f"cannot fetch {what} from {short}: {exc.reason}") from None
    except TimeoutError:
        raise EdlmError(f"cannot fetch {what} from {short}: no answer within {timeout:g} s") from None
    except (OSError, ValueError) as exc:  # a reset connection, a malformed URL or answer
        raise EdlmError(f"cannot fetch {what} from {short}: {first_line(exc)}") from None


# ------------------------------------------------------------------ prompts
def render_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat, rendered as training renders `messages` data (edlm.train.data.chat_prompt)."""
    templated = bool(getattr(tokenizer, "chat_template", None))  # a template writes its own specials
    return tokenizer(chat_prompt(tokenizer, messages), add_special_tokens=not templated)["input_ids"]


def chars_per_token_bound(tokenizer) -> int:
    """A generous bound on the characters one token covers: twice the longest vocabulary entry (a
    byte-level entry is at least as long as the text it stands for). Text longer than the context
    times this cannot fit, whatever it says, so it is refused without tokenizing."""
    return 2 * max(4, max(map(len, tokenizer.get_vocab()), default=0))


def _check_chars(dlm, texts: list[str], param: str, chars_per_token: int) -> None:
    limit = dlm.max_positions
    if limit is None:
        return
    for text in texts:
        if len(text) > limit * chars_per_token:
            raise ApiError(400, f"{param} has {len(text)} characters, more than {limit} positions of this model "
                           f"can hold (a token covers at most {chars_per_token} characters)",
                           param=param, code="context_length_exceeded")


async def _tokenize(dlm, texts: list[str], param: str) -> list[list[int]]:
    """Token ids of each text, checked against the context; in a thread, so a long text never
    stalls the event loop (every other client, /health included)."""
    ids = await asyncio.to_thread(lambda: [dlm.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts])
    return [_check_length(dlm, i, param) for i in ids]


def _check_length(dlm, ids: list[int], param: str) -> list[int]:
    if not ids:
        raise ApiError(400, f"{param} is empty", param=param, code="invalid_value")
    limit = dlm.max_positions
    if limit is not None and len(ids) > limit:
        raise ApiError(400, f"{param} has {len(ids)} tokens; this model handles at most {limit} positions",
                       param=param, code="context_length_exceeded")
    return ids


def _listed(value: str | list[str], param: str, most: int) -> list[str]:
    """A request's text or texts as a list: never empty, at most `most` (a request's size is bounded)."""
    items = [value] if isinstance(value, str) else value
    if not items:
        raise ApiError(400, f"{param} is empty", param=param, code="invalid_value")
    if len(items) > most:
        raise ApiError(400, f"{len(items)} items in {param}; this server takes at most {most} per request",
                       param=param, code="invalid_value")
    return items


def _stops(body: _DecodeBody) -> tuple[str, ...]:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(not s for s in stop):  # "" would end every answer before its first token
        raise ApiError(400, "stop holds an empty string", param="stop", code="invalid_value")
    return stop


def _job(dlm, body: _DecodeBody, ids: list[list[int]], max_tokens: int | None, param: str,
         verified: bool = False, logprobs: int | None = None) -> Job:
    """Resolve and check everything before queueing: a bad request never reaches (or fails) a batch."""
    body.refuse_unsupported(type(body).UNSUPPORTED)
    stop = _stops(body)
    try:
        if verified:  # the AR parent's greedy text: only the drafts' block size acts (the worker reads it)
            options = DecodeOptions(block_size=resolve_parent_verified(dlm, **body.decode_options()))
        else:
            options = DecodeOptions.resolve(dlm, **body.decode_options())
        _, budgets, _ = resolve_rows(dlm, ids, max_tokens, list(stop))
    except DecodeOptionError as exc:
        field = {"max_new_tokens": "max_tokens", "prompt": param}.get(exc.option, exc.option)
        code = "context_length_exceeded" if field in ("max_tokens", param) else "invalid_value"
        raise ApiError(400, str(exc).replace("max_new_tokens", "max_tokens"), param=field, code=code) from None
    except EdlmError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from None
    return Job("generate", ids, options, budgets, stop, streaming=body.stream, logprobs=logprobs)


def _usage(prompt_tokens: int, rows: list[RowResult]) -> dict:
    completion = sum(r.completion_tokens for r in rows)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "model_calls": sum(r.model_calls for r in rows)}


# ------------------------------------------------------------------ logprobs in OpenAI's shapes
def _logprob(value: float) -> float:
    return max(value, -9999.0)  # -inf (a token top-p cut) is not JSON; vLLM answers -9999.0 too


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer, lps, offset: int) -> dict | None:
    """Completions' shape; `offset` is where the first token's text starts in the choice's text. The
    top dict also holds the chosen token, as OpenAI's does (up to k + 1 entries)."""
    if lps is None:
        return None
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in lps:
        text = _token_text(tokenizer, lp.token_id)
        top = {}
        for token_id, value in lp.top:
            top.setdefault(_token_text(tokenizer, token_id), _logprob(value))
        top.setdefault(text, _logprob(lp.logprob))
        out["tokens"].append(text)
        out["token_logprobs"].append(_logprob(lp.logprob))
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(tokenizer, lps) -> dict | None:
    """Chat's shape: {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    if lps is None:
        return None

    def entry(token_id, value):
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": _logprob(value), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}


# ------------------------------------------------------------------ talking to the worker
async def _rows(job: Job) -> list[RowResult]:
    while True:
        kind, *rest = await job.get()
        if kind == "done":
            return rest[0]
        if kind == "error":
            raise ApiError(500, f"decoding failed: {rest[0]}", "server_error")


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is already read, so receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)


async def _answer_unless_gone(request: Request, job: Job, waiter):
    """Await the job's answer; if the client leaves first, cancel the job so it costs nothing."""
    answer = asyncio.ensure_future(waiter(job))
    gone = asyncio.ensure_future(_client_gone(request))
    await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    if answer.done():
        gone.cancel()
        return answer.result()
    job.cancel()
    answer.cancel()
    return None


def _sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _streaming_response(job: Job, meta: dict, choice, n_prompt: int, include_usage: bool, record,
                        opening: list | None = None) -> StreamingResponse:
    """SSE for completions and chat alike; `choice(index, text, finish, logprobs)` is the endpoint's
    choice object (text None on a row's closing chunk); `record(usage)` counts it for /metrics."""

    def chunk(index, text, finish=None, logprobs=None):
        return {**meta, "choices": [choice(index, text, finish, logprobs)]}

    async def events():
        try:
            for c in opening or []:
                yield _sse(c)
            while True:
                kind, *rest = await job.get()
                if kind == "block":
                    row, text, logprobs = rest
                    yield _sse(chunk(row, text, None, logprobs))
                elif kind == "done":
                    rows = rest[0]
                    for i, r in enumerate(rows):
                        yield _sse(chunk(i, None, r.finish_reason))
                    usage = record(_usage(n_prompt, rows))
                    if include_usage:
                        yield _sse({**meta, "choices": [], "usage": usage})
                    break
                elif kind == "error":
                    yield _sse({"error": {"message": f"decoding failed: {rest[0]}", "type": "server_error",
                                          "param": None, "code": None}})
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a client that left mid-stream stops costing compute (no-op once done)

    return StreamingResponse(events(), media_type="text/event-stream")


# ------------------------------------------------------------------ metrics and the HTTP guard
class _WorkerCollector:
    """The worker's own counters and gauges, read at scrape time."""

    def __init__(self, worker: BatchingWorker):
        self.worker = worker

    def collect(self):
        stats = self.worker.stats
        for name, key, doc in (("engine_calls", "batches", "engine calls (batches) started"),
                               ("rows", "rows", "rows decoded or embedded"),
                               ("joined", "joined", "requests that joined a running call"),
                               ("dropped", "dropped", "queued requests dropped undecoded: their client left"),
                               ("abandoned", "abandoned", "calls stopped early: every client left")):
            yield CounterMetricFamily(f"edlm_{name}", doc, value=stats[key])
        yield GaugeMetricFamily("edlm_queue_depth", "requests waiting for the model", value=self.worker.queued)
        yield GaugeMetricFamily("edlm_running_rows", "rows decoding now", value=stats["running"])


class ServerMetrics:
    """Prometheus metrics of one app, in its own registry: several apps in one process never collide.
    edlm_generation_tokens / edlm_model_calls is the served tokens per forward (TPF)."""

    ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics")

    def __init__(self, worker: BatchingWorker):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("edlm_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("edlm_request_duration_seconds", "time from a request's arrival to its last byte",
                                 ["endpoint"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.prompt_tokens = Counter("edlm_prompt_tokens", "prompt tokens of answered requests", registry=r)
        self.generation_tokens = Counter("edlm_generation_tokens", "tokens generated for answered requests",
                                         registry=r)
        self.model_calls = Counter("edlm_model_calls", "model calls of answered rows, counted per row as in usage",
                                   registry=r)
        r.register(_WorkerCollector(worker))

    def record(self, usage: dict) -> dict:
        self.prompt_tokens.inc(usage["prompt_tokens"])
        self.generation_tokens.inc(usage.get("completion_tokens", 0))
        self.model_calls.inc(usage.get("model_calls", 0))
        return usage

    def endpoint(self, path: str) -> str:
        return path if path in self.ENDPOINTS else "other"  # a label per unknown path would grow forever


class HttpGuard:
    """ASGI middleware in front of every route: counts and times each request, checks the API key,
    and reads the whole body itself, bounded in size (413) and in time (408), before the app sees
    it. uvicorn bounds neither: without this a client holds a connection and its memory as long as
    it likes. Refusals are sent before the body is read and close the connection."""

    def __init__(self, app, metrics: ServerMetrics, api_key: str | None, max_request_bytes: int,
                 body_timeout: float):
        self.app, self.metrics, self.max_bytes, self.body_timeout = app, metrics, max_request_bytes, body_timeout
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500  # 500: the app raised before answering

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, counted)
        finally:
            endpoint = self.metrics.endpoint(scope["path"])
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    async def _guarded(self, scope, receive, send):
        headers = dict(scope["headers"])
        path = scope["path"]
        if self.api_key and (path.startswith("/v1/") or path == "/metrics"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.api_key):
                return await self._refuse(ApiError(
                    401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}), scope, receive, send)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(self._too_large(int(length)), scope, receive, send)
        chunks, size = [], 0
        deadline = time.monotonic() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return await self._refuse(ApiError(
                    408, f"the request body did not arrive within {self.body_timeout:g} s", code="timeout"),
                    scope, receive, send)
            if message["type"] == "http.disconnect":
                return  # nobody left to answer
            size += len(message.get("body", b""))
            if size > self.max_bytes:  # chunked, or more than its Content-Length said
                return await self._refuse(self._too_large(size, at_least=True), scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: disconnect notices, for cancelling
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self, size: int, at_least: bool = False) -> ApiError:
        return ApiError(413, f"request body of {'over ' if at_least else ''}{size} bytes; this server takes at "
                        f"most {self.max_bytes} (edlm serve --max-request-bytes)", code="request_too_large")

    @staticmethod
    async def _refuse(error: ApiError, scope, receive, send):
        error.headers = {**(error.headers or {}), "Connection": "close"}  # the unread body is not ours to drain
        await error.response()(scope, receive, send)


# ------------------------------------------------------------------ the app
def create_app(dlm, model_name: str, max_batch: int = 64, max_queue: int = 256, aliases=(), verifier=None,
               api_key: str | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
               body_timeout: float = BODY_TIMEOUT, allow_remote_images: bool = False) -> FastAPI:
    """The server for one loaded DiffusionLM; clients pass `model_name` (listed by /v1/models) or
    one of `aliases` as `model`. One request holds at most max_batch prompts, each within the
    model's context, in a body of at most max_request_bytes: that bounds the memory one request can
    take. With `api_key` every /v1 endpoint and /metrics need it as a bearer token. With
    allow_remote_images the server fetches chat images given as http(s) URLs (else only data URLs)."""
    served = {model_name, *aliases}
    is_vlm = vision.is_vlm(dlm.inner_model.config)
    placeholder = vision.placeholder_text(dlm.tokenizer, dlm.inner_model.config) if is_vlm else None
    image_token = vision.image_token_id(dlm.inner_model.config) if is_vlm else None
    worker = BatchingWorker(dlm, max_batch=max_batch, max_queue=max_queue, verifier=verifier)
    metrics = ServerMetrics(worker)
    created = int(time.time())
    tokenizer = dlm.tokenizer
    chars_per_token = chars_per_token_bound(tokenizer)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.close()

    app = FastAPI(title="edlm", lifespan=lifespan)
    app.state.worker = worker
    app.state.metrics = metrics
    app.add_middleware(HttpGuard, metrics=metrics, api_key=api_key, max_request_bytes=max_request_bytes,
                       body_timeout=body_timeout)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
                        ).response()

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        return ApiError(500, f"internal error: {first_line(exc)}", "server_error").response()

    def check_model(name: str) -> None:
        if name not in served:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def submit(job: Job) -> Job:
        try:
            worker.submit(job)
        except QueueFull as exc:
            raise ApiError(429, f"server busy ({exc}); retry later", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": RETRY_AFTER}) from None
        return job

    def head(kind: str, prefix: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
                "model": model_name}

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok", "model": model_name, "queued": worker.queued, **worker.stats}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "edlm", "max_model_len": dlm.max_positions}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        if body.echo and body.logprobs is not None:
            raise ApiError(400, "echo with logprobs (scoring the prompt) is not supported by edlm; "
                           "score text with `edlm eval`", param="logprobs", code="invalid_value")
        prompts = _listed(body.prompt, "prompt", max_batch)
        _check_chars(dlm, prompts, "prompt", chars_per_token)
        _stops(body)  # a bad stop is refused before the tokenizer's work
        ids = await _tokenize(dlm, prompts, "prompt")
        job = submit(_job(dlm, body, ids, body.max_tokens or COMPLETION_MAX_TOKENS, "prompt", verifier is not None,
                          body.logprobs))
        n_prompt = sum(len(i) for i in ids)
        echo = prompts if body.echo else [""] * len(prompts)  # echo: the prompt comes before the completion
        if body.stream:
            offsets = [len(e) for e in echo]  # where each choice's next token starts in its streamed text

            def choice(i, text, finish, lps=None):
                out = completion_logprobs(tokenizer, lps, offsets[i])
                offsets[i] += len(text or "")
                return {"index": i, "text": text or "", "logprobs": out, "finish_reason": finish}

            opening = [{**head("text_completion", "cmpl"), "choices": [
                {"index": i, "text": p, "logprobs": None, "finish_reason": None}]} for i, p in enumerate(echo) if p]
            return _streaming_response(
                job, head("text_completion", "cmpl"), choice, n_prompt,
                bool(body.stream_options and body.stream_options.include_usage), metrics.record, opening)
        rows = await _answer_unless_gone(request, job, _rows)
        if rows is None:
            return Response(status_code=499)  # nobody is there to read it
        return {**head("text_completion", "cmpl"),
                "choices": [{"index": i, "text": echo[i] + r.text, "finish_reason": r.finish_reason,
                             "logprobs": completion_logprobs(tokenizer, r.logprobs, len(echo[i]))}
                            for i, r in enumerate(rows)],
                "usage": metrics.record(_usage(n_prompt, rows))}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        k = body.logprobs_k()
        urls = check_image_urls(dlm, body.messages, allow_remote_images)
        if urls:  # each image part becomes the model's placeholder where it stands
            messages, _ = vision.flatten_image_parts([m.as_dict() for m in body.messages], placeholder)
        else:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        _check_chars(dlm, ["".join(m["content"] for m in messages)], "messages", chars_per_token)
        _stops(body)

        def tokenize():
            try:
                ids = render_chat(tokenizer, messages)
            except Exception as exc:  # noqa: BLE001 - chat templates raise anything (jinja, bad roles)
                raise ApiError(400, f"cannot apply the chat template: {first_line(exc)}", param="messages",
                               code="invalid_value") from None
            if not urls:
                if is_vlm and image_token in ids:  # it would be read as an image feature that is not there
                    raise EdlmError(f"the messages hold the model's image token "
                                    f"{tokenizer.convert_ids_to_tokens(image_token)!r} as text, but no "
                                    "image: send images as image_url content parts")
                return ids
            # the images' features computed now: an ImagePrompt, one token-id row to the batcher
            images = [fetch_image(u.url, f"image {i}") if u.url.startswith(("http://", "https://")) else u.url
                      for i, u in enumerate(urls, 1)]
            try:
                return vision.encode(dlm, ids, images)
            except EdlmError:
                raise
            except Exception as exc:  # noqa: BLE001 - an image processor's refusal (e.g. an extreme aspect ratio)
                raise EdlmError(f"cannot read the images with the model's image processor: {first_line(exc)}") \
                    from None

        try:
            ids = _check_length(dlm, await asyncio.to_thread(tokenize), "messages")
        except EdlmError as exc:
            raise _image_error(str(exc)) from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        job = submit(_job(dlm, body, [ids], max_tokens, "messages", verifier is not None, k))
        if body.stream:
            meta = head("chat.completion.chunk", "chatcmpl")

            def choice(i, text, finish, lps=None, delta=None):
                return {"index": i, "delta": delta or ({} if text is None else {"content": text}),
                        "logprobs": chat_logprobs(tokenizer, lps), "finish_reason": finish}

            opening = [{**meta, "choices": [choice(0, None, None, None, {"role": "assistant", "content": ""})]}]
            return _streaming_response(job, meta, choice, len(ids),
                                       bool(body.stream_options and body.stream_options.include_usage),
                                       metrics.record, opening)
        rows = await _answer_unless_gone(request, job, _rows)
        if rows is None:
            return Response(status_code=499)
        r = rows[0]
        return {**head("chat.completion", "chatcmpl"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                             "logprobs": chat_logprobs(tokenizer, r.logprobs), "finish_reason": r.finish_reason}],
                "usage": metrics.record(_usage(len(ids), rows))}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        check_model(body.model)
        texts = _listed(body.input, "input", max_batch * 16)  # embedding rows are cheap: one forward each
        width = dlm.text_config.hidden_size
        if body.dimensions is not None and body.dimensions > width:
            raise ApiError(400, f"dimensions {body.dimensions} exceeds the model's {width}", param="dimensions",
                           code="invalid_value")
        _check_chars(dlm, texts, "input", chars_per_token)
        ids = await _tokenize(dlm, texts, "input")
        job = submit(Job("embed", ids))

        async def vectors(job):
            kind, *rest = await job.get()
            if kind == "error":
                raise ApiError(500, f"embedding failed: {rest[0]}", "server_error")
            return rest[0]

        vecs = await _answer_unless_gone(request, job, vectors)
        if vecs is None:
            return Response(status_code=499)
        if body.dimensions is not None:  # OpenAI's Matryoshka-style shortening: cut, then unit length again
            vecs = torch.nn.functional.normalize(vecs[:, : body.dimensions], dim=-1)
        if body.encoding_format == "base64":  # little-endian float32, what the openai client decodes
            data = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vecs]
        else:
            data = vecs.tolist()
        n_prompt = sum(len(i) for i in ids)
        return {"object": "list", "model": model_name,
                "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                "usage": metrics.record({"prompt_tokens": n_prompt, "total_tokens": n_prompt})}

    return app
