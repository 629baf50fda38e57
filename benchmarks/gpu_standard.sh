#!/usr/bin/env bash
# The full recipe trained and benchmarked under the standard protocol on one GPU, in one call:
#   benchmarks/gpu_standard.sh OUT DATA_DIR [BUDGET_S] [EXTRA bench args...]
# BUDGET_S (default 330) bounds the bench: stages are started in priority order (pretraining, full data,
# IPC 10 with DM at 20,000 iterations, IPC 1, IPC 50, max coverage, 1000-epoch evaluations) while time is
# left; what is cut is listed in the JSON. The trained checkpoints come back as checkpoints.tgz (the cache
# entries), the bench's grids as grids.tgz. python3 is the machine's own (torch with CUDA); the project's
# other needs travel as wheels in .whl/ (diffusers, cryptography, cffi, pycparser, importlib_metadata).
set -u
OUT=${1:?usage: gpu_standard.sh OUT DATA_DIR [BUDGET_S] [EXTRA...]}
DATA=${2:?data dir with the four IDX files}
BUDGET=${3:-330}
shift 3 2>/dev/null || shift $#
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FEDCONDENSE_CACHE=${FEDCONDENSE_CACHE:-/tmp/fedcondense-cache}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
t0=$SECONDS
timeout $((BUDGET + 150)) python3 -m server.cli bench --protocol standard --recipe full --scale full --device cuda \
  --data-dir "$DATA" --out "$OUT/bench" --budget-s "$BUDGET" "$@" 2>&1 | tr '\r' '\n' | grep -v "^\s*$" > "$OUT/log.txt"
echo "bench rc=${PIPESTATUS[0]} wall=$((SECONDS - t0))s"
tail -n 60 "$OUT/log.txt"
tar czf "$OUT/checkpoints.tgz" -C "$FEDCONDENSE_CACHE" . && ls -la "$OUT"
(cd "$OUT/bench" && tar czf "$OUT/grids.tgz" grids-ipc* 2>/dev/null; mv -- *.json *.md *.png "$OUT/" 2>/dev/null)
ls -la "$OUT"
