"""Training data: local text/jsonl/parquet files or HF dataset dirs -> packed token sequences.

Goes through `datasets`, whose Arrow cache is memory-mapped, so corpora larger than RAM work.
Every example becomes input_ids + a `maskable` flag per token (False for prompt tokens of SFT
data); documents are joined with EOS and packed into sequences of exactly seq_len tokens, so no
compute is spent on padding.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from edlm.errors import EdlmError, first_line

LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class DataFields:
    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"


def load_raw(files: list[str]):
    """Load files with one loader (all files must share a format), or one saved HF dataset dir."""
    import datasets

    if not files:
        raise EdlmError("no data files given (--data)")
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.exists():
            raise EdlmError(f"data file not found: {p}")
        if p.is_file() and p.stat().st_size == 0:
            raise EdlmError(f"data file is empty: {p}")
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


def _check_types(raw, kind: str, fields: DataFields, where: str) -> None:
    """Every column the format reads must hold strings (messages: role/content objects); names the row.
    String columns (the usual case) are accepted from their Arrow type without a pass over the data."""
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
    for name in ("text", "prompt", "response", "messages"):
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


def tokenize_examples(batch, tokenizer, kind: str, fields: DataFields):
    eos = tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
    ids_out, mask_out = [], []
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
        ids_out.append(ids)
        mask_out.append(maskable)
    return {"input_ids": ids_out, "maskable": mask_out}


def pack(batch, seq_len: int):
    """Concatenate examples and cut into seq_len chunks (the remainder is dropped)."""
    ids = [t for row in batch["input_ids"] for t in row]
    msk = [m for row in batch["maskable"] for m in row]
    n = (len(ids) // seq_len) * seq_len
    return {
        "input_ids": [ids[i : i + seq_len] for i in range(0, n, seq_len)],
        "maskable": [msk[i : i + seq_len] for i in range(0, n, seq_len)],
    }


def build_dataset(files: list[str], tokenizer, seq_len: int, fields: DataFields | None = None,
                  num_proc: int | None = None):
    """Packed dataset with columns input_ids [seq_len] and maskable [seq_len] (torch format)."""
    fields = fields or DataFields()
    raw = load_raw(files)
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
