#!/usr/bin/env bash
# exllamav2 on a GPU machine that has torch+CUDA, transformers, pandas, pyarrow and ninja but no
# network: the carried wheels go into /tmp/site, exllamav2's import JIT-compiles its extension
# (about 110 s on an H200 with MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0; cached in
# ~/.cache/torch_extensions while the machine stays), then the GPU test and the bench write into
# $OUT. One command may run 10 minutes at most there, so the work comes in three steps, run
# right after each other on the same warm machine (/tmp and the extension cache stay):
#
#   here, once (needs PyPI):   bash bench/gpu_exllamav2.sh pack     -> .gpu/exl/*.whl (8 MB)
#   there, carry [".gpu/exl"]:
#     1. bash bench/gpu_exllamav2.sh test      install, JIT, tests/gpu/test_exllamav2_engine.py,
#                                              bench/engines_gpu.py --skip-exl2 (torch vs FP16)
#     2. bash bench/gpu_exllamav2.sh convert   the EXL2 checkpoint (exllamav2's converter,
#                                              calibrated on toy-world text) into /tmp
#     3. bash bench/gpu_exllamav2.sh bench     the whole table: torch, FP16 and EXL2
# Each step installs the wheels again (seconds), so any one also runs on a fresh machine (step
# 3 then converts first, which may not fit in one command). .gpu/ is git-ignored
# (.git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(exllamav2==0.3.2 fastparquet==2026.9.0 cramjam==2.14.0 pydantic==2.14.4 pydantic_core==2.50.5
        annotated_types==0.8.0 typing_inspection==0.4.5)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
OUT=${OUT:-/tmp/out}
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

install() {
    mkdir -p "$OUT"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .gpu/exl/*.whl
    python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'
    local start=$SECONDS
    python3 -c 'import exllamav2, exllamav2.ext' 2>&1 | tail -5
    echo "exllamav2 import (JIT compile on a fresh machine): $((SECONDS - start)) s"
}

case "${1:-}" in
pack)
    mkdir -p .gpu/exl
    grep -qx '/.gpu/' "$(git rev-parse --git-common-dir)/info/exclude" ||
        echo '/.gpu/' >> "$(git rev-parse --git-common-dir)/info/exclude"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" -d .gpu/exl "${WHEELS[@]}"
    ls .gpu/exl && du -sh .gpu/exl
    ;;
test)
    install 2>&1 | tee "$OUT/install.log"
    python3 -m pytest -q -p no:cacheprovider -s -rs tests/gpu/test_exllamav2_engine.py 2>&1 |
        tee "$OUT/test_exllamav2.log" || true
    python3 bench/engines_gpu.py --out "$OUT" --skip-exl2 2>&1 | tee "$OUT/engines_gpu_fp16.log"
    ;;
convert)
    install 2>&1 | tee "$OUT/install.log"
    python3 bench/engines_gpu.py --convert-only 2>&1 | tail -40 | tee "$OUT/convert.log"
    ;;
bench)
    install 2>&1 | tee "$OUT/install.log"
    python3 bench/engines_gpu.py --out "$OUT" 2>&1 | tee "$OUT/engines_gpu.log"
    ;;
*) echo "usage: $0 pack|test|convert|bench" >&2; exit 2 ;;
esac
