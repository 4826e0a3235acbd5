"""Images through `edlm serve` and `edlm generate --image`, on tiny random VLMs of both families:
answers equal the Python API's, image requests batch with others, bad images are 400s (one-line
CLI errors), remote URLs are fetched only when the server allows it (from 127.0.0.1 here)."""

import asyncio
import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from test_serve import NAME, LiveServer, load  # noqa: E402

from edlm import vision  # noqa: E402
from edlm.cli import main  # noqa: E402
from edlm.serve.app import render_chat  # noqa: E402
from edlm.testing import VLM_ARCHITECTURES, make_tiny_vlm  # noqa: E402
from edlm.train.convert import convert_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
# plain colours: the tiny random towers tell these apart (random-noise images all look alike to them)
SMALL = Image.new("RGB", (56, 84), (250, 0, 0))  # Qwen2-VL: 6 image tokens; LLaVA: 5 for any size
LARGE = Image.new("RGB", (112, 112), (0, 0, 0))  # Qwen2-VL: 16 image tokens
LARGE.paste((250, 250, 0), (0, 0, 56, 112))
N = 8  # new tokens per answer: two blocks of 4


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image_or_bytes, mime="image/png") -> str:
    raw = image_or_bytes if isinstance(image_or_bytes, bytes) else png(image_or_bytes)
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def image_part(url: str, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}]


@pytest.fixture(scope="module", params=VLM_ARCHITECTURES)
def vlm_dir(request, tmp_path_factory):
    """A converted tiny VLM checkpoint (processor saved with it; a chat template on its tokenizer)."""
    model, tok, processor = make_tiny_vlm(request.param)
    tok.chat_template = TEMPLATE
    model.edlm_image_processor = processor
    out = tmp_path_factory.mktemp(f"vlm_{request.param}") / "dlm"
    convert_model(model, tok, block_size=4).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ref(vlm_dir):
    """The in-process reference (the server gets its own copy), loaded as a user loads it."""
    dlm = load(vlm_dir)
    assert dlm.image_processor is not None  # save_pretrained wrote it, from_pretrained read it back
    return dlm


@pytest.fixture(scope="module")
def server(vlm_dir):
    with LiveServer(load(vlm_dir)) as s:
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def chat_ref(dlm, messages, images, max_tokens=N, **kw):
    """What the Python API answers for the chat the server renders: the image parts flattened to
    the model's placeholder, the template applied, the images given to generate."""
    flat, _ = vision.flatten_image_parts(messages, vision.placeholder_text(dlm.tokenizer, dlm.inner_model.config))
    ids = render_chat(dlm.tokenizer, flat)
    return dlm.generate(ids, images=images, max_new_tokens=max_tokens, temperature=0.0, **kw), ids


def chat(url: str, messages, max_tokens=N, **fields) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"model": NAME, "messages": messages,
                                                          "max_tokens": max_tokens, "temperature": 0, **fields},
                      timeout=60)


