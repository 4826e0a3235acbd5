"""AR -> dLM conversion: pick or add a mask token, record our settings, keep every AR weight.

Whether an architecture can be converted is decided by a behavioural self-check (does its output
change exactly as a block mask says it must?), not by a list of model names.
"""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

import torch

from edlm.config import CONFIG_KEY, DEFAULT_BLOCK_SIZE, DiffusionConfig
from edlm.errors import EdlmError, first_line
from edlm.files import prepare_output_dir, write_dir_atomically
from edlm.masks import block_causal_mask, to_backend_mask
from edlm.model import DiffusionLM, load_causal_lm, read_checkpoint_config
from edlm.vision import PROCESSOR_FILES, text_config

NEW_MASK_TOKEN = "<|mask|>"
# SDAR names Qwen3's mask token <|MASK|> (its generate.py strips "<|MASK|>"); keeping that name on
# Qwen3 bases makes a converted model's tokenizer match what SDAR servers (SGLang, LMDeploy) ship.
SDAR_MASK_TOKEN = "<|MASK|>"


def new_mask_token_name(model) -> str:
    return SDAR_MASK_TOKEN if getattr(model.config, "model_type", None) == "qwen3" else NEW_MASK_TOKEN


def choose_mask_token(model, tokenizer, mask_token: str | None = None) -> int:
    """Return the mask token id, adding the token (and an embedding row) when it is new.

    Order: the named token if given, else the tokenizer's own mask_token, else a new <|mask|>
    (<|MASK|> on Qwen3, as SDAR).
    A new token whose id still falls inside the model's embedding (vocabularies padded to a
    multiple, e.g. Qwen3's 151669 -> row 151669 of 151936) reuses that free row, as SDAR does;
    otherwise the embeddings grow by one row. Either way the new row is the mean embedding
    (transformers' mean resizing), and all existing rows stay bit-identical.
    """
    vocab = tokenizer.get_vocab()
    if mask_token is not None and not mask_token.strip():
        raise EdlmError("--mask-token is empty: leave the flag out for the default (the tokenizer's mask "
                        "token, else a new one), or name a token")
    if mask_token is None and tokenizer.mask_token is not None:
        return _check_mask_role(model, tokenizer, int(tokenizer.mask_token_id), tokenizer.mask_token)
    name = mask_token or new_mask_token_name(model)
    if name in vocab:
        _check_mask_role(model, tokenizer, int(vocab[name]), name)
        if name not in tokenizer.get_added_vocab():  # legitimate only when no free token exists
            print(f"edlm convert: warning: mask token {name!r} is an ordinary token of the vocabulary: every "
                  "occurrence in text will read as a mask; name a special or reserved token, or a new one",
                  file=sys.stderr)
        tokenizer.mask_token = name
        return int(vocab[name])
    tokenizer.add_special_tokens({"mask_token": name})
    new_id = int(tokenizer.convert_tokens_to_ids(name))
    rows = model.get_input_embeddings().weight.shape[0]
    if new_id >= rows:
        model.resize_token_embeddings(new_id + 1, mean_resizing=True)
    else:
        _fill_free_row(model, new_id, used_rows=new_id)
    return new_id


