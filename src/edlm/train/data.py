"""Training data: local text/jsonl/parquet files or HF dataset dirs -> packed token sequences.

Goes through `datasets`, whose Arrow cache is memory-mapped, so corpora larger than RAM work.
Every example becomes input_ids + a `maskable` flag per token (False for prompt tokens of SFT
data); documents are joined with EOS and packed into sequences of exactly seq_len tokens, so no
compute is spent on padding. Prompt/response data that records the decoder's trajectory (`edlm
distill-data --trajectory`) also gets each token's decode time, `order` (trajectory masking).

Data with images (a VLM's: rows with an `images` list, or message parts of type image) is not
packed: a cut would split an image, and each image's features belong to one row. Each example
is one sequence, right-padded (`build_image_dataset`).
"""

from __future__ import annotations

import json
import logging
import mmap
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from edlm.errors import EdlmError, first_line

LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class DataFields:
    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"
    images: str = "images"
    trajectory: str = "trajectory"  # prompt/response data: each response token's decode time


def check_data_files(files: list[str]) -> list[Path]:
    """The --data paths, each existing and not empty (one line naming the first that is not)."""
    if not files:
        raise EdlmError("no data files given (--data)")
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.exists():
            raise EdlmError(f"data file not found: {p}")
        if p.is_file() and p.stat().st_size == 0:
            raise EdlmError(f"data file is empty: {p}")
    return paths


def load_raw(files: list[str]):
    """Load files with one loader (all files must share a format), or one saved HF dataset dir."""
    import datasets

    paths = check_data_files(files)
    if len(paths) == 1 and paths[0].is_dir():
        try:
            ds = datasets.load_from_disk(str(paths[0]))
        except Exception as exc:  # noqa: BLE001
            raise EdlmError(f"{paths[0]} is not a saved HF dataset: {first_line(exc)}") from None
        return ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    kinds = {LOADERS.get(p.suffix.lower()) for p in paths}
    if None in kinds or len(kinds) != 1:
        raise EdlmError(f"data files must all be one of {sorted(LOADERS)}, got {[p.name for p in paths]}")
    kind = kinds.pop()
    kwargs = {"sample_by": "paragraph"} if kind == "text" else {}
    log = logging.getLogger("datasets")  # its loaders log a failure before raising: we say it once, better
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        ds = datasets.load_dataset(kind, data_files=[str(p) for p in paths], split="train", **kwargs)
    except Exception as exc:  # noqa: BLE001
        found = diagnose(paths, kind)
        raise EdlmError(f"cannot read data files: {found}" if found else
                        f"cannot read {', '.join(map(str, paths))}: {_deepest(exc)}") from None
    finally:
        log.setLevel(level)
    if len(ds) == 0:
        raise EdlmError(f"data is empty: {', '.join(map(str, paths))}")
    return ds


