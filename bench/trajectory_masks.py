"""Trajectory masks (d3LLM's pseudo-trajectories, issue 25) on the demo, against their control.

Stages, each skipped when its output is there (so a killed run resumes):
1. the shipped dLM's own answers to the first --prompts training problems, decoded with
   `threshold` 0.9 and their commit times (`edlm distill-data --trajectory`'s `distill`);
2. the rows whose final answer is right (the trajectories of wrong answers would teach them);
3. for each --steps: the study's recipe (bench/parallelism.py's runs: from the shipped dLM, lr 1e-4
   to 1e-5, AR loss 1, one t per block, seq 256 x 16) once with position masking (the control, the
   same data) and once with `--masking trajectory`;
4. every model on the held-out problems: bench/parallelism.py (accuracy, TPF, AUP, histograms).

    python bench/trajectory_masks.py --work runs/traj --steps 300 900 --out bench/results/parallelism/trajectory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from edlm.model import DiffusionLM
    from edlm.recipes.distill import distill
    from edlm.recipes.reasoning import extract_answer, train_problems
    from edlm.train import TrainConfig, train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dlm", default=str(ROOT / "models/dlm"), help="the dLM to start from (default models/dlm)")
    ap.add_argument("--work", default="runs/traj", help="data and runs (resumable)")
    ap.add_argument("--prompts", type=int, default=8000, help="training problems to answer (default 8000)")
    ap.add_argument("--steps", type=int, nargs="+", default=[300], help="training steps, one pair of runs each")
    ap.add_argument("--limit", type=int, default=500, help="held-out problems (default 500)")
    ap.add_argument("--maskings", nargs="+", default=["position", "trajectory"], choices=["position", "trajectory"],
                    help="which runs to train per --steps (default both: trajectory and its control)")
    ap.add_argument("--window", type=int, default=1, help="train with --window N (named NAME-wN; default 1)")
    ap.add_argument("--settings", nargs="+", default=None, help="bench/parallelism.py's --settings (default its own)")
    ap.add_argument("--out", default=None, help="where bench/parallelism.py writes results.json/md")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    problems = list(train_problems(args.prompts))
    answers = work / "answers.jsonl"
    distill(DiffusionLM.from_pretrained(args.dlm), [p.prompt for p in problems], answers, max_new_tokens=96,
            batch_size=64, trajectory=True, strategy="threshold", threshold=0.9)
    gold = {p.prompt: p.answer for p in problems}
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    right = [r for r in rows if extract_answer(r["response"]) == gold.get(r["prompt"])]
    data = work / "right.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in right))
    print(f"{len(right)}/{len(rows)} answers right: {data}")
    models = []
    tag = f"-w{args.window}" if args.window > 1 else ""
    for steps in args.steps:
        for masking in args.maskings:
            out = work / f"{masking}{tag}-{steps}"
            if not (out / "model" / "config.json").exists():
                train(TrainConfig(model=args.dlm, out=str(out), data=[str(data)], val_data=None, steps=steps,
                                  lr=1e-4, min_lr=1e-5, warmup_steps=20, seed=3, seq_len=256, batch_size=16,
                                  eval_every=0, save_every=100, keep_last=2, resume=True, ar_loss_weight=1.0,
                                  t_per_block=True, masking=masking, window=args.window))
            models.append(f"{masking}{tag}{steps}={out / 'model'}")
    cmd = [sys.executable, str(ROOT / "bench/parallelism.py"), "--models", f"shipped={args.dlm}", *models,
           "--limit", str(args.limit)] + (["--out", args.out] if args.out else []) \
        + (["--settings", *args.settings] if args.settings else [])
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
