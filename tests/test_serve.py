"""`edlm serve` against a live uvicorn server: the OpenAI client, errors, batching, cancellation."""

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")

from edlm.cli import main  # noqa: E402
from edlm.decode.options import ENGINE_DEFAULTS, DecodeOptions  # noqa: E402
from edlm.model import DiffusionLM  # noqa: E402
from edlm.serve.app import create_app, render_chat  # noqa: E402
from edlm.serve.batching import BatchingWorker, Job, QueueFull  # noqa: E402
from edlm.train.convert import convert  # noqa: E402

NAME = "tiny-dlm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a background thread of the test process, on a free port."""

    def __init__(self, dlm, **app_kwargs):
        self.port = free_port()
        self.app = create_app(dlm, NAME, **app_kwargs)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health").json()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dlm_dir(tiny_dlm_dir):  # the converted tiny model of conftest, read only
    return tiny_dlm_dir


def load(dlm_dir):
    return DiffusionLM.from_pretrained(dlm_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def dlm(dlm_dir):
    return load(dlm_dir)  # in-process reference; the server gets its own copy


@pytest.fixture(scope="module")
def server(dlm_dir):
    with LiveServer(load(dlm_dir)) as s:
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def greedy(dlm, prompt, max_tokens, **kw):
    return dlm.generate(prompt, max_new_tokens=max_tokens, temperature=0.0, **kw)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    h = server.health()
    assert h["status"] == "ok" and h["model"] == NAME and h["queued"] == 0


def test_completion_matches_engine_and_stream_matches_completion(client, dlm):
    prompt = "The cat sat on"
    ref = greedy(dlm, prompt, 12)
    res = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    choice = res.choices[0]
    assert choice.text == ref.texts[0] and choice.finish_reason == ref.finish_reasons[0]
    assert res.usage.prompt_tokens == len(prompt) and res.usage.completion_tokens == len(ref.token_ids[0])
    assert res.usage.total_tokens == len(prompt) + len(ref.token_ids[0])
    assert res.usage.model_extra["model_calls"] == ref.stats[0].model_calls

    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(texts) == choice.text
    assert len(texts) >= 3  # one event per committed block (12 tokens, blocks of 4), not one at the end
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == res.usage.completion_tokens


def test_extensions_stop_and_prompt_list(client, dlm):
    prompt = "Hello, wor"
    ref = greedy(dlm, prompt, 10, threshold=0.3, block_size=2, strategy="threshold")
    res = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0,
                                    extra_body={"threshold": 0.3, "block_size": 2, "strategy": "threshold"})
    assert res.choices[0].text == ref.texts[0]

    full = greedy(dlm, prompt, 12).texts[0]
    stop = full[5:7]
    res = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert res.choices[0].text == full[: full.find(stop)] and res.choices[0].finish_reason == "stop"

    res = client.completions.create(model=NAME, prompt=prompt, temperature=0)  # OpenAI's default: 16 tokens
    assert res.choices[0].text == greedy(dlm, prompt, 16).texts[0]

    res = client.completions.create(model=NAME, prompt=["ab", prompt], max_tokens=6, temperature=0)
    assert [c.text for c in res.choices] == greedy(dlm, ["ab", prompt], 6).texts
    assert res.usage.prompt_tokens == 2 + len(prompt)