def _deepest(exc: BaseException) -> str:
    """The most specific message in an exception chain (datasets wraps the real cause)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return first_line(exc)


def diagnose(paths: list[Path], kind: str) -> str | None:
    """Why a data file cannot be read, naming file and line: encoding, JSON syntax, a field whose
    type changes between rows. None when nothing is found (the caller falls back to the library's)."""
    for path in paths:
        if kind == "parquet":
            continue
        if kind == "json" and path.suffix.lower() == ".json":
            try:
                json.loads(path.read_bytes())
                continue  # one JSON document (an array of rows): fine as a whole
            except (ValueError, UnicodeDecodeError):
                pass  # else read as JSON lines below
        first_type: dict[str, tuple[str, int]] = {}
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return f"{path}, line {lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})"
                if kind != "json" or not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    return f"{path}, line {lineno}: invalid JSON ({getattr(exc, 'msg', exc)}, column {getattr(exc, 'colno', '?')})"
                if not isinstance(row, dict):
                    return f"{path}, line {lineno}: expected a JSON object per line, got {_json_type(row)}"
                for key, value in row.items():
                    if value is None:
                        continue
                    seen = first_type.setdefault(key, (_json_type(value), lineno))
                    if seen[0] != _json_type(value):
                        return (f"{path}, line {lineno}: field '{key}' is {_json_type(value)} here but "
                                f"{seen[0]} on line {seen[1]}")
    return None


def _json_type(value) -> str:
    return {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The text that asks a chat model for its next turn: the tokenizer's chat template, or, without
    one, plain "role: content" lines and "assistant:". Training (`messages` data) and serving share it."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _is_string(feature) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _is_number(feature) -> bool:
    return str(getattr(feature, "dtype", "")).startswith(("float", "int", "uint", "null"))


def _check_types(raw, kind: str, fields: DataFields, where: str) -> None:
    """Every column the format reads must hold strings (messages: role/content objects); names the row.
    String columns (the usual case) are accepted from their Arrow type without a pass over the data."""
    if kind == "sft" and fields.trajectory in raw.column_names:
        feature = raw.features[fields.trajectory]
        if not (_is_number(getattr(feature, "feature", None)) or getattr(feature, "dtype", None) == "null"):
            raise EdlmError(f"{where}: field '{fields.trajectory}' must be a list of decode times (numbers in "
                            f"(0, 1], as edlm distill-data --trajectory writes), got {feature}")
    wanted = {"text": [fields.text], "sft": [fields.prompt, fields.response], "chat": [fields.messages]}[kind]
    for name in wanted:
        feature = raw.features[name]
        if kind != "chat" and _is_string(feature):
            if kind == "text" or raw.data.column(name).null_count == 0:
                continue
        inner = getattr(feature, "feature", None)
        if kind == "chat" and isinstance(inner, dict) and all(_is_string(inner.get(k)) for k in ("role", "content")):
            continue
        for i, value in enumerate(raw[name]):
            if kind == "chat":
                ok = isinstance(value, list) and bool(value) and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in value)
                expected = "a non-empty list of {'role': str, 'content': str} messages"
            else:
                ok = isinstance(value, str) or (kind == "text" and value is None)
                expected = "a string"
            if not ok:
                raise EdlmError(f"{where}, row {i + 1}: field '{name}' must be {expected}, got {value!r:.60}")


def detect_format(columns: list[str], fields: DataFields) -> str:
    """The data's format from its columns. A field name the user set (not the default) must be
    there: otherwise another format's columns would be trained on without a word."""
    defaults, chosen = DataFields(), []
    for name in ("text", "prompt", "response", "messages", "trajectory"):
        value = getattr(fields, name)
        if value != getattr(defaults, name):
            if value not in columns:
                raise EdlmError(f"--{name}-field {value!r}: the data has no such field (fields present: "
                                f"{', '.join(columns)})")
            chosen.append(name)
    if "text" in chosen and not {"prompt", "response", "messages"} & set(chosen):
        return "text"
    if "messages" in chosen and not {"prompt", "response"} & set(chosen):
        return "chat"
    if fields.prompt in columns and fields.response in columns:
        return "sft"
    if fields.messages in columns:
        return "chat"
    if fields.text in columns:
        return "text"
    raise EdlmError(
        f"data has columns {columns}; expected '{fields.text}', or '{fields.prompt}'+'{fields.response}', "
        f"or '{fields.messages}' (set --text-field / --prompt-field / --response-field / --messages-field)"
    )


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    """The BOS a tokenizer that adds one puts first (our encoding adds no special tokens itself)."""
    return [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and \
        tokenizer.bos_token_id is not None else []


def tokenize_examples(batch, tokenizer, kind: str, fields: DataFields):
    """input_ids and maskable per example; prompt/response data with a trajectory field also `order`,
    each token's decode time (-1: a prompt token, or unknown)."""
    eos = tokenizer.eos_token_id
    bos = _bos(tokenizer)
    timed = kind == "sft" and fields.trajectory in batch
    ids_out, mask_out, order_out = [], [], []
    n = len(next(iter(batch.values())))
    for i in range(n):
        if kind == "text":
            text = batch[fields.text][i]
            if not text or not text.strip():
                continue
            ids = bos + _encode(tokenizer, text) + [eos]
            maskable = [True] * len(ids)
        else:
            if kind == "sft":
                prompt, response = batch[fields.prompt][i], batch[fields.response][i]
            else:
                messages = batch[fields.messages][i]
                prompt = chat_prompt(tokenizer, messages[:-1])
                response = messages[-1]["content"]
            p_ids = bos + _encode(tokenizer, prompt)
            r_ids = _encode(tokenizer, response) + [eos]
            ids = p_ids + r_ids
            maskable = [False] * len(p_ids) + [True] * len(r_ids)
            if timed:
                order_out.append([-1.0] * len(p_ids) + response_order(batch[fields.trajectory][i], len(r_ids)))
        ids_out.append(ids)
        mask_out.append(maskable)
    return {"input_ids": ids_out, "maskable": mask_out, **({"order": order_out} if timed else {})}


def response_order(trajectory: list | None, n: int) -> list[float]:
    """The decode times of a response's n tokens, its final EOS included. The decoder's trajectory has
    one more time for an EOS it generated, none when the budget ended the answer (its EOS unknown).
    A trajectory of another length did not survive re-tokenisation (these tokens are not the
    decoder's): unknown throughout. Unknown (-1), and times outside (0, 1], take trajectory
    masking's fallback, position masking."""
    if trajectory is not None and len(trajectory) == n - 1:
        trajectory = [*trajectory, -1.0]
    if trajectory is None or len(trajectory) != n:
        return [-1.0] * n
    return [float(u) if u is not None and 0.0 < u <= 1.0 else -1.0 for u in trajectory]


def pack(batch, seq_len: int):
    """Concatenate examples and cut into seq_len chunks (the remainder is dropped); every column is
    per token (input_ids, maskable, and order where the data has decode times) and cut alike."""
    out = {}
    for name, rows in batch.items():
        flat = [x for row in rows for x in row]
        n = (len(flat) // seq_len) * seq_len
        out[name] = [flat[i : i + seq_len] for i in range(0, n, seq_len)]
    return out


def build_dataset(files: list[str], tokenizer, seq_len: int, fields: DataFields | None = None,
                  num_proc: int | None = None, model=None):
    """Packed dataset with columns input_ids [seq_len] and maskable [seq_len] (torch format), and
    order [seq_len] float where prompt/response data has a trajectory field (tokenize_examples).
    Data with images: `build_image_dataset` (`model`: the VLM being trained, which says how many
    tokens an image becomes)."""
    fields = fields or DataFields()
    if any(_mentions_images(Path(f), fields) for f in files):
        return build_image_dataset(files, tokenizer, seq_len, fields, model)
    raw = load_raw(files)
    if fields.images in raw.column_names:
        return build_image_dataset(files, tokenizer, seq_len, fields, model)
    kind = detect_format(raw.column_names, fields)
    _check_types(raw, kind, fields, ", ".join(files))
    tokenized = raw.map(
        tokenize_examples, batched=True, remove_columns=raw.column_names, num_proc=num_proc,
        fn_kwargs={"tokenizer": tokenizer, "kind": kind, "fields": fields}, desc="tokenizing",
    )
    packed = tokenized.map(pack, batched=True, batch_size=1000, fn_kwargs={"seq_len": seq_len}, desc="packing")
    if len(packed) == 0:
        raise EdlmError(f"data holds fewer than --seq-len={seq_len} tokens: nothing to train on")
    return packed.with_format("torch")


# ---------------------------------------------------------------- data with images
def _mentions_images(path: Path, fields: DataFields) -> bool:
    """A JSON (lines) file whose rows carry an images field or an image message part. Searched as
    bytes (memory-mapped: any size), as a row's key: text that merely says "images" is no match."""
    if not path.is_file() or path.suffix.lower() not in (".jsonl", ".json") or path.stat().st_size == 0:
        return False
    key = re.escape(json.dumps(fields.images).encode())
    pattern = re.compile(key + rb'\s*:|"type"\s*:\s*"image(?:_url)?"')
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return pattern.search(data) is not None


def _json_rows(path: Path) -> list:
    """The rows of a .json (one array) or JSON-lines file, read with json itself: VLM chat rows mix
    string and list message contents, which one Arrow type cannot hold."""
    text = path.read_bytes()
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError):
            doc = None  # JSON lines in a .json file
        if isinstance(doc, list):
            return doc
    rows = []
    try:
        for line in text.decode("utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line))
    except (ValueError, UnicodeDecodeError):
        raise EdlmError(f"cannot read data files: {diagnose([path], 'json') or path}") from None
    return rows


def _rows_of(path: Path, fields: DataFields) -> list:
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        rows = _json_rows(path)
    else:
        rows = load_raw([str(path)]).to_list()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise EdlmError(f"{path}, row {i + 1}: expected a JSON object per row, got {_json_type(row)}")
    return rows


class _Images:
    """What the data needs from the model being trained: its image token and placeholder, and how
    many tokens each image becomes (each image file is read once)."""

    def __init__(self, model, tokenizer):
        from edlm import vision

        self.vision, self.model = vision, model
        self.vlm = model is not None and vision.is_vlm(model.config)
        if self.vlm:
            self.processor = getattr(model, "edlm_image_processor", None)
            self.token = vision.image_token_id(model.config)
            self.token_text = tokenizer.convert_ids_to_tokens(self.token)
            self.placeholder = vision.placeholder_text(tokenizer, model.config)
        self.counts: dict[str, int] = {}
        self.memo: dict = {}

    def count(self, source: str, what: str) -> int:
        if source not in self.counts:
            image = self.vision.load_image(source, what)
            processed = self.vision.processed(self.model, self.processor, [image])
            self.counts[source] = self.vision.image_token_count(self.model, processed, 0, self.memo)
        return self.counts[source]


def _resolve(source, base: Path, where: str) -> str:
    if not isinstance(source, str) or not source:
        raise EdlmError(f"{where}: an image must be a file path or a data URL, got {source!r:.60}")
    if source.startswith(("data:", "http://", "https://")):
        return source  # a data URL is read as is; a URL gets load_image's one line
    path = Path(source).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _image_example(row: dict, where: str, base: Path, tokenizer, kind: str, fields: DataFields, img: _Images,
                   seq_len: int) -> dict:
    """One row as one sequence: the images' placeholders expanded to their image tokens (prompt only,
    never maskable), the response maskable, padding to seq_len (`length`: the example's own tokens)."""
    images = row.get(fields.images)
    images = [] if images is None else images
    if not isinstance(images, list):
        raise EdlmError(f"{where}: field '{fields.images}' must be a list of image paths, got {images!r:.60}")
    placeholder = img.placeholder if img.vlm else "<image>"
    parts = []
    if kind == "chat":
        messages = row.get(fields.messages)
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, list))
                for m in messages)):
            raise EdlmError(f"{where}: field '{fields.messages}' must be a non-empty list of {{'role': str, "
                            f"'content': str or a list of parts}} messages, got {messages!r:.60}")
        try:
            messages, parts = img.vision.flatten_image_parts(messages, placeholder)
        except EdlmError as exc:
            raise EdlmError(f"{where}: {exc}") from None
        named = [p for p in parts if p is not None]
        if named and (images or len(named) != len(parts)):
            raise EdlmError(f"{where}: give the images either in '{fields.images}' or in every image part, "
                            "not both")
        images = named or images
    elif kind == "sft":
        prompt, response = row.get(fields.prompt), row.get(fields.response)
        for name, value in ((fields.prompt, prompt), (fields.response, response)):
            if not isinstance(value, str):
                raise EdlmError(f"{where}: field '{name}' must be a string, got {value!r:.60}")
    elif images:
        raise EdlmError(f"{where}: images go with prompt/response or messages rows, not plain "
                        f"'{fields.text}' rows")
    if (images or (kind == "chat" and parts)) and not img.vlm:
        if img.model is None:
            raise EdlmError(f"{where}: data with images needs the model being trained (build_dataset(model=))")
        raise EdlmError(f"{where}: the row has images, but the model is a text-only LM (train a converted "
                        "vision-language model)")
    if images and img.processor is None:
        raise EdlmError(f"{where}: the model has no image processor (preprocessor_config.json): copy it from "
                        "the base VLM")
    if kind == "chat":
        if images and not any(img.token_text in m["content"] for m in messages):
            # no placeholder anywhere: the images open the first user turn (as encode puts them first)
            at = next((i for i, m in enumerate(messages[:-1]) if m["role"] == "user"), 0)
            messages = [*messages]
            messages[at] = {**messages[at], "content": placeholder * len(images) + messages[at]["content"]}
        prompt, response = chat_prompt(tokenizer, messages[:-1]), messages[-1]["content"]
    elif kind == "sft" and images:
        prompt = img.vision.with_placeholders(prompt, len(images), tokenizer, img.model.config)
    if kind == "text":
        text = row.get(fields.text)
        if not isinstance(text, str):
            raise EdlmError(f"{where}: field '{fields.text}' must be a string, got {text!r:.60}")
        p_ids, r_ids = [], _encode(tokenizer, text) + [tokenizer.eos_token_id]
    else:
        p_ids, r_ids = _bos(tokenizer) + _encode(tokenizer, prompt), _encode(tokenizer, response) + [tokenizer.eos_token_id]
    if img.vlm and img.token in r_ids:
        raise EdlmError(f"{where}: an image in the response (the last message): images sit in the prompt only")
    holes = p_ids.count(img.token) if img.vlm else 0
    if holes != len(images):
        raise EdlmError(f"{where}: the prompt has {holes} image placeholders but {len(images)} images are given")
    sources = [_resolve(s, base, where) for s in images]
    counts = [img.count(source, f"{where}: image {k + 1}") for k, source in enumerate(sources)]
    ids = img.vision.expand_placeholders(p_ids, img.token, counts) if img.vlm else p_ids
    n_prompt = len(ids)
    ids = ids + r_ids
    if len(ids) > seq_len:
        n_image = sum(counts)
        raise EdlmError(f"{where}: {len(ids)} tokens ({n_image} of them image tokens) exceed --seq-len {seq_len}: "
                        "raise --seq-len, or shorten or drop the row")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"input_ids": ids + [pad] * (seq_len - len(ids)),
            "maskable": [False] * n_prompt + [True] * len(r_ids) + [False] * (seq_len - len(ids)),
            "length": len(ids), "images": sources}


