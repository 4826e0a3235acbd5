"""`edlm export`: hand a trained model to other servers.

--format sdar: the checkpoint layout of SDAR (JetLM/SDAR-*-Chat), which SGLang and LMDeploy serve as
  block-diffusion models. SDAR is Qwen3 weights + block-causal attention with clean earlier blocks +
  a mask token at id 151669, no shift, blocks aligned to absolute positions from 0: exactly what
  `edlm convert` + `edlm train` make of a Qwen3 base, so the export only rewrites config.json.
  Both engines hard-code the mask id (SGLang: dllm/config.py DLLM_PARAMS; LMDeploy:
  pytorch/configurations/sdar.py) and implement the model themselves: the directory ships only a
  small configuration_sdar.py so that `AutoConfig(..., trust_remote_code=True)` can read it.
  A Qwen3-MoE base exports as SDAR-MoE (SGLang's SDARMoeForCausalLM, as JetLM/SDAR-30B-A3B): the
  same rules, Qwen3-MoE weights under their per-expert names (what transformers 5 saves), and
  every layer sparse, the only layout SGLang's sdar_moe.py builds.
--format hf: a plain HF checkpoint (LoRA merged, edlm settings kept) for everything else.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from edlm.decode.options import DecodeOptions
from edlm.errors import EdlmError
from edlm.files import prepare_output_dir, write_dir_atomically
from edlm.model import DiffusionLM, read_checkpoint_config

FORMATS = ("sdar", "hf")
SDAR_MASK_TOKEN_ID = 151669  # the first free row of Qwen3's padded embedding (151669 tokens, 151936 rows)

# Qwen3Config fields copied into SDAR's config.json (RoPE is handled apart: see rope_fields).
QWEN3_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "tie_word_embeddings", "attention_bias", "use_sliding_window",
    "sliding_window", "max_window_layers", "layer_types", "attention_dropout",
    "bos_token_id", "eos_token_id", "pad_token_id",
)

CONFIGURATION_SDAR = '''"""SDAR configuration: Qwen3 hyper-parameters plus the block-diffusion settings.

