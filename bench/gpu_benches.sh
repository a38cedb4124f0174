#!/usr/bin/env bash
# The GPU figures that need no Ray, in one device call (carry [".gpu/wmin", ".gpu/llg"]):
#
#   bash bench/gpu_benches.sh [step ...]     default: every step below, in this order
#
# Each step has its own time limit, so one that hangs leaves the others their time; logs and
# JSON go to $OUT. The steps share one random Qwen3-1.7B-shape checkpoint in /tmp/ck.
#   capture    bench/hidden_capture.py          residual-stream capture cost (issue 24)
#   grammar    bench/grammar.py --mode gpu      grammar masks at batch 32 (issue 21)
#   tools      models.builtin.tool_task         the `tools` adapter, trained (issue 21)
#   prefix     bench/prefix_cache.py --gpu      TTFT with a cached 2,000-token prefix (issue 23)
#   spec       bench/speculative.py --gpu       verify cost and simulated speed-up (issue 23)
#   tests      tests/gpu/test_gpu_hidden.py, test_gpu_grammar.py
# At most 8 files come back from a device call: name the steps whose output you need.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/ck
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/wmin/*.whl .gpu/llg/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'
CK=/tmp/ck/qwen3-1.7b

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name (limit ${limit} s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "=== $name: rc $? in $((SECONDS - start)) s"
    tail -25 "$OUT/$name.log"
}

for s in ${@:-capture grammar tools prefix spec tests}; do
    case $s in
    capture) step capture 150 python3 bench/hidden_capture.py --checkpoint "$CK" --out "$OUT" ;;
    grammar) step grammar 120 python3 bench/grammar.py --mode gpu --checkpoints /tmp/ck --out "$OUT" ;;
    tools) step tools 200 python3 -m models.builtin.tool_task --init models/builtin/weights/toy \
        --device cuda --out "$OUT/tools" ;;
    prefix) step prefix 120 python3 bench/prefix_cache.py --gpu --checkpoint "$CK" --out "$OUT" ;;
    spec) step spec 220 python3 bench/speculative.py --gpu --checkpoint /tmp/ck/spec --out "$OUT" ;;
    tests) step tests 150 python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_gpu_hidden.py \
        tests/gpu/test_gpu_grammar.py ;;
    *) echo "unknown step $s" >&2 ;;
    esac
done