def test_chat_plain_fallback_and_stream(client, dlm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    ids = render_chat(dlm.tokenizer, messages)
    assert dlm.tokenizer.decode(ids) == "system: be brief\nuser: hi there\nassistant:"
    ref = greedy(dlm, [ids], 10)
    res = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    msg = res.choices[0].message
    assert msg.role == "assistant" and msg.content == ref.texts[0]
    assert res.usage.prompt_tokens == len(ids) and res.usage.completion_tokens == len(ref.token_ids[0])

    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == res.choices[0].finish_reason


def test_chat_template_is_used_when_present(dlm):
    tok = dlm.tokenizer
    old = tok.chat_template
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    try:
        ids = render_chat(tok, [{"role": "user", "content": "hi"}])
    finally:
        tok.chat_template = old
    assert tok.decode(ids) == "<user>hi<assistant>"


def test_embeddings(client, server, dlm):
    texts = ["a cat", "a much longer sentence about dogs"]
    ref = dlm.embed(texts)
    res = client.embeddings.create(model=NAME, input=texts)  # the client asks for base64 by default
    got = torch.tensor([d.embedding for d in res.data])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert res.usage.prompt_tokens == sum(len(t) for t in texts)
    body = httpx.post(f"{server.url}/v1/embeddings", json={"model": NAME, "input": "a cat",
                                                           "encoding_format": "float"}).json()
    torch.testing.assert_close(torch.tensor(body["data"][0]["embedding"]), ref[0], atol=1e-5, rtol=0)


BAD_REQUESTS = [
    ("/v1/completions", b'{"model": "tiny-dlm", "prompt": "ab"', 400, "invalid_json", None),
    ("/v1/completions", {"model": NAME, "prompt": "ab", "max_tokens": "8"}, 400, "invalid_value", "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": 5}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "ab"}, 404, "model_not_found", "model"),
    ("/v1/completions", {"model": NAME, "prompt": "ab", "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "a" * 300}, 400, "context_length_exceeded", "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": ""}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "ab", "strategy": "magic"}, 400, "invalid_value", "strategy"),
    ("/v1/completions", {"model": NAME, "prompt": "ab", "threshold": 1.5}, 400, "invalid_value", "threshold"),
    ("/v1/completions", {"model": NAME, "prompt": "ab", "n": 2}, 400, "invalid_value", "n"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "invalid_value", "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x" * 300}]}, 400,
     "context_length_exceeded", "messages"),
    ("/v1/embeddings", {"model": NAME, "input": "x" * 300}, 400, "context_length_exceeded", "input"),
    ("/v1/embeddings", {"model": NAME}, 400, "invalid_value", "input"),
    ("/v1/nothing", {}, 404, "not_found", None),
    # one request can never take the machine: every size is bounded by the model's context
    ("/v1/completions", {"model": NAME, "prompt": "ab", "block_size": 20000}, 400, "invalid_value", "block_size"),
    ("/v1/completions", {"model": NAME, "prompt": "ab", "block_size": 100000}, 400, "invalid_value", "block_size"),
    ("/v1/completions", {"model": NAME, "prompt": "a" * 200, "max_tokens": 100}, 400, "context_length_exceeded",
     "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": ["a"] * 65}, 400, "invalid_value", "prompt"),
    # strategy constraints are 400s before anything is queued, never 500s from the worker
    ("/v1/completions", {"model": NAME, "prompt": "ab", "strategy": "psd", "temperature": 0.8}, 400,
     "invalid_value", "temperature"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "a"}], "strategy": "lossless",
                              "temperature": 1.0}, 400, "invalid_value", "temperature"),
    # a no-shift model trained without --ar-loss-weight has no AR stream to verify with
    ("/v1/completions", {"model": NAME, "prompt": "ab", "strategy": "verified"}, 400, "invalid_value", "strategy"),
    # OpenAI fields edlm does not implement are refused by name, never silently ignored
    ("/v1/completions", {"model": NAME, "prompt": "ab", "logprobs": 21}, 400, "invalid_value", "logprobs"),
    ("/v1/completions", {"model": NAME, "prompt": "ab", "logprobs": 1, "echo": True}, 400, "invalid_value",
     "logprobs"),
    ("/v1/completions", {"model": NAME, "prompt": "ab", "best_of": 3}, 400, "invalid_value", "best_of"),
    ("/v1/completions", {"model": NAME, "prompt": "ab", "presence_penalty": 0.5}, 400, "invalid_value",
     "presence_penalty"),
    ("/v1/completions", {"model": NAME, "prompt": "ab", "suffix": "x"}, 400, "invalid_value", "suffix"),
    ("/v1/completions", {"model": NAME, "prompt": "ab", "seed": "x"}, 400, "invalid_value", "seed"),
    ("/v1/completions", {"model": NAME, "prompt": "ab", "frobnicate": 1}, 400, "invalid_value", "frobnicate"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, 400,
     "invalid_value", "top_logprobs"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "a"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "invalid_value",
     "tools"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "a"}],
                              "response_format": {"type": "json_object"}}, 400, "invalid_value", "response_format"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "a"}]}, 400,
     "invalid_value", "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": None}]}, 400,
     "invalid_value", "messages"),
    ("/v1/embeddings", {"model": NAME, "input": "a", "dimensions": 100000}, 400, "invalid_value", "dimensions"),
]


