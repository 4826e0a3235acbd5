"""Decoding through torch.compile (DiffusionLM.compile): the texts eager decoding gives, through graphs."""

import copy
import shutil

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import DynamicCache

from edlm.decode.kv import contiguous_cache
from edlm.drafter import DrafterConfig, GatedLoRA
from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer
from edlm.train.convert import convert_model

PROMPTS = ["The cat sat", "Hello, wor", "Once upon a time there"]
needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                    reason="torch.compile on a CPU needs a C++ compiler")


def pair(drafter: DrafterConfig | None = None):
    tok = make_tiny_tokenizer()
    parent = make_tiny_causal_lm("llama", vocab_size=len(tok), dtype=torch.float64)
    return parent, tok, convert_model(copy.deepcopy(parent), tok, block_size=4, drafter=drafter)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_a_cropped_cache_is_made_dense_with_the_same_values():
    """A crop leaves strided views (a compiled forward would recompile on each new stride)."""
    cache = DynamicCache()
    k = torch.randn(2, 4, 9, 8)
    cache.update(k, k + 1, 0)
    cache.crop(-3)
    assert not cache.layers[0].keys.is_contiguous()
    contiguous_cache(cache)
    assert cache.layers[0].keys.is_contiguous() and cache.layers[0].values.is_contiguous()
    assert torch.equal(cache.layers[0].keys, k[:, :, :6]) and torch.equal(cache.layers[0].values, k[:, :, :6] + 1)


@needs_compiler
def test_compiled_decoding_gives_the_eager_texts():
    """`verified`, a threshold rule and the AR engine, batched and alone: compiled == eager, and the
    compiled forward is the one that ran (graphs were made); training's model stays eager."""
    _, _, dlm = pair()
    settings = [{}, {"strategy": "threshold", "threshold": 0.3}]
    want = [dlm.generate(PROMPTS, max_new_tokens=10, **s).token_ids for s in settings]
    alone = dlm.generate(PROMPTS[0], max_new_tokens=10).token_ids
    before = graphs()
    assert dlm.compile() is dlm and dlm.compiled_model is not dlm.model
    for s, w in zip(settings, want, strict=True):
        assert dlm.generate(PROMPTS, max_new_tokens=10, **s).token_ids == w
    assert dlm.generate(PROMPTS[0], max_new_tokens=10).token_ids == alone
    assert graphs() > before
    assert not isinstance(dlm.model, torch._dynamo.eval_frame.OptimizedModule)


@needs_compiler
def test_a_compiled_drafter_still_gives_the_parents_greedy_text():
    """The adapter's per-token gate is read inside the graph, through the fused q/k/v and gate/up
    GEMMs (edlm.fusion): a compiled drafter drafts with its adapter and keeps HF generate's text."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    parent, tok, dlm = pair(DrafterConfig(rank=4, alpha=8.0, targets=targets))
    with torch.no_grad():
        for mod in dlm.model.modules():
            if isinstance(mod, GatedLoRA):  # drafts unlike the parent's own
                mod.lora_b.weight.copy_(torch.randn(mod.lora_b.weight.shape, dtype=torch.float64))
    eager = dlm.generate(PROMPTS, max_new_tokens=10)
    dlm.compile()
    got = dlm.generate(PROMPTS, max_new_tokens=10)
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        hf = parent.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=0)
        assert got.token_ids[i] == hf[0, ids.shape[1]:].tolist()
        assert got.stats[i].model_calls == eager.stats[i].model_calls  # the same drafts were accepted
