"""Embeddings: shape, unit norm, padding invariance, bidirectional attention, CLI."""

import json

import pytest
import torch

from edlm.cli import main
from edlm.embed import bidirectional_hidden_states, embed
from edlm.errors import EdlmError
from edlm.model import DiffusionLM


@pytest.fixture(scope="module")
def dlm_dir(tiny_dlm_dir):
    return tiny_dlm_dir


@pytest.fixture(scope="module")
def dlm(dlm_dir):
    return DiffusionLM.from_pretrained(dlm_dir, device="cpu", dtype=torch.float32)


def test_shape_and_unit_norm(dlm):
    vecs = embed(dlm, ["a cat", "hello world, a longer one", "x"])
    assert vecs.shape == (3, dlm.inner_model.config.hidden_size) and vecs.dtype == torch.float32
    torch.testing.assert_close(vecs.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(vecs[0], vecs[1])
    torch.testing.assert_close(dlm.embed("a cat")[0], vecs[0])  # the adapter delegates here


def test_padding_and_batch_size_do_not_change_a_vector(dlm):
    short, long = "a cat", "a much longer sentence that forces right padding of the short one"
    alone = embed(dlm, short)[0]
    batched = embed(dlm, [long, short, "mid length"])
    torch.testing.assert_close(batched[1], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(embed(dlm, [long, short, "mid length"], batch_size=1), batched, atol=1e-5, rtol=0)


def test_pooling_covers_real_tokens_only(dlm):
    # by hand: hidden states of the text alone, mean over all its positions, normalised
    ids = torch.tensor([dlm.tokenizer("a cat")["input_ids"]])
    hidden = bidirectional_hidden_states(dlm, ids, torch.ones_like(ids, dtype=torch.bool))[0]
    expected = torch.nn.functional.normalize(hidden.mean(0), dim=-1)
    torch.testing.assert_close(embed(dlm, ["a cat", "padding partner text"])[0], expected, atol=1e-5, rtol=0)


def test_attention_is_bidirectional(dlm):
    a = torch.tensor([dlm.tokenizer("abcdefg")["input_ids"]])
    b = a.clone()
    b[0, -1] = dlm.tokenizer.convert_tokens_to_ids("z")
    real = torch.ones_like(a, dtype=torch.bool)
    ha, hb = bidirectional_hidden_states(dlm, a, real), bidirectional_hidden_states(dlm, b, real)
    assert (ha[0, 0] - hb[0, 0]).abs().max() > 1e-4  # the first token sees the last one
    # control: under the model's own causal attention the first position cannot see it
    ca = dlm.model(input_ids=a, output_hidden_states=True).hidden_states[-1]
    cb = dlm.model(input_ids=b, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(ca[0, 0], cb[0, 0])


def test_max_length_truncates(dlm):
    # the tiny tokenizer is one token per character with no special tokens
    torch.testing.assert_close(embed(dlm, "abcdefgh", max_length=3), embed(dlm, "abc"))


def test_a_text_over_the_context_is_refused_not_cut(dlm, dlm_dir, capsys):
    """It used to embed the first 256 tokens silently; generate refuses an over-long prompt, so does embed."""
    limit = dlm.max_positions
    embed(dlm, "x" * limit)  # exactly the context: fine
    with pytest.raises(EdlmError, match=f"text 1 is {limit + 1} tokens, over the model's {limit} positions"):
        embed(dlm, ["ok", "x" * (limit + 1)])
    assert main(["embed", str(dlm_dir), "--text", "x" * 5000]) == 2
    assert f"over the model's {limit} positions" in capsys.readouterr().err


def test_bad_inputs(dlm):
    with pytest.raises(EdlmError, match="no text"):
        embed(dlm, [])
    with pytest.raises(EdlmError, match="empty"):
        embed(dlm, ["ok", ""])
    with pytest.raises(EdlmError, match="expected a string"):
        embed(dlm, ["ok", 3])


def test_cli(dlm_dir, capsys):
    assert main(["embed", str(dlm_dir), "--text", "a cat", "--text", "a dog", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    vecs = torch.tensor(out["embeddings"])
    assert out["dim"] == 64 and vecs.shape == (2, 64)
    torch.testing.assert_close(vecs.norm(dim=-1), torch.ones(2))
    assert main(["embed", str(dlm_dir), "--text", "a cat", "--text", "a dog"]) == 0
    text = capsys.readouterr().out
    assert text.count("dim 64  norm 1.0000") == 2 and "cosine similarity" in text
    assert main(["embed", str(dlm_dir / "missing"), "--text", "x"]) == 2
    assert "model directory not found" in capsys.readouterr().err
