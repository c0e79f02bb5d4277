#!/usr/bin/env bash
# The one prepared GPU suite: every check that needs a CUDA device, each under its own timeout, in
# under 8 minutes all told (GPU_SUITE_BUDGET_S); a failed or timed-out check is recorded and the
# suite goes on. The checks the issue asks for run first, the extra ones after, while budget lasts:
#
#   analysis_vit_s16, analysis_vit_l16  whole-slide analysis against the model alone, bf16, 224 px
#                                       at 0.5 µm/px (benchmarks/wsi_inference.py): analysis_vs_model
#   train_wait                          the training feed's data wait, ViT-S/16 on DINO crops and the
#                                       ResNet-50 U-Net, producer processes (train.py): train_data_wait;
#                                       the U-Net's tiles arrive packed and are decoded on the device
#   embed                               embedding tiles cut by producer processes against the model
#                                       alone (embed_model.py): embed_vs_model
#   cnn_vs_foundation                   inference time, ResNet-50 U-Net over ViT-S/16 (train.py)
#   gpu_decode                          JPEG tiles/s, CPU against nvJPEG (gpu_decode.py)
#   ssl, foundation, fsdp_vitg, fsdp_vitg_gc   extras: DINOv2 steps, preset embed speed, ViT-g FSDP
#
# It ends with a table of the required figures against their goals, then
# `gpu_suite mode=... failed=N missing=M` (exit status 1 unless both are 0). The markdown block
# goes to $OUT/gpu_results.md (or /tmp/pathray-gpu-suite/) with every check's whole log in
# gpu_suite_logs.txt beside it; a GPU run also appends the block, headed by the date and the
# device, to benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu.sh --fetch-wheels   # here, once: wheels the GPU image lacks, into .whl/
#   bash benchmarks/gpu.sh                  # on the GPU machine, from the repository root
#   bash benchmarks/gpu.sh --cpu            # here: the same checks at small sizes on the CPU (a test runs it)
#
# The GPU image has CUDA torch, timm, torchvision, tifffile, numpy, pandas, PyYAML and SciPy, but
# neither Ray, tiffslide, zarr, imagecodecs nor pydantic, and nothing is installed from the network
# there: every check imports only pathray's Ray-free modules (from src/, not installed), and
# pydantic is installed from the small wheels carried in .whl/ (--no-index, into a temporary
# folder). `ray` is made unimportable for every check; with --cpu, tiffslide, zarr, imagecodecs and
# openslide are too, so the CPU run sees what the GPU image has. PYTHONSAFEPATH keeps each script's
# folder off sys.path (no file there shadows a module). With the device
# tool: run `bash benchmarks/gpu.sh` with carry [".whl"] and timeout_s 560, then append
# $OUT/gpu_results.md to benchmarks/RESULTS.md here.
#
# Environment: PYTHON (default: python3; --cpu: .venv/bin/python), GPU_SUITE_BUDGET_S (460),
# GPU_SUITE_CACHE (slides and model packages, kept between runs: .bench/gpu-suite), OUT.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  "") ;;
  --cpu | --cpu-dry-run) MODE=cpu ;;
  --fetch-wheels) MODE=wheels ;;
  *) echo "usage: bash benchmarks/gpu.sh [--cpu | --fetch-wheels]" >&2; exit 2 ;;
esac

if [ "$MODE" = wheels ]; then
  # the versions this checkout's venv runs, for CPython 3.12 on x86-64 (the GPU image's Python)
  PY=${PYTHON:-.venv/bin/python}
  pins=$("$PY" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in
      ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")))
EOF
  ) || exit 1
  rm -rf .whl && mkdir -p .whl
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins || exit 1
  ls -l .whl
  exit 0
fi

if [ "$MODE" = cpu ]; then
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
else
  PY=${PYTHON:-python3}
fi
OUTDIR=${OUT:-/tmp/pathray-gpu-suite}
CACHE=${GPU_SUITE_CACHE:-.bench/gpu-suite}
BUDGET=${GPU_SUITE_BUDGET_S:-460}
START=$(date +%s)
mkdir -p "$OUTDIR" "$CACHE"
TMP=$(mktemp -d /tmp/pathray-gpu-suite.XXXX)
trap 'rm -rf "$TMP"' EXIT
LOGS=$TMP/logs
mkdir -p "$LOGS"

# packages no check may import: a stub that raises ImportError stands in for each
BLOCK=(ray)
[ "$MODE" = cpu ] && BLOCK+=(tiffslide zarr imagecodecs openslide)
for name in "${BLOCK[@]}"; do
  mkdir -p "$TMP/blocked/$name"
  echo "raise ImportError('$name is not importable in the GPU suite (benchmarks/gpu.sh)')" \
    >"$TMP/blocked/$name/__init__.py"
done
export PYTHONPATH="$TMP/blocked:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1