Written by `edlm export --format sdar`. SGLang and LMDeploy implement SDARForCausalLM themselves and
only need this class to read config.json (hence --trust-remote-code). Works with transformers 4.x and 5.x.
"""

from transformers import PretrainedConfig


class SDARConfig(PretrainedConfig):
    model_type = "sdar"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, head_dim=128, hidden_act="silu",
                 max_position_embeddings=32768, initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True,
                 tie_word_embeddings=False, rope_theta=1000000.0, rope_scaling=None, attention_bias=False,
                 use_sliding_window=False, sliding_window=None, max_window_layers=28, attention_dropout=0.0,
                 mask_token_id=151669, block_size=4, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window if use_sliding_window else None
        self.max_window_layers = max_window_layers
        self.attention_dropout = attention_dropout
        self.mask_token_id = mask_token_id
        self.block_size = block_size
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        # Engines read `rope_theta` and fall back to 10000 when it is missing: always a plain attribute.
        self.rope_theta = rope_theta
        # transformers 5 keeps RoPE in `rope_parameters` (`rope_scaling` is a deprecated alias of it);
        # transformers 4 reads `rope_scaling`.
        if isinstance(getattr(PretrainedConfig, "rope_scaling", None), property):
            self.rope_parameters = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
        else:
            self.rope_scaling = rope_scaling


class SDARMoeConfig(SDARConfig):
    """SDAR-MoE (SGLang's SDARMoeForCausalLM): Qwen3-MoE experts in every layer."""

    model_type = "sdar_moe"

    def __init__(self, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                 decoder_sparse_step=1, mlp_only_layers=None, router_aux_loss_coef=0.001,
                 output_router_logits=False, **kwargs):
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.norm_topk_prob = norm_topk_prob
        self.decoder_sparse_step = decoder_sparse_step
        self.mlp_only_layers = [] if mlp_only_layers is None else mlp_only_layers
        self.router_aux_loss_coef = router_aux_loss_coef
        self.output_router_logits = output_router_logits
        super().__init__(**kwargs)


__all__ = ["SDARConfig", "SDARMoeConfig"]
'''

# Qwen3MoeConfig's own fields, beside QWEN3_FIELDS, in an SDAR-MoE config.json
QWEN3_MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                    "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "output_router_logits")


# ---------------------------------------------------------------- loading
def stored_dtype(raw: dict) -> torch.dtype:
    """The dtype the checkpoint was saved in: an export keeps it (fp32 when unrecorded)."""
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def load_for_export(path):
    """A converted edlm dir, an SDAR dir, or a PEFT LoRA adapter dir on top of one (merged here)."""
    path = Path(path)
    if not path.is_dir():
        raise EdlmError(f"model directory not found: {path}")
    adapter = path / "adapter_config.json"
    if not adapter.is_file():
        return DiffusionLM.from_pretrained(path, device="cpu", dtype=stored_dtype(read_checkpoint_config(path)))
    base = json.loads(adapter.read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise EdlmError(f"{path} is a LoRA adapter whose base model {base!r} is not a local directory")
    from peft import PeftModel

    dlm = DiffusionLM.from_pretrained(base, device="cpu", dtype=stored_dtype(read_checkpoint_config(base)))
    model = PeftModel.from_pretrained(dlm.model, str(path)).merge_and_unload()
    return DiffusionLM(model.eval(), dlm.tokenizer, dlm.config)


def _adapter_base(path) -> str | None:
    """The local base model of a LoRA adapter dir (read too: OUT must keep clear of it), else None."""
    try:
        base = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return base if isinstance(base, str) and Path(base).is_dir() else None


def training_layout(path) -> dict | None:
    """The TrainConfig of the `edlm train` run MODEL came from, or None when it is not from one.

    A checkpoint's model sits in step-N/model beside step-N/trainer.json; a run's final RUN/model is a
    copy of the last checkpoint's model, so its settings are in RUN/checkpoints/step-*/trainer.json.
    """
    path = Path(path)
    found = [path.parent / "trainer.json"] if (path.parent / "trainer.json").is_file() else []
    found = found or sorted((path.parent / "checkpoints").glob("step-*/trainer.json"))
    if not found:
        return None
    try:
        return json.loads(found[-1].read_text()).get("config")
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------- SDAR
def check_sdar_servable(dlm, layout: dict | None = None) -> None:
    """Raise EdlmError unless SGLang/LMDeploy would decode this model exactly as edlm does."""
    model_config = dlm.inner_model.config
    model_type = getattr(model_config, "model_type", None)
    if not dlm.config.diffusion:
        raise EdlmError("--format sdar needs a block-diffusion model; this is an autoregressive checkpoint")
    if model_type not in ("qwen3", "qwen3_moe"):
        raise EdlmError(f"--format sdar needs a Qwen3 or Qwen3-MoE base (SDAR is Qwen3 weights, SDAR-MoE "
                        f"Qwen3-MoE's), this model is {model_type!r}: use --format hf")
    if model_type == "qwen3_moe" and (getattr(model_config, "decoder_sparse_step", 1) != 1
                                      or getattr(model_config, "mlp_only_layers", None)):
        raise EdlmError("--format sdar of a Qwen3-MoE needs experts in every layer (SGLang's SDAR-MoE builds no "
                        "dense layers), this model has dense ones (decoder_sparse_step / mlp_only_layers): "
                        "use --format hf")
    if dlm.config.mask_token_id != SDAR_MASK_TOKEN_ID:
        raise EdlmError(f"--format sdar needs mask token id {SDAR_MASK_TOKEN_ID} (SGLang and LMDeploy hard-code "
                        f"it), this model uses {dlm.config.mask_token_id}: use --format hf")
    if dlm.tokenizer.mask_token_id != SDAR_MASK_TOKEN_ID:
        raise EdlmError(f"the tokenizer's mask token is id {dlm.tokenizer.mask_token_id}, the model's is "
                        f"{SDAR_MASK_TOKEN_ID}: the checkpoint is inconsistent")
    if dlm.config.shift:
        raise EdlmError("--format sdar needs a no-shift model (SDAR predicts token i at position i), "
                        "this one was converted with --shift: use --format hf")
    if dlm.config.causal_clean:
        raise EdlmError("--format sdar needs a block-causal clean stream (SGLang writes finished blocks' KV "
                        "block-causally), this model was trained with --causal-clean: use --format hf")
    attention = (layout or {}).get("attention", "clean")
    if attention != "clean":
        raise EdlmError(f"--format sdar needs SDAR's training layout (noisy blocks see clean earlier blocks, "
                        f"edlm's --attention clean); this model was trained with --attention {attention}: "
                        "use --format hf")


def rope_fields(config) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) in the pre-5.x layout that serving engines read."""
    params = getattr(config, "rope_parameters", None)  # transformers >= 5
    if params is None:
        return float(getattr(config, "rope_theta", 10000.0)), getattr(config, "rope_scaling", None)
    params = dict(params)
    theta = float(params.pop("rope_theta", getattr(config, "rope_theta", 10000.0)))
    return theta, (None if params.get("rope_type", "default") == "default" else params)


def sdar_config(model_config, block_size: int, dtype: torch.dtype) -> dict:
    """SDAR's config.json: every Qwen3 field, RoPE and head_dim explicit, plus mask id and block size;
    SDAR-MoE's (a Qwen3-MoE model) with the expert fields too."""
    import transformers

    moe = model_config.model_type == "qwen3_moe"
    cfg = {
        "architectures": ["SDARMoeForCausalLM" if moe else "SDARForCausalLM"],
        "model_type": "sdar_moe" if moe else "sdar",
        "auto_map": {"AutoConfig": f"configuration_sdar.{'SDARMoeConfig' if moe else 'SDARConfig'}"},
    }
    cfg.update({name: getattr(model_config, name, None) for name in QWEN3_FIELDS + (QWEN3_MOE_FIELDS if moe else ())})
    cfg["head_dim"] = getattr(model_config, "head_dim", None) or (
        model_config.hidden_size // model_config.num_attention_heads)
    cfg["rope_theta"], cfg["rope_scaling"] = rope_fields(model_config)
    cfg["tie_word_embeddings"] = False  # the export always writes lm_head.weight (see untied_head)
    dtype_name = str(dtype).removeprefix("torch.")
    cfg.update(mask_token_id=SDAR_MASK_TOKEN_ID, block_size=block_size, torch_dtype=dtype_name, dtype=dtype_name,
               transformers_version=transformers.__version__)
    return cfg


def launch_commands(out: Path, block_size: int, threshold: float) -> dict[str, str]:
    out = out.resolve()
    return {
        "SGLang": f"python -m sglang.launch_server --model-path {out} --trust-remote-code "
                  f"--dllm-algorithm LowConfidence --dllm-algorithm-config {out / 'dllm.yaml'}",
        # One forced token per step (denoising steps = block length) plus the threshold: edlm's rule.
        "LMDeploy": f"lmdeploy serve api_server {out} --backend pytorch --dllm-block-length {block_size} "
                    f"--dllm-unmasking-strategy low_confidence_dynamic --dllm-denoising-steps {block_size} "
                    f"--dllm-confidence-threshold {threshold}",
        "edlm": f"edlm generate {out} --prompt 'Hello' --threshold {threshold}",
    }


def serving_readme(out: Path, block_size: int, threshold: float) -> str:
    cmds = launch_commands(out, block_size, threshold)
    lines = [
        "# SDAR-format block-diffusion model (written by `edlm export --format sdar`)",
        "",
        f"Qwen3 (or Qwen3-MoE: SDAR-MoE) weights, block size {block_size}, mask token id {SDAR_MASK_TOKEN_ID}, "
        "no shift, blocks aligned to absolute positions from 0.",
        "`dllm.yaml` holds the decoding settings SGLang reads (block_size, threshold).",
        "transformers reads config.json with `trust_remote_code=True` (configuration_sdar.py); there is no",
        "modeling code: serve it with an engine below, or load it with `edlm.DiffusionLM.from_pretrained`.",
        "",
    ]
    for name, cmd in cmds.items():
        lines += [f"## {name}", "", "```bash", cmd, "```", ""]
    return "\n".join(lines)


def _portable_tokenizer_config(directory: Path) -> None:
    """transformers 5 names tokenizer.json-only tokenizers `TokenizersBackend`, a class transformers 4
    (which serving engines often pin) does not know; `PreTrainedTokenizerFast` loads it in both."""
    path = directory / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def untied_head(model):
    """Within the block, the LM head is its own copy of a tied embedding and the config says untied.

    SGLang's SDAR model (0.5.23, srt/models/sdar.py) loads `lm_head.weight` unconditionally, so an
    export of a tied Qwen3 (0.6B/1.7B/4B all tie) crashes it with KeyError; LMDeploy handles both.
    The copy has the same values, so every engine (edlm included) decodes the export identically.
    The model is restored afterwards: exporting never changes the caller's in-memory model.
    """
    head, config = model.get_output_embeddings(), model.config
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    if not tied:
        yield
        return
    shared = head.weight
    head.weight = torch.nn.Parameter(shared.detach().clone(), requires_grad=False)
    config.tie_word_embeddings = False
    try:
        yield
    finally:
        head.weight = shared
        config.tie_word_embeddings = True


def write_sdar(dlm, out: Path, threshold: float, readme_path: Path) -> None:
    model = dlm.inner_model
    with untied_head(model):  # SGLang's sdar.py reads lm_head.weight and crashes without it
        model.save_pretrained(str(out), safe_serialization=True)
    cfg = sdar_config(model.config, dlm.config.block_size, dlm.dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "configuration_sdar.py").write_text(CONFIGURATION_SDAR)
    dlm.tokenizer.save_pretrained(str(out))
    _portable_tokenizer_config(out)
    (out / "dllm.yaml").write_text(f"# SGLang --dllm-algorithm-config (LowConfidence)\n"
                                   f"block_size: {dlm.config.block_size}\nthreshold: {threshold}\n")
    (out / "README.md").write_text(serving_readme(readme_path, dlm.config.block_size, threshold))


# ---------------------------------------------------------------- entry points
def _check_format(format: str, threshold: float | None) -> None:
    if format not in FORMATS:
        raise EdlmError(f"--format must be one of {FORMATS}, got {format!r}")
    if format == "hf" and threshold is not None:
        raise EdlmError("--threshold only applies to --format sdar")


def export_model(dlm, out, format: str, threshold: float | None = None, force: bool = False,
                 layout: dict | None = None) -> Path:
    """Write an in-memory DiffusionLM to OUT in FORMAT; `layout` is its TrainConfig, when known.
    The SDAR threshold defaults like every decode option (the checkpoint's, then the engine's)."""
    _check_format(format, threshold)
    out = prepare_output_dir(out, force)
    if format == "sdar":
        check_sdar_servable(dlm, layout)
        threshold = DecodeOptions.resolve(dlm, strategy="threshold", threshold=threshold).threshold
    from edlm.drafter import gate_of

    if gate_of(dlm.inner_model) is not None:
        raise EdlmError("this model drafts with an adapter that acts per token (noisy positions only): no engine "
                        "format holds it, and merging it would change the parent; serve it with `edlm serve`")
    dlm = dlm.merged()
    if format == "sdar":
        write_dir_atomically(out, lambda tmp: write_sdar(dlm, tmp, threshold, readme_path=out))
    else:
        write_dir_atomically(out, dlm.save_pretrained)
    return out


def export(model, out, format: str, threshold: float | None = None, force: bool = False) -> Path:
    """`edlm export`: load MODEL (converted/trained edlm dir, SDAR dir, or LoRA adapter dir), write OUT."""
    _check_format(format, threshold)  # fail before loading a large model
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise EdlmError(f"--threshold must be in (0, 1], got {threshold}")
    prepare_output_dir(out, force, MODEL=model, **({"BASE": base} if (base := _adapter_base(model)) else {}))
    return export_model(load_for_export(model), out, format, threshold, force, layout=training_layout(model))