class ForwardCounter:
    """Counts the forwards of a model (a pre-hook on its module) while the `with` block runs."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.calls = model, 0

    def __enter__(self):
        self._hook = self.model.register_forward_pre_hook(self._count)
        return self

    def _count(self, *args):
        self.calls += 1

    def __exit__(self, *exc):
        self._hook.remove()


WORK_COUNTERS = ("batches", "rows", "joined", "dropped", "abandoned")  # the worker's stats that count work


def idle_health(live: LiveServer) -> dict:
    """/health once no row is decoding (an earlier request's call may still be winding down)."""
    while (h := live.health())["running"] or h["queued"]:
        time.sleep(0.01)
    return h


@pytest.mark.parametrize(("path", "body", "status", "code", "param"), BAD_REQUESTS)
def test_bad_request_gets_openai_error_and_server_keeps_serving(server, dlm, path, body, status, code, param):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    before = idle_health(server)
    with ForwardCounter(server.app.state.worker.dlm.model) as forwards:
        r = httpx.post(server.url + path, **kw)
    after = server.health()
    # refused up front: never queued, never batched, not one forward of the model
    assert forwards.calls == 0 and after["queued"] == 0
    assert {k: after[k] for k in WORK_COUNTERS} == {k: before[k] for k in WORK_COUNTERS}
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code and err["param"] == param, err
    ok = httpx.post(f"{server.url}/v1/completions", json={"model": NAME, "prompt": "ab", "max_tokens": 4,
                                                          "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == greedy(dlm, "ab", 4).texts[0]


async def _post_all(url, bodies):
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=len(bodies))) as c:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*(c.post(f"{url}/v1/completions", json=b) for b in bodies))
        return rs, time.perf_counter() - t0


def test_concurrent_requests_are_batched_and_exact(server, dlm_dir, capsys):
    prompts = [f"Request {i}: {'abcdefghij'[i % 10] * (1 + i % 7)}" for i in range(100)]
    bodies = [{"model": NAME, "prompt": p, "max_tokens": 16, "temperature": 0} for p in prompts]
    with LiveServer(load(dlm_dir), max_batch=1) as one_at_a_time:
        asyncio.run(_post_all(one_at_a_time.url, bodies[:2]))  # warm-up, untimed
        with ForwardCounter(one_at_a_time.app.state.worker.dlm.model) as seq_forwards:
            seq, t_seq = asyncio.run(_post_all(one_at_a_time.url, bodies))
        assert one_at_a_time.health()["largest_batch"] == 1
    asyncio.run(_post_all(server.url, bodies[:2]))
    before = idle_health(server)
    with ForwardCounter(server.app.state.worker.dlm.model) as batched_forwards:
        batched, t_batched = asyncio.run(_post_all(server.url, bodies))
    after = server.health()

    assert all(r.status_code == 200 for r in seq + batched)
    singles = [r.json()["choices"][0]["text"] for r in seq]
    assert [r.json()["choices"][0]["text"] for r in batched] == singles  # none lost, none mixed up
    assert after["rows"] - before["rows"] == 100
    assert after["batches"] - before["batches"] < 10 and after["largest_batch"] > 10
    # one at a time, every forward serves one row; batched, one forward serves many rows
    row_calls = sum(r.json()["usage"]["model_calls"] for r in seq)
    assert seq_forwards.calls == row_calls
    assert batched_forwards.calls * 4 <= seq_forwards.calls  # >= 4 rows per forward on average
    with capsys.disabled():  # wall-clock figures are reported, not asserted: they depend on the machine
        print(f"\n100 requests x 16 tokens: one at a time {t_seq:.2f}s ({seq_forwards.calls} forwards), "
              f"batched {t_batched:.2f}s ({batched_forwards.calls} forwards), speedup {t_seq / t_batched:.1f}x "
              f"({after['batches'] - before['batches']} batches)")