if ! "$PY" -c "import pydantic" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null \
      && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$TMP/site" .whl/*.whl; then
    export PYTHONPATH="$PYTHONPATH:$TMP/site"
  else
    echo "pydantic is missing and .whl/ holds no wheels for it (bash benchmarks/gpu.sh --fetch-wheels, then carry .whl)"
  fi
fi

ROWS=()
SECTIONS=""

# check NAME LIMIT_S CMD...: runs CMD under min(LIMIT_S, what is left of the budget), logs it, and
# records its status, time and the tail of its output. Skipped when under half its limit is left.
check() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt $((limit / 2)) ] || [ "$left" -lt 20 ]; then
    ROWS+=("| $name | skipped: ${left}s of the suite's budget left | 0 |")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s): $*"
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMED OUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  ROWS+=("| $name | $status | $(($(date +%s) - t0)) |")
  SECTIONS+=$'\n'"#### $name"$'\n\n'"\`$*\`"$'\n\n'"\`\`\`text"$'\n'"$(grep -v -e '^\s*$' "$LOGS/$name.log" | tail -n 25)"$'\n'"\`\`\`"$'\n'
}

WSI=(benchmarks/wsi_inference.py --gpu --cache "$CACHE/wsi")
TRAIN=(benchmarks/train.py --workdir "$CACHE")
EMBED=(benchmarks/embed_model.py --workdir "$CACHE")
if [ "$MODE" = gpu ]; then
  DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  DEVICE=${DEVICE:-a GPU nvidia-smi does not name}
  WSI+=(--repeat 3)
  TRAIN_WAIT=(--device cuda --no-ray --engines dinov2 cnn --gpu-batch 64 --gpu-warmup 20 --gpu-steps 60)
  EMBED+=(--device cuda --batch 256 --batches 40)
  INFER=(--device cuda --engines foundation cnn --gpu-steps 0 --gpu-batch 128)
  DECODE=()
  SSL=(--gpu --batch 32 --steps 10 --warmup 3)
  FOUNDATION=(--gpu --presets kaiko_vits16 uni h_optimus_0 --n 512 --batch 64)
  FSDP=(--gpu --preset h_optimus_0 --batch 32 --steps 5 --warmup 2)
  FSDP_GC=(--gpu --preset h_optimus_0 --batch 64 --steps 3 --warmup 1 --grad-checkpointing)
  ENV_CMD=(bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; \
\"$PY\" -c 'import torch, timm, pydantic; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
\"timm\", timm.__version__, \"pydantic\", pydantic.__version__, \"gpu\", torch.cuda.get_device_name())'")
else  # the same checks, tiny: 1-block ViTs, 32-64 px tiles, 1024 px slides, a few batches
  DEVICE="CPU, $(nproc) cores"
  WSI+=(--device cpu --size 1024 --depth 1 --tile 64@0.5 --batch-size 16 --repeat 1)
  SMALL=(--size 32 --depth 1 --slides 2 --slide-size 1024 --producers 1)
  TRAIN_WAIT=(--device cpu --no-ray --engines dinov2 cnn "${SMALL[@]}" --local-size 16 --out-dim 256)
  TRAIN_WAIT+=(--batch 2 --warmup 1 --steps 3 --iters 1 --infer-warmup 0 --decode device)
  EMBED+=(--device cpu "${SMALL[@]}" --batch 4 --batches 8)
  INFER=(--device cpu --engines foundation cnn --size 32 --depth 1 --batch 2 --steps 0 --iters 2 --infer-warmup 1)
  DECODE=(--size 1024 --tiles 32 --batch 16)
  SSL=(--depth 1 --size 64 --local-size 32 --batch 2 --steps 1 --warmup 0 --out-dim 256)
  FOUNDATION=(--presets kaiko_vits16 --n 2 --batch 2 --warmup 0 --size 112)
  FSDP=(--preset h_optimus_0 --depth 2 --size 28 --batch 2 --steps 1 --warmup 0)
  FSDP_GC=(--preset h_optimus_0 --depth 2 --size 28 --batch 2 --steps 1 --warmup 0 --grad-checkpointing)
  ENV_CMD=("$PY" -c "import torch, pydantic; from pathray.models.timm_compat import import_timm; \
print('torch', torch.__version__, 'timm', import_timm().__version__, 'pydantic', pydantic.__version__, \
'cuda', torch.cuda.is_available())")
fi

check env 30 "${ENV_CMD[@]}"
# --- the figures the issue asks for ----------------------------------------------------------------
check analysis_vit_s16 120 "$PY" "${WSI[@]}" --model vit_small_patch16_224
check analysis_vit_l16 120 "$PY" "${WSI[@]}" --model vit_large_patch16_224
check train_wait 150 "$PY" "${TRAIN[@]}" "${TRAIN_WAIT[@]}"
check embed 90 "$PY" "${EMBED[@]}"
check cnn_vs_foundation 60 "$PY" "${TRAIN[@]}" "${INFER[@]}"
# gpu_decode.py writes PIL-encoded tiles through tifffile, which asks for imagecodecs' JPEG encoder
# even for encoded tiles: it runs with train.py's fallback (PIL's encoder) in place
check gpu_decode 120 "$PY" -c "import runpy, sys; sys.path.append('benchmarks'); import train; \
train.slim_image_fallbacks(); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
  benchmarks/gpu_decode.py "${DECODE[@]}"
