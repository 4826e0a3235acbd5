"""`edlm serve` exposed to a team: API key, body size and time limits, metrics, 4xx instead of 500,
logprobs, `--ar`. Against a live uvicorn server (tests/test_serve.py's LiveServer)."""

import asyncio
import dataclasses
import json
import socket
import threading
import time

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

from test_serve import NAME, LiveServer, greedy, load  # noqa: E402

from edlm import DiffusionConfig  # noqa: E402
from edlm.cli import main  # noqa: E402
from edlm.decode.options import ENGINE_DEFAULTS, DecodeOptions  # noqa: E402
from edlm.decode.state import RowStats, TokenLogprob  # noqa: E402
from edlm.model import DiffusionLM  # noqa: E402
from edlm.serve.app import chars_per_token_bound, create_app  # noqa: E402
from edlm.serve.batching import BatchingWorker, Job, QueueFull  # noqa: E402
from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dlm_dir(tiny_dlm_dir):  # the converted tiny model of conftest, read only
    return tiny_dlm_dir


@pytest.fixture(scope="module")
def dlm(dlm_dir):
    return load(dlm_dir)


@pytest.fixture(scope="module")
def server(dlm_dir):
    with LiveServer(load(dlm_dir), max_request_bytes=16384, body_timeout=1.0) as s:
        yield s


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def completion(url: str, client=httpx, **fields) -> httpx.Response:
    return client.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "ab", "max_tokens": 4, **fields},
                       timeout=30)