def test_queue_limit_and_disconnected_clients_cost_nothing(dlm_dir, dlm):
    slow = load(dlm_dir)
    slow.model.register_forward_pre_hook(lambda *a: time.sleep(0.02))  # a model slow enough to queue behind
    long_body = {"model": NAME, "prompt": "ab", "max_tokens": 40, "temperature": 0, "threshold": 1.0}
    # a setting that cannot join the running call (plain rules of any setting would: see
    # test_a_request_of_another_plain_setting_joins_the_running_call), so it waits in the queue
    short_body = {"model": NAME, "prompt": "cd", "max_tokens": 4, "temperature": 0, "strategy": "lossless"}
    with LiveServer(slow, max_queue=1) as s:
        url = f"{s.url}/v1/completions"
        long = threading.Thread(target=httpx.post, args=(url,), kwargs={"json": long_body, "timeout": 60})
        long.start()
        while s.health()["running"] == 0:
            time.sleep(0.01)
        with pytest.raises(httpx.ReadTimeout):  # this client gives up while its request waits
            httpx.post(url, json=short_body, timeout=0.3)
        time.sleep(0.2)
        answers = []
        queued = threading.Thread(target=lambda: answers.append(httpx.post(url, json=short_body, timeout=60)))
        queued.start()
        while s.health()["queued"] == 0:
            time.sleep(0.01)
        full = httpx.post(url, json=short_body)
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        long.join()
        queued.join()
        assert answers[0].status_code == 200
        h = s.health()
        assert h["dropped"] == 1  # the abandoned request was never decoded
        assert h["rows"] == 2  # the long one and the one that waited

        # a streaming client that leaves mid-stream stops its batch at the next block
        whole = greedy(dlm, "ab", 200, threshold=1.0).stats[0].model_calls  # what the full answer costs
        with ForwardCounter(slow.model) as forwards:
            with httpx.stream("POST", url, json={**long_body, "max_tokens": 200, "stream": True}) as r:
                first = next(r.iter_lines())
                assert first.startswith("data: ") and json.loads(first[6:])["choices"][0]["text"]
            while s.health()["running"]:
                time.sleep(0.01)
        assert s.health()["abandoned"] == 1
        assert 0 < forwards.calls <= whole // 4, (forwards.calls, whole)  # stopped early, not decoded to the end


def test_request_arriving_mid_batch_joins_at_the_next_block(dlm_dir, dlm):
    slow = load(dlm_dir)
    slow.model.register_forward_pre_hook(lambda *a: time.sleep(0.02))  # >= 20 ms per engine step
    long_body = {"model": NAME, "prompt": "ab", "max_tokens": 60, "temperature": 0, "threshold": 1.0}
    short_body = {**long_body, "prompt": "Hello, wor", "max_tokens": 6}  # same settings: it may join
    answered = {}

    def post(name, body):
        r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60)
        answered[name] = (forwards.calls, r)  # how far the model had got when this answer came

    with LiveServer(slow) as s, ForwardCounter(slow.model) as forwards:
        long = threading.Thread(target=post, args=("long", long_body))
        long.start()
        while forwards.calls < 3:  # a few steps into the long request's call (60 steps of one token)
            time.sleep(0.01)
        post("short", short_body)
        long.join()
        h = s.health()
    # answered while the long call was still running: it did not wait for the running call to end
    assert answered["short"][0] < answered["long"][0]
    assert h["batches"] == 1 and h["joined"] == 1 and h["rows"] == 2 and h["largest_batch"] == 2
    for name, body in (("short", short_body), ("long", long_body)):
        r = answered[name][1]
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == greedy(dlm, body["prompt"], body["max_tokens"], threshold=1.0).texts[0]