# --- extras, while the budget lasts ------------------------------------------------------------------
# DINOv2 pretraining steps of a ViT-S/16 (2x224 + 8x96 crops, 65536 prototypes) on crops in memory
check ssl 60 "$PY" benchmarks/ssl_pretrain.py "${SSL[@]}"
# preset embedding throughput, bf16: a ViT-S, a ViT-L and a ViT-g
check foundation 90 "$PY" benchmarks/foundation.py "${FOUNDATION[@]}"
# FSDP2 train steps of a ViT-g (h_optimus_0, 1.1B) on one GPU, then with gradient checkpointing
check fsdp_vitg 120 "$PY" benchmarks/fsdp_step.py "${FSDP[@]}"
check fsdp_vitg_gc 100 "$PY" benchmarks/fsdp_step.py "${FSDP_GC[@]}"

# figure LABEL CHECK LINE KEY [OP GOAL]: KEY's value on the last line of CHECK's log that LINE
# (an extended regex) matches, and whether it meets the goal
FIGURES=()
MISSING=0
figure() {
  local label=$1 log=$LOGS/$2.log line=$3 key=$4 op=${5:-} goal=${6:-} value met=- target
  value=$(grep -E "$line" "$log" 2>/dev/null | tail -n 1 | tr ' ' '\n' | sed -n "s/^$key=//p" | tail -n 1)
  if [[ $value =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    [ -n "$op" ] && met=$(awk -v v="$value" -v g="$goal" -v op="$op" \
      'BEGIN { ok = (op == ">=") ? v >= g : v < g; print ok ? "yes" : "no" }')
  elif [ "$value" != skipped ]; then
    value=missing
    MISSING=$((MISSING + 1))
  fi
  target=${op:+$op $goal}
  FIGURES+=("| $label | $value | ${target:--} | $met |")
}
figure "analysis_vs_model ViT-S/16" analysis_vit_s16 '^analysis_vs_model=' analysis_vs_model '>=' 0.9
figure "analysis_vs_model ViT-L/16" analysis_vit_l16 '^analysis_vs_model=' analysis_vs_model '>=' 0.9
figure "train_data_wait ViT-S/16 DINO crops" train_wait '^train_data_wait=.* engine=dinov2 ' train_data_wait '<' 0.05
figure "train_data_wait ResNet-50 U-Net" train_wait '^train_data_wait=.* engine=cnn ' train_data_wait '<' 0.05
figure "embed_vs_model" embed '^embed_vs_model=' embed_vs_model '>=' 0.9
figure "cnn_vs_foundation_infer (time ratio)" cnn_vs_foundation '^data_wait_share=' cnn_vs_foundation_infer
figure "decode tiles/s, CPU" gpu_decode '^gpu_decode tiles_per_s' cpu
figure "decode tiles/s, GPU" gpu_decode '^gpu_decode tiles_per_s' cuda

FAILED=$(printf '%s\n' "${ROWS[@]}" | grep -c -e FAILED -e 'TIMED OUT')
{
  echo
  echo "### GPU suite ($MODE), $(date -u +%Y-%m-%d), $DEVICE, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo "\`bash benchmarks/gpu.sh$([ "$MODE" = cpu ] && echo ' --cpu')\`: $(($(date +%s) - START)) s in all"
  [ "$MODE" = cpu ] && printf '\n%s\n' "Tiny models and sizes on the CPU: the figures show that every check runs, not how fast."
  echo
  echo "| figure | value | goal on a GPU | met |"
  echo "| --- | --- | --- | --- |"
  printf '%s\n' "${FIGURES[@]}"
  echo
  echo "| check | status | seconds |"
  echo "| --- | --- | --- |"
  printf '%s\n' "${ROWS[@]}"
  printf '%s' "$SECTIONS"
} | tee "$OUTDIR/gpu_results.md"
for log in "$LOGS"/*.log; do
  [ -e "$log" ] && printf '===== %s\n%s\n' "$(basename "$log" .log)" "$(cat "$log")"
done >"$OUTDIR/gpu_suite_logs.txt"
if [ "$MODE" = gpu ]; then
  RESULTS=${GPU_SUITE_RESULTS:-benchmarks/RESULTS.md}
  [ -f "$RESULTS" ] || printf '# Benchmark results\n\nRuns of `bash benchmarks/gpu.sh`, newest last.\n' >"$RESULTS"
  cat "$OUTDIR/gpu_results.md" >>"$RESULTS"
fi
echo
echo "gpu_suite mode=$MODE failed=$FAILED missing=$MISSING"
[ "$FAILED" -eq 0 ] && [ "$MISSING" -eq 0 ]
