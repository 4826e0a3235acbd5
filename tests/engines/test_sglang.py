"""An `edlm export --format sdar` checkpoint served by a live SGLang decodes edlm's greedy tokens.

Run by `make test-engines`; skipped unless EDLM_SGLANG_PYTHON names the python of a venv with SGLang.
The models: a 2-layer Qwen3 (hidden 64, Qwen3's 151680 embedding rows), tied and untied, and a Qwen3-MoE
of the same shape (4 experts, 2 a token: SGLang's SDARMoeForCausalLM), with the Qwen3-sized tokenizer, so that `edlm convert --block-size 4` puts the mask token at id 151669 where
SGLang hard-codes it. The final norm is scaled x60 so that logits are peaked: measured with edlm over
this matrix, every top-1/top-2 logit gap is > 3e-3 and every confidence of a masked slot is < 0.99999
and > 5e-4 away from 0.9, far above the ~1e-6 by which the two engines' float32 math differs.
Embedding rows past the tokenizer are zero, so neither engine's vocabulary limit matters.
Each case: one prompt, one budget, one threshold (SGLang reads it per server from dllm.yaml), greedy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

if not os.environ.get("EDLM_SGLANG_PYTHON"):
    pytest.skip("engine tier: set EDLM_SGLANG_PYTHON to the python of a venv with SGLang (make test-engines)",
                allow_module_level=True)

from edlm import DiffusionLM  # noqa: E402
from edlm.testing import make_tiny_causal_lm, qwen3_sized_tokenizer  # noqa: E402

BLOCK = 4
SCALE = 60.0
THRESHOLDS = (1.0, 0.9)
VARIANTS = ("untied", "tied", "moe")
# lengths 1 and 11 end inside a block, 4 and 16 on a block boundary
PROMPTS = ("x", "abcd", "hello world", "block diffusion!")


def budgets(prompt_len: int) -> list[int]:
    """Two budgets that end on a block boundary and two that end 1 and 2 slots into a block."""
    on = -(-(prompt_len + 6) // BLOCK) * BLOCK - prompt_len  # the first >= 6 ending on a boundary
    return [on, on + 1, on + 6, on + 8]


CASES = [(v, t, p, n) for v in VARIANTS for t in THRESHOLDS for p in PROMPTS for n in budgets(len(p))]


def case_id(case) -> str:
    v, t, p, n = case
    return f"{v}-t{t}-p{len(p)}-n{n}-{'on' if (len(p) + n) % BLOCK == 0 else 'off'}"


def edlm_cli(*args) -> None:
    exe = Path(sys.executable).with_name("edlm")
    cmd = [str(exe) if exe.exists() else shutil.which("edlm") or "edlm", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"


def build(root: Path, variant: str) -> Path:
    """A peaked tiny Qwen3 (or Qwen3-MoE: the SDAR-MoE export) + tokenizer -> `edlm convert`; returns
    the converted dir."""
    shape = dict(vocab_size=151680, hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    if variant == "moe":  # 4 experts, 2 a token, every layer sparse (what SGLang's sdar_moe.py builds)
        model = make_tiny_causal_lm("qwen3_moe", moe_intermediate_size=32, **shape)
    else:
        model = make_tiny_causal_lm("qwen3", intermediate_size=128, tie_word_embeddings=variant == "tied", **shape)
    with torch.no_grad():
        model.model.norm.weight.mul_(SCALE)
        model.get_output_embeddings().weight[len(qwen3_sized_tokenizer()):] = 0
    model.save_pretrained(root / "base")
    qwen3_sized_tokenizer().save_pretrained(root / "base")
    edlm_cli("convert", root / "base", root / "dlm", "--block-size", BLOCK)
    return root / "dlm"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """variant -> (edlm's DiffusionLM of the converted model, {threshold: SDAR export dir}); built once."""
    built = {}

    def get(variant: str):
        if variant not in built:
            root = tmp_path_factory.mktemp(variant)
            dlm_dir = build(root, variant)
            exports = {}
            for t in THRESHOLDS:
                exports[t] = root / f"sdar-t{t}"
                edlm_cli("export", dlm_dir, exports[t], "--format", "sdar", "--threshold", t)
            built[variant] = (DiffusionLM.from_pretrained(dlm_dir), exports)
        return built[variant]

    return get


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_sglang_greedy_tokens_equal_edlm(case, models, sglang, engine_report):
    variant, threshold, prompt, n = case
    dlm, exports = models(variant)
    ids = dlm.tokenizer.encode(prompt, add_special_tokens=False)
    assert len(ids) == len(prompt)
    t0 = time.perf_counter()
    ours = dlm.generate([ids], max_new_tokens=n, strategy="threshold", threshold=threshold).token_ids[0]
    t1 = time.perf_counter()
    server = sglang.server(exports[threshold])
    t2 = time.perf_counter()
    theirs = server.generate(ids, n)
    t3 = time.perf_counter()
    # edlm stops after an EOS, SGLang (ignore_eos) does not: compare up to and including edlm's first EOS
    eos = dlm.tokenizer.eos_token_id
    if eos in ours:
        ours = ours[: ours.index(eos) + 1]
    else:
        assert len(ours) == n, f"edlm returned {len(ours)} tokens for a budget of {n} without an EOS"
    theirs = theirs[: len(ours)]
    engine_report({"case": case_id(case), "match": theirs == ours, "compared": len(ours), "edlm_s": t1 - t0,
                   "engine": "sglang", "engine_s": t3 - t2})
    i = first_difference(ours, theirs)
    assert theirs == ours, (
        f"{case_id(case)}: prompt {ids} (len {len(ids)}), budget {n}, block {BLOCK}: first difference at "
        f"generated token {i} (absolute position {len(ids) + i}, block {(len(ids) + i) // BLOCK})\n"
        f"  edlm   {ours}\n  sglang {theirs}\n  server log: {server.log}")
