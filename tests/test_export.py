"""`edlm export`: the SDAR layout for SGLang / LMDeploy, and plain HF.

The SDAR checks need a Qwen3 whose tokenizer has exactly Qwen3's 151669 entries, so that `edlm convert`
puts the new mask token at id 151669 the way it does on a real Qwen3 (no test-only switch in the code):
the tokenizer is the char-level test tokenizer padded with synthetic entries `<x4>`..`<x151668>` (never
produced by encoding), and the model is a 2-layer Qwen3 with hidden size 32 and 151680 embedding rows
(Qwen3's padded vocabulary, smaller). Tied embeddings and YaRN RoPE, as in Qwen3-0.6B/4B with long context.
"""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from edlm import DiffusionLM
from edlm.cli import main
from edlm.errors import EdlmError
from edlm.serve.export import QWEN3_FIELDS, SDAR_MASK_TOKEN_ID, export, export_model
from edlm.testing import QWEN3_TOKENS, make_tiny_causal_lm, qwen3_sized_tokenizer
from edlm.train.convert import convert

ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e6}
PROMPTS = ["hello world", "the cat sat on"]  # prompt lengths 11 and 14: both end mid-block


@pytest.fixture(scope="module")
def qwen3_dlm_dir(tmp_path_factory):
    """A Qwen3 base converted by `edlm convert` (block size 8)."""
    root = tmp_path_factory.mktemp("qwen3")
    model = make_tiny_causal_lm("qwen3", vocab_size=151680, hidden_size=32, intermediate_size=64,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                tie_word_embeddings=True, rope_parameters=dict(ROPE))
    model.save_pretrained(root / "base")
    qwen3_sized_tokenizer().save_pretrained(root / "base")
    convert(root / "base", root / "dlm", block_size=8)
    return root / "dlm"


