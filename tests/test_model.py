"""The concat(x_t, x_0) training forward equals decoding's cache-then-block computation."""

import pytest
import torch
from transformers import DynamicCache

from edlm import DiffusionConfig, DiffusionLM
from edlm.masks import block_causal_mask
from edlm.testing import ARCHITECTURES, make_tiny_causal_lm


def _noisy_block_via_cache(dlm, x_0, x_t, block, bs):
    """Clean earlier blocks through a KV cache, then the noisy block alone."""
    model, b = dlm.model, x_0.shape[0]
    start = block * bs
    cache = DynamicCache()
    if start:
        model(input_ids=x_0[:, :start], position_ids=torch.arange(start)[None].expand(b, -1),
              attention_mask=dlm.backend_mask(block_causal_mask(start, bs).expand(b, -1, -1)),
              cache=cache, use_cache=True)
    end = min(start + bs, x_0.shape[1])
    mask = torch.ones(b, end - start, end, dtype=torch.bool)
    return model(input_ids=x_t[:, start:end], position_ids=torch.arange(start, end)[None].expand(b, -1),
                 attention_mask=dlm.backend_mask(mask), cache=cache, use_cache=True).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_concat_forward_equals_cached_blocks(arch, impl):
    model = make_tiny_causal_lm(arch, attn_implementation=impl)
    bs, seq_len = 4, 10  # last block is partial
    dlm = DiffusionLM(model, None, DiffusionConfig(block_size=bs, mask_token_id=127))
    x_0 = torch.randint(0, 120, (2, seq_len))
    x_t = torch.where(torch.rand(2, seq_len) < 0.5, torch.full_like(x_0, 127), x_0)
    with torch.no_grad():
        logits = dlm.forward_noisy(x_t, x_0)
        assert logits.shape == (2, seq_len, 128)
        for block in range(3):
            ref = _noisy_block_via_cache(dlm, x_0, x_t, block, bs)
            got = logits[:, block * bs : block * bs + ref.shape[1]]
            assert (ref - got).abs().max() <= 1e-4


def test_noisy_half_ignores_its_own_future_blocks_and_clean_copy():
    model = make_tiny_causal_lm("llama")
    dlm = DiffusionLM(model, None, DiffusionConfig(block_size=4, mask_token_id=127))
    x_0 = torch.randint(0, 120, (1, 8))
    x_t = x_0.clone()
    x_t[0, :4] = 127
    with torch.no_grad():
        base = dlm.forward_noisy(x_t, x_0)
        x0b = x_0.clone()
        x0b[0, 1] = (x0b[0, 1] + 1) % 120  # the clean copy of block 0 must not leak into noisy block 0
        x_tb = x_t.clone()
        x_tb[0, 6] = 5  # a later noisy block must not change block 0
        assert torch.allclose(dlm.forward_noisy(x_tb, x0b)[:, :4], base[:, :4], atol=1e-6)
        # but the clean block 0 does condition noisy block 1
        assert not torch.allclose(dlm.forward_noisy(x_t, x0b)[:, 4:], base[:, 4:], atol=1e-6)


def test_shift_uses_clean_stream_at_block_starts():
    model = make_tiny_causal_lm("qwen3")
    dlm = DiffusionLM(model, None, DiffusionConfig(block_size=4, mask_token_id=127, shift=True))
    x_0 = torch.randint(0, 120, (1, 8))
    x_t = x_0.clone()
    x_t[0, 4:] = 127
    with torch.no_grad():
        shifted = dlm.forward_noisy(x_t, x_0)
        plain = dlm.forward_noisy(x_t, x_0, shift=False)
        causal_ref = model(input_ids=x_0[:, :4], attention_mask=dlm.backend_mask(block_causal_mask(4, 4))).logits
    assert torch.allclose(shifted[:, 5:8], plain[:, 4:7])
    assert torch.allclose(shifted[:, 4], causal_ref[:, 3], atol=1e-5)  # block start <- clean i-1


@pytest.mark.parametrize("attention", ["noisy", "bidirectional"])
def test_study_variants_run(attention):
    model = make_tiny_causal_lm("llama")
    dlm = DiffusionLM(model, None, DiffusionConfig(block_size=4, mask_token_id=127))
    x = torch.randint(0, 120, (2, 8))
    with torch.no_grad():
        a = dlm.forward_noisy(x, x, attention=attention)
        x2 = x.clone()
        x2[:, -1] = (x2[:, -1] + 1) % 120
        b = dlm.forward_noisy(x2, x2, attention=attention)
    changed_first_block = not torch.allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert changed_first_block == (attention == "bidirectional")


@pytest.mark.parametrize("arch,impl,shift", [("llama", "sdpa", False), ("qwen3", "eager", True), ("llama", "sdpa", True)])
def test_feeding_only_active_noisy_blocks_is_exact(arch, impl, shift):
    model = make_tiny_causal_lm(arch, attn_implementation=impl, dtype=torch.float64)
    bs, seq_len = 4, 14  # the last block is partial
    dlm = DiffusionLM(model, None, DiffusionConfig(block_size=bs, mask_token_id=127, shift=shift))
    x_0 = torch.randint(0, 120, (3, seq_len))
    x_t = torch.where(torch.rand(3, seq_len) < 0.5, torch.full_like(x_0, 127), x_0)
    active = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    fed = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: fed.append(args[0].shape[1]))
    with torch.no_grad():
        full = dlm.forward_noisy(x_t, x_0)
        part = dlm.forward_noisy(x_t, x_0, active=active)
    assert fed == [2 * seq_len, 8 + seq_len]  # widest row: two active blocks of 4
    tok = active.repeat_interleave(bs, dim=1)[:, :seq_len]
    assert torch.allclose(part[tok], full[tok], atol=1e-6)  # eager softmaxes in float32
    if not shift:
        assert not part[~tok].any()


def test_loading_in_python_shows_no_progress_bar(tmp_path, capfd):
    from edlm import DiffusionLM
    from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer
    from edlm.train.convert import convert_model

    convert_model(make_tiny_causal_lm("llama"), make_tiny_tokenizer(), block_size=4).save_pretrained(tmp_path)
    capfd.readouterr()
    DiffusionLM.from_pretrained(tmp_path)
    assert "Loading weights" not in capfd.readouterr().err
