#!/usr/bin/env bash
# Session 18's GPU check (docs/results.md, "Session 18"): the guided default on CUDA end to end
# (`demo --local`), the guidance-schedule screen with its 1,000-image speeds, then IPC 1 / 50.
#   OUT=DIR benchmarks/gpu_guidance_check.sh [DATA_DIR]     (python: $PY, default python3)
# On a lent machine without the project's wheels, install them first and put them on PYTHONPATH
# (session 18 carried diffusers, cryptography, cffi, pycparser, importlib_metadata, lazy-importer,
# dp-accounting and dm-tree as wheels). Each stage runs under its own time limit; logs go to $OUT/log.txt.
set -u
OUT=${OUT:?set OUT to an output folder}
DATA=${1:-/usr/share/datasets/fashion-mnist}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FEDCONDENSE_PROGRESS=0 FEDCONDENSE_CACHE=${FEDCONDENSE_CACHE:-/tmp/fc-cache}
mkdir -p "$OUT"
L=$OUT/log.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$L" 2>&1
$PY -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)" >> "$L" 2>&1 || exit 4
stage() { local lim=$1 name=$2; shift 2; local t0=$SECONDS; echo "== $name (limit ${lim}s): $*" | tee -a "$L"
  timeout "$lim" "$@" >> "$L" 2>&1; echo "== $name rc=$? wall=$((SECONDS - t0))s" | tee -a "$L"; }
stage "${LIMIT1:-170}" demo $PY -m server.cli demo --local --device cuda --data-dir "$DATA" --out /tmp/demo
cp /tmp/demo/report.json "$OUT/demo-report.json" 2>/dev/null
stage "${LIMIT2:-290}" screen $PY -m benchmarks.guidance_screen "$OUT/screen" --device cuda --data-dir "$DATA" --seeds 10 \
  --variants 0.025:0 0:0 0.025:10 0.05:10 0.025:5 0.1:5 --speed-images 1000 --time-limit 200
stage "${LIMIT3:-100}" bench $PY -m server.cli bench --device cuda --data-dir "$DATA" --scale full --ipc 1 50 --seeds 0 1 2 \
  --arms ours random_real --out "$OUT/bench"
