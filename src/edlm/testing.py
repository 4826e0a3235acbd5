"""Tiny random models and a tiny tokenizer, for tests and examples (no network, no weights).

Lives in the package (not tests/) so benchmarks and `make demo`'s fallback can use it too.
"""

from __future__ import annotations

import string

import torch

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
MOE_ARCHITECTURES = ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral")  # edlm.moe's supported families

# 4 experts, 2 per token, every layer sparse; Qwen2-MoE's shared expert too (its field names differ)
_MOE = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, norm_topk_prob=False, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}

_SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def tiny_config(arch: str, vocab_size: int = 128, **overrides):
    from transformers import AutoConfig

    kwargs = dict(_SMALL, vocab_size=vocab_size, tie_word_embeddings=False)
    if arch in ("qwen3",):
        kwargs["head_dim"] = 16
    if arch in ("mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"):
        kwargs["sliding_window"] = None
    kwargs.update(_MOE.get(arch, {}))
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def make_tiny_causal_lm(arch: str = "llama", vocab_size: int = 128, attn_implementation="sdpa",
                        dtype=torch.float32, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size, **overrides)
    extra = {}
    if arch in MOE_ARCHITECTURES and dtype == torch.float64:  # grouped_mm (the default) has no float64
        extra["experts_implementation"] = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, **extra)
    return model.to(dtype).eval()


def make_tiny_tokenizer(vocab_size: int = 128):
    """A character-level fast tokenizer: printable ASCII plus specials, ids < vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


QWEN3_TOKENS = 151669  # len(Qwen3's tokenizer): `edlm convert` puts a new mask token at this id


def qwen3_sized_tokenizer():
    """The char-level tokenizer padded with `<x4>`..`<x151668>` (never produced by encoding) to Qwen3's
    151669 entries, so that `edlm convert` adds the mask token at id 151669 exactly as on a real Qwen3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for c in string.printable:
        if c not in "\x0b\x0c\r":
            vocab.setdefault(c, len(vocab))
    vocab.update({f"<x{i}>": i for i in range(len(vocab), QWEN3_TOKENS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


# ---- tiny vision-language models (edlm.vision): both supported families ----
VLM_ARCHITECTURES = ("qwen2_vl", "llava")  # M-RoPE (Qwen2-VL family), LLaVA-style (CLIP tower + projector)
_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<image>"]
_TEXT = dict(_SMALL, vocab_size=160, max_position_embeddings=512, tie_word_embeddings=False)


def make_tiny_vlm(arch: str = "qwen2_vl", seed: int = 0, dtype=torch.float32):
    """(model, tokenizer, image_processor) of a tiny random VLM; images of any size work.

    qwen2_vl: 14-pixel patches merged 2x2, so a W x H image gives (W/28)*(H/28) image tokens
    (sizes are rounded to 28 and kept between 28x28 and 112x112). llava: a CLIP tower on 28x28
    crops, 4 patches + CLS = 5 image tokens per image."""
    from transformers import AutoModelForImageTextToText, CLIPImageProcessorPil, LlavaConfig, Qwen2VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = make_tiny_tokenizer(160)
    tok.add_special_tokens({"additional_special_tokens": _VISION_TOKENS})
    ids = dict(zip(("start", "end", "image", "video", "llava"), tok.convert_tokens_to_ids(_VISION_TOKENS),
                   strict=True))
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if arch == "qwen2_vl":
        text = dict(_TEXT, **special, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "mrope_section": [2, 3, 3]})
        config = Qwen2VLConfig(text_config=text, image_token_id=ids["image"], video_token_id=ids["video"],
                               vision_start_token_id=ids["start"], vision_end_token_id=ids["end"],
                               vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                                                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
                               **special)
        processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                             temporal_patch_size=2)
    elif arch == "llava":
        config = LlavaConfig(text_config=dict(_TEXT, model_type="llama", **special),
                             vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=2, image_size=28,
                                                patch_size=14),
                             image_token_id=ids["llava"], vision_feature_layer=-1,
                             vision_feature_select_strategy="full", **special)
        processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    else:
        raise ValueError(f"no tiny VLM {arch!r}; choose from {VLM_ARCHITECTURES}")
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa").to(dtype).eval()
    return model, tok, processor


def save_tiny_vlm(out, arch: str = "qwen2_vl", seed: int = 0):
    """A tiny random VLM checkpoint dir (weights, tokenizer, image processor), as a hub VLM ships."""
    model, tok, processor = make_tiny_vlm(arch, seed)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out


def tiny_image(width: int = 56, height: int = 84, seed: int = 0):
    """A random RGB PIL image (seeded)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())
