"""Speculative and re-masking decoders: lossless == greedy, termination, batching, the bench script."""

import importlib.util
from pathlib import Path

import pytest
import torch

from edlm.decode import soft as soft_module
from edlm.decode import speculative
from edlm.decode.options import DecodeOptions
from edlm.decode.state import Batch
from edlm.decode.step import denoise_step, forward_block
from edlm.decode.strategies import STRATEGIES
from edlm.errors import EdlmError
from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer
from edlm.train.convert import convert_model

PROMPTS = ["The cat sat", "Hello, wor", "ab", "Once upon a time there"]  # 11, 10, 2, 22 tokens
NEW = ("lossless", "psd", "soft", "wino")


def tiny_dlm(arch="llama", block_size=4, shift=False, sharpen=1.0, **overrides):
    """float64 tiny model; sharpen scales the LM head so confidences are high and drafts get accepted."""
    model = make_tiny_causal_lm(arch, dtype=torch.float64, **overrides)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpen)
    return convert_model(model, make_tiny_tokenizer(), block_size=block_size, shift=shift)


def greedy(dlm, prompts, max_new, **kw):
    return dlm.generate(prompts, max_new_tokens=max_new, strategy="steps", tokens_per_step=1, **kw)


def totals(results) -> tuple[int, int]:
    stats = [s for r in results for s in r.stats]
    return sum(s.generated_tokens for s in stats), sum(s.model_calls for s in stats)


# ------------------------------------------------------------------ lossless
@pytest.mark.parametrize("arch,block_size,sharpen", [("llama", 4, 1.0), ("qwen3", 4, 1.0), ("llama", 8, 30.0)])
@pytest.mark.parametrize("depth", [1, 3, 8])
def test_lossless_equals_one_token_per_step_greedy(arch, block_size, sharpen, depth):
    dlm = tiny_dlm(arch, block_size, sharpen=sharpen)
    for max_new in (8, 11):  # a multiple of the block and not
        ref = greedy(dlm, PROMPTS, max_new)  # prompts aligned to the block and not
        got = dlm.generate(PROMPTS, max_new_tokens=max_new, strategy="lossless", draft_depth=depth)
        assert got.token_ids == ref.token_ids and got.texts == ref.texts
        for i, p in enumerate(PROMPTS):  # batched == one by one
            assert dlm.generate(p, max_new_tokens=max_new, strategy="lossless",
                                draft_depth=depth).token_ids[0] == ref.token_ids[i]


def test_lossless_with_shift():
    dlm = tiny_dlm("llama", 4, shift=True, sharpen=30.0)
    for bs in (3, 4):
        ref = greedy(dlm, PROMPTS, 11, block_size=bs)
        assert dlm.generate(PROMPTS, max_new_tokens=11, strategy="lossless", block_size=bs).token_ids == ref.token_ids


def test_lossless_saves_calls_and_never_costs_more():
    dlm = tiny_dlm("llama", 8, sharpen=30.0)
    singles = [(greedy(dlm, p, 24), dlm.generate(p, max_new_tokens=24, strategy="lossless")) for p in PROMPTS]
    for ref, got in singles:  # batch 1: per-row calls are the row's own
        assert got.token_ids == ref.token_ids
        assert got.stats[0].model_calls <= ref.stats[0].model_calls
    tokens, calls = totals(got for _, got in singles)
    assert tokens / calls > 1.2  # drafts do get accepted


def test_lossless_with_eos_inside_block():
    dlm = tiny_dlm("llama", 4, sharpen=30.0)
    free = greedy(dlm, PROMPTS, 12)
    eos_char = dlm.tokenizer.convert_ids_to_tokens(free.token_ids[0][5])
    dlm.tokenizer.eos_token = eos_char
    eos = dlm.tokenizer.eos_token_id
    ref = greedy(dlm, PROMPTS, 12)
    got = dlm.generate(PROMPTS, max_new_tokens=12, strategy="lossless")
    first = got.token_ids[0]
    assert eos in first and first[-1] == eos and first.count(eos) == 1 and len(first) <= 6
    assert got.token_ids == ref.token_ids and got.finish_reasons == ref.finish_reasons
    for i, p in enumerate(PROMPTS):
        assert dlm.generate(p, max_new_tokens=12, strategy="lossless").token_ids[0] == ref.token_ids[i]


