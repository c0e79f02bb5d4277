#!/usr/bin/env bash
# The one prepared GPU suite: every check that needs a CUDA device, each under its own timeout, in
# about 8 minutes all told; a failed or timed-out check is recorded and the suite goes on. Prints a
# markdown block to append to benchmarks/RESULTS.md (also written to $OUT/gpu_results.md, or to
# /tmp/pathray-gpu-suite/, with one log per check beside it).
#
#   bash benchmarks/gpu.sh --fetch-wheels   # here, once: wheels the GPU image lacks, into .whl/
#   bash benchmarks/gpu.sh                  # on the GPU machine, from the repository root
#   bash benchmarks/gpu.sh --cpu-dry-run    # here: the same checks on the CPU with tiny settings
#
# The GPU image has CUDA torch, timm, torchvision, tifffile, numpy, PyYAML and SciPy, but neither
# Ray, tiffslide, zarr nor pydantic, and nothing is installed from the network there: every check
# imports only pathray's Ray-free modules (from src/, not installed), and pydantic (which the
# engine configs of the FSDP step need) is installed from the small wheels carried in .whl/
# (--no-index, into a temporary folder). With the device tool: run `bash benchmarks/gpu.sh` with
# carry [".whl"] and timeout_s 540.
#
# Environment: PYTHON (default: python3; dry run: .venv/bin/python), GPU_SUITE_BUDGET_S (450).
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  "") ;;
  --cpu-dry-run) MODE=cpu ;;
  --fetch-wheels) MODE=wheels ;;
  *) echo "usage: bash benchmarks/gpu.sh [--cpu-dry-run | --fetch-wheels]" >&2; exit 2 ;;
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
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
BUDGET=${GPU_SUITE_BUDGET_S:-450}
START=$(date +%s)

if ! "$PY" -c "import pydantic" 2>/dev/null; then
  SITE=$(mktemp -d /tmp/pathray-site.XXXX)
  if compgen -G ".whl/*.whl" >/dev/null \
      && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl; then
    export PYTHONPATH="$PYTHONPATH:$SITE"
  else
    echo "pydantic is missing and .whl/ holds no wheels for it (bash benchmarks/gpu.sh --fetch-wheels, then carry .whl)"
  fi
fi

ROWS=()
SECTIONS=""

# check NAME LIMIT_S CMD...: runs CMD under min(LIMIT_S, what is left of the budget), logs it, and
# records its status, time and the tail of its output.
check() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    ROWS+=("| $name | skipped: suite budget spent | 0 |")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s): $*"
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMED OUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  ROWS+=("| $name | $status | $(($(date +%s) - t0)) |")
  SECTIONS+=$'\n'"#### $name"$'\n\n'"\`$*\`"$'\n\n'"\`\`\`text"$'\n'"$(grep -v -e '^\s*$' "$OUTDIR/$name.log" | tail -n 25)"$'\n'"\`\`\`"$'\n'
}

if [ "$MODE" = gpu ]; then
  FOUNDATION=(--gpu --presets kaiko_vits16 phikon uni virchow2 h_optimus_0 gigapath --n 512 --batch 64)
  FSDP=(--gpu --preset h_optimus_0 --batch 32 --steps 5 --warmup 2)
  FSDP_GC=(--gpu --preset h_optimus_0 --batch 64 --steps 3 --warmup 1 --grad-checkpointing)
  SSL=(--gpu --batch 32 --steps 10 --warmup 3)
  DECODE=()
  ENV_CMD=(bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
\"$PY\" -c 'import torch, timm, pydantic; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
\"timm\", timm.__version__, \"pydantic\", pydantic.__version__, \"gpu\", torch.cuda.get_device_name())'")
else  # the same checks, tiny: small presets, few tiles, a 2-block ViT-g, one step
  FOUNDATION=(--presets kaiko_vits16 h0_mini --n 2 --batch 2 --warmup 0 --size 112)
  FSDP=(--preset h_optimus_0 --depth 2 --size 28 --batch 2 --steps 1 --warmup 0)
  FSDP_GC=(--preset h_optimus_0 --depth 2 --size 28 --batch 2 --steps 1 --warmup 0 --grad-checkpointing)
  SSL=(--depth 1 --size 64 --local-size 32 --batch 2 --steps 1 --warmup 0 --out-dim 256)
  DECODE=(--size 1024 --tiles 32 --batch 16)
  ENV_CMD=("$PY" -c "import torch, pydantic; from pathray.models.timm_compat import import_timm; \
print('torch', torch.__version__, 'timm', import_timm().__version__, 'pydantic', pydantic.__version__, \
'cuda', torch.cuda.is_available())")
fi

check env 60 "${ENV_CMD[@]}"
# embedding throughput, bf16: a ViT-S, a ViT-B, a ViT-L, a ViT-H and two ViT-g
check foundation 240 "$PY" benchmarks/foundation.py "${FOUNDATION[@]}"
# FSDP2 train steps of a ViT-g (h_optimus_0, 1.1B) on one GPU: the training loop's model, shards,
# AdamW and bf16 autocast, without Ray; then with gradient checkpointing at twice the batch
check fsdp_vitg 180 "$PY" benchmarks/fsdp_step.py "${FSDP[@]}"
check fsdp_vitg_gc 150 "$PY" benchmarks/fsdp_step.py "${FSDP_GC[@]}"
# DINOv2 pretraining steps of a ViT-S/16 (2x224 + 8x96 crops, 65536 prototypes), bf16: images/s
# per worker beside DINOv2's published per-A100 figure
check ssl 90 "$PY" benchmarks/ssl.py "${SSL[@]}"
# --- GPU JPEG decode comparison (nvJPEG vs CPU): benchmarks/gpu_decode.py, another helper's ---------
if [ -f benchmarks/gpu_decode.py ]; then
  check gpu_decode 150 "$PY" benchmarks/gpu_decode.py "${DECODE[@]}"
else
  ROWS+=("| gpu_decode | skipped: benchmarks/gpu_decode.py not in this checkout | 0 |")
fi
# --- end of the GPU JPEG decode spot ----------------------------------------------------------------

{
  echo
  echo "### GPU suite ($MODE), $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo "\`bash benchmarks/gpu.sh$([ "$MODE" = cpu ] && echo ' --cpu-dry-run')\`: $(($(date +%s) - START)) s in all"
  echo
  echo "| check | status | seconds |"
  echo "| --- | --- | --- |"
  printf '%s\n' "${ROWS[@]}"
  printf '%s' "$SECTIONS"
} | tee "$OUTDIR/gpu_results.md"
echo
echo "gpu_suite mode=$MODE failed=$(printf '%s\n' "${ROWS[@]}" | grep -c -e FAILED -e 'TIMED OUT')"
