"""Accuracy and speed of one decoding setting on the built-in reasoning set (demo and bench)."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from edlm import reasoning


@dataclass
class RunResult:
    name: str
    accuracy: float
    tpf: float
    tokens_per_s: float
    latency_s: float  # median seconds per request
    n: int
    generated_tokens: int
    model_calls: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def run_reasoning(dlm, name: str, problems=None, limit: int = 100, batch_size: int = 1,
                  max_new_tokens: int = 96, progress: bool = True, **decode) -> RunResult:
    """Decode every problem's prompt and score exact match; tokens/s counts generated tokens only."""
    from tqdm.auto import tqdm

    problems = problems if problems is not None else reasoning.test_problems(limit)
    correct = tokens = calls = 0
    latencies = []
    bar = tqdm(total=len(problems), desc=name, disable=not progress, leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        t = time.perf_counter()
        res = dlm.generate([p.prompt for p in chunk], max_new_tokens=max_new_tokens, **decode)
        elapsed = time.perf_counter() - t
        latencies.extend([elapsed] * len(chunk))
        for p, text, s in zip(chunk, res.texts, res.stats, strict=True):
            correct += reasoning.exact_match(text, p)
            tokens += s.generated_tokens
            calls += s.model_calls
        bar.update(len(chunk))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    bar.close()
    return RunResult(name, correct / len(problems), tokens / max(1, calls), tokens / seconds,
                     statistics.median(latencies), len(problems), tokens, calls, seconds)


def warm_up(dlm, **decode) -> None:
    """One untimed call: first calls pay for lazy initialisation and allocator growth."""
    dlm.generate(reasoning.test_problems(1)[0].prompt, max_new_tokens=16, **decode)


def format_table(rows: list[RunResult], baseline: RunResult | None = None) -> str:
    head = "| setting | accuracy | TPF | tokens/s | speed-up | latency (s) |\n|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        speed = f"{r.tokens_per_s / baseline.tokens_per_s:.2f}x" if baseline else "-"
        lines.append(f"| {r.name} | {100 * r.accuracy:.1f}% | {r.tpf:.2f} | {r.tokens_per_s:.1f} | {speed} "
                     f"| {r.latency_s:.3f} |")
    return "\n".join(lines)


def plot_pareto(rows: list[RunResult], path, title: str) -> None:
    """Accuracy vs tokens/s: the trade-off a user picks a threshold from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        is_ar = r.name.startswith("AR")
        ax.scatter(r.tokens_per_s, 100 * r.accuracy, marker="s" if is_ar else "o", s=60,
                   color="tab:gray" if is_ar else "tab:blue")
        ax.annotate(r.name, (r.tokens_per_s, 100 * r.accuracy), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)
    dlm_rows = sorted((r for r in rows if not r.name.startswith("AR")), key=lambda r: r.tokens_per_s)
    if dlm_rows:
        ax.plot([r.tokens_per_s for r in dlm_rows], [100 * r.accuracy for r in dlm_rows], color="tab:blue", alpha=0.5)
    ax.set_xlabel("generated tokens / s (batch 1)")
    ax.set_ylabel("exact match (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
