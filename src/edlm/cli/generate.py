"""`edlm generate`: stream a completion block by block and print a stats line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edlm.cli.common import add_compile_flag, add_decode_flags, add_dtype_flag, decode_flags, dtype_flag
from edlm.decode.options import DEFAULT_MAX_NEW_TOKENS, resolve_parent_verified
from edlm.errors import EdlmError


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with parallel block decoding",
                       description="Decode PROMPT with MODEL (a converted edlm dir; --ar for a plain AR dir). "
                       "Example: edlm generate models/dlm --prompt 'Question: ...' --threshold 0.9")
    p.add_argument("model", help="converted edlm model directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt text")
    p.add_argument("--chat", action="store_true", help="the prompt is one user message, rendered by the "
                   "tokenizer's chat template as the server's chat endpoint renders it")
    p.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="an image file for the prompt (repeatable, in order; a vision-language model only). They "
                   "stand where the prompt holds the model's image token, else before its text (with --chat: "
                   "at the start of the user message)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"budget of new tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    add_decode_flags(p)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ar", action="store_true", help="MODEL is a plain AR checkpoint (block size 1 baseline)")
    p.add_argument("--verifier", default=None, help="AR_DIR: MODEL drafts blocks, this AR parent verifies them "
                   "(output identical to the parent's greedy decode; decode flags other than --block-size are "
                   "refused)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_dtype_flag(p)
    add_compile_flag(p)
    p.set_defaults(func=run)


def run(args) -> None:
    from edlm.model import DiffusionLM

    prompt = read_prompt_file(args.prompt_file) if args.prompt_file is not None else args.prompt
    images = read_images(args.image or [], args.model)  # before the model loads: a bad file costs nothing
    dlm = DiffusionLM.from_pretrained(args.model, autoregressive=args.ar, dtype=dtype_flag(args),
                                      compile=args.compile)
    if images:
        _check_vlm(dlm.inner_model.config, args.model)
    if args.chat:
        prompt = chat_prompt_ids(dlm.tokenizer, prompt, images, dlm.inner_model.config)
    kwargs = dict(max_new_tokens=args.max_new_tokens, stop=args.stop, **decode_flags(args))
    if images:
        kwargs["images"] = images  # one prompt and its images (edlm.vision.encode places them)
    if args.verifier is not None:
        if args.ar:
            raise EdlmError("--verifier drafts with MODEL, a converted dLM: drop --ar")
        block_size = resolve_parent_verified(dlm, **decode_flags(args))  # the server's --verifier rule too
        ar = DiffusionLM.from_pretrained(args.verifier, autoregressive=True, dtype=dtype_flag(args),
                                         compile=args.compile)
        res = dlm.generate(prompt, max_new_tokens=args.max_new_tokens, stop=args.stop, verifier=ar, block_size=block_size,
                           **({"images": images} if images else {}))
        _print(res, args.json)
        return
    if args.json:
        _print(dlm.generate(prompt, **kwargs), True)
        return

    def show(event):
        sys.stdout.write(event.text)
        sys.stdout.flush()

    _print(dlm.generate(prompt, on_block=show, **kwargs), False, streamed=True)


def read_prompt_file(name: str) -> str:
    path = Path(name)
    if path.is_dir():
        raise EdlmError(f"--prompt-file {path} is a directory, not a file")
    if not path.is_file():
        raise EdlmError(f"prompt file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EdlmError(f"prompt file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def read_images(paths: list[str], model: str) -> list:
    """The --image files as PIL images, checked before any model loads (one-line errors): each a
    readable image within edlm.vision's limits, at most MAX_IMAGES, and MODEL a vision-language
    model where its config.json says so already."""
    if not paths:
        return []
    from edlm import vision

    if len(paths) > vision.MAX_IMAGES:
        raise EdlmError(f"{len(paths)} --image flags; a prompt takes at most {vision.MAX_IMAGES} images")
    if (Path(model) / "config.json").is_file():  # else (a hub id, a bad path) loading says what is wrong
        from edlm.model import read_checkpoint_config

        _check_vlm(read_checkpoint_config(model), model)
    return [vision.load_image(p, f"--image {p}") for p in paths]


def _check_vlm(config, model: str) -> None:
    from edlm.vision import is_vlm

    if not is_vlm(config):
        raise EdlmError(f"--image needs a vision-language model, and {model} is a text-only LM (convert a VLM, "
                        "e.g. a Qwen2-VL or LLaVA checkpoint)")


def chat_prompt_ids(tokenizer, text: str, images=(), config=None) -> list[int]:
    """Token ids of TEXT as one user turn, rendered as the server's /v1/chat/completions renders a
    chat (edlm.train.data.chat_prompt). Ids, not text: the template writes its own special tokens,
    which encoding the text again would double. With images (a VLM's `config`), the user turn holds
    them as the server's image_url parts do (edlm.vision.flatten_image_parts): before the text,
    unless the text holds the model's image token already (then there, one per image)."""
    if not getattr(tokenizer, "chat_template", None):
        raise EdlmError("--chat needs a chat template, and this model's tokenizer has none (no chat_template in "
                        "tokenizer_config.json or chat_template.jinja): drop --chat and write the prompt as the "
                        "model was trained")
    from edlm.train.data import chat_prompt

    messages = [{"role": "user", "content": text}]
    if images:
        from edlm import vision

        placed = tokenizer.convert_ids_to_tokens(vision.image_token_id(config)) in text
        if not placed:
            parts = [{"type": "image", "image": img} for img in images] + [{"type": "text", "text": text}]
            messages, _ = vision.flatten_image_parts([{"role": "user", "content": parts}],
                                                     vision.placeholder_text(tokenizer, config))
    return tokenizer(chat_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


def _print(res, as_json: bool, streamed: bool = False) -> None:
    """The completion (unless streamed already) and a stats line, or one JSON object."""
    s = res.stats[0]
    if as_json:
        print(json.dumps({"text": res.texts[0], "token_ids": res.token_ids[0],
                          "finish_reason": res.finish_reasons[0], **s.to_dict()}))
        return
    print(("" if streamed else res.texts[0]))
    experts = f", {s.expert_activations / max(s.generated_tokens, 1):.1f} expert activations/token" \
        if s.expert_pairs else ""  # an MoE model: distinct layer-experts run per token (edlm.moe)
    print(f"[{s.generated_tokens} tokens, {s.model_calls} model calls, TPF {s.tpf:.2f}{experts}, "
          f"{s.generated_tokens / max(s.seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