# ------------------------------------------------------------------ authentication
def test_api_key_guards_v1_and_metrics_but_not_health(dlm_dir, dlm):
    with LiveServer(load(dlm_dir), api_key="sekret") as s:
        wrong = openai.OpenAI(base_url=f"{s.url}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as exc:
            wrong.completions.create(model=NAME, prompt="ab", max_tokens=4)
        assert exc.value.status_code == 401 and exc.value.body["code"] == "invalid_api_key"
        err = error_of(httpx.get(f"{s.url}/v1/models"), 401)  # no header at all
        assert err["code"] == "invalid_api_key"
        assert httpx.get(f"{s.url}/metrics").status_code == 401
        assert httpx.get(f"{s.url}/health").status_code == 200

        right = openai.OpenAI(base_url=f"{s.url}/v1", api_key="sekret", max_retries=0)
        res = right.completions.create(model=NAME, prompt="ab", max_tokens=4, temperature=0)
        assert res.choices[0].text == greedy(dlm, "ab", 4).texts[0]
        assert [m.id for m in right.models.list().data] == [NAME]
        assert httpx.get(f"{s.url}/metrics", headers={"Authorization": "Bearer sekret"}).status_code == 200


def test_cli_refuses_an_open_public_bind_and_reads_the_key(dlm_dir, tiny_ar_dir, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(app=app, host=host))
    monkeypatch.delenv("EDLM_API_KEY", raising=False)
    assert main(["serve", str(dlm_dir), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--api-key" in err and "--allow-unauthenticated" in err
    assert not seen

    assert main(["serve", str(dlm_dir), "--host", "0.0.0.0", "--allow-unauthenticated"]) == 0
    assert "WITHOUT AUTHENTICATION" in capsys.readouterr().err and seen["host"] == "0.0.0.0"

    from starlette.testclient import TestClient  # no lifespan: the guard answers before any route runs

    monkeypatch.setenv("EDLM_API_KEY", "from-env")
    assert main(["serve", str(dlm_dir), "--host", "0.0.0.0"]) == 0  # a key: no flag needed
    guarded = TestClient(seen["app"])
    assert guarded.get("/v1/models").status_code == 401
    assert guarded.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200

    assert main(["serve", str(tiny_ar_dir), "--ar", "--verifier", str(tiny_ar_dir)]) == 2
    assert "--ar" in capsys.readouterr().err
    assert main(["serve", str(dlm_dir), "--body-timeout", "0"]) == 2
    assert main(["serve", str(tiny_ar_dir), "--ar"]) == 0  # a plain AR checkpoint, through the same engine
    assert seen["app"].state.worker.dlm.config.block_size == 1


# ------------------------------------------------------------------ size and time
def _raw_request(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):  # b"": the server closed the connection
        data += chunk
    return data


def test_request_body_cap_from_content_length_and_while_reading(server):
    err = error_of(httpx.post(f"{server.url}/v1/completions", content=b"x" * 20000,
                              headers={"content-type": "application/json"}), 413)
    assert err["code"] == "request_too_large" and "16384" in err["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b" " * 1000

    err = error_of(httpx.post(f"{server.url}/v1/completions", content=chunks(),
                              headers={"content-type": "application/json"}), 413)
    assert err["code"] == "request_too_large"

    # a big upload in progress holds nothing up: /health answers while it is still arriving
    body = json.dumps({"model": NAME, "prompt": "a" * 20000}).encode()
    sock = _raw_request(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                        b"\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (2000, body[:2000]))
    try:
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body) - 2000, body[2000:]))
        assert _read_all(sock).startswith(b"HTTP/1.1 413")
    finally:
        sock.close()
    assert completion(server.url).status_code == 200


def test_a_stalled_body_is_timed_out_and_its_connection_closed(server):
    sock = _raw_request(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                        b"\r\nContent-Length: 100\r\n\r\n{\"model\": ")
    try:
        t0 = time.monotonic()
        answer = _read_all(sock)  # returns only once the server closes the socket
        waited = time.monotonic() - t0
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408") and b'"code":"timeout"' in answer
    assert 0.5 < waited < 8  # the server's 1 s, not the client's 10 s socket timeout


class CountingTokenizer:
    """The server's tokenizer, counting calls; each call waits for `release` (a slow tokenizer)."""

    def __init__(self, tokenizer):
        self._tok, self.calls = tokenizer, 0
        self.entered, self.release = threading.Event(), threading.Event()
        self.release.set()

    def __call__(self, *args, **kw):
        self.calls += 1
        self.entered.set()
        self.release.wait(10)
        return self._tok(*args, **kw)

    def __len__(self):
        return len(self._tok)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_tokenizing_runs_off_the_event_loop_and_hopeless_lengths_skip_it(server, monkeypatch):
    dlm = server.app.state.worker.dlm
    counting = CountingTokenizer(dlm.tokenizer)
    monkeypatch.setattr(dlm, "tokenizer", counting)
    bound = chars_per_token_bound(counting)
    for path, body, param in (
            ("/v1/completions", {"prompt": "a" * (dlm.max_positions * bound + 1)}, "prompt"),
            ("/v1/embeddings", {"input": ["ok", "b" * (dlm.max_positions * bound + 1)]}, "input"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "c" * (dlm.max_positions * bound)},
                                                   {"role": "user", "content": "more"}]}, "messages")):
        err = error_of(httpx.post(server.url + path, json={"model": NAME, **body}), 400)
        assert err["code"] == "context_length_exceeded" and err["param"] == param
    assert counting.calls == 0  # the character count alone proved it

    counting.release.clear()  # a slow tokenization: other clients must still be answered meanwhile
    answers = []
    slow = threading.Thread(target=lambda: answers.append(completion(server.url)))
    slow.start()
    try:
        assert counting.entered.wait(10)
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    finally:
        counting.release.set()
        slow.join()
    assert answers[0].status_code == 200


# ------------------------------------------------------------------ 4xx, never 500
SURROGATE_BODIES = [
    ("/v1/completions", b'{"model": "tiny-dlm", "prompt": "x\\ud800y"}', "prompt"),
    ("/v1/completions", b'{"model": "tiny-dlm", "prompt": ["ok", "x\\udfffy"]}', "prompt"),
    ("/v1/completions", b'{"model": "tiny-dlm", "prompt": "ab", "stop": "\\ud800"}', "stop"),
    ("/v1/completions", b'{"model": "x\\ud800", "prompt": "ab"}', "model"),
    ("/v1/embeddings", b'{"model": "tiny-dlm", "input": "x\\ud800y"}', "input"),
    ("/v1/chat/completions", b'{"model": "tiny-dlm", "messages": [{"role": "user", "content": "x\\ud800y"}]}',
     "messages"),
]


