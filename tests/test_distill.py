"""edlm distill-data: a model's own answers as SFT rows, batched and resumable."""

import json

import pytest
import torch

from edlm import DiffusionLM
from edlm.cli import main
from edlm.recipes.distill import distill


def test_rows_are_the_models_own_greedy_answers_and_a_rerun_resumes(tiny_ar_dir, tmp_path, capsys):
    prompts = ["The cat sat", "Hello, wor", "ab", "Once upon a time there", "ab"]  # a repeat is done once
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in prompts))
    out = tmp_path / "self.jsonl"
    args = ["distill-data", str(tiny_ar_dir), "--ar", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(out),
            "--max-new-tokens", "6", "--batch-size", "2"]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ar = DiffusionLM.from_pretrained(tiny_ar_dir, autoregressive=True, dtype=torch.float32)
    assert [r["prompt"] for r in rows] == prompts[:4]
    for r in rows:
        assert r["response"] == ar.generate(r["prompt"], max_new_tokens=6).texts[0]
    # killed mid-file: the cut line is decoded again, finished rows are kept, nothing is repeated
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    capsys.readouterr()
    assert main(args) == 0
    assert "wrote 2 rows" in capsys.readouterr().out
    again = [json.loads(line) for line in out.read_text().splitlines()]  # every line whole again
    assert sorted(r["prompt"] for r in again) == sorted(prompts[:4])


def test_bad_inputs_are_one_line(tiny_ar_dir, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"text": "x"}\n')
    base = ["distill-data", str(tiny_ar_dir), "--ar", "--out", str(tmp_path / "o.jsonl")]
    assert main([*base, "--prompts", str(tmp_path / "missing.jsonl")]) == 2
    assert main([*base, "--prompts", str(tmp_path / "p.jsonl")]) == 2
    assert "no string field 'prompt'" in capsys.readouterr().err
    assert main([*base[:3], "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "o.jsonl").exists()


def test_distill_from_python_with_a_dlm_and_decode_options(tiny_dlm_dir, tmp_path):
    dlm = DiffusionLM.from_pretrained(tiny_dlm_dir, dtype=torch.float32)
    n = distill(dlm, ["ab", "cd"], tmp_path / "d.jsonl", max_new_tokens=5, progress=False, strategy="prefix",
                threshold=0.5)
    assert n == 2
    with pytest.raises(Exception, match="threshold does not apply"):
        distill(dlm, ["ef"], tmp_path / "e.jsonl", max_new_tokens=5, progress=False, strategy="lossless",
                threshold=0.5)


def test_trajectory_rows_carry_each_tokens_commit_time(tiny_dlm_dir, tiny_ar_dir, tmp_path, capsys):
    dlm = DiffusionLM.from_pretrained(tiny_dlm_dir, dtype=torch.float32)
    (tmp_path / "p.txt").write_text("The cat sat\nab\n")
    out = tmp_path / "t.jsonl"
    args = ["distill-data", str(tiny_dlm_dir), "--prompts", str(tmp_path / "p.txt"), "--out", str(out),
            "--max-new-tokens", "9", "--trajectory", "--strategy", "steps", "--tokens-per-step", "1"]
    assert main(args) == 0
    for row in map(json.loads, out.read_text().splitlines()):
        res = dlm.generate(row["prompt"], max_new_tokens=9, strategy="steps", tokens_per_step=1, commit_times=True)
        assert row["response"] == res.texts[0]
        assert row["trajectory"] == [round(t, 4) for t in res.commit_times[0]]
        assert len(row["trajectory"]) == len(res.token_ids[0])
    bad = ["distill-data", str(tiny_ar_dir), "--ar", "--prompts", str(tmp_path / "p.txt"), "--out",
           str(tmp_path / "x.jsonl"), "--trajectory"]
    capsys.readouterr()
    assert main(bad) == 2
    assert "an AR model commits one token a step" in capsys.readouterr().err


def test_answer_field_keeps_right_answers_and_a_resume_skips_the_rejected(tiny_ar_dir, tmp_path, capsys):
    from edlm.recipes.distill import final_answer, rejected_path

    assert [final_answer(t) for t in (" 3+4=7. #### 7", "so 1,200.0 apples", "#### $1,200.50", "-3", "#### yes", "")] \
        == ["7", "1200", "1200.50", "-3", "yes", None]
    ar = DiffusionLM.from_pretrained(tiny_ar_dir, autoregressive=True, dtype=torch.float32)
    prompts = ["The cat sat", "Hello, wor", "ab"]
    texts = {p: ar.generate(p, max_new_tokens=6).texts[0] for p in prompts}
    # the references: the first prompt's is its own answer (right whatever the random model says), the
    # others' a word no response ends on
    rows = [{"prompt": p, "answer": texts[p] if i == 0 else "zzz"} for i, p in enumerate(prompts)]
    (tmp_path / "p.jsonl").write_text("\n".join(map(json.dumps, rows)))
    out = tmp_path / "self.jsonl"
    args = ["distill-data", str(tiny_ar_dir), "--ar", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(out),
            "--max-new-tokens", "6", "--answer-field", "answer"]
    assert main(args) == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    dropped = [json.loads(line) for line in rejected_path(out).read_text().splitlines()]
    assert [r["prompt"] for r in kept] == prompts[:1] and kept[0]["response"] == texts[prompts[0]]
    assert [r["prompt"] for r in dropped] == prompts[1:]
    capsys.readouterr()
    assert main(args) == 0  # nothing left to decode: the rejected are done too
    assert "wrote 0 rows" in capsys.readouterr().out
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": "ab"}))
    assert main([*args[:4], str(tmp_path / "q.jsonl"), *args[5:]]) == 2
    assert "no answer field 'answer'" in capsys.readouterr().err


def test_a_response_with_no_final_answer_is_rejected_whatever_the_reference(tmp_path):
    from types import SimpleNamespace

    from edlm.recipes.distill import rejected_path

    replies = {"a": "", "b": "so 2+3=5. #### 5", "c": "#### 6"}
    stub = SimpleNamespace(config=SimpleNamespace(diffusion=False),
                           generate=lambda prompts, **kw: SimpleNamespace(texts=[replies[p] for p in prompts]))
    out = tmp_path / "o.jsonl"
    assert distill(stub, list(replies), out, progress=False, answers={"a": "", "b": "5.0", "c": "7"}) == 3
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["b"]
    assert [json.loads(line)["prompt"] for line in rejected_path(out).read_text().splitlines()] == ["a", "c"]
    with pytest.raises(Exception, match="no reference answer"):
        distill(stub, ["d"], tmp_path / "p.jsonl", progress=False, answers={})
