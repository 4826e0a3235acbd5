import json

import pytest
import torch
from safetensors.torch import load_file

from edlm import DiffusionLM
from edlm.cli import main
from edlm.errors import EdlmError
from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer
from edlm.train.convert import check_mask_support, convert


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_round_trip_keeps_weights_and_adds_mask(tiny_ar_dir, tmp_path):
    out = tmp_path / "dlm"
    convert(tiny_ar_dir, out, block_size=8)
    cfg = json.loads((out / "config.json").read_text())["edlm"]
    assert cfg["block_size"] == 8 and cfg["shift"] is False
    dlm = DiffusionLM.from_pretrained(out)
    assert dlm.tokenizer.convert_ids_to_tokens(dlm.config.mask_token_id) == "<|mask|>"
    before, after = _weights(tiny_ar_dir), _weights(out)
    mask_id = dlm.config.mask_token_id
    for name, w in before.items():
        got = after[name]
        if w.shape[0] == 128 and ("embed" in name or "lm_head" in name):
            rows = torch.arange(128) != mask_id  # only the free row taken by the mask token changes
            assert torch.equal(got[rows], w[rows]), name
            assert torch.allclose(got[mask_id], w[:mask_id].mean(0), atol=1e-6)
        else:
            assert torch.equal(got, w), name


def test_named_existing_token_and_resize(tmp_path):
    model = make_tiny_causal_lm("qwen2", vocab_size=101)  # tokenizer fills the whole vocab
    tok = make_tiny_tokenizer(vocab_size=101)
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    dlm = convert(base, tmp_path / "named", block_size=4, mask_token="~")
    assert dlm.config.mask_token_id == tok.convert_tokens_to_ids("~")
    dlm = convert(base, tmp_path / "new", block_size=4)
    assert dlm.config.mask_token_id == 101
    assert dlm.model.get_input_embeddings().weight.shape[0] == 102
    old = model.get_input_embeddings().weight
    assert torch.equal(dlm.model.get_input_embeddings().weight[:101], old)


class _CausalOnly(torch.nn.Module):
    """A model that ignores 4D masks and always attends causally."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, attention_mask=None, **kw):
        return self.inner(input_ids=input_ids, position_ids=kw.get("position_ids"))


def test_self_check_rejects_mask_ignoring_model():
    good = make_tiny_causal_lm("llama")
    check_mask_support(good, 128)
    with pytest.raises(EdlmError, match="ignores 4D attention masks"):
        check_mask_support(_CausalOnly(good), 128)


def test_cli_errors_write_nothing(tiny_ar_dir, tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "o1")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()
    assert main(["convert", str(tiny_ar_dir), str(tmp_path / "o2"), "--block-size", "0"]) == 2
    assert "block-size" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(["convert", str(tiny_ar_dir), str(busy)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "x"
    notlm = tmp_path / "notlm"
    notlm.mkdir()
    (notlm / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    assert main(["convert", str(notlm), str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err
    earlier = tmp_path / "earlier"  # --force replaces an earlier output (see test_outputs for other dirs)
    assert main(["convert", str(tiny_ar_dir), str(earlier)]) == 0
    assert main(["convert", str(tiny_ar_dir), str(earlier), "--force", "--block-size", "8"]) == 0
    assert json.loads((earlier / "config.json").read_text())["edlm"]["block_size"] == 8
