"""Self-generated training data: a model's own answers to a prompt set, as `edlm train` reads them.

Training for parallelism (distillation, on-policy drafting) and a drafting adapter learn best from
the text the model itself writes (DMax, dParallel, d3LLM all train on the model's own answers), so
this decodes prompts with a model and writes jsonl rows {"prompt", "response"} that `edlm train`
treats as SFT data (prompt tokens never masked nor scored). Batched; resumable: rows already in
OUT are kept and their prompts skipped, each batch is appended and flushed as it finishes.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from edlm.errors import EdlmError
from edlm.files import check_output_target


def read_prompts(path: str | Path, field: str = "prompt") -> list[str]:
    """Prompts of a .jsonl (one object a line, its `field`) or a .txt (one prompt a line)."""
    path = Path(path)
    if not path.is_file():
        raise EdlmError(f"prompt file not found: {path}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return [line.replace("\\n", "\n") for line in lines]
    prompts = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EdlmError(f"{path}:{i}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise EdlmError(f"{path}:{i}: no string field {field!r}")
        prompts.append(row[field])
    return prompts


def distill(dlm, prompts: list[str], out: str | Path, max_new_tokens: int = 128, batch_size: int = 32,
            progress: bool = True, **decode) -> int:
    """Decode every prompt not yet in OUT and append its row; returns the rows written now."""
    out = Path(out)
    if out.is_dir():
        raise EdlmError(f"--out {out} is a directory; name a .jsonl file")
    check_output_target(out.parent)  # a file's folder: writable, not /proc, not under a file
    done = set()
    if out.is_file():
        text = out.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):  # a row cut by a kill: dropped, its prompt is decoded again
            text = text[: text.rfind("\n") + 1]
            out.write_text(text, encoding="utf-8")
        for line in text.splitlines():
            try:
                done.add(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    todo = [p for p in dict.fromkeys(prompts) if p not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with out.open("a", encoding="utf-8") as f, tqdm(total=len(todo), disable=not progress, desc="edlm distill") as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            res = dlm.generate(chunk, max_new_tokens=max_new_tokens, **decode)
            for prompt, text in zip(chunk, res.texts, strict=True):
                f.write(json.dumps({"prompt": prompt, "response": text}) + "\n")
            f.flush()
            written += len(chunk)
            bar.update(len(chunk))
    return written
