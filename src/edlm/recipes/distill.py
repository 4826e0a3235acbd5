"""Self-generated training data: a model's own answers to a prompt set, as `edlm train` reads them.

Training for parallelism (distillation, on-policy drafting) and a drafting adapter learn best from
the text the model itself writes (DMax, dParallel, d3LLM all train on the model's own answers), so
this decodes prompts with a model and writes jsonl rows {"prompt", "response"} that `edlm train`
treats as SFT data (prompt tokens never masked nor scored). Batched; resumable: rows already in
OUT are kept and their prompts skipped, each batch is appended and flushed as it finishes.

With `trajectory`, a dLM's row also gets the order it unmasked each block in (d3LLM's pseudo-
trajectory): per generated token (the response's, then the EOS where it ended with one), the
fraction of its block's steps done when it was committed, in (0, 1]. `edlm train --masking trajectory`
masks by it, so training sees the partly decoded blocks this decode setting visits.
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
            progress: bool = True, trajectory: bool = False, **decode) -> int:
    """Decode every prompt not yet in OUT and append its row; returns the rows written now."""
    if trajectory and not dlm.config.diffusion:
        raise EdlmError("--trajectory records the order a dLM unmasks its blocks in; an AR model commits "
                        "one token a step")
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
            res = dlm.generate(chunk, max_new_tokens=max_new_tokens, commit_times=trajectory, **decode)
            for i, (prompt, text) in enumerate(zip(chunk, res.texts, strict=True)):
                row = {"prompt": prompt, "response": text}
                if trajectory:
                    row["trajectory"] = [round(t, 4) for t in res.commit_times[i]]
                f.write(json.dumps(row) + "\n")
            f.flush()
            written += len(chunk)
            bar.update(len(chunk))
    return written