def _check_mask_role(model, tokenizer, mask_id: int, name: str) -> int:
    """Refuse a mask token that is also EOS, BOS or PAD: a decoded mask would read as the end of
    the text (the model could never stop, or always stop) and padding would be trained as noise."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    roles = [("the tokenizer's EOS token", tokenizer.eos_token_id), ("the tokenizer's BOS token", tokenizer.bos_token_id),
             ("the tokenizer's PAD token", tokenizer.pad_token_id),
             *(("an EOS token of the model's generation config", e) for e in (eos if isinstance(eos, list) else [eos]))]
    clashes = list(dict.fromkeys(role for role, role_id in roles if role_id is not None and role_id == mask_id))
    if clashes:
        raise EdlmError(f"mask token {name!r} (id {mask_id}) is {' and '.join(clashes)}: a mask must be a token "
                        "of its own; name another (e.g. a reserved special token) or leave --mask-token out "
                        "to add a new one")
    return mask_id


@torch.no_grad()
def _fill_free_row(model, row: int, used_rows: int) -> None:
    emb = model.get_input_embeddings().weight
    emb[row] = emb[:used_rows].float().mean(0).to(emb.dtype)
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != emb.data_ptr():
        head.weight[row] = head.weight[:used_rows].float().mean(0).to(head.weight.dtype)


@torch.no_grad()
def check_mask_support(model, vocab_size: int, block_size: int = 4) -> None:
    """Raise EdlmError unless the model follows a 4D block-causal mask and position_ids.

    Three behaviours a block-diffusion model needs: a later block never changes an earlier one;
    the last token of a block changes the first (bidirectional within a block: a model that
    silently falls back to causal attention fails here); positions come from position_ids.
    """
    bs = max(2, min(block_size, 4))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (1, 2 * bs), generator=gen)
    device = next(model.parameters()).device
    impl = getattr(model.config, "_attn_implementation", "eager")
    dtype = next(model.parameters()).dtype
    mask = to_backend_mask(block_causal_mask(2 * bs, bs, device), impl, None, dtype)
    pos = torch.arange(2 * bs, device=device)[None]

    def run(x, position_ids=pos):
        return model(input_ids=x.to(device), attention_mask=mask, position_ids=position_ids,
                     use_cache=False).logits.float()

    base = run(ids)
    later = ids.clone()
    later[0, -1] = (later[0, -1] + 1) % vocab_size
    same_block = ids.clone()
    same_block[0, bs - 1] = (same_block[0, bs - 1] + 1) % vocab_size
    gap = pos.clone()
    gap[0, bs:] += 3  # RoPE is relative: only a gap between blocks must change the output
    shifted = run(ids, gap)
    tol = 1e-4 * max(1.0, base.abs().max().item())
    if (run(later)[0, :bs] - base[0, :bs]).abs().max() > tol:
        raise EdlmError("the model ignores 4D attention masks (a later block changed an earlier one): "
                        "it cannot be converted")
    if (run(same_block)[0, 0] - base[0, 0]).abs().max() <= tol:
        raise EdlmError("the model ignores 4D attention masks (no bidirectional attention inside a block): "
                        "it cannot be converted")
    if (shifted - base).abs().max() <= tol:
        raise EdlmError("the model ignores position_ids: it cannot be converted")


def convert_model(model, tokenizer, block_size: int = DEFAULT_BLOCK_SIZE, mask_token: str | None = None,
                  shift: bool = False, base_model: str | None = None, drafter=None) -> DiffusionLM:
    """In-memory conversion of a loaded causal LM (used by `edlm convert` and `edlm train`).

    drafter (an edlm.drafter.DrafterConfig, a `lora:RANK[:MODULES]` spec, or a trained adapter: its
    drafter.safetensors or the folder holding it): add a drafting adapter instead of preparing the weights for full training; the model
    then keeps the parent as its clean stream (token shift, token-causal clean stream) and decodes
    with `verified`, the parent's own greedy text."""
    if block_size < 1:
        raise EdlmError(f"--block-size must be >= 1, got {block_size}")
    limit = getattr(text_config(model.config), "max_position_embeddings", None)
    if limit is not None and block_size > limit:
        raise EdlmError(f"--block-size {block_size} exceeds the model's {limit} positions")
    mask_id = choose_mask_token(model, tokenizer, mask_token)
    check_mask_support(model, model.get_input_embeddings().weight.shape[0], block_size)
    config = DiffusionConfig(block_size=block_size, mask_token_id=mask_id, shift=shift, base_model=base_model)
    if drafter is not None:
        from edlm import drafter as drafting

        trained = None if isinstance(drafter, drafting.DrafterConfig) else drafting.adapter_file(drafter)
        if trained is None:
            drafter = drafter if isinstance(drafter, drafting.DrafterConfig) else drafting.DrafterConfig.parse(drafter)
            drafting.attach(model, drafter)
        else:
            drafter, trained_mask = drafting.read_adapter(trained)
            if trained_mask is not None and trained_mask != mask_id:
                raise EdlmError(f"the adapter {trained} was trained with mask token id {trained_mask}, but this "
                                f"conversion chose {mask_id}: convert with the parent it was trained on")
            drafting.load(model, trained, drafter, mask_id)
        config.shift, config.causal_clean, config.drafter = True, True, drafter.to_dict()
        config.decoding = {"strategy": "verified", "draft_depth": 1}
    return DiffusionLM(model, tokenizer, config)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_gguf(base, gguf_file: str | None = None) -> tuple[Path, str] | None:
    """(directory, file name) when BASE names a GGUF checkpoint, else None (a HF dir or hub id).

    BASE may be a `.gguf` file, or a directory plus `gguf_file` (a name inside it, as transformers'
    `from_pretrained(dir, gguf_file=...)`).
    """
    base = Path(base)
    if gguf_file is not None:
        if base.suffix == ".gguf":
            raise EdlmError(f"--gguf-file names a file inside a directory; BASE {base} is already a .gguf file")
        if not base.is_dir():
            raise EdlmError(f"model directory not found: {base}")
        if not (base / gguf_file).is_file():
            found = sorted(p.name for p in base.glob("*.gguf"))
            raise EdlmError(f"GGUF file not found: {base / gguf_file}"
                            + (f" (GGUF files there: {', '.join(found)})" if found else ""))
        return base, gguf_file
    if base.suffix == ".gguf":
        if not base.is_file():
            raise EdlmError(f"GGUF file not found: {base}")
        return base.parent, base.name
    if base.is_dir() and not (base / "config.json").is_file():
        found = sorted(p.name for p in base.glob("*.gguf"))
        if found:
            raise EdlmError(f"{base} holds GGUF files, not a HF checkpoint: pass one with --gguf-file "
                            f"({', '.join(found)})")
    return None


