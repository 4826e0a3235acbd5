"""`edlm bench`: the accuracy / throughput trade-off of a dLM against its AR parent, in ONE run.

Settings measured together (same prompts, same process, same device):
- the AR base through our engine (block size 1, KV cache): the like-for-like baseline;
- the AR base through HF `generate` (the outside reference), and HF prompt-lookup decoding
  (batch 1, where HF supports it);
- the dLM at every (strategy, threshold, block size).
Each setting gets an untimed warm-up and `--repeats` timed passes, interleaved with the other
settings chunk by chunk (`measure_together`); tokens/s is the median over passes and counts
generated tokens only. Accuracy comes from the first pass (greedy decoding is deterministic).
Outputs: results.json, results.md, pareto.png in --out, and the table on stdout.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edlm.config import CONFIG_KEY
from edlm.decode.strategies import strategies_reading
from edlm.errors import EdlmError


@dataclass
class Example:
    prompt: str
    answer: str
    images: list | None = None  # a VLM task's images of this prompt (PIL images or paths)

    def correct(self, text: str) -> bool:
        from edlm.recipes.reasoning import extract_answer

        if "####" in self.answer:  # built-in reasoning format: compare the final numbers
            return extract_answer(text) is not None and extract_answer(text) == extract_answer(self.answer)
        return text.strip().startswith(self.answer.strip())


def load_examples(task: str, limit: int) -> list[Example]:
    from edlm.recipes import reasoning

    if task == "reasoning":
        return [Example(p.prompt, p.response) for p in reasoning.test_problems(min(limit, reasoning.TEST_SIZE))]
    if task == "pictures":  # the VLM demo's: reasoning problems whose first number is a picture
        from edlm.recipes import picture_problems

        return [Example(p.prompt(picture_problems.PLACEHOLDER), p.response, [p.card()])
                for p in picture_problems.test_problems(min(limit, reasoning.TEST_SIZE))]
    path = Path(task)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise EdlmError(f"task file not found: {path}")
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append(Example(str(row["prompt"]), str(row["answer"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EdlmError(f"{path}:{i + 1}: each line must be JSON with 'prompt' and 'answer'") from None
        if not rows:
            raise EdlmError(f"task file is empty: {path}")
        return rows[:limit]
    raise EdlmError(f"unknown task {task!r}: use 'reasoning', 'pictures' (a VLM's), a .jsonl of prompt/answer, "
                    "or lm-eval:TASK")


# ------------------------------------------------------------------ runners
# A runner decodes a list of prompts: run(prompts) -> (texts, generated tokens, model calls,
# {tokens committed in one step: number of steps}); HF runners know neither calls nor steps.
# On a task with images it is called run(prompts, images), one list of images per prompt.
def engine_runner(dlm, max_new_tokens: int, **decode):
    return result_runner(lambda prompts, images: dlm.generate(prompts, max_new_tokens=max_new_tokens,
                                                               images=images, **decode))


def verified_runner(dlm, ar, max_new_tokens: int):
    """The dLM drafts, the AR parent verifies (edlm.decode.verify); calls = verification steps."""
    return result_runner(lambda prompts, images: dlm.generate(prompts, max_new_tokens=max_new_tokens,
                                                               images=images, verifier=ar))


def result_runner(decode):
    """A runner from a function (prompts, images) -> GenerationResult."""

    def run(prompts, images=None):
        res = decode(prompts, images)
        hist = Counter()
        for s in res.stats:
            hist.update(s.steps_histogram)
        return (res.texts, sum(s.generated_tokens for s in res.stats), sum(s.model_calls for s in res.stats),
                hist)

    return run


def hf_runner(ar, max_new_tokens: int, prompt_lookup: int | None = None):
    """HF generate, greedy, left padding; model calls are unknown to HF (reported as 0)."""
    import torch

    tok, model = ar.tokenizer, ar.model
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos

    memo: dict = {}  # image token counts a LLaVA measures once (in the untimed warm-up)

    def run(prompts, images=None):
        tok.padding_side = "left"
        if images is not None:  # what a user of the HF processor feeds generate: ids and pixels
            from edlm.vision import hf_inputs

            enc = hf_inputs(ar, prompts, images, memo)
        else:
            enc = tok(prompts, return_tensors="pt", padding=True).to(ar.device)
        extra = {"prompt_lookup_num_tokens": prompt_lookup} if prompt_lookup else {}
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=pad, **extra)
        new = out[:, enc["input_ids"].shape[1]:]
        texts, tokens = [], 0
        for row in new.tolist():
            if eos in row:
                row = row[: row.index(eos) + 1]
            tokens += len(row)
            texts.append(tok.decode(row, skip_special_tokens=True))
        return texts, tokens, 0, {}

    return run


class ForwardClock:
    """Time spent inside the models' forward passes (hooks on the top modules), to split a decode
    call into model forward and everything else (masks, candidate filtering, bookkeeping)."""

    def __init__(self, *models):
        self.seconds, self.calls, self._t0 = 0.0, 0, 0.0
        for m in models:
            m.register_forward_pre_hook(self._start)
            m.register_forward_hook(self._stop)

    def _start(self, *_):
        _sync()
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        _sync()
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1


def warm_up(settings: list[tuple[str, object]], examples: list[Example], batch_size: int, chunks: int = 3) -> None:
    """Run each setting, untimed, on a few chunks of the task, ending on a short last chunk: a
    compiled forward (DiffusionLM.compile) compiles once per shape class (batch 1 or more, one query
    or many, a prefill), seconds each, which must not land in the timed pass."""
    prompts = [e.prompt for e in examples]
    images = [e.images for e in examples] if any(e.images for e in examples) else None
    starts = [s for s in range(0, len(prompts), batch_size)][:chunks]
    if len(prompts) % batch_size and len(prompts) > batch_size:
        starts.append(len(prompts) - len(prompts) % batch_size)
    for _, run in settings:
        for s in starts:
            run(*((prompts[s : s + batch_size],) + (() if images is None else (images[s : s + batch_size],))))


def measure(name: str, run, examples: list[Example], batch_size: int = 1, repeats: int = 1,
            progress: bool = True, clock: ForwardClock | None = None) -> dict:
    """One setting alone: `measure_together` of one."""
    return measure_together([(name, run)], examples, batch_size, repeats, progress, clock)[0]


def measure_together(settings: list[tuple[str, object]], examples: list[Example], batch_size: int = 1,
                     repeats: int = 1, progress: bool = True, clock: ForwardClock | None = None) -> list[dict]:
    """Settings [(name, runner)] timed interleaved: each chunk of `batch_size` prompts is decoded by
    every setting in turn, so a slow spell of a shared machine (seconds long, +-40% on the CPUs
    here) hits all settings alike instead of whichever ran then; the ratios between settings are
    what a bench reports. Per setting: an untimed warm-up, `repeats` timed passes (median tokens/s,
    generated tokens only), accuracy / TPF / commit histogram from the first pass (greedy decoding
    is deterministic). With a clock, the first pass also splits each setting's time into model
    forwards and the rest."""
    from tqdm.auto import tqdm

    prompts = [e.prompt for e in examples]
    images = [e.images for e in examples] if any(e.images for e in examples) else None

    def chunk(s: int) -> tuple:  # a VLM task's runners get each prompt's images too
        return (prompts[s : s + batch_size],) + (() if images is None else (images[s : s + batch_size],))

    for _, run in settings:
        run(*chunk(0))  # warm-up, untimed: first calls pay for lazy init and allocator growth
    stats = [{"seconds": [0.0] * repeats, "n_tok": [0] * repeats, "latencies": [], "correct": 0, "tokens": 0,
              "calls": 0, "hist": Counter(), "forward_s": 0.0, "forwards": 0} for _ in settings]
    chunks = range(0, len(prompts), batch_size)
    label = settings[0][0] if len(settings) == 1 else f"{len(settings)} settings"
    for rep in range(repeats):
        for s in tqdm(chunks, desc=f"{label} [{rep + 1}/{repeats}]", leave=False, disable=not progress,
                      dynamic_ncols=True):
            for (_, run), st in zip(settings, stats, strict=True):
                c0 = (clock.seconds, clock.calls) if clock is not None else None
                _sync()
                t = time.perf_counter()
                texts, n, c, h = run(*chunk(s))
                _sync()
                took = time.perf_counter() - t
                st["seconds"][rep] += took
                st["n_tok"][rep] += n
                st["latencies"].append(took)
                if rep == 0:
                    st["correct"] += sum(ex.correct(x) for ex, x in zip(examples[s : s + batch_size], texts,
                                                                          strict=True))
                    st["tokens"], st["calls"] = st["tokens"] + n, st["calls"] + c
                    st["hist"].update(h)
                    if c0 is not None:
                        st["forward_s"] += clock.seconds - c0[0]
                        st["forwards"] += clock.calls - c0[1]
    rows = []
    for (name, _), st in zip(settings, stats, strict=True):
        rates = [n / sec if sec else 0.0 for n, sec in zip(st["n_tok"], st["seconds"], strict=True)]
        profile = {}
        if st["forwards"]:  # over the first pass, like the clock
            profile = {"forwards": st["forwards"], "forward_ms": 1e3 * st["forward_s"] / st["forwards"],
                       "rest_ms": 1e3 * (st["seconds"][0] - st["forward_s"]) / st["forwards"]}
        rows.append({"name": name, "batch_size": batch_size, "accuracy": st["correct"] / len(examples),
                     "tpf": st["tokens"] / st["calls"] if st["calls"] else None,
                     "tokens_per_s": statistics.median(rates), "latency_s": statistics.median(st["latencies"]),
                     "generated_tokens": st["tokens"], "model_calls": st["calls"],
                     "commit_histogram": dict(sorted(st["hist"].items())), **({"profile": profile} if profile else {})})
    return rows


def forward_cost(dlm, batch_sizes, tokens=(1, 8, 16, 32, 64), context: int = 64, tries: int = 20) -> list[dict]:
    """Best-of-`tries` ms of one forward feeding `tokens` new tokens per row after `context` cached
    ones, per batch size: where the device stops being bound by per-call overhead and starts
    paying per token. Parallel decoding feeds a block (or TiDAR's draft blocks) per call, so this
    curve bounds its speed-up: free while flat, a cost where it climbs (2 CPU cores climb early)."""
    import torch
    from transformers import DynamicCache

    out = []
    vocab = dlm.text_config.vocab_size
    for b in batch_sizes:
        cache = DynamicCache()
        with torch.no_grad():
            dlm.model(input_ids=torch.randint(0, vocab, (b, context), device=dlm.device), cache=cache, use_cache=True)
            for t in tokens:
                ids = torch.randint(0, vocab, (b, t), device=dlm.device)
                pos = torch.arange(context, context + t, device=dlm.device)[None].expand(b, -1)
                best = float("inf")
                for _ in range(tries):
                    _sync()
                    t0 = time.perf_counter()
                    dlm.model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=t)
                    _sync()
                    best = min(best, time.perf_counter() - t0)
                    cache.crop(-t)
                out.append({"batch_size": b, "tokens_per_row": t, "ms": 1e3 * best})
    return out


def forward_cost_lines(cost: list[dict]) -> list[str]:
    tokens = sorted({c["tokens_per_row"] for c in cost})
    lines = ["One forward by new tokens per row (ms, best of 20; 64 cached tokens):", "",
             "| batch | " + " | ".join(f"{t} tok" for t in tokens) + " |", "|---" * (len(tokens) + 1) + "|"]
    for b in sorted({c["batch_size"] for c in cost}):
        ms = {c["tokens_per_row"]: c["ms"] for c in cost if c["batch_size"] == b}
        lines.append(f"| {b} | " + " | ".join(f"{ms[t]:.2f}" for t in tokens) + " |")
    return lines


def profile_lines(rows: list[dict]) -> list[str]:
    """Markdown lines: the time of one forward and of everything else, per forward, per setting."""
    lines = ["Time per forward, model vs the rest (ms; first pass):", ""]
    return lines + [f"- {r['name']} (batch {r['batch_size']}): {r['profile']['forward_ms']:.2f} forward + "
                    f"{r['profile']['rest_ms']:.2f} rest ({r['profile']['forwards']} forwards)"
                    for r in rows if r.get("profile")]


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def lm_eval_setting(model: str, task: str, limit: int, batch_size: int, name: str, **model_args) -> dict:
    """One setting through lm-eval (accuracy from the harness, speed from our engine's stats)."""
    from edlm.recipes.evaluate import evaluate_tasks

    t0 = time.perf_counter()
    res = evaluate_tasks(model, [task], limit=limit, batch_size=batch_size, **model_args)
    seconds = time.perf_counter() - t0
    metrics = res["results"][task]
    acc_key = next(k for k in metrics if not k.endswith("_stderr") and isinstance(metrics[k], float))
    gen = res["config"]["edlm"]["generation"]
    return {"name": name, "batch_size": batch_size, "accuracy": metrics[acc_key], "metric": acc_key,
            "tpf": gen["tpf"], "tokens_per_s": gen["generated_tokens"] / seconds, "latency_s": None,
            "generated_tokens": gen["generated_tokens"], "model_calls": gen["model_calls"]}


# ------------------------------------------------------------------ report
def markdown(rows: list[dict]) -> str:
    """The table every measurement prints; speed-up is over the first AR row of the same batch size."""
    lines = ["| setting | batch | accuracy | TPF | tokens/s | speed-up vs AR | latency (s) |",
             "|---|---|---|---|---|---|---|"]
    base: dict[int, float] = {}
    for r in rows:
        if r["name"].startswith("AR"):
            base.setdefault(r["batch_size"], r["tokens_per_s"])
    for r in rows:
        ref = base.get(r["batch_size"])
        speed = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"
        tpf = f"{r['tpf']:.2f}" if r["tpf"] else "-"
        lat = f"{r['latency_s']:.3f}" if r["latency_s"] is not None else "-"
        lines.append(f"| {r['name']} | {r['batch_size']} | {100 * r['accuracy']:.1f}% | {tpf} | "
                     f"{r['tokens_per_s']:.1f} | {speed} | {lat} |")
    lines += ["", *aup_lines(rows)]
    return "\n".join(lines).rstrip() + "\n"


def aup(points: list[tuple[float, float]], y_max: float) -> float:
    """d3LLM's Accuracy Under Parallelism of (TPF, accuracy %) points: a hardware-independent score.

    Sorted by TPF; points more than 5 accuracy points under the lowest-TPF one are dropped;
    AUP = rho_1 y_1 + 1/2 sum_i (rho_i - rho_{i-1}) (y_i W(y_i) + y_{i-1} W(y_{i-1})),
    W(y) = min(exp(-3 (1 - y / y_max)), 1), y_max the best accuracy on the task (the AR parent's
    when it is best). An AR model (one point at TPF 1) scores its accuracy.
    """
    pts = sorted(points)
    pts = [p for p in pts if p[1] >= pts[0][1] - 5]

    def w(y):
        return min(math.exp(-3 * (1 - y / y_max)), 1.0) if y_max > 0 else 0.0

    total = pts[0][0] * pts[0][1]
    for (r0, y0), (r1, y1) in zip(pts, pts[1:], strict=False):
        total += 0.5 * (r1 - r0) * (y1 * w(y1) + y0 * w(y0))
    return total


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def aup_lines(rows: list[dict]) -> list[str]:
    """One AUP line per batch size over the dLM rows of each strategy (y_max: the best row's accuracy)."""
    out = []
    for bs in sorted({r["batch_size"] for r in rows}):
        sub = [r for r in rows if r["batch_size"] == bs and r["tpf"]]
        y_max = 100 * max((r["accuracy"] for r in sub), default=0.0)
        groups: dict[str, list] = {}
        for r in sub:
            if not r["name"].startswith("AR"):  # one curve per strategy: the name without its threshold
                words = [w for w in r["name"].replace("(default)", "").split() if not _is_number(w)]
                groups.setdefault(" ".join(words), []).append((r["tpf"], 100 * r["accuracy"]))
        if groups:
            out.append(f"AUP (batch {bs}, y_max {y_max:.1f}%): " +
                       ", ".join(f"{name} {aup(pts, y_max):.1f}" for name, pts in groups.items()))
    return out


def histograms(rows: list[dict]) -> list[str]:
    """Markdown lines: how many tokens each denoising step committed, per engine setting."""
    lines = ["Tokens committed per model call ({tokens: calls}):", ""]
    return lines + [f"- {r['name']} (batch {r['batch_size']}): {json.dumps(r['commit_histogram'])}"
                    for r in rows if r.get("commit_histogram")]


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy vs tokens/s per batch size, with the dLM's Pareto frontier drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["batch_size"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.2), squeeze=False)
    for ax, bs in zip(axes[0], sizes, strict=True):
        sub = [r for r in rows if r["batch_size"] == bs]
        for r in sub:
            ar = r["name"].startswith("AR")
            ax.scatter(r["tokens_per_s"], 100 * r["accuracy"], marker="s" if ar else "o",
                       color="tab:gray" if ar else "tab:blue")
            ax.annotate(r["name"], (r["tokens_per_s"], 100 * r["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        front, best = [], -1.0
        for r in sorted((r for r in sub if not r["name"].startswith("AR")), key=lambda r: -r["tokens_per_s"]):
            if r["accuracy"] > best:
                front.append(r)
                best = r["accuracy"]
        if front:
            ax.plot([r["tokens_per_s"] for r in front], [100 * r["accuracy"] for r in front], "--", color="tab:blue")
        ax.set(xlabel="generated tokens / s", ylabel="accuracy (%)", title=f"{title} (batch {bs})")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ recipe + CLI
THRESHOLD_SWEEP = (0.9, 0.7, 0.5)


def default_strategies(model: str) -> tuple[str, ...]:
    """`threshold` (the paper's rule, swept over the thresholds) and the checkpoint's own strategy
    (config.json -> "edlm" -> "decoding"), which `edlm generate MODEL` uses when given none."""
    from edlm.config import DiffusionConfig
    from edlm.model import read_checkpoint_config

    own = DiffusionConfig.from_dict(read_checkpoint_config(model).get(CONFIG_KEY, {})).decoding.get("strategy")
    return ("threshold",) if own in (None, "threshold") else ("threshold", own)


def check_bench_args(model: str, base: str, task: str, thresholds, strategies, block_sizes, batch_sizes, limit: int,
                     repeats: int, max_new_tokens: int, out: str, drafter: str | None = None) -> Path:
    """Every argument, before a model is loaded: a typo never waits for the measurement. Returns OUT."""
    from edlm.decode.options import declared_options
    from edlm.files import check_output_target
    from edlm.model import read_checkpoint_config

    if not batch_sizes or not strategies or not thresholds:
        raise EdlmError("--batch-sizes, --strategies and --thresholds need at least one value each")
    for flag, values in (("--repeats", [repeats]), ("--limit", [limit]), ("--batch-sizes", batch_sizes),
                         ("--max-new-tokens", [max_new_tokens]),
                         ("--block-sizes", [b for b in block_sizes if b is not None])):
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise EdlmError(f"{flag} must be >= 1, got {v}")
    spec = {s.name: s for s in declared_options()}
    for s in strategies:
        spec["strategy"].check(s)
    for t in thresholds:
        spec["threshold"].check(t)
    out_dir = check_output_target(out)
    if not task.startswith("lm-eval:"):
        load_examples(task, limit)  # cheap: a bad task file fails here
    if CONFIG_KEY in read_checkpoint_config(base):
        raise EdlmError(f"--base {base} is a converted dLM; pass the AR model it came from")
    if CONFIG_KEY not in read_checkpoint_config(model):
        raise EdlmError(f"{model} is not a converted edlm model (run `edlm convert {model} OUT` first)")
    if drafter is not None and not read_checkpoint_config(drafter).get(CONFIG_KEY, {}).get("drafter"):
        raise EdlmError(f"--drafter {drafter} has no drafting adapter (make one with `edlm convert {base} OUT "
                        "--drafter lora:16`)")
    return out_dir


def run_bench(model: str, base: str, task: str = "reasoning", thresholds=THRESHOLD_SWEEP, strategies=None,
              block_sizes=(None,), batch_sizes=(1,), limit: int = 50, repeats: int = 1, max_new_tokens: int = 96,
              out: str = "bench-out", hf_baselines: bool = True, verified: bool = False, dtype=None,
              drafter: str | None = None, compile: bool = False) -> list[dict]:
    """`strategies` None: `default_strategies(model)`; `drafter`: a drafting adapter's dir over `base`
    (edlm.drafter), timed beside as one more setting; `compile`: the engine's settings decode through
    torch.compile (DiffusionLM.compile; HF generate stays eager, as a user runs it), warmed up on
    every shape first, and with no split of time into forward and rest (hooks would break the graph)."""
    from edlm.decode.options import DecodeOptions
    from edlm.model import DiffusionLM

    strategies = tuple(strategies) if strategies is not None else default_strategies(model)
    out_dir = check_bench_args(model, base, task, thresholds, strategies, block_sizes, batch_sizes, limit, repeats,
                               max_new_tokens, out, drafter)
    rows: list[dict] = []
    settings = [(s, t, b) for s in strategies for b in block_sizes
                for t in (thresholds if s in strategies_reading("threshold") else [None])]
    if task.startswith("lm-eval:"):
        name = task.split(":", 1)[1]
        for bs in batch_sizes:
            rows.append(lm_eval_setting(base, name, limit, bs, "AR engine", autoregressive=True))
            for s, t, b in settings:
                rows.append(lm_eval_setting(model, name, limit, bs, _label(s, t, b), strategy=s,
                                            threshold=t, block_size=b))
    else:
        examples = load_examples(task, limit)
        ar = DiffusionLM.from_pretrained(base, autoregressive=True, dtype=dtype, compile=compile)  # HF's stays eager
        dlm = DiffusionLM.from_pretrained(model, dtype=dtype, compile=compile)
        drafting = DiffusionLM.from_pretrained(drafter, dtype=dtype, compile=compile) if drafter else None
        for s, t, b in settings:  # the strategies' constraints on this model, before any setting is timed
            DecodeOptions.resolve(dlm, strategy=s, threshold=t, block_size=b)
        clock = None if compile else ForwardClock(ar.model, dlm.model,
                                                  *([drafting.model] if drafting is not None else []))
        for bs in batch_sizes:
            timed = [("AR engine", engine_runner(ar, max_new_tokens))]
            if hf_baselines:
                timed.append(("AR HF generate", hf_runner(ar, max_new_tokens)))
                if bs == 1:
                    timed.append(("AR HF prompt-lookup", hf_runner(ar, max_new_tokens, prompt_lookup=10)))
            if verified:
                timed.append(("dLM drafts, AR verifies", verified_runner(dlm, ar, max_new_tokens)))
            if drafting is not None:
                timed.append(("drafter on the AR (one model)", engine_runner(drafting, max_new_tokens)))
            for s, t, b in settings:
                decode = {"strategy": s, "block_size": b, **({"threshold": t} if t is not None else {})}
                timed.append((_label(s, t, b), engine_runner(dlm, max_new_tokens, **decode)))
            if compile:  # every shape class compiled before anything is timed
                warm_up(timed, examples, bs)
            rows += measure_together(timed, examples, bs, repeats, clock=clock)
    cost = [] if task.startswith("lm-eval:") else forward_cost(dlm, batch_sizes)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    (out_dir / "results.json").write_text(json.dumps({"model": model, "base": base, "task": task,
                                                      "dtype": str(dtype or "auto").replace("torch.", ""), "compiled": compile, "rows": rows,
                                                      "forward_cost": cost}, indent=1))
    extra = ["", *forward_cost_lines(cost)] if cost else []
    (out_dir / "results.md").write_text("\n".join([table, "", *histograms(rows), "", *profile_lines(rows), *extra])
                                        + "\n")
    plot(rows, out_dir / "pareto.png", Path(model).name)
    print(table)
    print(f"wrote {out_dir}/results.json, results.md, pareto.png")
    return rows


def _label(strategy: str, threshold, block_size) -> str:
    label = f"dLM {strategy}" + (f" {threshold:g}" if threshold is not None else "")
    return label + (f" bs{block_size}" if block_size else "")
