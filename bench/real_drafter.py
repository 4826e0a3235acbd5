"""A drafting adapter on a real checkpoint against HF generate of its parent, timed interleaved in one
run: texts identical to HF generate, tokens per forward, tokens/s at each batch size and dtype.

    python bench/real_drafter.py --adapter models/smollm2-drafter [--parent GGUF_OR_HF_DIR] \
        [--limit 20] [--batch-sizes 1 8] [--dtypes bfloat16 float32] [--block-sizes 8 4] [--out bench/results/real-drafter-cpu]

The prompts are the demo's held-out reasoning problems as one-turn chats (the parent's template);
the drafter is rebuilt from the adapter file on the parent (`edlm convert PARENT --drafter FILE`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def main() -> None:
    from edlm.model import DiffusionLM, default_device
    from edlm.recipes import reasoning
    from edlm.recipes.bench import Example, engine_runner, hf_runner, markdown, measure_together
    from edlm.recipes.real_drafter import chat_prompts, hf_parent
    from edlm.train.convert import convert

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", default=None, help="the AR parent: HF dir or GGUF (default: SmolLM2-135M-Instruct's GGUF)")
    ap.add_argument("--adapter", required=True, help="a trained drafter.safetensors, or the folder holding it")
    ap.add_argument("--limit", type=int, default=20, help="held-out problems (default 20)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=("float32", "bfloat16"))
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[8, 4], help="verified's draft block sizes")
    ap.add_argument("--device", default=None, help="default: cuda if there is one")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--work", default="runs/real-drafter-bench", help="where the rebuilt drafter is written")
    ap.add_argument("--out", default=None, help="write results.json and results.md here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    args.parent = str(hf_parent(args.parent, Path(args.work)))  # HF generate runs on the weights the drafter has
    rebuilt = Path(args.work) / "drafter"
    if not (rebuilt / "config.json").exists():
        convert(args.parent, rebuilt, shift=True, drafter=args.adapter, block_size=8)
    problems = reasoning.test_problems(min(args.limit, reasoning.TEST_SIZE))
    rows, identical = [], {}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        ar = DiffusionLM.from_pretrained(args.parent, device, dtype, autoregressive=True)
        drafter = DiffusionLM.from_pretrained(rebuilt, device, dtype)
        examples = [Example(p, q.response) for p, q in zip(chat_prompts(ar.tokenizer, problems), problems, strict=True)]
        hf = hf_runner(ar, args.max_new_tokens)
        texts_hf = [hf([e.prompt])[0][0] for e in examples]  # the reference: HF generate, a prompt at a time
        for bs in args.block_sizes:  # exactness first, untimed: every text against HF generate's
            alone = [drafter.generate([e.prompt], max_new_tokens=args.max_new_tokens, block_size=bs).texts[0]
                     for e in examples]
            b = max(args.batch_sizes)
            batched = [t for s in range(0, len(examples), b) for t in drafter.generate(
                [e.prompt for e in examples[s: s + b]], max_new_tokens=args.max_new_tokens, block_size=bs).texts]
            identical[f"{dtype_name} block {bs}"] = {
                name: sum(a == b for a, b in zip(mine, texts_hf, strict=True))
                for name, mine in (("batch 1", alone), (f"batch {max(args.batch_sizes)}", batched))}
        for batch in args.batch_sizes:
            settings = [("HF generate (parent)", hf), ("AR engine (parent)", engine_runner(ar, args.max_new_tokens))]
            settings += [(f"drafter, verified, block {bs}", engine_runner(drafter, args.max_new_tokens, block_size=bs))
                         for bs in args.block_sizes]
            got = measure_together(settings, examples, batch_size=batch)
            base = got[0]["tokens_per_s"]
            for row in got:
                row.update(dtype=dtype_name, x_hf=row["tokens_per_s"] / base)
                rows.append(row)
                tpf = f"{row['tpf']:.2f}" if row["tpf"] else "-"
                print(f"{dtype_name} b{batch} {row['name']:28s} TPF {tpf:>5}  {row['tokens_per_s']:8.1f} tok/s  "
                      f"{row['x_hf']:.2f}x HF generate", flush=True)
        del ar, drafter
    for k, v in identical.items():
        print(f"{k}: " + ", ".join(f"{n}/{len(problems)} at {b}" for b, n in v.items()) + " identical to HF generate's")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": str(device),
                "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None, "threads": args.threads,
                "machine": platform.machine(), "torch": torch.__version__, "problems": len(problems),
                "max_new_tokens": args.max_new_tokens, "adapter": str(args.adapter)}
        (out / "results.json").write_text(json.dumps({**meta, "identical": identical, "rows": rows}, indent=1,
                                                     default=str) + "\n")
        lines = [f"# A drafting adapter on real weights vs HF generate ({meta['date']}, {device}, {meta['gpu'] or ''})",
                 "", f"{len(problems)} held-out chat problems, {args.max_new_tokens} new tokens, timed interleaved. "
                 "Accuracy is the parent's own on the demo's answer format (a drafter's text is the parent's); "
                 "speed-up is over our AR engine, x HF generate is in results.json.", "",
                 "Texts are compared with HF generate's for one prompt at a time; a batch's rows are padded, "
                 "which moves HF generate's own bf16 text too.", "",
                 "| setting | " + " | ".join(f"identical to HF generate, {b}" for b in next(iter(identical.values()))) + " |",
                 "|---|" + "---|" * len(next(iter(identical.values())))]
        lines += [f"| {k} | " + " | ".join(f"{n}/{len(problems)}" for n in v.values()) + " |"
                  for k, v in identical.items()]
        for dtype_name in args.dtypes:
            table = markdown([r for r in rows if r["dtype"] == dtype_name])
            lines += ["", f"## {dtype_name}", "", *[x for x in table.splitlines() if not x.startswith("AUP")]]
        (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