def answer(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


# ------------------------------------------------------------------ answers equal the Python API's
def test_image_chat_equals_python_api(client, ref):
    messages = user("look ", image_part(data_url(SMALL)), " what is it?")
    want, ids = chat_ref(ref, messages, [SMALL])
    other, _ = chat_ref(ref, messages, [LARGE])
    assert want.texts[0] != other.texts[0]  # the image decides the answer: an ignored image would show
    res = client.chat.completions.create(model=NAME, messages=messages, max_tokens=N, temperature=0)
    assert res.choices[0].message.content == want.texts[0]
    assert res.choices[0].finish_reason == want.finish_reasons[0]
    expanded = vision.encode(ref, ids, [SMALL])  # placeholders: one token per image feature
    assert res.usage.prompt_tokens == len(expanded) > len(ids)
    assert res.usage.completion_tokens == len(want.token_ids[0])

    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=N, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.texts[0]

    # two images, the second given as JPEG; "auto" detail is OpenAI's default and changes nothing
    jpeg = io.BytesIO()
    LARGE.save(jpeg, format="JPEG")
    messages = user(image_part(data_url(SMALL), detail="auto"), "and",
                    image_part(data_url(jpeg.getvalue(), "image/jpeg")), "?")
    want, _ = chat_ref(ref, messages, [SMALL, jpeg.getvalue()])
    res = client.chat.completions.create(model=NAME, messages=messages, max_tokens=N, temperature=0)
    assert res.choices[0].message.content == want.texts[0]


async def _post_chats(url, bodies):
    async with httpx.AsyncClient(timeout=120) as c:
        return await asyncio.gather(*(c.post(f"{url}/v1/chat/completions", json=b) for b in bodies))


def test_concurrent_image_requests_batch_and_each_equals_its_solo_answer(vlm_dir, ref):
    slow = load(vlm_dir)
    slow.model.register_forward_pre_hook(lambda *a: time.sleep(0.02))  # so the requests overlap
    convos = [(user("small ", image_part(data_url(SMALL)), " please"), [SMALL]),
              (user(image_part(data_url(LARGE)), "a longer question about the large one"), [LARGE]),
              ([{"role": "user", "content": "no image at all"}], None)]  # a text row in the same call
    want = [chat_ref(ref, m, imgs, threshold=1.0)[0].texts[0] for m, imgs in convos]
    bodies = [{"model": NAME, "messages": m, "max_tokens": N, "temperature": 0, "threshold": 1.0} for m, _ in convos]
    with LiveServer(slow) as s:
        rs = asyncio.run(_post_chats(s.url, bodies))
        h = s.health()
    assert [answer(r) for r in rs] == want
    assert h["rows"] == 3 and h["largest_batch"] >= 2  # decoded together, not one after the other


# ------------------------------------------------------------------ bad images: 400, then serving on
def _mono(width, height) -> bytes:
    return png(Image.new("1", (width, height)))  # a few KiB of PNG, 16.8 M pixels decoded


BAD = [  # (what was sent, content parts, a word the message must hold)
    ("not an image", lambda: [image_part(data_url(b"hello, not a picture"))], "not an image"),
    ("malformed base64", lambda: [image_part("data:image/png;base64,@@not base64@@")], "malformed"),
    ("not an image data URL", lambda: [image_part("data:text/plain;base64,aGk=")], "data:image/"),
    ("too many pixels", lambda: [image_part(data_url(_mono(4100, 4100)))], "too large"),
    ("too many images", lambda: [image_part(data_url(SMALL))] * (vision.MAX_IMAGES + 1), f"at most {vision.MAX_IMAGES}"),
    ("a path on the server", lambda: [image_part("/etc/hostname")], "data URL"),
    ("a file URL", lambda: [image_part("file:///etc/hostname")], "data URL"),
    ("detail low", lambda: [image_part(data_url(SMALL), detail="low")], "detail"),
    ("no url", lambda: [{"type": "image_url", "image_url": {}}], "url"),
    ("an unknown part type", lambda: [{"type": "input_audio", "input_audio": {}}], "messages"),
]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # "too many pixels": refused all the same
@pytest.mark.parametrize(("what", "parts", "word"), BAD, ids=[b[0] for b in BAD])
def test_bad_image_is_400_and_the_server_keeps_serving(server, ref, what, parts, word):
    before = server.health()
    r = chat(server.url, user(*parts(), "hi"))
    assert r.status_code == 400, (what, r.text)
    err = r.json()["error"]
    assert err["param"] == "messages" and err["code"] == "invalid_value" and word in err["message"], err
    assert server.health()["rows"] == before["rows"]  # refused before the batcher: nothing decoded
    ok = user(image_part(data_url(SMALL)), "hi")
    assert answer(chat(server.url, ok, 4)) == chat_ref(ref, ok, [SMALL], 4)[0].texts[0]


def test_placeholders_typed_as_text_are_refused(server, ref):
    token = ref.tokenizer.convert_ids_to_tokens(vision.image_token_id(ref.inner_model.config))
    r = chat(server.url, [{"role": "user", "content": f"hi {token} there"}])  # an image token, no image
    assert r.status_code == 400 and "image token" in r.json()["error"]["message"], r.text
    r = chat(server.url, user(f"two {token}", image_part(data_url(SMALL))))  # two placeholders, one image
    assert r.status_code == 400 and "placeholders" in r.json()["error"]["message"], r.text
    assert answer(chat(server.url, user(image_part(data_url(SMALL)), "ok"), 4))


def test_an_image_the_processor_refuses_is_400_not_500(server, ref):
    """Qwen2-VL's processor raises ValueError on an aspect ratio over 200 (a user's image, not a bug)."""
    r = chat(server.url, user(image_part(data_url(Image.new("RGB", (1, 400)))), "hi"), 4)
    if vision.uses_mrope(ref.inner_model):
        assert r.status_code == 400 and "image processor" in r.json()["error"]["message"], r.text
    else:  # LLaVA's CLIP processor resizes and crops any shape
        assert r.status_code == 200, r.text
    assert answer(chat(server.url, user(image_part(data_url(SMALL)), "ok"), 4))


def test_text_only_model_refuses_images(tiny_dlm_dir):
    with LiveServer(load(tiny_dlm_dir)) as s:
        r = chat(s.url, user("hi", image_part(data_url(SMALL))))
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages" and "text-only" in err["message"]
        assert answer(chat(s.url, user("hi"), 4)) is not None  # text parts still work


# ------------------------------------------------------------------ remote URLs
class _Images(BaseHTTPRequestHandler):
    files: dict = {}
    hits: list = []

    def do_GET(self):
        self.hits.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if self.path != "/no-length":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    """An HTTP server on 127.0.0.1 only, serving a few images from memory."""
    _Images.files = {"/small.png": png(SMALL), "/big.png": b"\0" * 5000, "/no-length": b"\0" * 5000}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_remote_image_refused_by_default_and_fetched_with_the_flag(server, vlm_dir, ref, image_host, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # 127.0.0.1 directly, never through a proxy
    _Images.hits.clear()
    messages = user(image_part(f"{image_host}/small.png"), "what is it?")
    r = chat(server.url, messages)
    assert r.status_code == 400 and "--allow-remote-images" in r.json()["error"]["message"], r.text
    assert _Images.hits == []  # not even fetched

    with LiveServer(load(vlm_dir), allow_remote_images=True) as s:
        want, _ = chat_ref(ref, messages, [SMALL])
        assert answer(chat(s.url, messages)) == want.texts[0]
        assert _Images.hits == ["/small.png"]
        r = chat(s.url, user(image_part(f"{image_host}/missing.png"), "?"))
        assert r.status_code == 400 and "HTTP 404" in r.json()["error"]["message"], r.text
        with monkeypatch.context() as m:
            m.setattr(vision, "MAX_IMAGE_BYTES", 4096)
            for path in ("/big.png", "/no-length"):  # refused from Content-Length, and while reading
                r = chat(s.url, user(image_part(f"{image_host}{path}"), "?"))
                assert r.status_code == 400 and "4096 bytes" in r.json()["error"]["message"], r.text
        assert _Images.hits == ["/small.png", "/missing.png", "/big.png", "/no-length"]
        assert answer(chat(s.url, messages)) == want.texts[0]  # still serving


# ------------------------------------------------------------------ edlm generate --image
def _generate_json(capsys, argv) -> dict:
    code = main(["generate", *map(str, argv), "--max-new-tokens", str(N), "--temperature", "0", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def test_cli_image_equals_python_api(vlm_dir, ref, tmp_path, capsys):
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    SMALL.save(small)
    LARGE.save(large)
    got = _generate_json(capsys, [vlm_dir, "--prompt", "describe", "--image", small])
    want = ref.generate("describe", images=[SMALL], max_new_tokens=N, temperature=0.0)
    assert got["text"] == want.texts[0] and got["token_ids"] == want.token_ids[0]
    assert got["text"] != ref.generate("describe", images=[LARGE], max_new_tokens=N, temperature=0.0).texts[0]

    got = _generate_json(capsys, [vlm_dir, "--prompt", "compare", "--image", small, "--image", large])
    assert got["text"] == ref.generate("compare", images=[SMALL, LARGE], max_new_tokens=N, temperature=0.0).texts[0]

    # --chat: the images open the user turn, rendered as the server renders image_url parts
    got = _generate_json(capsys, [vlm_dir, "--prompt", "compare", "--chat", "--image", small, "--image", large])
    messages = user(image_part(data_url(SMALL)), image_part(data_url(LARGE)), "compare")
    assert got["text"] == chat_ref(ref, messages, [SMALL, LARGE])[0].texts[0]


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_images")
    SMALL.save(root / "ok.png")
    (root / "notes.txt").write_text("not an image")
    return root


CLI_BAD = [  # (what was tried, extra argv, model: "vlm" or "text", a word the message must hold)
    ("a text file as --image", ["--image", "{root}/notes.txt"], "vlm", "not an image"),
    ("a missing --image", ["--image", "{root}/nope.png"], "vlm", "not found"),
    ("an http URL as --image", ["--image", "http://127.0.0.1:9/x.png"], "vlm", "remote image URLs"),
    ("too many --image", ["--image", "{root}/ok.png"] * (vision.MAX_IMAGES + 1), "vlm", f"at most {vision.MAX_IMAGES}"),
    ("--image on a text-only model", ["--image", "{root}/ok.png"], "text", "text-only"),
]


@pytest.mark.parametrize(("what", "extra", "model", "word"), CLI_BAD, ids=[c[0] for c in CLI_BAD])
def test_cli_bad_image_is_one_line_exit_2_before_loading(vlm_dir, tiny_dlm_dir, cli_files, capsys, monkeypatch,
                                                         what, extra, model, word):
    from edlm.model import DiffusionLM

    def loading(*a, **k):
        raise AssertionError(f"{what}: the model was loaded before the images were checked")

    monkeypatch.setattr(DiffusionLM, "from_pretrained", loading)
    path = vlm_dir if model == "vlm" else tiny_dlm_dir
    code = main(["generate", str(path), "--prompt", "hi", *[a.format(root=cli_files) for a in extra]])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert word in lines[0], lines[0]


def test_cli_image_help(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--image PATH" in text and "repeatable" in text


def test_pil_images_keep_their_pixels_through_a_data_url():
    """The data URLs above decode to the very pixels the references use (PNG is lossless)."""
    back = vision.load_image(data_url(SMALL))
    assert back.size == SMALL.size and back.tobytes() == SMALL.tobytes()