def test_a_request_of_another_plain_setting_joins_the_running_call(dlm_dir, dlm):
    """Mixed settings share calls: a prefix request at another threshold joins a running threshold
    call at its next step (it used to wait for the whole call), and both answers are still the
    engine's own for their settings."""
    slow = load(dlm_dir)
    slow.model.register_forward_pre_hook(lambda *a: time.sleep(0.02))  # >= 20 ms per engine step
    long_body = {"model": NAME, "prompt": "ab", "max_tokens": 60, "temperature": 0, "threshold": 1.0}
    short_body = {"model": NAME, "prompt": "Hello, wor", "max_tokens": 6, "strategy": "prefix", "threshold": 0.3}
    answered = {}

    def post(name, body):
        r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60)
        answered[name] = (forwards.calls, r)

    with LiveServer(slow) as s, ForwardCounter(slow.model) as forwards:
        long = threading.Thread(target=post, args=("long", long_body))
        long.start()
        while forwards.calls < 3:
            time.sleep(0.01)
        post("short", short_body)
        long.join()
        h = s.health()
    assert answered["short"][0] < answered["long"][0]
    assert h["batches"] == 1 and h["joined"] == 1 and h["largest_batch"] == 2
    for name, body, kw in (("short", short_body, {"strategy": "prefix", "threshold": 0.3}),
                           ("long", long_body, {"threshold": 1.0})):
        assert answered[name][1].json()["choices"][0]["text"] == greedy(dlm, body["prompt"], body["max_tokens"],
                                                                         **kw).texts[0]