# ------------------------------------------------------------------ every new strategy
@pytest.mark.parametrize("strategy", NEW)
@pytest.mark.parametrize("threshold", [0.9, 0.5])
def test_new_strategy_terminates_commits_and_batches(strategy, threshold):
    dlm = tiny_dlm("llama", 8, sharpen=30.0)
    kw = {"strategy": strategy, **({"threshold": threshold} if "threshold" in STRATEGIES[strategy].reads else {})}
    singles = [dlm.generate(p, max_new_tokens=19, **kw) for p in PROMPTS]
    for res in singles:
        s = res.stats[0]
        assert s.generated_tokens == 19 and dlm.config.mask_token_id not in res.token_ids[0]
        assert s.model_calls <= s.generated_tokens + 7  # >= 1 token per call; the last block is decoded whole
        assert min(s.steps_histogram) >= 1
    batched = dlm.generate(PROMPTS, max_new_tokens=19, **kw)
    assert batched.token_ids == [r.token_ids[0] for r in singles]


def test_psd_at_depth_one_is_threshold_decoding_and_at_threshold_one_is_lossless():
    dlm = tiny_dlm("llama", 8, sharpen=30.0)
    for thr in (0.9, 0.5):
        ref = dlm.generate(PROMPTS, max_new_tokens=19, threshold=thr)
        assert dlm.generate(PROMPTS, max_new_tokens=19, threshold=thr, strategy="psd",
                            draft_depth=1).token_ids == ref.token_ids
    assert dlm.generate(PROMPTS, max_new_tokens=19, threshold=1.0, strategy="psd").token_ids == \
        dlm.generate(PROMPTS, max_new_tokens=19, strategy="lossless").token_ids


def test_psd_commits_more_per_call_than_threshold():
    dlm = tiny_dlm("llama", 8, sharpen=30.0)
    thr = totals(dlm.generate(p, max_new_tokens=24, threshold=0.9) for p in PROMPTS)
    psd = totals(dlm.generate(p, max_new_tokens=24, threshold=0.9, strategy="psd") for p in PROMPTS)
    assert psd[0] / psd[1] > thr[0] / thr[1]


def test_soft_with_hard_inputs_is_threshold_decoding(monkeypatch):
    dlm = tiny_dlm("qwen3", 8, sharpen=30.0)
    ref = dlm.generate(PROMPTS, max_new_tokens=19, threshold=0.7)
    soft = dlm.generate(PROMPTS, max_new_tokens=19, threshold=0.7, strategy="soft")
    monkeypatch.setattr(soft_module, "soft_embeddings", lambda d, ids, tokens, w: d.model.get_input_embeddings()(ids))
    hard = dlm.generate(PROMPTS, max_new_tokens=19, threshold=0.7, strategy="soft")
    assert hard.token_ids == ref.token_ids  # the embeddings path and kept state are exact
    assert soft.token_ids != ref.token_ids  # the blends do change what the model sees


def test_wino_without_remasking_is_threshold_and_remasking_costs_calls():
    dlm = tiny_dlm("llama", 8, sharpen=30.0)
    ref = dlm.generate(PROMPTS, max_new_tokens=19, threshold=0.5)
    assert dlm.generate(PROMPTS, max_new_tokens=19, threshold=0.5, strategy="wino",
                        remask_below=1e-300).token_ids == ref.token_ids  # no draft is ever that weak
    strict = [dlm.generate(p, max_new_tokens=19, threshold=0.5, strategy="wino", remask_below=1.0)
              for p in PROMPTS]  # every earlier draft is suspect
    base = [dlm.generate(p, max_new_tokens=19, threshold=0.5) for p in PROMPTS]
    assert totals(strict)[1] > totals(base)[1]
    assert all(r.stats[0].model_calls <= 19 + 7 for r in strict)  # terminates: >= 1 slot per call (last block whole)


