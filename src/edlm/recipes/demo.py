"""`edlm demo`: the shipped AR model vs its dLM on held-out reasoning problems, in one run.

Prints accuracy, TPF, tokens/s and speed-up over AR (batch 1) and writes a PNG of accuracy
vs tokens/s. The models are the ones `make models` builds (edlm.recipes.demo_model).
"""

from __future__ import annotations

import json
from pathlib import Path

from edlm.errors import EdlmError

MAX_NEW_TOKENS = 96  # the longest held-out worked solution is 96 tokens
THRESHOLDS = (0.95, 0.9, 0.7)
STRATEGIES = ("threshold", "prefix")
# The paper's rule over a window of blocks (multi-block decoding: the next block opens while this one
# still has masks): the shipped dLM's threshold-rule point at its parent's accuracy, 93.2% at 6.20
# tokens per forward on 500 held-out problems (bench/results/parallelism/2026-12-07-right-answers;
# three blocks at 0.98: 93.4% at 6.03, with wider forwards). (strategy, threshold, blocks), shown
# when the strategy is.
MULTI_BLOCK = (("prefix", 0.97, 2),)


def find_demo_models(models: str | Path | None = None, pair: tuple[str, str] = ("ar", "dlm")) -> Path:
    """The dir holding the pair (ar/ and dlm/; vlm-ar/ and vlm-dlm/): the one given, else ./models,
    else the source checkout's."""
    here = Path(__file__).resolve().parents[3] / "models"  # src/edlm/recipes/demo.py -> repo root
    candidates = [Path(models)] if models is not None else [Path.cwd() / "models", here]
    for path in candidates:
        if all((path / sub / "config.json").is_file() for sub in pair):
            return path
    make = "make vlm-models" if pair[0].startswith("vlm") else "make models"
    raise EdlmError(f"no demo models ({pair[0]}/ and {pair[1]}/) in {candidates[0]}: pass --models DIR, or build "
                    f"them with `{make}` in a source checkout")


def run_demo(models=None, limit: int = 100, thresholds=THRESHOLDS, strategies=STRATEGIES, out="demo-out",
             threads: int | None = None, vlm: bool = False) -> list[dict]:
    """AR vs dLM on `limit` held-out problems at batch 1; prints the table, writes results and a plot.
    vlm: the VLM pair (models/vlm-ar, models/vlm-dlm) on the same problems with their first number
    shown as a picture (edlm.recipes.picture_problems), HF `generate` of the parent timed beside."""
    import torch

    from edlm.decode.options import DecodeOptions
    from edlm.files import check_output_target
    from edlm.model import DiffusionLM
    from edlm.recipes import reasoning
    from edlm.recipes.bench import (
        engine_runner,
        hf_runner,
        load_examples,
        markdown,
        measure_together,
        plot,
        verified_runner,
    )

    if not 1 <= limit <= reasoning.TEST_SIZE:
        raise EdlmError(f"--limit must be in [1, {reasoning.TEST_SIZE}], got {limit}")
    for t in thresholds:
        if not 0 < t <= 1:
            raise EdlmError(f"--thresholds must be in (0, 1], got {t}")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise EdlmError(f"--strategies: unknown {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    if threads is not None and threads < 1:
        raise EdlmError(f"--threads must be >= 1, got {threads}")
    out = check_output_target(out)
    pair = ("vlm-ar", "vlm-dlm") if vlm else ("ar", "dlm")
    models = find_demo_models(models, pair)
    if threads is not None:
        torch.set_num_threads(threads)
    examples = load_examples("pictures" if vlm else "reasoning", limit)
    ar = DiffusionLM.from_pretrained(models / pair[0], autoregressive=True)
    dlm = DiffusionLM.from_pretrained(models / pair[1])
    print(f"edlm demo{' --vlm' if vlm else ''}: {len(examples)} held-out problems, batch 1, "
          f"{torch.get_num_threads()} threads, dLM block size {dlm.config.block_size}")
    default = DecodeOptions.resolve(dlm)  # what `edlm generate models/dlm` uses with no flags
    timed = [("AR HF generate", hf_runner(ar, MAX_NEW_TOKENS))] if vlm else []
    timed += [("AR (KV cache)", engine_runner(ar, MAX_NEW_TOKENS)),
             # the parent's own text, drafted a block at a time by the dLM (edlm.decode.verify)
             ("dLM drafts, AR verifies", verified_runner(dlm, ar, MAX_NEW_TOKENS))]
    if not vlm and (models / "drafter" / "config.json").is_file():  # a drafting adapter on the parent (edlm.drafter)
        drafter = DiffusionLM.from_pretrained(models / "drafter")
        timed.append(("drafter on the AR (one model)", engine_runner(drafter, MAX_NEW_TOKENS)))
    if dlm.config.causal_clean:  # one model: drafts checked by its own AR stream (edlm.decode.selfverify)
        name = "dLM verified (one model)" + (" (default)" if default.strategy == "verified" else "")
        timed.append((name, engine_runner(dlm, MAX_NEW_TOKENS, strategy="verified")))
    for strategy in strategies:
        for t in thresholds:
            name = f"dLM {strategy} {t:g}"
            if (strategy, t) == (default.strategy, default.threshold):
                name += " (default)"
            timed.append((name, engine_runner(dlm, MAX_NEW_TOKENS, threshold=t, strategy=strategy)))
    for strategy, t, blocks in () if vlm else MULTI_BLOCK:
        if strategy in strategies:
            timed.append((f"dLM {blocks}-block {strategy} {t:g}",
                          engine_runner(dlm, MAX_NEW_TOKENS, threshold=t, strategy=strategy, blocks=blocks)))
    rows = measure_together(timed, examples)  # interleaved: machine noise hits every setting alike
    table = markdown(rows)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "pareto.png", f"edlm demo{' --vlm' if vlm else ''}: {len(examples)} held-out problems, {dlm.device}")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'pareto.png'}")
    return rows
