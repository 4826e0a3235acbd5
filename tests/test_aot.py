"""Decode steps through an exported, ahead-of-time compiled program (DiffusionLM.compile(aot=True),
edlm.aot): the texts eager decoding gives, and refusals where a model's steps cannot be exported."""

import copy
import shutil

import pytest
import torch

from edlm.aot import AotStep
from edlm.config import DiffusionConfig
from edlm.drafter import DrafterConfig, GatedLoRA
from edlm.errors import EdlmError
from edlm.model import DiffusionLM
from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer
from edlm.train.convert import convert_model

PROMPTS = ["The cat sat", "Hello, wor", "Once upon a time there"]
needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                    reason="AOTInductor on a CPU needs a C++ compiler")


def converted(arch="llama", shift=False, drafter=None, dtype=torch.float64, attn="sdpa"):
    tok = make_tiny_tokenizer()
    parent = make_tiny_causal_lm(arch, vocab_size=len(tok), dtype=dtype, attn_implementation=attn)
    return parent, tok, convert_model(copy.deepcopy(parent), tok, block_size=4, shift=shift, drafter=drafter)


@pytest.fixture
def program_calls(monkeypatch):
    """How many forwards the AOT program ran."""
    calls = [0]
    real = AotStep.__call__

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AotStep, "__call__", counted)
    return calls


def joined(dlm) -> list[list[int]]:
    """Token ids of a `verified` call that two requests join after its first step."""
    joins, result = [([PROMPTS[1], PROMPTS[2]], [9, 5], None)], []
    for _ in dlm.stream([PROMPTS[0]], max_new_tokens=[12], result=result, admit=lambda: joins.pop(0) if joins else None):
        pass
    return result[0].token_ids


@needs_compiler
def test_aot_decoding_gives_the_eager_texts(program_calls):
    """`verified` and a threshold rule, batched, alone and with joins, and the parent's one-token AR
    steps: the program's steps decode what eager decoding does (the prefill stays with
    torch.compile), and the program did run; it reads the model's weights, not a copy."""
    parent, tok, dlm = converted("qwen3", shift=True)  # the drafter's test below: llama, no shift
    settings = [{}, {"strategy": "threshold", "threshold": 0.3}]
    want = [dlm.generate(PROMPTS, max_new_tokens=10, **s).token_ids for s in settings]
    alone = dlm.generate(PROMPTS[0], max_new_tokens=10).token_ids
    with_joins = joined(dlm)
    assert dlm.compile(aot=True) is dlm and dlm.aot_step is not None
    for s, w in zip(settings, want, strict=True):
        assert dlm.generate(PROMPTS, max_new_tokens=10, **s).token_ids == w
    assert dlm.generate(PROMPTS[0], max_new_tokens=10).token_ids == alone
    assert joined(dlm) == with_joins  # rows joining a running call: the cache is grown and compacted
    # the program reads the model's own tensors: an in-place write reaches it (q_proj's weight is a
    # view of its fused q/k/v buffer, edlm.fusion)
    with torch.no_grad():
        for layer in dlm.model.model.layers:
            layer.self_attn.q_proj.weight.mul_(-4.0)
            layer.mlp.down_proj.weight.mul_(-4.0)
    calls = program_calls[0]
    written = dlm.generate(PROMPTS, max_new_tokens=10).token_ids
    assert program_calls[0] > calls and written != want[0]
    program, compiled = dlm.aot_step, dlm.compiled_model
    dlm.aot_step = dlm.compiled_model = None
    assert dlm.generate(PROMPTS, max_new_tokens=10).token_ids == written  # eager, the same weights
    dlm.aot_step, dlm.compiled_model = program, compiled
    # a weight given new storage is no longer what the program reads: torch.compile takes over
    norm = dlm.model.model.norm.weight
    norm.data = norm.data.clone()
    calls = program_calls[0]
    with pytest.warns(UserWarning, match="weights were replaced"):
        assert dlm.generate(PROMPTS, max_new_tokens=10).token_ids == written
    assert program_calls[0] == calls
    ar = DiffusionLM(parent, tok, DiffusionConfig.autoregressive(base_model="parent"))  # one-token steps
    want = ar.generate(PROMPTS, max_new_tokens=10).token_ids
    calls = program_calls[0]
    assert ar.compile(aot=True).generate(PROMPTS, max_new_tokens=10).token_ids == want
    assert program_calls[0] >= calls + 9


@needs_compiler
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_prompts_first_forward_is_a_program_call_too(attn, program_calls):
    """An empty cache goes in as closed keys (sdpa's mask is bool, eager's additive: both shut
    them), so every forward of a decode runs the program, the prompt's included, and the texts
    are eager decoding's, for a threshold rule and `verified`; through the loader's flat entry
    and through AOTInductor's own wrapper alike."""
    _, _, dlm = converted(shift=True, attn=attn)
    settings = [{"strategy": "threshold", "threshold": 0.3}, {}]
    want = [dlm.generate(PROMPTS[2], max_new_tokens=12, **s).token_ids for s in settings]
    dlm.compile(aot=True)
    assert dlm.aot_step.run is not None
    for flat in (True, False):
        if not flat:
            dlm.aot_step.run = None
        for s, w in zip(settings, want, strict=True):
            calls = program_calls[0]
            got = dlm.generate(PROMPTS[2], max_new_tokens=12, **s)
            assert got.token_ids == w
            assert program_calls[0] - calls == got.stats[0].model_calls