def load_gguf_causal_lm(directory: Path, gguf_file: str, attn_implementation: str = "sdpa"):
    """A GGUF causal LM + tokenizer, dequantised to fp32 by transformers, as a plain HF model.

    transformers loads GGUF weights dequantised but marks the model as GGUF-quantised, and
    `save_pretrained` refuses such a model. The same weights loaded into a model built from the
    config without `quantization_config` save as a normal safetensors checkpoint, bit-identical.
    """
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise EdlmError("reading a GGUF checkpoint needs the gguf package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = directory / gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
    except Exception as exc:  # noqa: BLE001 - many loader errors, one user message
        raise EdlmError(f"cannot load a tokenizer from {where}: {first_line(exc)}") from None
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001
        raise EdlmError(f"cannot load a causal LM from {where}: {first_line(exc)}") from None
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise EdlmError(f"{where}: weights do not match the architecture (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


def convert(base, out, block_size: int = DEFAULT_BLOCK_SIZE, mask_token: str | None = None, shift: bool = False,
            force: bool = False, attn_implementation: str = "sdpa", gguf_file: str | None = None,
            dtype: str = "float32", drafter=None) -> DiffusionLM:
    """`edlm convert`: load BASE (a HF dir or a GGUF file), convert, write OUT as a normal HF
    checkpoint + our settings, in `dtype` (the conversion itself runs in fp32)."""
    if block_size < 1:
        raise EdlmError(f"--block-size must be >= 1, got {block_size}")
    if dtype not in DTYPES:
        raise EdlmError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    found = resolve_gguf(base, gguf_file)
    source = found[0] / found[1] if found is not None else Path(base)
    out = prepare_output_dir(out, force, **({"BASE": source} if source.exists() else {}))
    if found is not None:
        model, tokenizer = load_gguf_causal_lm(*found, attn_implementation=attn_implementation)
    else:
        if Path(base).is_dir():
            raw = read_checkpoint_config(base)
            if CONFIG_KEY in raw:
                raise EdlmError(f"{base} is already a converted edlm model")
        model, tokenizer = load_causal_lm(base, device="cpu", dtype=torch.float32,
                                          attn_implementation=attn_implementation)
    dlm = convert_model(model, tokenizer, block_size, mask_token, shift, base_model=str(base), drafter=drafter)
    if DTYPES[dtype] != torch.float32:
        dlm.model.to(DTYPES[dtype])
    def save(where: Path) -> None:
        dlm.save_pretrained(where)
        for name in PROCESSOR_FILES:  # a VLM's processor files as the base ships them (chat template, video)
            if found is None and (Path(base) / name).is_file() and not (where / name).exists():
                shutil.copyfile(Path(base) / name, where / name)

    write_dir_atomically(out, save)
    return dlm