@pytest.mark.parametrize(("path", "raw", "param"), SURROGATE_BODIES)
def test_lone_surrogates_are_a_400_naming_the_field_on_a_kept_connection(server, dlm, path, raw, param):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        err = error_of(c.post(path, content=raw, headers={"content-type": "application/json"}), 400)
        assert err["param"] == param and "surrogate" in err["message"]
        ok = completion("", client=c, temperature=0)  # the same keep-alive connection still works
        assert ok.json()["choices"][0]["text"] == greedy(dlm, "ab", 4).texts[0]


@pytest.mark.parametrize(("fields", "param"), [
    ({"seed": 2**64}, "seed"), ({"seed": 2**63}, "seed"), ({"stop": ""}, "stop"), ({"stop": ["x", ""]}, "stop")])
def test_out_of_range_seed_and_empty_stop_are_400s(server, fields, param):
    assert error_of(completion(server.url, **fields), 400)["param"] == param


def test_largest_seed_is_accepted(server):
    assert completion(server.url, seed=2**63 - 1, temperature=0.7).status_code == 200


def test_queue_full_says_when_to_retry(server, monkeypatch):
    def full(job):
        raise QueueFull("256 requests are already waiting")

    monkeypatch.setattr(server.app.state.worker, "submit", full)
    r = completion(server.url)
    assert error_of(r, 429)["code"] == "queue_full" and r.headers["Retry-After"] == "1"


@dataclasses.dataclass
class FakeEvent:
    row: int
    text: str
    token_ids: list
    done: bool = False
    finish_reason: str | None = None
    stats: object = None
    final_text: str | None = None


class FakeStreamDLM:
    """Yields one finished row per prompt: enough to drive BatchingWorker._decode."""

    def stream(self, prompts, **kw):
        for row in range(len(prompts)):
            yield FakeEvent(row, "t", [5], True, "length", RowStats(1, 1), "t")


def test_answered_requests_never_count_as_abandoned():
    async def scenario():
        opts = DecodeOptions(**{**ENGINE_DEFAULTS, "block_size": 4})

        class StreamingJob(Job):  # its stream ends (and cancels it) the moment its answer arrives
            def put(self, message):
                super().put(message)
                if message[0] == "done":
                    self.cancel()

        worker = BatchingWorker(FakeStreamDLM())
        worker._decode([StreamingJob("generate", [[1]], opts, [4], streaming=True)])
        assert worker.stats["abandoned"] == 0
        worker._decode([StreamingJob("generate", [[1]], opts, [4]), StreamingJob("generate", [[2]], opts, [4])])
        assert worker.stats["abandoned"] == 0

        left = Job("generate", [[1], [2]], opts, [4, 4])  # a client that left before its rows finished
        left.cancel()
        worker._decode([left])
        assert worker.stats["abandoned"] == 1

    asyncio.run(scenario())


