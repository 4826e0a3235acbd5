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
import re
from contextlib import ExitStack
from pathlib import Path

from tqdm.auto import tqdm

from edlm.errors import EdlmError
from edlm.files import check_output_target


def read_prompts(path: str | Path, field: str = "prompt") -> list[str]:
    """Prompts of a .jsonl (one object a line, its `field`) or a .txt (one prompt a line)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return [line.replace("\\n", "\n") for line in _lines(path)]
    return [row[field] for row in _prompt_rows(path, field)]


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise EdlmError(f"prompt file not found: {path}")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _prompt_rows(path: Path, field: str) -> list[dict]:
    """The objects of a .jsonl prompt file, each with a string `field`, or a one-line error."""
    rows = []
    for i, line in enumerate(_lines(path), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EdlmError(f"{path}:{i}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise EdlmError(f"{path}:{i}: no string field {field!r}")
        rows.append(row)
    return rows


def read_answers(path: str | Path, field: str, prompt_field: str = "prompt") -> dict[str, str]:
    """{prompt: reference answer} of a .jsonl prompt file whose rows carry `field`."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise EdlmError(f"--answer-field needs a .jsonl prompt file with that field, got {path}")
    answers = {}
    for i, row in enumerate(_prompt_rows(path, prompt_field), 1):
        value = row.get(field)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise EdlmError(f"{path}: row {i} has no answer field {field!r} (a string or a number)")
        answers[row[prompt_field]] = str(value)
    return answers


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """The answer a response ends on, GSM8K's convention: what follows its last `####`, else its last
    number; numbers without thousands commas or a zero fraction ("1,200.0" -> "1200")."""
    tail = text.rsplit("####", 1)[1].strip().split("\n")[0] if "####" in text else None
    numbers = _NUMBER.findall(tail if tail is not None else text)
    if not numbers:  # a word answer: compared as written
        return (tail if tail is not None else text).strip() or None
    n = numbers[0] if tail is not None else numbers[-1]
    n = n.replace(",", "")
    return n[: n.index(".")] if "." in n and not n.split(".")[1].strip("0") else n


def rejected_path(out: str | Path) -> Path:
    """Where distill puts the answers it did not keep: OUT's `.rejected.jsonl` neighbour."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".rejected.jsonl")


def _done_prompts(path: Path) -> set[str]:
    """Prompts of the rows already in a jsonl (a row cut by a kill is dropped: decoded again)."""
    done = set()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
            path.write_text(text, encoding="utf-8")
        for line in text.splitlines():
            try:
                done.add(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def distill(dlm, prompts: list[str], out: str | Path, max_new_tokens: int = 128, batch_size: int = 32,
            progress: bool = True, trajectory: bool = False, answers: dict[str, str] | None = None,
            **decode) -> int:
    """Decode every prompt not yet in OUT (or, with `answers`, its rejected file) and append its row;
    returns the rows decoded now. With answers, a row whose final answer differs from its prompt's
    goes to the rejected file instead."""
    if trajectory and not dlm.config.diffusion:
        raise EdlmError("--trajectory records the order a dLM unmasks its blocks in; an AR model commits "
                        "one token a step")
    out = Path(out)
    if out.is_dir():
        raise EdlmError(f"--out {out} is a directory; name a .jsonl file")
    check_output_target(out.parent)  # a file's folder: writable, not /proc, not under a file
    if answers is not None and (missing := [p for p in prompts if p not in answers]):
        raise EdlmError(f"{len(missing)} prompts have no reference answer, e.g. {missing[0][:60]!r}")
    done = _done_prompts(out) | (_done_prompts(rejected_path(out)) if answers is not None else set())
    todo = [p for p in dict.fromkeys(prompts) if p not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with ExitStack() as files:
        f = files.enter_context(out.open("a", encoding="utf-8"))
        rejected = files.enter_context(rejected_path(out).open("a", encoding="utf-8")) if answers is not None else None
        bar = files.enter_context(tqdm(total=len(todo), disable=not progress, desc="edlm distill"))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            res = dlm.generate(chunk, max_new_tokens=max_new_tokens, commit_times=trajectory, **decode)
            for i, (prompt, text) in enumerate(zip(chunk, res.texts, strict=True)):
                row = {"prompt": prompt, "response": text}
                if trajectory:
                    row["trajectory"] = [round(t, 4) for t in res.commit_times[i]]
                got = final_answer(text) if answers is not None else None  # no answer at all: wrong
                right = answers is None or (got is not None and got == final_answer(answers[prompt]))
                (f if right else rejected).write(json.dumps(row) + "\n")
            f.flush()
            if rejected is not None:
                rejected.flush()
            written += len(chunk)
            bar.update(len(chunk))
    return written
