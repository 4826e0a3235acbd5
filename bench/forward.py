"""One compiled forward of the demo models, timed interleaved in one process: what sibling fusion
(edlm.fusion), a drafting adapter and its rank cost a forward (README: Compiled decoding).

    python bench/forward.py [--queries 24] [--cached 150] [--ranks 16 8] [--eager | --aot] [--out DIR]

A forward here is a `verified` step's shape: `--queries` new tokens (the last 8 noisy, where a
drafter acts) over `--cached` keys in the KV cache, batch 1 and 8, fp32, 2 threads. Rows: the
full-weight dLM and the drafter, each compiled with and without fusion; with --ranks, the shipped
drafter cut to each rank by SVD of every layer's B·A (how much of its time is the rank); with --aot,
both models' ahead-of-time compiled step (edlm.aot; the cache is made dense after each crop, as
decoding does, in every row). Decoding
as a whole is timed by bench/compiled.py; this isolates the forward, where whole-run noise (~10%)
hides a few percent.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def truncated(drafter_dir: Path, rank: int, out: Path) -> Path:
    """A copy of the drafter whose every B·A is its best rank-`rank` approximation (same scale)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from edlm.drafter import WEIGHTS_NAME

    shutil.copytree(drafter_dir, out, dirs_exist_ok=True)
    with safe_open(str(drafter_dir / WEIGHTS_NAME), "pt") as f:
        meta = f.metadata()
    settings = json.loads(meta["edlm_drafter"])
    scale = settings["alpha"] / settings["rank"]
    weights = load_file(str(drafter_dir / WEIGHTS_NAME))
    for a_name in [k for k in weights if ".lora_a." in k]:
        b_name = a_name.replace(".lora_a.", ".lora_b.")
        u, s, vh = torch.linalg.svd(scale * weights[b_name].double() @ weights[a_name].double(), full_matrices=False)
        weights[b_name] = (u[:, :rank] * s[:rank] / 2.0).float().contiguous()  # alpha = 2 * rank: scale 2
        weights[a_name] = vh[:rank].float().contiguous()
    settings.update(rank=rank, alpha=2.0 * rank)
    save_file(weights, str(out / WEIGHTS_NAME), metadata={**meta, "edlm_drafter": json.dumps(settings)})
    config = json.loads((out / "config.json").read_text())
    config["edlm"]["drafter"].update(rank=rank, alpha=2.0 * rank)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def net(dlm):
    """The forward decoding runs: compiled, or with --eager the model itself."""
    return dlm.model if dlm.compiled_model is None else dlm.compiled_model


def prefilled(dlm, bs: int, p: int):
    """A KV cache of `p` random tokens per row."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        net(dlm)(input_ids=torch.randint(0, 500, (bs, p)), position_ids=torch.arange(p)[None].expand(bs, p),
                 past_key_values=cache, use_cache=True)
    return cache


def forward(dlm, cache, step) -> None:
    """One forward of `step` (ids, positions, mask, noisy) over the cache, which is then cut back."""
    from edlm.decode.kv import contiguous_cache
    from edlm.drafter import gate_of

    ids, pos, mask, noisy = step
    gate = gate_of(dlm.inner_model)
    if dlm.aot_step is not None:  # the exported program (edlm.aot) appends the new keys itself
        with torch.no_grad():
            dlm.aot_step(ids, pos, mask, cache, noisy if gate is not None else None, ids.shape[1])
    else:
        with torch.no_grad(), gate.open_on(noisy) if gate is not None else nullcontext():
            net(dlm)(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache, use_cache=True,
                     logits_to_keep=ids.shape[1])
    cache.crop(-ids.shape[1])
    contiguous_cache(cache)  # as decoding does before each compiled forward


def main() -> None:
    import tempfile

    from edlm import fusion
    from edlm.model import DiffusionLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=str(ROOT / "models"), help="folder of dlm and drafter (default models/)")
    ap.add_argument("--queries", type=int, default=24, help="new tokens a forward (default 24: a depth-1 step)")
    ap.add_argument("--cached", type=int, default=150, help="keys in the cache (default 150)")
    ap.add_argument("--ranks", type=int, nargs="*", default=[], help="drafter rows cut to these ranks by SVD")
    ap.add_argument("--repeats", type=int, default=30, help="rounds of 10 forwards per row (default 30)")
    ap.add_argument("--eager", action="store_true", help="time eager forwards (fused or not) instead of compiled ones")
    ap.add_argument("--aot", action="store_true", help="also the fused models through compile(aot=True) (edlm.aot)")
    ap.add_argument("--out", default=None, help="write forward.json here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    models = Path(args.models)
    tmp = Path(tempfile.mkdtemp())

    def load(path, fuse):
        dlm = DiffusionLM.from_pretrained(path)
        if not args.eager:
            return dlm.compile(fuse=fuse)
        if fuse:
            fusion.fuse(dlm.inner_model)
        return dlm

    rows = {"full-weight dLM": load(models / "dlm", False), "full-weight dLM, fused": load(models / "dlm", True),
            "drafter": load(models / "drafter", False), "drafter, fused": load(models / "drafter", True)}
    if args.aot:
        rows["full-weight dLM, aot"] = DiffusionLM.from_pretrained(models / "dlm").compile(aot=True)
        rows["drafter, aot"] = DiffusionLM.from_pretrained(models / "drafter").compile(aot=True)
    for r in args.ranks:
        rows[f"drafter rank {r}, fused"] = load(truncated(models / "drafter", r, tmp / f"r{r}"), True)
    q, p = args.queries, args.cached
    results = []
    for bs in (1, 8):
        step = (torch.randint(0, 500, (bs, q)), (p + torch.arange(q))[None].expand(bs, q),  # ids, positions
                torch.ones(bs, 1, q, p + q, dtype=torch.bool), (torch.arange(q) >= q - 8)[None].expand(bs, q))  # mask, noisy
        caches = {name: prefilled(dlm, bs, p) for name, dlm in rows.items()}
        for name, dlm in rows.items():  # compile and warm up, untimed
            for _ in range(5):
                forward(dlm, caches[name], step)
        seconds = dict.fromkeys(rows, 0.0)
        for _ in range(args.repeats):
            for name, dlm in rows.items():
                start = time.perf_counter()
                for _ in range(10):
                    forward(dlm, caches[name], step)
                seconds[name] += time.perf_counter() - start
        base = seconds["full-weight dLM"]
        for name, s in seconds.items():
            ms = s / (10 * args.repeats) * 1e3
            results.append({"batch": bs, "row": name, "ms": ms, "x_full_weight_unfused": s / base})
            print(f"b{bs} {name:28s} {ms:6.3f} ms  {s / base:.3f}x the unfused full-weight forward", flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = "forward-eager.json" if args.eager else "forward.json"
        (out / name).write_text(json.dumps({"queries": q, "cached": p, "eager": args.eager, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