# ------------------------------------------------------------------ metrics, HEAD
def test_metrics_in_the_prometheus_format_and_head_health(server):
    res = completion(server.url, temperature=0).json()
    assert httpx.post(f"{server.url}/v1/embeddings", json={"model": NAME, "input": "a cat"}).status_code == 200
    assert completion(server.url, max_tokens=0).status_code == 400
    assert httpx.head(f"{server.url}/health").status_code == 200

    text = httpx.get(f"{server.url}/metrics").text
    samples = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0)

    assert value("edlm_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert value("edlm_requests_total", endpoint="/v1/completions", status="400") >= 1
    assert value("edlm_requests_total", endpoint="/v1/embeddings", status="200") >= 1
    assert value("edlm_requests_total", endpoint="/health", status="200") >= 1
    assert value("edlm_request_duration_seconds_count", endpoint="/v1/completions") >= 2
    assert value("edlm_generation_tokens_total") >= res["usage"]["completion_tokens"]
    assert value("edlm_model_calls_total") >= res["usage"]["model_calls"] > 0
    assert value("edlm_prompt_tokens_total") >= res["usage"]["prompt_tokens"] + 5  # + the embedding's 5
    assert value("edlm_engine_calls_total") >= 2
    assert ("edlm_queue_depth", ()) in samples and ("edlm_running_rows", ()) in samples

    again = create_app(server.app.state.worker.dlm, NAME)  # a second app in one process: its own registry
    assert again.state.metrics.registry is not server.app.state.metrics.registry


# ------------------------------------------------------------------ logprobs
class WithLogprobs:
    """Wraps a DiffusionLM's stream: records the `logprobs` k it is asked for and gives each block
    event made-up log-probs with k top entries (-0.5 for a token, the top ones below)."""

    def __init__(self, stream):
        self.engine_stream, self.asked = stream, []

    def stream(self, prompts, logprobs=None, **kw):
        self.asked.append(logprobs)
        for event in self.engine_stream(prompts, **kw):
            if logprobs is not None:
                event.logprobs = [TokenLogprob(t, -0.5, [(t, -0.5)] + [((t + j) % 90 + 4, -1.0 - j)
                                                                        for j in range(1, logprobs)])
                                  for t in event.token_ids]
            yield event


def test_logprobs_in_openai_shapes_each_request_its_own_k(server, dlm, monkeypatch):
    worker = server.app.state.worker
    fake = WithLogprobs(worker.dlm.stream)
    monkeypatch.setattr(worker.dlm, "stream", fake.stream)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    ref = greedy(dlm, "ab", 8)

    res = client.completions.create(model=NAME, prompt="ab", max_tokens=8, temperature=0, logprobs=3)
    lp = res.choices[0].logprobs
    assert fake.asked[-1] == 3 and res.choices[0].text == ref.texts[0]
    assert "".join(lp.tokens) == res.choices[0].text
    assert lp.token_logprobs == [-0.5] * len(lp.tokens) and len(lp.tokens) == res.usage.completion_tokens
    assert all(len(top) <= 4 and top[t] == -0.5 for top, t in zip(lp.top_logprobs, lp.tokens, strict=True))
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]

    chunks = list(client.completions.create(model=NAME, prompt="ab", max_tokens=8, temperature=0, logprobs=3,
                                            stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert streamed == lp.tokens and offsets == lp.text_offset

    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(c.logprob == -0.5 and len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode())
               for c in content)
    chunks = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, temperature=0, logprobs=True, stream=True))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]
    assert all(c.top_logprobs == [] for c in streamed)  # top_logprobs unset: 0

    # two requests batched in one call: the call computes the larger k, each gets its own
    async def both():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(c.post(f"{server.url}/v1/completions", json={
                "model": NAME, "prompt": "ab", "max_tokens": 8, "temperature": 0, "logprobs": k}) for k in (1, 5)))

    fake.asked.clear()
    small, large = asyncio.run(both())
    assert max(fake.asked) == 5
    assert {len(t) for t in small.json()["choices"][0]["logprobs"]["top_logprobs"]} == {1}
    assert max(len(t) for t in large.json()["choices"][0]["logprobs"]["top_logprobs"]) > 1
    fake.asked.clear()
    assert completion(server.url).json()["choices"][0]["logprobs"] is None and fake.asked == [None]


def test_ar_mode_logprobs_equal_hf():
    """`edlm serve --ar`: a token's logprob is the AR model's own log_softmax (a vocabulary exactly its
    tokenizer's, so every row is a candidate), top included, to 1e-4."""
    tok = make_tiny_tokenizer()
    model = make_tiny_causal_lm("llama", vocab_size=len(tok))
    ar = DiffusionLM(model, tok, DiffusionConfig.autoregressive())
    with LiveServer(ar) as s:
        body = completion(s.url, max_tokens=6, temperature=0, logprobs=2).json()
    got = body["choices"][0]["logprobs"]
    prompt = tok("ab", add_special_tokens=True)["input_ids"]
    ids = ar.generate("ab", max_new_tokens=6).token_ids[0]
    assert got["tokens"] == [tok.decode([i]) for i in ids]  # greedy: the server decoded these ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1: -1].float()
    want = logits.log_softmax(-1)
    torch.testing.assert_close(torch.tensor(got["token_logprobs"]), want[torch.arange(len(ids)), torch.tensor(ids)],
                               atol=1e-4, rtol=0)
    for i, top in enumerate(got["top_logprobs"]):
        best = want[i].topk(2)
        for token_id, value in zip(best.indices.tolist(), best.values.tolist(), strict=True):
            assert top[tok.decode([token_id])] == pytest.approx(value, abs=1e-4)
