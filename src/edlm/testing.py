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