@pytest.fixture(scope="module")
def sdar_dir(qwen3_dlm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "sdar"
    export(qwen3_dlm_dir, out, "sdar", threshold=0.8)
    return out


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_convert_puts_the_sdar_mask_token_in_qwen3s_free_row(qwen3_dlm_dir):
    cfg = json.loads((qwen3_dlm_dir / "config.json").read_text())
    assert cfg["edlm"]["mask_token_id"] == SDAR_MASK_TOKEN_ID and cfg["vocab_size"] == 151680  # no resize
    dlm = DiffusionLM.from_pretrained(qwen3_dlm_dir)
    assert dlm.tokenizer.mask_token == "<|MASK|>" and dlm.tokenizer.mask_token_id == SDAR_MASK_TOKEN_ID


def test_sdar_config_tokenizer_and_serving_files(qwen3_dlm_dir, sdar_dir):
    from transformers import AutoConfig, AutoTokenizer

    cfg = json.loads((sdar_dir / "config.json").read_text())
    assert cfg["architectures"] == ["SDARForCausalLM"] and cfg["model_type"] == "sdar"
    assert cfg["auto_map"] == {"AutoConfig": "configuration_sdar.SDARConfig"}
    assert (sdar_dir / "configuration_sdar.py").is_file() and "edlm" not in cfg
    assert cfg["mask_token_id"] == SDAR_MASK_TOKEN_ID and cfg["block_size"] == 8
    assert cfg["head_dim"] == 16 and cfg["rope_theta"] == 1e6
    assert cfg["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    base = json.loads((qwen3_dlm_dir / "config.json").read_text())
    for name in QWEN3_FIELDS:
        assert cfg[name] == (False if name == "tie_word_embeddings" else base.get(name)), name
    assert base["tie_word_embeddings"] is True  # a tied base, untied in the export (SGLang needs lm_head)

    hf = AutoConfig.from_pretrained(str(sdar_dir), trust_remote_code=True)
    assert type(hf).__name__ == "SDARConfig" and hf.model_type == "sdar"
    assert (hf.mask_token_id, hf.block_size, hf.head_dim, hf.rope_theta) == (SDAR_MASK_TOKEN_ID, 8, 16, 1e6)
    assert hf.num_key_value_heads == 1 and hf.tie_word_embeddings is False

    tok = AutoTokenizer.from_pretrained(str(sdar_dir), config=hf)
    assert tok.mask_token == "<|MASK|>" and tok.mask_token_id == SDAR_MASK_TOKEN_ID
    assert "<|MASK|>" in tok.all_special_tokens and len(tok) == QWEN3_TOKENS + 1

    assert yaml.safe_load((sdar_dir / "dllm.yaml").read_text()) == {"block_size": 8, "threshold": 0.8}
    readme = (sdar_dir / "README.md").read_text()
    assert (f"python -m sglang.launch_server --model-path {sdar_dir.resolve()} --trust-remote-code "
            f"--dllm-algorithm LowConfidence --dllm-algorithm-config {sdar_dir.resolve() / 'dllm.yaml'}") in readme
    assert "lmdeploy serve api_server" in readme
    assert "--dllm-block-length 8" in readme and "--dllm-confidence-threshold 0.8" in readme


def test_sdar_weights_are_qwen3_weights_unchanged(qwen3_dlm_dir, sdar_dir):
    before, after = _weights(qwen3_dlm_dir), _weights(sdar_dir)
    assert "lm_head.weight" not in before and after.keys() == before.keys() | {"lm_head.weight"}
    assert torch.equal(after["lm_head.weight"], before["model.embed_tokens.weight"])  # the tied head, written out
    assert all(k.startswith(("model.", "lm_head.")) for k in after)
    for name, w in before.items():
        assert torch.equal(after[name], w), name


def test_edlm_loads_the_sdar_export_and_decodes_identically(qwen3_dlm_dir, sdar_dir):
    ours, sdar = DiffusionLM.from_pretrained(qwen3_dlm_dir), DiffusionLM.from_pretrained(sdar_dir)
    assert sdar.model.config.model_type == "qwen3"  # SDAR read as Qwen3: no remote code
    assert (sdar.config.block_size, sdar.config.mask_token_id, sdar.config.shift) == (8, SDAR_MASK_TOKEN_ID, False)
    assert sdar.model.config.rope_parameters == ours.model.config.rope_parameters == ROPE
    assert len(sdar.tokenizer) == len(ours.tokenizer)
    for (name, a), (_, b) in zip(ours.model.state_dict().items(), sdar.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    kwargs = dict(max_new_tokens=8, threshold=0.8)
    assert ours.generate(PROMPTS, **kwargs).token_ids == sdar.generate(PROMPTS, **kwargs).token_ids


def test_lora_is_merged_into_sdar_weights(qwen3_dlm_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    dlm = DiffusionLM.from_pretrained(qwen3_dlm_dir)
    torch.manual_seed(0)
    peft = get_peft_model(dlm.model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    export_model(DiffusionLM(peft, dlm.tokenizer, dlm.config), tmp_path / "sdar", "sdar")
    expected = peft.merge_and_unload().state_dict()
    got = _weights(tmp_path / "sdar")
    assert got.keys() == _weights(qwen3_dlm_dir).keys() | {"lm_head.weight"}
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           _weights(qwen3_dlm_dir)["model.layers.0.self_attn.q_proj.weight"])
    for name, w in got.items():
        assert torch.equal(w, expected[name]), name


# ---------------------------------------------------------------- refusals
def _variant(src, root, edit=None):
    dst = root / "model"
    shutil.copytree(src, dst)
    if edit:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["edlm"].update(edit)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _trained(src, root, attention, final):
    """MODEL as `edlm train` leaves it: RUN/model (final) or RUN/checkpoints/step-N/model."""
    step = root / "run" / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    (step / "trainer.json").write_text(json.dumps({"step": 2, "config": {"attention": attention}}))
    return _variant(src, root / "run" if final else step)


REFUSALS = {
    "non-qwen3": (lambda q, llama, root: llama, "needs a Qwen3 or Qwen3-MoE base"),
    "mask-id": (lambda q, llama, root: _variant(q, root, {"mask_token_id": 5}), "mask token id 151669"),
    "shift": (lambda q, llama, root: _variant(q, root, {"shift": True}), "--shift"),
    "causal-clean": (lambda q, llama, root: _variant(q, root, {"causal_clean": True}), "--causal-clean"),
    "noisy-layout": (lambda q, llama, root: _trained(q, root, "noisy", final=True), "--attention noisy"),
    "bidirectional-layout": (lambda q, llama, root: _trained(q, root, "bidirectional", final=False),
                             "--attention bidirectional"),
}


@pytest.fixture(scope="module")
def llama_dlm_dir(tiny_ar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama") / "dlm"
    convert(tiny_ar_dir, out, block_size=4)
    return out


@pytest.mark.parametrize("case", REFUSALS)
def test_sdar_refuses_what_sdar_servers_cannot_serve(case, qwen3_dlm_dir, llama_dlm_dir, tmp_path, capsys):
    make, message = REFUSALS[case]
    model = make(qwen3_dlm_dir, llama_dlm_dir, tmp_path)
    with pytest.raises(EdlmError, match=message.replace("-", r"\-")):
        export(model, tmp_path / "out", "sdar")
    capsys.readouterr()  # drop library progress bars printed by the direct call
    assert main(["export", str(model), str(tmp_path / "out"), "--format", "sdar"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edlm export: error:") and message in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_sdar_refuses_an_autoregressive_model(qwen3_dlm_dir, tmp_path):
    dlm = DiffusionLM.from_pretrained(qwen3_dlm_dir, autoregressive=True)
    with pytest.raises(EdlmError, match="autoregressive"):
        export_model(dlm, tmp_path / "out", "sdar")


def test_export_argument_errors(llama_dlm_dir, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    cases = [
        ([str(llama_dlm_dir), str(busy), "--format", "hf"], "--force"),
        ([str(llama_dlm_dir), str(tmp_path / "o"), "--format", "hf", "--threshold", "0.9"], "--threshold"),
        ([str(llama_dlm_dir), str(tmp_path / "o"), "--format", "sdar", "--threshold", "1.5"], "--threshold"),
        ([str(tmp_path / "missing"), str(tmp_path / "o"), "--format", "hf"], "not found"),
        ([str(llama_dlm_dir), str(llama_dlm_dir), "--format", "hf", "--force"], "differ"),
    ]
    for argv, message in cases:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, argv
    assert (busy / "keep.txt").read_text() == "x" and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0 and "--format" in capsys.readouterr().out


# ---------------------------------------------------------------- --format hf
def test_hf_round_trip_keeps_settings_weights_and_decoding(llama_dlm_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(llama_dlm_dir), str(out), "--format", "hf"]) == 0
    assert "exported" in capsys.readouterr().out
    src, dst = DiffusionLM.from_pretrained(llama_dlm_dir), DiffusionLM.from_pretrained(out)
    assert dst.config == src.config and dst.model.config.model_type == "llama"
    before, after = _weights(llama_dlm_dir), _weights(out)
    assert before.keys() == after.keys() and all(torch.equal(after[k], w) for k, w in before.items())
    kwargs = dict(max_new_tokens=8, threshold=0.8)
    assert src.generate(PROMPTS, **kwargs).token_ids == dst.generate(PROMPTS, **kwargs).token_ids


def test_hf_export_of_a_lora_adapter_dir_merges_it(llama_dlm_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    dlm = DiffusionLM.from_pretrained(llama_dlm_dir)
    torch.manual_seed(0)
    peft = get_peft_model(dlm.model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(llama_dlm_dir)
    export(tmp_path / "adapter", tmp_path / "hf", "hf")
    expected = peft.merge_and_unload().state_dict()
    got = DiffusionLM.from_pretrained(tmp_path / "hf")
    assert got.config == dlm.config
    for name, w in got.model.state_dict().items():
        assert torch.equal(w, expected[name]), name


# ---------------------------------------------------------------- SDAR-MoE (a Qwen3-MoE base)
def _qwen3_moe_dlm(root, **overrides):
    model = make_tiny_causal_lm("qwen3_moe", vocab_size=151680, hidden_size=32, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=16, moe_intermediate_size=16, **overrides)
    model.save_pretrained(root / "base")
    qwen3_sized_tokenizer().save_pretrained(root / "base")
    convert(root / "base", root / "dlm", block_size=8)
    return root / "dlm"


def test_a_qwen3_moe_exports_as_sdar_moe_that_edlm_decodes_identically(tmp_path):
    from transformers import AutoConfig

    dlm_dir = _qwen3_moe_dlm(tmp_path)
    out = export(dlm_dir, tmp_path / "sdar", "sdar", threshold=0.8)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["SDARMoeForCausalLM"] and cfg["model_type"] == "sdar_moe"
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) == (4, 2, 16)
    assert cfg["decoder_sparse_step"] == 1 and cfg["mlp_only_layers"] == []
    hf = AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    assert type(hf).__name__ == "SDARMoeConfig" and hf.num_experts == 4 and hf.mask_token_id == SDAR_MASK_TOKEN_ID
    weights = _weights(out)
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in weights  # the per-expert names SGLang loads
    before = _weights(dlm_dir)
    assert all(torch.equal(weights[k], v) for k, v in before.items())
    ours, sdar = DiffusionLM.from_pretrained(dlm_dir), DiffusionLM.from_pretrained(out)
    assert sdar.model.config.model_type == "qwen3_moe"  # read as Qwen3-MoE: no remote code
    kwargs = dict(max_new_tokens=12, threshold=0.8)
    assert ours.generate(PROMPTS, **kwargs).token_ids == sdar.generate(PROMPTS, **kwargs).token_ids


def test_sdar_moe_refuses_dense_layers(tmp_path):
    dlm_dir = _qwen3_moe_dlm(tmp_path, mlp_only_layers=[1], intermediate_size=32)
    with pytest.raises(EdlmError, match="needs experts in every layer"):
        export(dlm_dir, tmp_path / "sdar", "sdar")
