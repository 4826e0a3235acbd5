"""OpenAI-compatible HTTP server for a converted dLM (FastAPI; `edlm serve MODEL`).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/embeddings,
GET /health. Every decode option of edlm.decode.options is a request field, generated from its
declaration with the same range (temperature, top_p and seed keep their OpenAI names; threshold,
block_size, strategy, ... are extensions). Usage adds model_calls to the OpenAI token counts, so
clients can compute tokens per forward. Unset decode options resolve as everywhere else (the
checkpoint's `decoding` config, then the engine's defaults), so unlike OpenAI an unset temperature
means greedy, as in `edlm generate`. With a verifier (`edlm serve --verifier`) requests follow the
two-model rule of `edlm generate --verifier` (edlm.decode.options.resolve_parent_verified).

Every field of a request is either honoured or refused with a 400 that names it: OpenAI fields
edlm does not implement (logprobs, tools, penalties, ...) are declared only to be refused when
set to anything but their no-op value, and unknown fields are refused too.

All model work goes through one `BatchingWorker` thread (edlm.serve.batching): concurrent requests with
the same settings are decoded as one batch, a request that arrives while one runs joins it at the
next step (speculative strategies: block boundary), and a full queue answers 429. Streaming sends one server-sent event per committed block.

Every bad request gets an OpenAI-style error body {"error": {message, type, param, code}} with a
4xx status, checked before it is queued, so one bad request never fails a batch.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import ClassVar, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

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


# ------------------------------------------------------------------ errors
class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _validation_error(exc: RequestValidationError) -> ApiError:
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {err.get('ctx', {}).get('error', '')}".rstrip(": "),
                        code="invalid_json")
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None  # the request field; deeper parts name union members too
    where = ".".join(loc) or "body"
    return ApiError(400, f"{where}: {err.get('msg', 'invalid value')}", param=param, code="invalid_value")


# ------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    # strict: "8" is not an int, as in the OpenAI API; a field we do not know is refused, not ignored
    model_config = ConfigDict(extra="forbid", strict=True)

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
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    UNSUPPORTED: ClassVar[dict] = {**_DecodeBody.UNSUPPORTED, "logprobs": (), "best_of": (1,), "suffix": ("",)}


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content


class ChatRequest(_DecodeBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: until EOS or the end of the context
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None

    UNSUPPORTED: ClassVar[dict] = {**_DecodeBody.UNSUPPORTED, "logprobs": (False,), "top_logprobs": (0,), "tools": ([],),
                   "tool_choice": ("none",), "response_format": ({"type": "text"},)}


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


# ------------------------------------------------------------------ prompts
def render_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat, rendered as training renders `messages` data (edlm.train.data.chat_prompt)."""
    templated = bool(getattr(tokenizer, "chat_template", None))  # a template writes its own specials
    return tokenizer(chat_prompt(tokenizer, messages), add_special_tokens=not templated)["input_ids"]


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


def _job(dlm, body: _DecodeBody, ids: list[list[int]], max_tokens: int | None, param: str,
         verified: bool = False) -> Job:
    """Resolve and check everything before queueing: a bad request never reaches (or fails) a batch."""
    body.refuse_unsupported(type(body).UNSUPPORTED)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(s for s in body.stop or () if s)
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
    return Job("generate", ids, options, budgets, stop, streaming=body.stream)


def _usage(prompt_tokens: int, rows: list[RowResult]) -> dict:
    completion = sum(r.completion_tokens for r in rows)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "model_calls": sum(r.model_calls for r in rows)}


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


def _streaming_response(job: Job, meta: dict, choice, n_prompt: int, include_usage: bool,
                        opening: list | None = None) -> StreamingResponse:
    """SSE for completions and chat alike; `choice(index, text, finish)` is the endpoint's choice
    object (text None on a row's closing chunk)."""

    def chunk(index, text, finish=None):
        return {**meta, "choices": [choice(index, text, finish)]}

    async def events():
        try:
            for c in opening or []:
                yield _sse(c)
            while True:
                kind, *rest = await job.get()
                if kind == "block":
                    yield _sse(chunk(*rest))
                elif kind == "done":
                    rows = rest[0]
                    for i, r in enumerate(rows):
                        yield _sse(chunk(i, None, r.finish_reason))
                    if include_usage:
                        yield _sse({**meta, "choices": [], "usage": _usage(n_prompt, rows)})
                    break
                elif kind == "error":
                    yield _sse({"error": {"message": f"decoding failed: {rest[0]}", "type": "server_error",
                                          "param": None, "code": None}})
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a client that left mid-stream stops costing compute (no-op once done)

    return StreamingResponse(events(), media_type="text/event-stream")


