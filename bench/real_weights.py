"""Real weights on CPU: SmolLM2-135M-Instruct converted by `edlm convert` (make real-model).

Two questions, one run (results.json + results.md in --out):

1. Cost of one dLM decode call relative to one AR step, through edlm's own engine, at block sizes
   4/8/16/32 and batch 1/8, with a ~200-token KV cache. A dLM call feeds the finished block + the
   current block (2L tokens); an AR step feeds 1 token. Per-call time is measured as a difference
   (decode n2 vs n1 tokens; time and model calls of the extra blocks only), so the prompt's prefill
   drops out. The speed-up a trained dLM can reach is TPF x (AR step / dLM call); its ceiling is
   L x (AR step / dLM call) (every block in one call).
2. What the converted-but-untrained model decodes: strict left to right (strategy prefix,
   threshold 1.0: one token per call, nothing parallel) vs the AR's greedy tokens on 20 chat
   prompts: positionwise token agreement and the length of the agreeing prefix. With no shift
   (edlm's default) the logit at a *mask* position must predict that position's token, which an AR
   model was never trained to do; shift=True (AR-style, logit i-1 -> token i) is shown beside it.

EOS is switched off for the timing runs (so every run decodes exactly its budget), not for part 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

from edlm.config import DiffusionConfig
from edlm.model import DiffusionLM

CHAT_PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "How many legs does a spider have?",
    "Give me one tip for learning Python.", "What is 12 times 7?", "Name three primary colors.",
    "Why is the sky blue?", "Translate 'good morning' into Spanish.", "What is the boiling point of water?",
    "Suggest a name for a pet turtle.", "Explain what a noun is.", "What does a bee make?",
    "How many days are in a leap year?", "Write one sentence about autumn.", "What is the opposite of cold?",
    "Who wrote Romeo and Juliet?", "What is photosynthesis in one sentence?", "List two fruits that are red.",
    "What is the square root of 81?", "Give a synonym for happy.",
]
LONG_TEXT = ("The history of mathematics spans thousands of years, from counting with pebbles to the abstract "
             "structures studied today. Early civilisations such as the Babylonians and Egyptians developed "
             "practical arithmetic and geometry for trade, astronomy and building. ")


USE_WALL = False  # set from --device: CPU time on cpu, wall time on cuda


class _NoEos:
    """The tokenizer with eos_token_id None: timing runs decode exactly their budget."""

    eos_token_id = None

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *a, **k):
        return self._tok(*a, **k)

    def __len__(self):
        return len(self._tok)


def load_info() -> dict:
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}


def chat_ids(tok, content: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def timed(model: DiffusionLM, prompts, budget: int, **kw) -> tuple[float, float, int]:
    """(CPU seconds of this process, wall seconds, model calls) of one generate call."""
    c, t = time.process_time(), time.perf_counter()
    res = model.generate(prompts, max_new_tokens=budget, temperature=0.0, **kw)
    cpu, wall = time.process_time() - c, time.perf_counter() - t
    assert all(len(ids) == budget for ids in res.token_ids), "timing run stopped early"
    return cpu, wall, max(s.model_calls for s in res.stats)


def per_call(model, prompts, n1, n2, repeats, warm=False, **kw) -> dict:
    """Min over repeats of (t(n2) - t(n1)) / (calls(n2) - calls(n1)), in CPU time and wall time.

    On CPU with one torch thread the process's CPU time is the cost of the computation and barely
    moves when other jobs share the cores (wall time does); on CUDA only wall time means anything.
    """
    if warm:
        timed(model, prompts, n1, **kw)  # warm-up (once per batch size)
    cpu, wall, calls = [], [], None
    for _ in range(repeats):
        c1, w1, k1 = timed(model, prompts, n1, **kw)
        c2, w2, k2 = timed(model, prompts, n2, **kw)
        cpu.append((c2 - c1) / (k2 - k1))
        wall.append((w2 - w1) / (k2 - k1))
        calls = k2 - k1
    main = wall if USE_WALL else cpu
    return {"ms": 1000 * min(main), "cpu_ms": round(1000 * min(cpu), 2), "wall_ms": round(1000 * min(wall), 2),
            "calls_measured": calls}


def bench_cost(dlm, ar, blocks, batches, context, repeats, repeats_large, save) -> list[dict]:
    tok = dlm.tokenizer
    text = (LONG_TEXT * 10)
    ids = tok(text, add_special_tokens=False)["input_ids"][:context]
    rows = []
    for b in batches:
        prompts = [ids] * b
        reps = repeats if b == 1 else repeats_large
        ar_cost = per_call(ar, prompts, 16, 48, reps, warm=True)
        print(f"batch {b}: AR step {ar_cost['ms']:.1f} ms", flush=True)
        for L in blocks:
            k2 = 1 + max(1, -(-16 // L))  # at least 16 more tokens (and one more block) than n1 = L
            cost = per_call(dlm, prompts, L, k2 * L, reps, block_size=L, strategy="prefix", threshold=1.0)
            ratio = cost["ms"] / ar_cost["ms"]
            row = {"batch": b, "block": L, "context": len(ids), "ar_step_ms": round(ar_cost["ms"], 2),
                   "dlm_call_ms": round(cost["ms"], 2), "cost_ratio": round(ratio, 3),
                   "break_even_tpf": round(ratio, 2), "ceiling_speedup": round(L / ratio, 2),
                   "speedup_at_tpf": {str(t): round(t / ratio, 2) for t in (2, 3, 4) if t <= L},
                   "timer": "wall" if USE_WALL else "cpu", "ar_step_wall_ms": ar_cost["wall_ms"],
                   "dlm_call_wall_ms": cost["wall_ms"], "calls_measured": cost["calls_measured"]}
            rows.append(row)
            save(rows)
            print(f"  block {L}: dLM call {cost['ms']:.1f} ms = {ratio:.2f} AR steps; ceiling {L / ratio:.2f}x",
                  flush=True)
    return rows


def agreement(dlm, ar, max_new: int, block: int) -> dict:
    tok = dlm.tokenizer
    prompts = [chat_ids(tok, c) for c in CHAT_PROMPTS]
    ref = ar.generate(prompts, max_new_tokens=max_new, temperature=0.0)
    out = {"prompts": len(prompts), "max_new_tokens": max_new, "block": block, "settings": {}}
    for shift in (False, True):
        model = DiffusionLM(dlm.model, tok, dataclasses.replace(dlm.config, shift=shift))
        res = model.generate(prompts, max_new_tokens=max_new, temperature=0.0, block_size=block,
                             strategy="prefix", threshold=1.0)
        same = total = prefix_sum = 0
        for a, d in zip(ref.token_ids, res.token_ids, strict=True):
            n = len(a)
            total += n
            same += sum(1 for i in range(n) if i < len(d) and d[i] == a[i])
            k = 0
            while k < min(len(a), len(d)) and a[k] == d[k]:
                k += 1
            prefix_sum += k
        calls = sum(s.model_calls for s in res.stats)
        out["settings"][f"shift={shift}"] = {
            "token_agreement": round(same / total, 4), "mean_agreeing_prefix": round(prefix_sum / len(prompts), 2),
            "ar_tokens": total, "dlm_tokens": sum(len(d) for d in res.token_ids),
            "tpf": round(sum(len(d) for d in res.token_ids) / calls, 3),
            "samples": [{"prompt": CHAT_PROMPTS[i], "ar": ref.texts[i], "dlm": res.texts[i]} for i in range(3)],
        }
        print(f"untrained, shift={shift}: token agreement {same / total:.1%}, "
              f"mean agreeing prefix {prefix_sum / len(prompts):.1f} tokens", flush=True)
    return out


def write_md(out: Path, res: dict) -> None:
    lines = [f"# Real weights on CPU: {res['model']}", "",
             f"{res['when']}, torch threads {res['threads']}, {res['machine']}; load average before "
             f"{res['load_before']['loadavg']}, after {res['load_after']['loadavg']} ({res['load_before']['cpus']} CPUs, "
             "shared machine). Engine: edlm's, fp32, sdpa. Times are "
             + ("wall" if res["cost"][0]["timer"] == "wall" else "this process's CPU time (one torch thread: the "
                "computation's cost, robust to other jobs on the cores; wall times are in results.json)")
             + "; per call = (t(n2) - t(n1)) / (calls(n2) - calls(n1)), best of the repeats.", "",
             "## Cost of one dLM decode call vs one AR step (KV cache of "
             f"~{res['cost'][0]['context']} tokens)", "",
             "A dLM call feeds the finished block + the current block (2L tokens); an AR step feeds 1. "
             "Speed-up at a given TPF = TPF / cost ratio; ceiling = L / cost ratio (a block per call).", "",
             "| batch | block L | AR step (ms) | dLM call (ms) | cost ratio | speed-up at TPF 2 / 3 / 4 | ceiling (TPF = L) |",
             "|---|---|---|---|---|---|---|"]
    for r in res["cost"]:
        at = " / ".join(f"{v:.2f}x" for v in r["speedup_at_tpf"].values())
        lines.append(f"| {r['batch']} | {r['block']} | {r['ar_step_ms']:.1f} | {r['dlm_call_ms']:.1f} | "
                     f"{r['cost_ratio']:.2f} | {at} | {r['ceiling_speedup']:.2f}x |")
    ag = res["agreement"]
    lines += ["", f"## Converted, untrained: strict left to right vs the AR's greedy tokens "
              f"({ag['prompts']} chat prompts, {ag['max_new_tokens']} new tokens, block {ag['block']})", "",
              "| setting | token agreement | mean agreeing prefix (tokens) |", "|---|---|---|"]
    for name, s in ag["settings"].items():
        lines.append(f"| prefix 1.0, {name} | {100 * s['token_agreement']:.1f}% | {s['mean_agreeing_prefix']:.1f} |")
    for name, s in ag["settings"].items():
        lines += ["", f"Samples ({name}):", ""]
        for x in s["samples"]:
            lines += [f"- {x['prompt']!r}", f"  - AR: {x['ar']!r}", f"  - dLM: {x['dlm']!r}"]
    out.joinpath("results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/smollm2-dlm")
    p.add_argument("--out", default="bench/results/real-cpu")
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats at batch 1")
    p.add_argument("--repeats-large", type=int, default=1, help="timed repeats at batch > 1")
    p.add_argument("--agree-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine 2 threads ran ~10x slower)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-agreement", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    global USE_WALL
    USE_WALL = args.device != "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    dlm = DiffusionLM.from_pretrained(args.model, device=args.device, dtype=dtype)
    ar = DiffusionLM(dlm.model, dlm.tokenizer, DiffusionConfig.autoregressive(base_model=args.model))  # same weights
    res = {"model": args.model, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "threads": torch.get_num_threads(), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "device": args.device, "load_before": load_info()}
    t0 = time.perf_counter()
    timing_dlm = DiffusionLM(dlm.model, _NoEos(dlm.tokenizer), dlm.config)
    timing_ar = DiffusionLM(dlm.model, _NoEos(dlm.tokenizer), ar.config)
    with torch.inference_mode():
        def save(rows):  # partial results survive an interrupted run
            out.joinpath("results.json").write_text(json.dumps({**res, "cost": rows, "partial": True}, indent=2) + "\n")

        res["cost"] = bench_cost(timing_dlm, timing_ar, args.blocks, args.batch_sizes, args.context, args.repeats,
                                 args.repeats_large, save)
        res["load_mid"] = load_info()
        if not args.skip_agreement:
            res["agreement"] = agreement(dlm, ar, args.agree_tokens, dlm.config.block_size)
    res["load_after"] = load_info()
    res["seconds"] = round(time.perf_counter() - t0, 1)
    out.joinpath("results.json").write_text(json.dumps(res, indent=2) + "\n")
    if "agreement" in res:
        write_md(out, res)
    print(f"wrote {out}/results.json" + ("" if args.skip_agreement else f", {out}/results.md")
          + f" ({res['seconds']} s)")


if __name__ == "__main__":
    main()
