"""A short CUDA check of the paths a GPU run takes, on tiny random models (~1 min on one GPU).

    python bench/gpu_smoke.py --out DIR

1. the drafting-adapter recipe end to end on a tiny Llama (convert, the parent's answers, `--train
   drafter`, the adapter file), then `verified` with the adapter against HF generate of the parent
   on the same device, fp32 and bf16;
2. every decode strategy of a tiny converted dLM on CUDA in bf16 (it runs), and in fp32 the
   strategies whose tokens equal the same decode on the CPU.
Writes DIR/gpu-smoke.json; prints one line per check and exits non-zero if one failed.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

DEVICE = "cuda"  # --device cpu: the plumbing, on this machine


def check_drafter(work: Path) -> dict:
    from edlm.model import DiffusionLM
    from edlm.recipes import real_drafter
    from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer
    from edlm.train.convert import convert

    tok = make_tiny_tokenizer()
    parent = make_tiny_causal_lm("llama", vocab_size=len(tok), max_position_embeddings=1024)  # char-level prompts
    parent.save_pretrained(work / "parent")
    tok.save_pretrained(work / "parent")
    real_drafter.main(["--parent", str(work / "parent"), "--work", str(work / "rd"), "--out", str(work / "adapter"),
                       "--prompts", "64", "--max-new-tokens", "16", "--distill-batch", "32", "--steps", "20",
                       "--batch-size", "8", "--seq-len", "256", "--block-size", "4"])
    convert(work / "parent", work / "rebuilt", block_size=4, shift=True, drafter=str(work / "adapter"))
    prompts = ["The cat sat", "Hello, wor", "ab", "Once upon a time there"]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        dlm = DiffusionLM.from_pretrained(work / "rebuilt", DEVICE, dtype)
        ar = DiffusionLM.from_pretrained(work / "parent", DEVICE, dtype, autoregressive=True)
        got = dlm.generate(prompts, max_new_tokens=24)
        same = 0
        for i, p in enumerate(prompts):
            ids = ar.tokenizer(p, return_tensors="pt")["input_ids"].to(DEVICE)
            hf = ar.model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=ar.tokenizer.eos_token_id,
                                   pad_token_id=0)[0, ids.shape[1]:].tolist()
            same += got.token_ids[i] == hf
        out[str(dtype)] = {"identical_to_hf_generate": f"{same}/{len(prompts)}",
                           "tpf": sum(s.generated_tokens for s in got.stats) / sum(s.model_calls for s in got.stats)}
    return out


def check_strategies(work: Path) -> dict:
    from edlm.decode.options import STRATEGIES, DecodeOptionError
    from edlm.model import DiffusionLM
    from edlm.testing import make_tiny_causal_lm, make_tiny_tokenizer
    from edlm.train.convert import convert

    tok = make_tiny_tokenizer()
    make_tiny_causal_lm("qwen3", vocab_size=len(tok)).save_pretrained(work / "q3")
    tok.save_pretrained(work / "q3")
    convert(work / "q3", work / "q3-dlm", block_size=4, shift=True)  # shift: `verified` runs too
    dlm = DiffusionLM.from_pretrained(work / "q3-dlm", DEVICE, torch.bfloat16)
    ran, usable = {}, []
    for name in STRATEGIES:
        t = time.perf_counter()
        try:
            res = dlm.generate(["Once upon", "ab"], max_new_tokens=12, strategy=name)
        except DecodeOptionError as exc:  # a strategy for the other token-shift setting
            ran[name] = f"refused: {exc}"
            continue
        usable.append(name)
        ran[name] = {"tokens": [len(r) for r in res.token_ids], "s": round(time.perf_counter() - t, 3)}
    gpu, cpu = (DiffusionLM.from_pretrained(work / "q3-dlm", d, torch.float32) for d in (DEVICE, "cpu"))
    same = [name for name in usable if name not in ("soft",)  # soft samples nothing but mixes embeddings: fp-sensitive
            and gpu.generate(["Once upon", "ab"], max_new_tokens=12, strategy=name).token_ids
            == cpu.generate(["Once upon", "ab"], max_new_tokens=12, strategy=name).token_ids]
    ran["fp32_cuda_equals_cpu"] = same
    return ran


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path("runs/gpu-smoke")
    results, failed = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "none"}, False
    for name, check in (("drafter", check_drafter), ("strategies", check_strategies)):
        t = time.perf_counter()
        try:
            results[name] = check(work)
            print(f"gpu-smoke {name}: ok in {time.perf_counter() - t:.0f}s {json.dumps(results[name])}", flush=True)
        except Exception:  # noqa: BLE001  (report every check, then fail)
            failed = True
            results[name] = {"error": traceback.format_exc()}
            print(f"gpu-smoke {name}: FAILED\n{results[name]['error']}", flush=True)
    (out / "gpu-smoke.json").write_text(json.dumps(results, indent=1) + "\n")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
