"""DiffusionLM: a Hugging Face causal LM driven as a block-diffusion language model.

The wrapped model is untouched; block diffusion is entirely in the inputs we give it: a 4D
attention mask, duplicated position ids for the concat(x_t, x_0) layout, and a mask token.
That is why any architecture that honours 4D masks and position_ids works (checked at
conversion by `edlm.train.convert.check_mask_support`).
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch

from edlm.config import CONFIG_KEY, DiffusionConfig
from edlm.errors import EdlmError, first_line
from edlm.masks import (
    bidirectional_mask,
    block_copies_mask,
    clean_context_mask,
    noisy_context_mask,
    to_backend_mask,
)

ATTENTION_VARIANTS = ("clean", "noisy", "bidirectional")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 autocast measured ~25x slower than fp32 on an AVX2 CPU without AMX: fp32 on CPU, bf16 on CUDA.
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def read_checkpoint_config(path: str | Path) -> dict:
    path = Path(path)
    if path.is_file():  # e.g. a .gguf or a weights file given for the model's folder
        raise EdlmError(f"{path} is a file, not a model directory (a checkpoint folder holding config.json)")
    if not path.is_dir():
        raise EdlmError(f"model directory not found: {path}")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise EdlmError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    try:
        return json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EdlmError(f"cannot read {cfg}: {exc}") from None


def _is_hub_id(name: str) -> bool:
    """`org/name` or `name`: loaded from the hub where the network allows it."""
    parts = name.split("/")
    return len(parts) <= 2 and not name.startswith((".", "/", "~")) and all(parts)


def _sdar_as_qwen3(path) -> dict:
    """from_pretrained kwargs for an SDAR dir (JetLM's, or `edlm export --format sdar`), else {}.

    SDAR is Qwen3 weights under Qwen3 names, but its config.json says model_type "sdar", which
    transformers only knows through remote code. Reading the same fields as a Qwen3Config lets
    AutoModelForCausalLM build Qwen3ForCausalLM with no remote code.
    """
    if not (Path(path) / "config.json").is_file():
        return {}
    raw = read_checkpoint_config(path)
    if raw.get("model_type") not in ("sdar", "sdar_moe"):
        return {}
    from transformers import Qwen3Config, Qwen3MoeConfig

    config = Qwen3MoeConfig if raw["model_type"] == "sdar_moe" else Qwen3Config  # SDAR-MoE: Qwen3-MoE weights
    return {"config": config.from_dict({k: v for k, v in raw.items()
                                        if k not in ("model_type", "architectures", "auto_map")})}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tiktoken.model")


def _tokenizer_problem(path, exc: BaseException) -> str:
    """One useful line: which files are missing, else the loader's message in full (some end in ':')."""
    folder = Path(path)
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        return (f"no tokenizer files in {folder} (expected one of {', '.join(TOKENIZER_FILES[:3])}, ...); "
                "copy them from the base model")
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def load_causal_lm(path, device=None, dtype=None, attn_implementation: str = "sdpa"):
    """Load a HF causal LM + tokenizer from a local dir with user-facing errors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if Path(path).is_file():
        raise EdlmError(f"{path} is a file, not a model directory (a checkpoint folder holding config.json)")
    if not Path(path).exists() and not _is_hub_id(str(path)):
        raise EdlmError(f"model directory not found: {path}")
    sdar = _sdar_as_qwen3(path)  # also for AutoTokenizer, which reads the model config too
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), **sdar)
    except Exception as exc:  # noqa: BLE001 - many loader errors, one user message
        raise EdlmError(f"cannot load a tokenizer from {path}: {_tokenizer_problem(path, exc)}") from None
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise in a library call
    from edlm import vision

    vlm = vision.is_vlm(read_checkpoint_config(path)) if (Path(path) / "config.json").is_file() else False
    loader = AutoModelForCausalLM
    if vlm:  # a vision-language model: its language model is the LM edlm drives, its images the prompt's
        from transformers import AutoModelForImageTextToText as loader
    try:
        model = loader.from_pretrained(
            str(path), dtype=dtype, attn_implementation=attn_implementation, **sdar
        )
    except ValueError as exc:
        raise EdlmError(f"{path} is not a causal language model: {first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001
        raise EdlmError(f"cannot load a causal LM from {path}: {first_line(exc)}") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if vlm:
        model.edlm_image_processor = vision.load_image_processor(path)
    return model.to(device).eval(), tokenizer


class DiffusionLM:
    """A causal LM plus the settings (block size, mask token, shift) that make it a dLM."""

    # the decoding forward through torch.compile (`compile`); None: eager, `model` itself
    compiled_model = None
    # the decode steps' forward as an ahead-of-time compiled program (`compile(aot=True)`, edlm.aot)
    aot_step = None

    def __init__(self, model, tokenizer, config: DiffusionConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config

    # ---- loading and saving (transformers conventions) ----
    @classmethod
    def from_pretrained(
        cls, path, device=None, dtype=None, attn_implementation: str = "sdpa", autoregressive: bool = False,
        compile: bool | str = False,
    ) -> "DiffusionLM":
        """Load a converted checkpoint; `autoregressive=True` drives a plain AR checkpoint instead;
        `compile=True` decodes through torch.compile, `compile="aot"` also through an ahead-of-time
        compiled step (`DiffusionLM.compile`)."""
        if compile not in (None, False, True, "graph", "aot"):
            raise EdlmError(f"compile must be True, 'graph' or 'aot', got {compile!r}")
        raw = read_checkpoint_config(path)
        if autoregressive:
            config = DiffusionConfig.autoregressive(base_model=str(path))
        elif CONFIG_KEY in raw:
            config = DiffusionConfig.from_dict(raw[CONFIG_KEY])
        elif raw.get("model_type") in ("sdar", "sdar_moe") and "mask_token_id" in raw:
            config = DiffusionConfig(block_size=int(raw.get("block_size", 4)), mask_token_id=int(raw["mask_token_id"]))
        else:
            raise EdlmError(f"{path} is not a converted edlm model (run `edlm convert {path} OUT` first)")
        model, tokenizer = load_causal_lm(path, device, dtype, attn_implementation)
        rows = model.get_input_embeddings().weight.shape[0]
        if config.mask_token_id is not None and config.mask_token_id >= rows:
            raise EdlmError(f"{path}: mask_token_id {config.mask_token_id} is outside the model's {rows} "
                            "embedding rows")
        if config.drafter is not None and not autoregressive:
            from edlm import drafter

            drafter.load(model, Path(path), drafter.DrafterConfig(**config.drafter))
        dlm = cls(model, tokenizer, config)
        return dlm.compile(aot=compile == "aot") if compile else dlm

    def compile(self, mode: str | None = None, fuse: bool = True, aot: bool = False) -> "DiffusionLM":
        """Decode (every strategy, the AR engine, scoring) through a torch.compile'd forward.

        Why: a small model's forward, and a block's few tokens on a big one, cost mostly the
        per-op overhead of eager PyTorch and HF's plumbing around a few small GEMMs (gpt-fast's
        point); on the demo dLM a compiled forward takes ~0.6x the time on a CPU. Shapes are
        dynamic (a block's keys grow every step), so one graph serves most calls; batch 1 vs more,
        one query vs many and a prefill without mask each compile once more, seconds each on the
        first such call: worth it for a server, a bench or a long batch job, not for one prompt.
        The logits match eager to float tolerance (greedy texts were identical on the demo's 500
        held-out problems); training and HF `generate` keep the eager model. `mode` is
        torch.compile's (e.g. "max-autotune" on CUDA); `fuse`: sibling projections as one GEMM
        (edlm.fusion; False only to measure what that buys, bench/forward.py). `aot`: the decode
        steps' forward also as one exported, ahead-of-time compiled program (edlm.aot: no guards, a
        C++ wrapper; ~25% less per forward on a CPU, ~20 s more to build); fp32 or a GPU, dense
        text models."""
        import torch._dynamo

        if aot:
            from edlm.aot import refusal

            if (why := refusal(self)) is not None:  # before any work: the model is left as it was
                raise EdlmError(f"cannot compile ahead of time: {why}")
        # each batch-size / query-count / mask class is one more graph of the same HF forward, shared
        # by every model in the process: dynamo's default limit of 8 would fall back to eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        from edlm import fusion

        if fuse:
            fusion.fuse(self.inner_model)  # q/k/v and gate/up (and a drafter's W and A) each as one GEMM
        self.compiled_model = torch.compile(self.model, dynamic=True, mode=mode)
        if aot:
            from edlm.aot import AotStep

            self.aot_step = AotStep(self)
        return self

    def save_pretrained(self, out, state_dict: dict | None = None) -> None:
        """A normal HF checkpoint dir plus our settings; `state_dict` overrides the weights
        (a sharded trainer's gathered full state)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        model = self.inner_model
        if self.config.diffusion:
            model.config.update({CONFIG_KEY: self.config.to_dict()})
        from edlm import drafter

        if drafter.gate_of(model) is not None:  # the parent's weights under their own names, the adapter beside
            drafter.save(model, out, drafter.DrafterConfig(**self.config.drafter), self.config.mask_token_id)
            state_dict = drafter.base_state(model) if state_dict is None else state_dict
        model.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save_pretrained(str(out))
        if self.image_processor is not None:
            self.image_processor.save_pretrained(str(out))

    def merged(self) -> "DiffusionLM":
        """The plain model to save: unwrapped, LoRA (PEFT) merged into a copy; a plain model as is."""
        model = self.inner_model
        from edlm.drafter import gate_of

        if gate_of(model) is not None:  # saved beside the weights (drafter.safetensors): nothing to merge
            if hasattr(model, "merge_and_unload"):
                raise EdlmError("a drafting adapter and a PEFT LoRA on one model cannot be merged together")
            return self
        if hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        return DiffusionLM(model, self.tokenizer, self.config)

    # ---- properties ----
    @property
    def inner_model(self):
        """The HF model itself, under any DDP/FSDP/DeepSpeed wrapper (which all keep `.module`)."""
        model = self.model
        while hasattr(model, "module") and not hasattr(model, "config"):
            model = model.module
        return model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def attn_implementation(self) -> str:
        return getattr(self.inner_model.config, "_attn_implementation", None) or "eager"

    @property
    def text_config(self):
        """The language model's config (a VLM's text_config; the model's own for a text LM)."""
        from edlm.vision import text_config

        return text_config(self.inner_model.config)

    @property
    def image_processor(self):
        """A VLM's image processor. It is kept on the HF model object (`edlm_image_processor`), so
        every DiffusionLM built around the model (training re-wraps it) keeps it; None: a text LM."""
        return getattr(self.inner_model, "edlm_image_processor", None)

    @property
    def max_positions(self) -> int | None:
        """The context length. Read every decode step, and an HF config attribute costs tens of
        microseconds (its __getattribute__ hooks), so it is remembered per config object."""
        config = self.inner_model.config
        memo = self.__dict__.get("_max_positions")
        if memo is None or memo[0] is not config:
            memo = self._max_positions = (config, getattr(self.text_config, "max_position_embeddings", None))
        return memo[1]

    def backend_mask(self, mask: torch.Tensor, key_padding: torch.Tensor | None = None):
        attn = self.attn_implementation
        dtype = self.dtype if attn == "eager" else torch.float32  # only eager's additive mask has a dtype
        return to_backend_mask(mask, attn, key_padding, dtype)

    # ---- training forward ----
    def _over_frozen_clean(self, ids, position_ids, mask, seq_len: int, clean_logits: bool, gate):
        """forward_noisy's [noisy ; clean] forward when nothing that learns acts on the clean stream
        (a drafter over its frozen parent): the clean half first, without a graph, into a KV cache
        (clean tokens never see noisy ones, so this is exact), then the noisy half over that cache.
        Backward then holds the noisy half's activations only, and attention is [W, L + W] rather
        than [L + W, L + W]: the drafter's training memory. Logits as the one forward's: the noisy
        inputs', then the clean stream's where `clean_logits`."""
        from transformers import DynamicCache

        w = ids.shape[1] - seq_len  # noisy inputs first
        cache = DynamicCache()
        with torch.no_grad():
            clean = self.model(input_ids=ids[:, w:], attention_mask=self.backend_mask(mask[:, w:, w:]),
                               position_ids=position_ids[:, w:], cache=cache, use_cache=True,
                               logits_to_keep=0 if clean_logits else 1).logits
        over_cache = torch.cat([mask[:, :w, w:], mask[:, :w, :w]], dim=-1)  # keys: the cache, then the noisy
        with gate.open_on(True):
            noisy = self.model(input_ids=ids[:, :w], attention_mask=self.backend_mask(over_cache),
                               position_ids=position_ids[:, :w], cache=cache, use_cache=True).logits
        return torch.cat([noisy, clean], dim=1) if clean_logits else noisy

    def forward_noisy(
        self,
        x_t: torch.Tensor,
        x_0: torch.Tensor,
        attention: str = "clean",
        block_size: int | None = None,
        shift: bool | None = None,
        active: torch.Tensor | None = None,
        with_clean: bool = False,
        vision=None,
        window_start: torch.Tensor | None = None,
    ):
        """Logits [B, L, V] that predict x_0 at every position of the noisy sequence x_t.

        attention="clean" (the paper's method): input concat(x_t, x_0) [B, 2L], the same position
        ids 0..L-1 on both halves, clean_context_mask; only the noisy half is projected to the
        vocabulary (logits_to_keep), which saves half of the LM-head cost.
        "noisy" and "bidirectional" feed x_t alone (paper Table 1 study variants).
        With shift, the logit for position i comes from position i-1; for the first token of a
        block under clean context that is the *clean* stream's i-1, exactly what decoding has.
        active [B, n_blocks] (clean only): the noisy blocks that carry loss. The others are left
        out of the input, which is exact (a noisy token attends only its own noisy block) and
        saves their compute: on SFT data prompt-only blocks are a large share. Their logits are 0.
        with_clean (clean attention only): also return the clean stream's logits [B, L, V] (position
        i predicts token i+1: under config.causal_clean an AR model's, for the AR loss).
        vision: a VLM batch's edlm.vision.VisionRows (edlm.vision.training_vision): the model is fed
        input embeddings, with the image features wherever a position of either stream holds an image
        token (a noisy block straddling the prompt's end carries its prompt tokens, as decoding feeds
        it), and M-RoPE models get 3-D position ids from the logical ones, equal on both streams.
        window_start [B, n_blocks] (clean attention only): training in windows of blocks, as
        multi-block decoding sees them (edlm.train.parallelism.window_starts): each noisy block
        sees the noisy blocks of its window before it instead of their clean ones, and with shift a
        block's first token inside a window comes from the noisy block before it, as decoding has.
        """
        block_size = block_size or self.config.block_size
        shift = self.config.shift if shift is None else shift
        causal = self.config.causal_clean
        if with_clean and attention != "clean":
            raise EdlmError("clean-stream logits exist only with attention='clean'")
        batch, seq_len = x_t.shape
        device = x_t.device
        pos = torch.arange(seq_len, device=device)
        noisy_at = None  # [B, W] positions of the noisy inputs when only active blocks are fed
        if window_start is not None and attention != "clean":
            raise EdlmError("training windows exist only with attention='clean'")
        if attention == "clean" and (window_start is not None or (active is not None and not active.all())):
            if active is None:
                active = torch.ones_like(window_start, dtype=torch.bool)
            tok_active = active.repeat_interleave(block_size, dim=1)[:, :seq_len]
            width = max(int(tok_active.sum(1).max()), 1)
            noisy_at = tok_active.int().argsort(dim=1, descending=True, stable=True)[:, :width]
            fed = tok_active.gather(1, noisy_at)
            ids = torch.cat([x_t.gather(1, noisy_at), x_0], dim=1)
            position_ids = torch.cat([noisy_at, pos[None].expand(batch, -1)], dim=1)
            group = torch.cat([torch.where(fed, noisy_at // block_size, -2),
                               torch.full_like(x_0, -1)], dim=1)  # a copy per block; -1 clean, -2 pad
            ws = None
            if window_start is not None:  # per token: its block's window start (clean and pad: unused)
                ws = torch.cat([window_start.gather(1, noisy_at // block_size), torch.full_like(x_0, -1)], dim=1)
            mask = block_copies_mask(position_ids, group, block_size, causal_clean=causal, window_start=ws)
            keep = torch.arange(width + seq_len if shift or with_clean else width, device=device)
        elif attention == "clean":
            ids = torch.cat([x_t, x_0], dim=1)
            position_ids = torch.cat([pos, pos])[None].expand(batch, -1)
            mask = clean_context_mask(seq_len, block_size, device, causal_clean=causal)
            keep = pos
            if shift or with_clean:
                keep = torch.cat([pos, seq_len + pos])  # clean logits feed block starts
        elif attention in ("noisy", "bidirectional"):
            ids = x_t
            position_ids = pos[None].expand(batch, -1)
            if attention == "noisy":
                mask = noisy_context_mask(seq_len, block_size, device)
            else:
                mask = bidirectional_mask(seq_len, device)
            keep = pos
        else:
            raise EdlmError(f"unknown attention variant {attention!r}; choose from {ATTENTION_VARIANTS}")
        from edlm.drafter import gate_of

        gate = gate_of(self.inner_model)  # a drafting adapter acts on the noisy inputs only
        noisy = None
        if gate is not None:
            n_noisy = noisy_at.shape[1] if noisy_at is not None else seq_len
            noisy = (torch.arange(ids.shape[1], device=device) < n_noisy)[None].expand(batch, -1)
            if attention != "clean":
                noisy = torch.ones_like(noisy)
        inputs = {"input_ids": ids}
        if vision is not None:
            from edlm.vision import hf_model

            embeds, position_ids = vision.inputs(hf_model(self.model), position_ids, ids)
            inputs = {"inputs_embeds": embeds}
        if attention == "clean" and gate is not None and gate.parent_frozen and vision is None:
            logits = self._over_frozen_clean(ids, position_ids, mask.expand(batch, -1, -1), seq_len,
                                             keep.numel() > ids.shape[1] - seq_len, gate)
        else:
            with gate.open_on(noisy) if gate is not None else contextlib.nullcontext():
                logits = self.model(**inputs, attention_mask=self.backend_mask(mask.expand(batch, -1, -1)),
                                    position_ids=position_ids, logits_to_keep=keep, use_cache=False).logits
        if noisy_at is not None:  # back to [B, L, V]; pad slots land on inactive positions
            width = noisy_at.shape[1]
            noisy = logits.new_zeros(batch, seq_len, logits.shape[-1])
            fed_logits = torch.where(fed[..., None], logits[:, :width], 0)
            noisy = noisy.scatter(1, noisy_at[..., None].expand(-1, -1, logits.shape[-1]), fed_logits)
            logits = torch.cat([noisy, logits[:, width:]], dim=1)
        clean = logits[:, seq_len:] if attention == "clean" and (shift or with_clean) else None
        noisy = logits[:, :seq_len]
        if not shift:
            return (noisy, clean) if with_clean else noisy
        shifted = torch.empty_like(noisy)
        shifted[:, 1:] = noisy[:, :-1]
        shifted[:, 0] = noisy[:, 0]  # position 0 has no predecessor; never scored under shift
        if attention == "clean":
            starts = torch.arange(block_size, seq_len, block_size, device=device)
            from_clean = clean[:, starts - 1]
            if window_start is not None:  # inside a window the noisy block before predicts it
                opens = window_start[:, 1: 1 + starts.numel()] == torch.arange(1, 1 + starts.numel(), device=device)
                from_clean = torch.where(opens[..., None], from_clean, shifted[:, starts])
            shifted[:, starts] = from_clean
        return (shifted, clean) if with_clean else shifted

    # ---- inference ----
    def generate(self, prompts, **kwargs):
        """Block-parallel decoding; see `edlm.decode.generate` for every option and its default."""
        from edlm.decode import generate

        return generate(self, prompts, **kwargs)

    def stream(self, prompts, **kwargs):
        """Iterator form of generate: yields BlockEvent(row, text, token_ids) per committed block."""
        from edlm.decode import stream

        return stream(self, prompts, **kwargs)

    def embed(self, texts, batch_size: int = 16, max_length: int | None = None) -> torch.Tensor:
        """L2-normalised mean-pooled last hidden states under a bidirectional mask (paper Sec. 5.3)."""
        from edlm.embed import embed

        return embed(self, texts, batch_size=batch_size, max_length=max_length)
