"""`edlm distill-data`: a model's own answers to a prompt set, as SFT data for `edlm train`."""

from __future__ import annotations

from pathlib import Path

from edlm.cli.common import add_compile_flag, add_decode_flags, add_dtype_flag, decode_flags, dtype_flag

HELP = "write a model's own answers to prompts as training data (jsonl prompt/response)"


def add_parser(sub) -> None:
    p = sub.add_parser("distill-data", help=HELP,
                       description="Decode every prompt of --prompts with MODEL (--ar: a plain AR parent, greedy) "
                       "and append {prompt, response} rows to --out, which `edlm train` reads as SFT data. "
                       "Resumable: prompts already in --out are skipped. Example: edlm distill-data models/ar --ar "
                       "--prompts prompts.jsonl --out runs/self.jsonl")
    p.add_argument("model", help="model directory (a converted edlm dir, or an AR dir with --ar)")
    p.add_argument("--prompts", required=True, help=".jsonl with a prompt field, or .txt with a prompt per line")
    p.add_argument("--prompt-field", default="prompt", help="field of a .jsonl prompt file")
    p.add_argument("--out", required=True, help=".jsonl to append rows to")
    p.add_argument("--answer-field", default=None,
                   help="keep only right answers (rejection sampling): the .jsonl prompts' field with each reference "
                   "answer, compared with the response's final one (after its last ####, else its last number); "
                   "the others go to OUT's .rejected.jsonl")
    p.add_argument("--ar", action="store_true", help="MODEL is a plain AR checkpoint (greedy, block size 1)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="budget per answer")
    p.add_argument("--batch-size", type=int, default=32, help="prompts decoded together")
    p.add_argument("--trajectory", action="store_true",
                   help="a dLM: also record when each token was committed in its block (a `trajectory` field, "
                   "d3LLM's pseudo-trajectory) for `edlm train --masking trajectory`; the block engine's strategies")
    add_decode_flags(p)
    add_dtype_flag(p)
    add_compile_flag(p)
    p.set_defaults(func=run)


def run(args) -> None:
    from edlm.errors import EdlmError
    from edlm.files import check_output_target
    from edlm.model import DiffusionLM
    from edlm.recipes.distill import distill, read_answers, read_prompts, rejected_path

    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise EdlmError("--batch-size and --max-new-tokens must be >= 1")
    if Path(args.out).is_dir():
        raise EdlmError(f"--out {args.out} is a directory; name a .jsonl file")
    check_output_target(Path(args.out).parent)  # before the model loads
    prompts = read_prompts(args.prompts, args.prompt_field)
    answers = read_answers(args.prompts, args.answer_field, args.prompt_field) if args.answer_field else None
    dlm = DiffusionLM.from_pretrained(args.model, autoregressive=args.ar, dtype=dtype_flag(args),
                                      compile=args.compile)
    n = distill(dlm, prompts, args.out, args.max_new_tokens, args.batch_size, trajectory=args.trajectory,
                answers=answers, **decode_flags(args))
    where = args.out if answers is None else f"{args.out} (right answers) and {rejected_path(args.out)} (wrong ones)"
    print(f"wrote {n} rows to {where} ({len(prompts) - n} already there)")
