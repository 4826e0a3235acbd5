"""`make real-drafter`'s recipe (edlm.recipes.real_drafter) end to end on a tiny parent."""

import json

import torch
from safetensors import safe_open

from edlm import DiffusionLM
from edlm.drafter import MASK_ROW, WEIGHTS_NAME
from edlm.recipes import real_drafter
from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer
from edlm.train.convert import convert


def test_the_recipe_resumes_and_its_adapter_keeps_the_parents_text(tmp_path):
    tok = make_tiny_tokenizer()  # no chat template: prompts fall back to "user: ...\nassistant:"
    parent = make_tiny_causal_lm("llama", vocab_size=len(tok), max_position_embeddings=1024)
    parent.save_pretrained(tmp_path / "parent")
    tok.save_pretrained(tmp_path / "parent")
    args = ["--parent", str(tmp_path / "parent"), "--work", str(tmp_path / "rd"), "--out", str(tmp_path / "adapter"),
            "--prompts", "12", "--max-new-tokens", "12", "--distill-batch", "8", "--batch-size", "4",
            "--seq-len", "256", "--block-size", "4", "--drafter", "lora:4:o_proj,v_proj"]
    real_drafter.main(args + ["--steps", "4"])
    answers = tmp_path / "rd" / "answers.jsonl"
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == 12 and all(r["prompt"].startswith("user: ") and r["prompt"].endswith("assistant:") for r in rows)
    before = answers.stat().st_mtime_ns
    real_drafter.main(args + ["--steps", "8"])  # a longer run resumes: the answers are kept, training continues
    assert answers.stat().st_mtime_ns == before
    steps = [json.loads(line)["step"] for line in (tmp_path / "adapter" / "train-metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == sorted(set(steps)) and steps[-1] == 8
    adapter = tmp_path / "adapter" / WEIGHTS_NAME
    with safe_open(str(adapter), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if k != MASK_ROW} == {torch.bfloat16}  # shipped in bf16
        assert json.loads(f.metadata()["edlm_drafter"])["targets"] == ["o_proj", "v_proj"]
    convert(tmp_path / "parent", tmp_path / "rebuilt", block_size=4, shift=True, drafter=str(adapter))
    dlm = DiffusionLM.from_pretrained(tmp_path / "rebuilt")
    prompts = [r["prompt"] for r in rows[:3]]
    got = dlm.generate(prompts, max_new_tokens=10).token_ids
    for prompt, ids in zip(prompts, got, strict=True):
        x = tok(prompt, return_tensors="pt")["input_ids"]
        want = parent.generate(x, max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=0)
        assert ids == want[0, x.shape[1]:].tolist()
    real_drafter.main(args + ["--export", str(tmp_path / "rd" / "train" / "model"), "--out", str(tmp_path / "again")])
    with safe_open(str(adapter), "pt") as a, safe_open(str(tmp_path / "again" / WEIGHTS_NAME), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