@needs_compiler
def test_an_aot_drafter_gives_the_parents_greedy_text(program_calls):
    """The drafter's per-token gate is an input of the program: its drafts are the adapter's (the
    same steps as eager) and its text is HF generate's of the parent."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    parent, tok, dlm = converted(drafter=DrafterConfig(rank=4, alpha=8.0, targets=targets))
    with torch.no_grad():
        for mod in dlm.model.modules():
            if isinstance(mod, GatedLoRA):  # drafts unlike the parent's own
                mod.lora_b.weight.copy_(torch.randn(mod.lora_b.weight.shape, dtype=torch.float64))
    eager = dlm.generate(PROMPTS, max_new_tokens=10)
    got = dlm.compile(aot=True).generate(PROMPTS, max_new_tokens=10)
    assert program_calls[0] > 0
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        hf = parent.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=0)
        assert got.token_ids[i] == hf[0, ids.shape[1]:].tolist()
        assert got.stats[i].model_calls == eager.stats[i].model_calls  # the same drafts were accepted


@needs_compiler
def test_the_program_reads_a_cropped_cache_as_a_dense_one():
    """A crop leaves strided views, which the program would misread (measured: logits off by ~1):
    AotStep hands it dense tensors."""
    from transformers import DynamicCache

    _, _, dlm = converted(dtype=torch.float32)
    dlm.compile(aot=True)
    p, q = 9, 3
    cropped, dense = DynamicCache(), DynamicCache()
    with torch.no_grad():
        dlm.model(input_ids=torch.randint(0, 50, (1, p + 4)), position_ids=torch.arange(p + 4)[None],
                  past_key_values=cropped, use_cache=True)
        cropped.crop(-4)
        for i, layer in enumerate(cropped.layers):
            dense.update(layer.keys.contiguous(), layer.values.contiguous(), i)
        assert not cropped.layers[0].keys.is_contiguous()
        ids, pos = torch.randint(0, 50, (1, q)), (p + torch.arange(q))[None]
        mask = torch.ones(1, 1, q, p + q, dtype=torch.bool)
        got = dlm.aot_step(ids, pos, mask, cropped, None, 0)
        want = dlm.aot_step(ids, pos, mask, dense, None, 0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("arch,dtype,word", [("llama", torch.bfloat16, "bf16"), ("qwen3_moe", torch.float32, "MoE")])
def test_models_whose_steps_cannot_be_exported_are_refused_in_one_line(arch, dtype, word):
    _, _, dlm = converted(arch, dtype=dtype)
    with pytest.raises(EdlmError, match=word):
        dlm.compile(aot=True)
    assert dlm.aot_step is None


def test_an_unknown_compile_setting_is_refused(tmp_path):
    with pytest.raises(EdlmError, match="compile must be"):
        DiffusionLM.from_pretrained(tmp_path, compile="fast")


@needs_compiler
def test_a_kept_program_is_loaded_and_reads_the_new_models_weights(monkeypatch, tmp_path, program_calls):
    """The second compile of a model of the same shape loads the kept package (no export, no C++
    compile) and decodes with that model's own weights (random, unlike the first's): eager's texts.
    A truncated package is compiled again with a warning; EDLM_CACHE_DIR=off keeps nothing."""
    import edlm.aot

    monkeypatch.setenv("EDLM_CACHE_DIR", str(tmp_path))
    _, _, first = converted(dtype=torch.float32)
    first.compile(aot=True)
    kept = list((tmp_path / "aot").glob("*.pt2"))
    assert len(kept) == 1
    _, _, second = converted(dtype=torch.float32)
    with torch.no_grad():
        for p in second.model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    want = second.generate(PROMPTS, max_new_tokens=10).token_ids
    assert want != first.generate(PROMPTS, max_new_tokens=10).token_ids

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again")

    with monkeypatch.context() as m:
        m.setattr(torch._inductor, "aoti_compile_and_package", no_compile)
        m.setattr(torch.export, "export", no_compile)
        calls = program_calls[0]
        assert second.compile(aot=True).generate(PROMPTS, max_new_tokens=10).token_ids == want
        assert program_calls[0] > calls
    kept[0].write_bytes(kept[0].read_bytes()[:1000])  # a run killed mid-copy cannot leave this (os.replace)
    _, _, third = converted(dtype=torch.float32)
    want = third.generate(PROMPTS, max_new_tokens=10).token_ids
    with pytest.warns(UserWarning, match="ignoring the cached AOT program"):
        assert third.compile(aot=True).generate(PROMPTS, max_new_tokens=10).token_ids == want
    assert kept[0].stat().st_size > 1000  # replaced by the new compile
    monkeypatch.setenv("EDLM_CACHE_DIR", "off")
    assert edlm.aot.cache_root() is None


def test_the_program_key_follows_what_a_trace_bakes_in():
    """Shapes and settings traced as constants give another program; a decode setting does not."""
    from dataclasses import replace

    from edlm.aot import program_key

    def key(dlm):
        live = dict(dlm.inner_model.named_parameters())
        return program_key(dlm, live, torch.float32)

    targets = ["q_proj", "v_proj"]
    _, _, a = converted(dtype=torch.float32, drafter=DrafterConfig(rank=4, alpha=8.0, targets=targets))
    _, _, b = converted(dtype=torch.float32, drafter=DrafterConfig(rank=4, alpha=16.0, targets=targets))
    _, _, c = converted(dtype=torch.float32)
    base = key(a)
    assert key(b) != base  # the LoRA scale alpha / rank is a constant of the trace
    assert key(c) != base
    a.config = replace(a.config, decoding={"strategy": "verified", "draft_depth": 0})
    assert key(a) == base
    a.model.to(torch.float64)
    assert key(a) != base