# ------------------------------------------------------------------ the app
def create_app(dlm, model_name: str, max_batch: int = 64, max_queue: int = 256, aliases=(), verifier=None) -> FastAPI:
    """The server for one loaded DiffusionLM; clients pass `model_name` (listed by /v1/models) or
    one of `aliases` as `model`. One request holds at most max_batch prompts, each within the
    model's context: that bounds the memory one request can take."""
    served = {model_name, *aliases}
    worker = BatchingWorker(dlm, max_batch=max_batch, max_queue=max_queue, verifier=verifier)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.close()

    app = FastAPI(title="edlm", lifespan=lifespan)
    app.state.worker = worker

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
                           code="queue_full") from None
        return job

    def head(kind: str, prefix: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
                "model": model_name}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queued": worker.queued, **worker.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "edlm", "max_model_len": dlm.max_positions}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = _listed(body.prompt, "prompt", max_batch)
        ids = [_check_length(dlm, dlm.tokenizer(p, add_special_tokens=True)["input_ids"], "prompt")
               for p in prompts]
        job = submit(_job(dlm, body, ids, body.max_tokens or COMPLETION_MAX_TOKENS, "prompt", verifier is not None))
        n_prompt = sum(len(i) for i in ids)
        echo = prompts if body.echo else [""] * len(prompts)  # echo: the prompt comes before the completion
        if body.stream:
            opening = [{**head("text_completion", "cmpl"), "choices": [
                {"index": i, "text": p, "logprobs": None, "finish_reason": None}]} for i, p in enumerate(echo) if p]
            return _streaming_response(
                job, head("text_completion", "cmpl"),
                lambda i, text, finish: {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish},
                n_prompt, bool(body.stream_options and body.stream_options.include_usage), opening)
        rows = await _answer_unless_gone(request, job, _rows)
        if rows is None:
            return Response(status_code=499)  # nobody is there to read it
        return {**head("text_completion", "cmpl"),
                "choices": [{"index": i, "text": echo[i] + r.text, "logprobs": None, "finish_reason": r.finish_reason}
                            for i, r in enumerate(rows)],
                "usage": _usage(n_prompt, rows)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = render_chat(dlm.tokenizer, messages)
        except Exception as exc:  # noqa: BLE001 - chat templates raise anything (jinja, bad roles)
            raise ApiError(400, f"cannot apply the chat template: {first_line(exc)}", param="messages",
                           code="invalid_value") from None
        _check_length(dlm, ids, "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens
        job = submit(_job(dlm, body, [ids], max_tokens, "messages", verifier is not None))
        if body.stream:
            meta = head("chat.completion.chunk", "chatcmpl")

            def choice(i, text, finish, delta=None):
                return {"index": i, "delta": delta or ({} if text is None else {"content": text}), "logprobs": None,
                        "finish_reason": finish}

            opening = [{**meta, "choices": [choice(0, None, None, {"role": "assistant", "content": ""})]}]
            return _streaming_response(job, meta, choice, len(ids),
                                       bool(body.stream_options and body.stream_options.include_usage), opening)
        rows = await _answer_unless_gone(request, job, _rows)
        if rows is None:
            return Response(status_code=499)
        r = rows[0]
        return {**head("chat.completion", "chatcmpl"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                             "logprobs": None, "finish_reason": r.finish_reason}],
                "usage": _usage(len(ids), rows)}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request):
        check_model(body.model)
        texts = _listed(body.input, "input", max_batch * 16)  # embedding rows are cheap: one forward each
        width = dlm.inner_model.config.hidden_size
        if body.dimensions is not None and body.dimensions > width:
            raise ApiError(400, f"dimensions {body.dimensions} exceeds the model's {width}", param="dimensions",
                           code="invalid_value")
        ids = [_check_length(dlm, dlm.tokenizer(t, add_special_tokens=True)["input_ids"], "input") for t in texts]
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
                "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt}}

    return app
