#!/usr/bin/env bash
# The served figures on a GPU machine in one device call (issue 17):
#   carry [".gpu/wsrv", ".gpu/extra", ".gpu/ray"]  (bench/gpu_bundle.sh packs .gpu/wheels and
#   .gpu/ray; .gpu/wsrv is .gpu/wheels without virtualenv and py-spy, which the run needs not,
#   so that the three fit in one call's 64 MiB)
#   bash bench/gpu_serve.sh [serve_path.py arguments...]
# Random Qwen3-1.7B/0.6B-shape checkpoints (bench/gpu_checkpoint.py), then bench/serve_path.py
# on serve_config.gpu.yaml: the engine in a loop, behind its async wrapper, and served through
# HAProxy (make serve's default) and through Ray's proxy, with steering in the first variant.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/wsrv/*.whl .gpu/extra/*.whl
bash bench/gpu_bundle.sh install-ray
export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 bench/gpu_checkpoint.py
ARGS=("$@")
[ ${#ARGS[@]} -gt 0 ] || ARGS=(--streams 1 16 64 128 --max-tokens 128 --prompt-tokens 128
    --variants haproxy default --client-procs 8 --steer guard:async proxy:colocated
    --steer-streams 1 16 --start-timeout 240)
python3 bench/serve_path.py --config serve_config.gpu.yaml "${ARGS[@]}" \
    --out "$OUT/serve_path_gpu.json" 2>&1 | tee "$OUT/serve_path_gpu.log"
