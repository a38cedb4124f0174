#!/usr/bin/env bash
# Pack what the GPU machine lacks to run Tandem through Ray Serve, in two parts of < 40 MB each
# (a device call carries at most 64 MiB, the working tree included):
#
#   .gpu/wheels/   ray[serve]'s, pydantic's and the openai client's dependency wheels for
#                  CPython 3.12 that the machine's image does not have (about 25 MB)
#   .gpu/ray/      the ray 2.60 wheel unpacked without jars/rllib/data/tune/train, as tar.xz
#                  (about 30 MB)
#
# Run here (it needs PyPI):   bash bench/gpu_bundle.sh
# Then two device calls right after each other (carried paths stay while the machine is warm):
#   1. carry [".gpu/wheels"]:  bash bench/gpu_bundle.sh install-wheels
#   2. carry [".gpu/ray"]:     bash bench/gpu_bundle.sh install-ray && <the run>
# Both install into /tmp/site; runs need `export PYTHONPATH=/tmp/site`.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/site
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_34_x86_64)
# present in the GPU image (device README, KINDS.md): never carried
HAVE='^(aiohttp|aiosignal|aiohappyeyeballs|annotated_doc|anyio|attrs|certifi|charset_normalizer|click|cloudpickle|filelock|frozenlist|fsspec|grpcio|h11|httpcore|httpx|idna|jinja2|markupsafe|msgpack|multidict|numpy|packaging|pillow|prometheus_client|propcache|protobuf|psutil|pyarrow|pyyaml|PyYAML|requests|rich|six|tqdm|typing_extensions|urllib3|uvloop|wrapt|yarl|zipp|markdown_it_py|mdurl|pygments|setuptools|typer|shellingham)-'

case "${1:-pack}" in
pack)
    rm -rf .gpu && mkdir -p .gpu/wheels .gpu/ray .gpu/all
    grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .gpu/all 'ray[serve]==2.60.0' openai 'grpcio==1.84.0' \
        'pydantic==2.14.4'
    for w in .gpu/all/*.whl; do
        name=$(basename "$w")
        if [[ $name == ray-2* ]]; then continue; fi
        if [[ $name =~ $HAVE ]]; then continue; fi
        cp "$w" .gpu/wheels/
    done
    ray_whl=$(ls .gpu/all/ray-2*.whl)
    tmp=$(mktemp -d)
    python3 -m zipfile -e "$ray_whl" "$tmp"
    rm -rf "$tmp"/ray/jars "$tmp"/ray/rllib "$tmp"/ray/data "$tmp"/ray/tune "$tmp"/ray/train
    tar -C "$tmp" -cJf .gpu/ray/ray.tar.xz .
    rm -rf "$tmp" .gpu/all
    du -sh .gpu/wheels .gpu/ray
    ;;
install-wheels)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .gpu/wheels/*.whl
    ;;
install-ray)
    mkdir -p "$SITE" && tar -C "$SITE" -xJf .gpu/ray/ray.tar.xz
    ln -sf "$SITE/bin/serve" /usr/local/bin/serve 2>/dev/null || true
    ;;
*) echo "usage: $0 [pack|install-wheels|install-ray]" >&2; exit 2 ;;
esac