def test_leave_one_out_logits_equal_masking_each_slot():
    dlm = tiny_dlm("llama", 4, num_hidden_layers=1)  # exact with one layer; deeper layers see slot j
    opts = DecodeOptions.resolve(dlm, block_size=4, strategy="wino")
    batch = Batch(dlm, [dlm.tokenizer("Hello, world")["input_ids"]], opts)  # 12 tokens: 3 pending blocks
    batch.open_blocks()
    denoise_step(dlm, batch)  # writes the pending KV
    batch.block_ids = torch.tensor([[40, 41, 42, 43]])
    both = forward_block(dlm, batch, ids=torch.cat([batch.block_ids, torch.full_like(
        batch.block_ids, dlm.config.mask_token_id)], 1), copies=2, see=speculative.leave_one_out_mask(4))
    plain = forward_block(dlm, batch, ids=batch.block_ids)[:, 0]
    torch.testing.assert_close(both[:, 0], plain)  # the shadow is invisible to the block
    for j in range(4):
        ids = batch.block_ids.clone()
        ids[0, j] = dlm.config.mask_token_id
        torch.testing.assert_close(both[0, 1, j], forward_block(dlm, batch, ids=ids)[0, 0, j])


@pytest.mark.parametrize("kwargs,msg", [
    ({"strategy": "lossless", "temperature": 0.7}, "temperature 0"),
    ({"strategy": "psd", "draft_depth": 0}, "draft_depth"),
    ({"strategy": "nope"}, "lossless, psd, soft, verified, wino"),
])
def test_bad_options(kwargs, msg):
    with pytest.raises(EdlmError, match=msg):
        tiny_dlm().generate("hi", max_new_tokens=4, **kwargs)


def test_wino_needs_no_shift():
    with pytest.raises(EdlmError, match="shift"):
        tiny_dlm(shift=True).generate("hi", max_new_tokens=4, strategy="wino")


# ------------------------------------------------------------------ bench script and CLI
@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """ar/ and dlm/ like the shipped demo models, tiny; 1024 positions for reasoning prompts."""
    root = tmp_path_factory.mktemp("models")
    model = make_tiny_causal_lm("llama", max_position_embeddings=1024)
    model.save_pretrained(root / "ar")
    make_tiny_tokenizer().save_pretrained(root / "ar")
    convert_model(model, make_tiny_tokenizer(), block_size=4).save_pretrained(root / "dlm")
    return root


def _bench_module():
    path = Path(__file__).resolve().parents[1] / "bench" / "strategies.py"
    spec = importlib.util.spec_from_file_location("bench_strategies", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_strategies_script(models_dir, tmp_path, capsys):
    bench = _bench_module()
    out = tmp_path / "out"
    assert bench.main(["--models", str(models_dir), "--limit", "2", "--max-new-tokens", "6", "--out", str(out)]) == 0
    md = (out / "strategies.md").read_text()
    for label, _ in bench.SETTINGS:
        assert f"| {label} |" in md
    assert "| AR (engine) |" in md and "lossless == steps k=1 token for token on 2/2" in md
    assert (out / "strategies.png").stat().st_size > 0 and (out / "strategies.json").is_file()
    assert bench.main(["--models", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "make models" in capsys.readouterr().err


def test_generate_cli_strategy_and_draft_depth(models_dir, capsys):
    import json

    from edlm.cli import main

    argv = ["generate", str(models_dir / "dlm"), "--prompt", "The cat", "--max-new-tokens", "6", "--json"]
    assert main(argv + ["--strategy", "steps"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert main(argv + ["--strategy", "lossless", "--draft-depth", "2"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["token_ids"] == ref["token_ids"] and got["model_calls"] <= ref["model_calls"]
    assert main(argv + ["--strategy", "psd", "--draft-depth", "0"]) == 2