def test_cli_serve_wires_the_app(dlm_dir, monkeypatch):
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(app=app, host=host, port=port))
    port = free_port()
    assert main(["serve", str(dlm_dir), "--port", str(port), "--max-batch", "8"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == port
    assert seen["app"].state.worker.max_batch == 8
    assert main(["serve", str(dlm_dir), "--max-queue", "0"]) == 2
    assert main(["serve", str(dlm_dir / "missing")]) == 2


def test_worker_groups_equal_settings_oldest_first():
    async def scenario():
        greedy8 = DecodeOptions(**{**ENGINE_DEFAULTS, "block_size": 4, "threshold": 0.9})
        other = DecodeOptions(**{**ENGINE_DEFAULTS, "block_size": 4, "threshold": 0.5})
        worker = BatchingWorker(dlm=None, max_batch=3, max_queue=5)  # not started: we drive _next_batch
        jobs = [Job("generate", [[1]], greedy8), Job("generate", [[2]], other), Job("generate", [[3], [4]], greedy8),
                Job("generate", [[5]], greedy8), Job("embed", [[6]])]
        for job in jobs:
            worker.submit(job)
        with pytest.raises(QueueFull):
            worker.submit(Job("generate", [[7]], greedy8))
        jobs[3].cancel()
        worker.submit(Job("generate", [[8]], greedy8))  # the cancelled job freed its slot
        assert worker.stats["dropped"] == 1
        first = worker._next_batch()
        assert first == jobs[:1] + jobs[2:3]  # same settings, up to max_batch rows; other settings wait
        assert worker._next_batch() == [jobs[1]]
        assert worker._next_batch() == [jobs[4]]  # embeddings never mix with decoding
        assert worker._next_batch()[0].inputs == [[8]]

    asyncio.run(scenario())


def test_joins_wait_for_room_for_a_group_under_a_backlog():
    """Rows of other plain settings join a running call; when more wait than fit, they join once
    half the batch is free (a join step pads every running row to the joiners' prompts), and with
    room for everyone waiting they join at once."""
    async def scenario():
        plain = DecodeOptions(**{**ENGINE_DEFAULTS, "block_size": 4, "threshold": 0.9})
        other = DecodeOptions(**{**ENGINE_DEFAULTS, "block_size": 4, "strategy": "prefix", "threshold": 0.5})
        spec = DecodeOptions(**{**ENGINE_DEFAULTS, "block_size": 4, "strategy": "lossless"})
        worker = BatchingWorker(dlm=None, max_batch=8, max_queue=20)
        first = Job("generate", [[1]], plain)
        for i in range(6):
            worker.submit(Job("generate", [[i]], other))
        worker.stats["running"] = 7  # one row free, six waiting: not yet
        assert worker._joining(first, None) == [] and worker.queued == 6
        worker.stats["running"] = 4  # half free: a group of four joins, two wait
        assert len(worker._joining(first, None)) == 4 and worker.queued == 2
        worker.stats["running"] = 6  # room for all that wait: at once
        assert len(worker._joining(first, None)) == 2 and worker.queued == 0
        worker.submit(Job("generate", [[9]], spec))
        assert worker._joining(first, None) == []  # a speculative setting never joins a plain call

    asyncio.run(scenario())


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_oversize_requests_cost_no_memory(server):
    """The 21 GB request of the newcomer trial: block_size 20000 is refused before any tensor exists."""
    before = _rss_mb()
    for size in (20000, 100000):
        r = httpx.post(f"{server.url}/v1/completions", json={"model": NAME, "prompt": "Question: a",
                                                             "max_tokens": 4, "temperature": 0, "block_size": size})
        assert r.status_code == 400
    assert _rss_mb() - before < 50  # MB; the bound a request may take is its rows x the model's context


def test_greedy_only_strategies_and_openai_extras_work_without_the_client_knowing(server, dlm):
    for strategy in ("psd", "lossless", "soft"):  # no temperature: the resolved default is greedy
        r = httpx.post(f"{server.url}/v1/completions", json={"model": NAME, "prompt": "ab", "max_tokens": 4,
                                                             "strategy": strategy})
        assert r.status_code == 200, r.text
    r = httpx.post(f"{server.url}/v1/completions", json={"model": NAME, "prompt": "ab", "max_tokens": 4,
                                                         "echo": True, "seed": 3, "user": "u1"}).json()
    assert r["choices"][0]["text"] == "ab" + greedy(dlm, "ab", 4).texts[0]
    full = httpx.post(f"{server.url}/v1/embeddings", json={"model": NAME, "input": "a cat"}).json()
    short = httpx.post(f"{server.url}/v1/embeddings", json={"model": NAME, "input": "a cat", "dimensions": 8}).json()
    vec, cut = torch.tensor(full["data"][0]["embedding"]), torch.tensor(short["data"][0]["embedding"])
    assert cut.shape == (8,)
    torch.testing.assert_close(cut, torch.nn.functional.normalize(vec[:8], dim=0), atol=1e-5, rtol=0)


def test_model_alias_and_wino_on_a_shift_model(tiny_ar_dir, tmp_path):
    convert(tiny_ar_dir, tmp_path / "shifty", block_size=4, shift=True)
    dlm = load(tmp_path / "shifty")
    with LiveServer(dlm, aliases=("shifty",)) as srv:
        ok = httpx.post(f"{srv.url}/v1/completions", json={"model": "shifty", "prompt": "ab", "max_tokens": 2})
        assert ok.status_code == 200
        bad = httpx.post(f"{srv.url}/v1/completions", json={"model": NAME, "prompt": "ab", "strategy": "wino"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "strategy"
        # one-model verified drafting, batched with a second prompt, equals the Python API
        both = httpx.post(f"{srv.url}/v1/completions", json={"model": "shifty", "prompt": ["ab", "hello"],
                                                              "max_tokens": 7, "strategy": "verified"})
        assert both.status_code == 200, both.text
        want = dlm.generate(["ab", "hello"], max_new_tokens=7, strategy="verified").texts
        assert [c["text"] for c in sorted(both.json()["choices"], key=lambda c: c["index"])] == want



def test_serving_with_the_ar_parent_as_verifier(tiny_ar_dir, dlm_dir):
    """`edlm serve DLM --verifier AR`: answers are the parent's greedy text; decode options are refused."""
    ar = DiffusionLM.from_pretrained(tiny_ar_dir, autoregressive=True, device="cpu", dtype=torch.float32)
    with LiveServer(load(dlm_dir), verifier=ar) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": NAME, "prompt": "ab", "max_tokens": 6})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ar.generate("ab", max_new_tokens=6).texts[0]
        bad = httpx.post(f"{srv.url}/v1/completions", json={"model": NAME, "prompt": "ab", "threshold": 0.5})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "threshold"
