"""`edlm study`: the paper's ablations at small scale, on the demo model's data.

Every variant continues the SAME AR parent for the same number of steps on the same data, then is
scored on held-out reasoning problems one token per step (threshold 1.0) and in parallel
(threshold 0.7). The report states, per study, whether small scale agrees with the paper's
direction (method.md): clean context > noisy context > bidirectional and no-shift >= shift
(Table 1); half-life 0.1 > uniform, right-to-left far worse (Table 2); a model trained at one
block size still works at others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edlm.errors import EdlmError

EVAL_THRESHOLDS = (1.0, 0.7)
# how a variant is decoded: threshold decoding (the paper's), the one-model `verified` strategy
# (drafts checked by the model's own AR stream), and the dLM drafting for its AR parent
THRESHOLD_EVALS = tuple(("threshold", t) for t in EVAL_THRESHOLDS)
PARITY_EVALS = (*THRESHOLD_EVALS, ("verified", None), ("parent verifies", None))


@dataclass
class Variant:
    name: str
    train: dict = field(default_factory=dict)  # TrainConfig overrides
    eval_block_sizes: tuple = (None,)
    evals: tuple = THRESHOLD_EVALS


STUDIES: dict[str, list[Variant]] = {
    "attention": [
        Variant("bidirectional", {"attention": "bidirectional"}),
        Variant("block, noisy context", {"attention": "noisy"}),
        Variant("block, clean context, shift", {"shift": True}),
        Variant("block, clean context, no shift", {"shift": False}),
    ],
    "masking": [
        Variant("uniform", {"masking": "uniform"}),
        Variant("position hl=0.25", {"half_life": 0.25}),
        Variant("position hl=0.1", {"half_life": 0.1}),
        Variant("position hl=0.05", {"half_life": 0.05}),
        Variant("right-to-left hl=0.1", {"masking": "reverse", "half_life": 0.1}),
    ],
    "block_size": [Variant(f"train bs={b}", {"block_size": b}, eval_block_sizes=(4, 8, 16)) for b in (4, 8, 16)],
    # issue 16: does a causal clean stream with an AR loss keep the parent's accuracy, and what
    # drafts best for verification?
    "parity": [
        Variant("block-causal clean (paper)", {}, evals=PARITY_EVALS),
        Variant("causal clean, a=0", {"causal_clean": True}, evals=PARITY_EVALS),
        Variant("causal clean, a=0.5", {"causal_clean": True, "ar_loss_weight": 0.5}, evals=PARITY_EVALS),
        Variant("causal clean, a=1", {"causal_clean": True, "ar_loss_weight": 1.0}, evals=PARITY_EVALS),
        Variant("a=1, full-mask blocks", {"causal_clean": True, "ar_loss_weight": 1.0, "masking": "full"},
                evals=PARITY_EVALS),
        Variant("a=1, block 16", {"causal_clean": True, "ar_loss_weight": 1.0, "block_size": 16},
                evals=PARITY_EVALS),
    ],
}

PAPER = {
    "attention": "Table 1 (Qwen2.5-1.5B): bidirectional 18-19, noisy context 28.2, clean+shift 37.7, clean no shift 38.4",
    "masking": "Table 2 (Qwen3-4B): hl=0.1 beats uniform by +2.6 avg (+4.4 at TPF 5.6); right-to-left far worse",
    "block_size": "Sec. 4: a model trained at one block size works at other evaluation block sizes",
    "parity": "TiDAR (arXiv 2511.08923): a joint AR + diffusion loss keeps AR quality while drafting 7-8 tokens "
              "per forward; MARS: an AR loss during conversion preserves the parent's accuracy",
}


def run_study(base: str, data: list[str], out: str, studies=tuple(STUDIES), steps: int = 300, limit: int = 100,
              block_size: int = 8, seq_len: int = 256, batch_size: int = 16, lr: float = 1e-3,
              max_new_tokens: int = 96, progress: bool = True, shift: bool = False) -> dict:
    """Every variant changes ONE setting of the base recipe (clean context, position masking
    hl=0.1, `block_size`, `shift`). Each row has exact match and the answer's mean negative
    log-likelihood per token when revealed left to right, block by block (the decoder's own
    view of the answer): at small scale accuracy can sit at 0 for several variants while the
    NLL still ranks them."""
    from edlm.model import DiffusionLM
    from edlm.recipes.bench import engine_runner, load_examples, measure, verified_runner
    from edlm.train import train

    out_dir = check_study_args(base, data, out, studies, steps, limit, block_size, seq_len, batch_size, lr,
                               max_new_tokens, shift)
    examples = load_examples("reasoning", limit)
    ar_model = DiffusionLM.from_pretrained(base, autoregressive=True)
    ar = measure("AR parent", engine_runner(ar_model, max_new_tokens), examples, progress=progress)
    ar_nll = answer_nll(ar_model, examples, 1)
    defaults = dict(block_size=block_size, attention="clean", shift=shift, masking="position", half_life=0.1)
    scores: dict[tuple, dict] = {}  # (run key, eval block size, threshold) -> score, shared across studies
    nlls: dict[tuple, float] = {}  # (run key, decode block size) -> answer NLL (threshold-free)
    results: dict[str, list[dict]] = {}
    for study in studies:
        rows = [{"variant": "AR parent", "eval_block_size": 1, "threshold": None, "decode": "AR",
                 "accuracy": ar["accuracy"], "tpf": 1.0, "speedup": 1.0, "answer_nll": ar_nll}]
        for v in STUDIES[study]:
            key = run_key(v.train, defaults)
            run_dir = out_dir / "runs" / key
            if not (run_dir / "model" / "config.json").exists():
                train(variant_config(v, base, data, run_dir, steps, block_size, seq_len, batch_size, lr, shift,
                                     progress))
            dlm = None
            for eval_bs in v.eval_block_sizes:
                for how, t in v.evals:
                    if (key, eval_bs, how, t) not in scores:
                        dlm = dlm or DiffusionLM.from_pretrained(run_dir / "model")
                        if how == "parent verifies":
                            runner = verified_runner(dlm, ar_model, max_new_tokens)
                        else:
                            runner = engine_runner(dlm, max_new_tokens, strategy=how, threshold=t,
                                                   block_size=eval_bs)
                        r = measure(v.name, runner, examples, progress=progress)
                        bs = eval_bs or dlm.config.block_size
                        if (key, bs) not in nlls:
                            nlls[key, bs] = answer_nll(dlm, examples, bs)
                        scores[key, eval_bs, how, t] = {
                            "eval_block_size": bs, "decode": how, "accuracy": r["accuracy"], "tpf": r["tpf"],
                            "speedup": r["tokens_per_s"] / ar["tokens_per_s"], "answer_nll": nlls[key, bs]}
                    rows.append({"variant": v.name, "threshold": t, **scores[key, eval_bs, how, t]})
        results[study] = rows
        _write_report(out_dir, results, f"Every variant continues `{base}` for {steps} steps x {batch_size} x "
                      f"{seq_len} tokens (lr {lr:g}, one t per block; base recipe: clean context, position "
                      f"masking hl=0.1, block {block_size}, {'shift' if shift else 'no shift'}), then decodes "
                      f"{limit} held-out problems.", shift)
    return results


def check_study_args(base: str, data: list[str], out: str, studies, steps: int, limit: int, block_size: int,
                     seq_len: int, batch_size: int, lr: float, max_new_tokens: int, shift: bool) -> Path:
    """Every argument, before the first model is loaded (a study trains for an hour): the base,
    the studies, the evaluation's numbers, OUT, and each variant's whole training config, checked
    as `edlm train` checks it. Returns OUT."""
    from edlm.config import CONFIG_KEY
    from edlm.files import check_output_target
    from edlm.model import read_checkpoint_config
    from edlm.recipes.reasoning import TEST_SIZE

    unknown = [s for s in studies if s not in STUDIES]
    if unknown or not studies:
        raise EdlmError(f"unknown study {unknown[0]!r}; choose from {', '.join(STUDIES)}" if unknown
                        else f"no study given; choose from {', '.join(STUDIES)}")
    if not 1 <= limit <= TEST_SIZE:
        raise EdlmError(f"--limit must be in [1, {TEST_SIZE}] (the held-out problems), got {limit}")
    for flag, value in (("--steps", steps), ("--block-size", block_size), ("--batch-size", batch_size),
                        ("--max-new-tokens", max_new_tokens)):
        if value < 1:
            raise EdlmError(f"{flag} must be >= 1, got {value}")
    if not lr > 0:
        raise EdlmError(f"--lr must be > 0, got {lr}")
    if seq_len < block_size:
        raise EdlmError(f"--seq-len {seq_len} must be at least --block-size {block_size}")
    out_dir = check_output_target(out)
    if CONFIG_KEY in read_checkpoint_config(base):
        raise EdlmError(f"--base {base} is a converted dLM; every variant starts from the AR parent")
    for study in studies:
        for v in STUDIES[study]:
            variant_config(v, base, data, out_dir / "runs" / "check", steps, block_size, seq_len, batch_size, lr,
                           shift).validate()
    return out_dir


def variant_config(v: Variant, base: str, data: list[str], run_dir: Path, steps: int, block_size: int, seq_len: int,
                   batch_size: int, lr: float, shift: bool, progress: bool = True):
    """The TrainConfig of one variant: the base recipe with the variant's overrides."""
    from edlm.train import TrainConfig

    cfg = dict(model=base, data=list(data), out=str(run_dir), block_size=block_size, seq_len=seq_len,
               batch_size=batch_size, steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=min(50, steps),
               save_every=max(50, steps // 4), resume=True, progress=progress, t_per_block=True, shift=shift)
    cfg.update(v.train)
    cfg["seq_len"] = max(cfg["seq_len"] // cfg["block_size"], 1) * cfg["block_size"]
    return TrainConfig(**cfg)


def answer_nll(dlm, examples, block_size: int) -> float:
    """Mean -log p(answer token | prompt) with the answer revealed one token at a time, left to
    right, at `block_size` (lm-eval adapter's exact `ltr` estimator; block size 1 = the AR view)."""
    from edlm.decode.scoring import left_to_right_row, score_rows
    from edlm.decode.state import encode_prompts

    tok, cfg = dlm.tokenizer, dlm.config
    rows, n_tokens = [], 0
    for e in examples:  # the prompt as the decoder encodes it, then response + EOS as in training
        prompt = encode_prompts(dlm, [e.prompt])[0]
        answer = tok(e.answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append(left_to_right_row(prompt + answer, len(prompt), block_size, cfg.mask_token_id, cfg.shift))
        n_tokens += len(answer)
    return -sum(lp for lp, _ in score_rows(dlm, rows, block_size, batch_size=8)) / n_tokens


def run_key(overrides: dict, defaults: dict) -> str:
    """A run directory name from the settings that differ from the defaults: variants that train
    the same thing ("position hl=0.1", "clean context, no shift", "train bs=8") share one run."""
    diff = {k: v for k, v in sorted(overrides.items()) if defaults.get(k) != v}
    return "-".join(f"{k}={v}" for k, v in diff.items()) or "default"


def verdict(study: str, rows: list[dict], shift: bool = False) -> str:
    """Does small scale agree with the paper's direction? Judged at threshold 1.0 (exact decoding).
    `shift`: the base recipe's, which the noisy-context and bidirectional variants share, so the
    clean-context variant with the same shift is the one they are compared with."""
    acc = {r["variant"]: r["accuracy"] for r in rows if r["threshold"] == 1.0}
    if study == "attention" and len(acc) == 4:
        clean = acc["block, clean context, shift" if shift else "block, clean context, no shift"]
        order_ok = clean >= acc["block, noisy context"] >= acc["bidirectional"]
        shift_ok = acc["block, clean context, no shift"] >= acc["block, clean context, shift"]
        return (f"clean >= noisy >= bidirectional: {'agrees' if order_ok else 'DISAGREES'}; "
                f"no shift >= shift: {'agrees' if shift_ok else 'DISAGREES'}")
    if study == "masking" and len(acc) == 5:
        pos_ok = acc["position hl=0.1"] >= acc["uniform"]
        r2l_ok = acc["right-to-left hl=0.1"] < min(acc["uniform"], acc["position hl=0.1"])
        par = {r["variant"]: r["accuracy"] for r in rows if r["threshold"] == EVAL_THRESHOLDS[1]}
        par_ok = par.get("position hl=0.1", 0) >= par.get("uniform", 0)
        return (f"hl=0.1 >= uniform: {'agrees' if pos_ok else 'DISAGREES'} (at threshold 0.7: "
                f"{'agrees' if par_ok else 'DISAGREES'}); right-to-left worst: {'agrees' if r2l_ok else 'DISAGREES'}")
    if study == "parity":
        ver = {r["variant"]: r for r in rows if r.get("decode") == "verified"}
        parent = next((r["accuracy"] for r in rows if r["variant"] == "AR parent"), None)
        if "causal clean, a=0" in ver and "causal clean, a=1" in ver and parent is not None:
            a0, a1 = ver["causal clean, a=0"]["accuracy"], ver["causal clean, a=1"]["accuracy"]
            keeps = a1 >= parent - 0.02
            return (f"verified (one model) accuracy a=0 {100 * a0:.0f}% -> a=1 {100 * a1:.0f}% vs the parent's "
                    f"{100 * parent:.0f}%: the AR loss {'keeps' if keeps else 'does NOT keep'} the parent's accuracy "
                    f"(within 2 points)")
        return "incomplete"
    if study == "block_size":
        worst = min(r["accuracy"] for r in rows if r["threshold"] == 1.0)
        best = max(r["accuracy"] for r in rows if r["threshold"] == 1.0)
        return f"accuracy across train x eval block sizes (threshold 1.0) spans {100 * worst:.1f}-{100 * best:.1f}%"
    return "incomplete"


def _write_report(out_dir: Path, results: dict, setup: str, shift: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# edlm study: the paper's ablations at small scale\n", setup + "\n"]
    for study, rows in results.items():
        several = len({r["eval_block_size"] for r in rows if r["threshold"] is not None}) > 1
        ranked = sorted({f"{r['variant']} @ eval bs {r['eval_block_size']}" if several and r["threshold"] is not None
                         else r["variant"]: r["answer_nll"] for r in rows}.items(), key=lambda kv: kv[1])
        lines += [f"## {study}\n", f"Paper: {PAPER[study]}\n", f"Here: {verdict(study, rows, shift)}\n",
                  "By answer NLL/token (lower is better): " + " < ".join(f"{v} ({x:.3f})" for v, x in ranked) + "\n",
                  "| variant | eval block | decode | accuracy | TPF | tokens/s vs AR | answer NLL/token |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['eval_block_size']} | {_thr(r)} | {100 * r['accuracy']:.1f}% | "
                  f"{r['tpf']:.2f} | {r['speedup']:.2f}x | {r['answer_nll']:.3f} |" for r in rows]
        lines += ["", *_aup_lines(rows), ""]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"{r['variant']}\nbs{r['eval_block_size']} t{_thr(r)}" for r in rows]
        ax.bar(range(len(rows)), [100 * r["accuracy"] for r in rows],
               color=[_COLORS.get(_thr(r), "tab:orange") for r in rows])
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=6)
        ax.set_ylabel("exact match (%)")
        ax.set_title(f"{study} (gray: AR parent, blue: threshold 1.0, orange: {EVAL_THRESHOLDS[1]:g}, "
                     "green: verified, purple: parent verifies)", fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"{study}.png", dpi=110)
        plt.close(fig)
        lines.append(f"![{study}]({study}.png)\n")
    (out_dir / "report.md").write_text("\n".join(lines))
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))


_COLORS = {"AR": "tab:gray", "threshold 1": "tab:blue", "verified": "tab:green", "parent verifies": "tab:purple"}


def _thr(row: dict) -> str:
    how = row["decode"]
    return how if row["threshold"] is None else f"{how} {row['threshold']:g}"


def _aup_lines(rows: list[dict]) -> list[str]:
    """AUP per variant over all its decodes (y_max: the best accuracy in the table)."""
    from edlm.recipes.bench import aup

    y_max = 100 * max(r["accuracy"] for r in rows)
    by_variant: dict[str, list] = {}
    for r in rows:
        if r["variant"] != "AR parent":
            by_variant.setdefault(r["variant"], []).append((r["tpf"], 100 * r["accuracy"]))
    return [f"AUP (y_max {y_max:.1f}%): " + ", ".join(f"{v} {aup(p, y_max):.1f}" for v, p in by_variant.items())]
