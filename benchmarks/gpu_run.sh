#!/usr/bin/env bash
# The GPU figures of docs/results.md ("GPU run"), as one script with a time limit per stage, so that
# a run cut short keeps every JSON it wrote (the bench rewrites its JSON after each result).
#   benchmarks/gpu_run.sh OUT [DATA_DIR]          (python: $PY, default python3; extra args: $EXTRA)
# Stages, most important first:
#   1. issue 6's grid on the GPU with every arm, the T=10 / random / shared variants included;
#   2. the demo pipeline on one machine (`demo --local`; the federation itself runs on CPUs);
#   3. the same grid cell (IPC 10) with the autoencoder and chain trained 5-7x longer;
#   4. IPC 10 with 5x the student steps, to see whether the gap to random real closes with training.
# On an H200 (session 8) the default limits were too short: stage 1 finished IPC 10 and 1 in its 300 s, and
# stage 3 needs about 8 minutes. Raise LIMIT1..LIMIT4 where the lease allows.
set -u
OUT=${1:?usage: gpu_run.sh OUT [DATA_DIR]}
DATA=${2:-/usr/share/datasets/fashion-mnist}
PY=${PY:-python3}
EXTRA=${EXTRA:-}
DEV=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FEDCONDENSE_PROGRESS=0
export FEDCONDENSE_CACHE=${FEDCONDENSE_CACHE:-/tmp/fedcondense-gpu-cache}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
}

stage() {  # stage LIMIT_S CMD...: runs CMD under a time limit and logs its exit status and wall time
  local limit=$1; shift
  local t0=$SECONDS
  echo "== stage (limit ${limit}s): $*"
  timeout "$limit" "$@"
  echo "== rc=$? wall=$((SECONDS - t0))s"
}
BENCH=($PY -m server.cli bench --device "$DEV" --data-dir "$DATA" --scale full)

stage "${LIMIT1:-300}" "${BENCH[@]}" --out "$OUT/grid" --ipc 10 1 50 --seeds 0 1 2 --dm-iterations 20 --full-steps 200 \
  --arms ours ours_t10 ours_random ours_one_to_one ours_shared random_real dm full_real $EXTRA
stage "${LIMIT2:-50}" $PY -m server.cli demo --local --device "$DEV" --data-dir "$DATA" \
  --out /tmp/fedcondense-gpu-demo $EXTRA
cp /tmp/fedcondense-gpu-demo/report.json "$OUT/demo-report.json"
stage "${LIMIT3:-120}" "${BENCH[@]}" --out "$OUT/longer-pretrain" --ipc 10 --seeds 0 1 2 --arms ours random_real \
  --ae-steps 3000 --chain-steps 6000 --module-steps 100 $EXTRA
stage "${LIMIT4:-60}" "${BENCH[@]}" --out "$OUT/longer-student" --ipc 10 --seeds 0 1 2 --arms ours random_real \
  --student-steps 1000 $EXTRA
