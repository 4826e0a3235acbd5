"""`edlm convert`: a HF causal LM -> an edlm block-diffusion checkpoint."""

from __future__ import annotations

from edlm.config import DEFAULT_BLOCK_SIZE


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="turn a HF causal LM into an edlm block-diffusion checkpoint",
                       description="Convert BASE (a local HF causal-LM dir, or a GGUF file) into a dLM checkpoint at OUT "
                       "(normal safetensors). Examples: edlm convert ./Qwen3-0.6B ./qwen3-dlm --block-size 32; "
                       "edlm convert ./SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2-dlm (GGUF needs: pip install gguf)")
    p.add_argument("base", help="local Hugging Face checkpoint directory of a causal LM, or a .gguf file "
                   "(weights dequantised)")
    p.add_argument("out", help="output directory (a normal HF checkpoint + edlm settings)")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help=f"diffusion block size L' (default {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--mask-token", default=None,
                   help="token to use as mask: a special/reserved token, or a new one to add (default: the "
                   "tokenizer's mask_token, else a new <|mask|>; <|MASK|> on Qwen3, as SDAR)")
    p.add_argument("--shift", action="store_true", help="predict token i from position i-1 (default: no shift)")
    p.add_argument("--gguf-file", default=None, metavar="NAME",
                   help="BASE is a directory holding GGUF files: convert this one")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the written weights (default float32; conversion runs in float32)")
    p.add_argument("--drafter", default=None, metavar="lora:RANK[:MODULES]|ADAPTER",
                   help="add a drafting adapter (LoRA on noisy positions only, e.g. lora:16 or lora:16:o_proj,v_proj) "
                   "over the untouched parent: `verified` then returns the parent's own greedy text; implies "
                   "--shift and a token-causal clean stream. ADAPTER: a trained drafter.safetensors (or its "
                   "folder) to put on this parent, e.g. one trained elsewhere (default: none)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT when it holds an earlier edlm output or checkpoint (never other files)")
    p.set_defaults(func=run)


def run(args) -> None:
    from edlm.drafter import DrafterConfig, adapter_file
    from edlm.train.convert import convert

    drafter = args.drafter
    if drafter is not None and adapter_file(drafter) is None:
        drafter = DrafterConfig.parse(drafter)  # a bad spec is one line before any loading
    dlm = convert(args.base, args.out, block_size=args.block_size, mask_token=args.mask_token,
                  shift=args.shift or drafter is not None, force=args.force, gguf_file=args.gguf_file,
                  dtype=args.dtype, drafter=drafter)
    mask = dlm.tokenizer.convert_ids_to_tokens(dlm.config.mask_token_id)
    print(f"converted {args.base} -> {args.out} (block_size={dlm.config.block_size}, "
          f"mask token {mask!r} id {dlm.config.mask_token_id}, shift={dlm.config.shift})")