def build_image_dataset(files: list[str], tokenizer, seq_len: int, fields: DataFields, model=None):
    """Data with images: one example per sequence (never packed: a cut would split an image), each
    right-padded to seq_len with pad tokens that are not maskable. Columns input_ids, maskable,
    length (the example's tokens; the rest is padding) and images (each row's image files, resolved
    against its data file's folder, or data URLs), read per batch (edlm.vision.training_vision).

    Rows: {"images": [...], "prompt": ..., "response": ...} or {"images": [...], "messages": [...]}
    (message contents a string or a list of text/image parts; image parts may name their image
    instead). A prompt naming no placeholder gets its images at its start (chat: the first user
    turn's). Every image is read once here: a missing file, a placeholder count that differs from
    the images, images for a text-only model or an example longer than seq_len is one line naming
    the file and row. Rows without images (text) are single padded sequences too."""
    import datasets

    paths = check_data_files(files)
    img = _Images(model, tokenizer)
    out: dict[str, list] = {"input_ids": [], "maskable": [], "length": [], "images": []}
    for path in paths:
        rows = _rows_of(path, fields)
        if not rows:
            raise EdlmError(f"data is empty: {path}")
        kind = detect_format(sorted({k for r in rows for k in r if k != fields.images}), fields)
        base = path if path.is_dir() else path.parent
        for i, row in enumerate(rows):
            example = _image_example(row, f"{path}, row {i + 1}", base, tokenizer, kind, fields, img, seq_len)
            for k, v in example.items():
                out[k].append(v)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64")),
                                  "maskable": datasets.Sequence(datasets.Value("bool")),
                                  "length": datasets.Value("int64"),
                                  "images": datasets.Sequence(datasets.Value("string"))})
    return datasets.Dataset.from_dict(out, features=features).with_format("torch")


def end_blocks_with_eos(input_ids, maskable, length, block_size: int, eos: int):
    """A padded example's last block completed with EOS tokens, maskable: the model learns to end
    a block after its answer (decoding fills the block that holds EOS, then stops), and the
    non-maskable padding starts at a block boundary, where no token of the example sees it (block-
    causal clean stream; a noisy block sees only itself and earlier clean blocks). Per step: a block
    schedule changes where blocks end."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    end = (length + block_size - 1) // block_size * block_size
    tail = (pos >= length[:, None]) & (pos < end[:, None])
    return torch.where(tail, torch.full_like(input_ids, eos), input_ids), maskable.bool() | tail


def to_device(batch: dict, device) -> dict:
    """A batch of dataset rows on `device` (tensors moved; a list column, such as images, as is)."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
