"""`edlm convert` from GGUF: a tiny GGUF written here (gguf.GGUFWriter, some tensors Q8_0), no wheel."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edlm.cli import main
from edlm.errors import EdlmError
from edlm.model import DiffusionLM
from edlm.train.convert import convert, resolve_gguf

gguf = pytest.importorskip("gguf", reason="GGUF tests need the gguf package (pip install gguf)")

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_chars() -> list[str]:  # GPT-2's byte -> printable-unicode table (byte-level BPE vocab)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path, hidden=64, layers=2, heads=4, kv=2, ff=128, seed=0):
    """A Llama GGUF shaped like SmolLM2's (gpt2 BPE, ChatML specials, tied embeddings, Q8_0 tensors)."""
    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + _byte_chars() + ["Ġt", "he"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)

    def tensor(name, *shape, quant=False):
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if quant:
            w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)

    tensor("token_embd.weight", len(tokens), hidden, quant=True)
    hd = hidden // heads
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden, quant=True)
        tensor(f"blk.{i}.attn_k.weight", kv * hd, hidden, quant=True)
        tensor(f"blk.{i}.attn_v.weight", kv * hd, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ff, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ff, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ff)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf")


@pytest.fixture(scope="module")
def dequantised(tiny_gguf):
    """What transformers itself reads from the file: the reference every weight must equal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)


@pytest.mark.parametrize("how", ["file", "dir"])
def test_convert_gguf_keeps_every_weight_template_and_specials(tiny_gguf, dequantised, tmp_path, how):
    base, tok = dequantised
    out = tmp_path / "dlm"
    args = [str(tiny_gguf)] if how == "file" else [str(tiny_gguf.parent), "--gguf-file", tiny_gguf.name]
    assert main(["convert", *args, str(out), "--block-size", "4"]) == 0
    saved = load_file(out / "model.safetensors")
    assert saved and all(v.dtype == torch.float32 for v in saved.values())
    ref = base.state_dict()
    rows = ref["model.embed_tokens.weight"].shape[0]
    for name, value in saved.items():
        if name == "model.embed_tokens.weight":  # one new row: the mask token (mean embedding)
            assert value.shape[0] == rows + 1
            assert torch.equal(value[:rows], ref[name])
            torch.testing.assert_close(value[rows], ref[name].mean(0))
        else:
            assert torch.equal(value, ref[name]), name
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True
    assert cfg["edlm"]["block_size"] == 4 and cfg["edlm"]["mask_token_id"] == rows
    dlm = DiffusionLM.from_pretrained(out, device="cpu")
    assert dlm.tokenizer.convert_ids_to_tokens(dlm.config.mask_token_id) == "<|mask|>"
    assert dlm.tokenizer.eos_token == tok.eos_token == "<|im_end|>"
    msgs = [{"role": "user", "content": "the cat"}]
    assert (dlm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
    assert dlm.tokenizer("<|im_start|>the<|im_end|>").input_ids == tok("<|im_start|>the<|im_end|>").input_ids
    # the converted model computes what the dequantised base computes (mask row aside)
    ids = torch.tensor([tok("the theme").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(dlm.model(ids).logits[..., :rows], base(ids).logits, rtol=0, atol=1e-5)


def test_convert_gguf_bfloat16(tiny_gguf, dequantised, tmp_path):
    convert(tiny_gguf, tmp_path / "bf16", block_size=4, dtype="bfloat16")
    saved = load_file(tmp_path / "bf16" / "model.safetensors")
    ref = dequantised[0].state_dict()
    assert all(v.dtype == torch.bfloat16 for v in saved.values())
    assert torch.equal(saved["model.layers.0.mlp.up_proj.weight"], ref["model.layers.0.mlp.up_proj.weight"].bfloat16())


def test_gguf_path_errors(tiny_gguf, tmp_path, monkeypatch, capsys):
    assert resolve_gguf(tmp_path) is None  # an empty dir is not GGUF: the HF loader reports it
    assert resolve_gguf(tiny_gguf) == (tiny_gguf.parent, tiny_gguf.name)
    for args in ([str(tmp_path / "nope.gguf")],
                 [str(tiny_gguf.parent), "--gguf-file", "other.gguf"],
                 [str(tiny_gguf.parent)],  # a dir of GGUF files and no --gguf-file
                 [str(tiny_gguf), "--gguf-file", tiny_gguf.name],
                 [str(tmp_path / "missing-dir"), "--gguf-file", "x.gguf"]):
        assert main(["convert", *args, str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err and "\n" not in err and "Traceback" not in err, err
    assert main(["convert", str(tiny_gguf.parent), "--gguf-file", "other.gguf", str(tmp_path / "o")]) == 2
    assert "tiny.Q8_0.gguf" in capsys.readouterr().err  # the error names the files that are there
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now fails as if not installed
    with pytest.raises(EdlmError, match="pip install gguf"):
        convert(tiny_gguf, tmp_path / "o2")
    assert main(["convert", str(tiny_gguf), str(tmp_path / "o3")]) == 2
    assert "pip install gguf" in capsys.readouterr().err
