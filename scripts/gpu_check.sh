#!/usr/bin/env bash
# The GPU check of issue 22, one script for one GPU (about 9 minutes): the tests marked for CUDA, then the
# efficiency benchmark in bf16 on a decoder slice as wide as LLaMA-7B's (width 4096, 4 layers) at the
# paper's geometry, once per attention backend. Writes $OUT/gpu_check_<backend>.json (OUT: the device
# tool's folder; runs/ elsewhere) and prints each run's table. Record the figures in docs/benchmarks.md
# with the card's name.
#
# On the device machine its python3 holds torch, lightning and timm; carry the rest as wheels in .whl/
# (the device tool's README: open_clip_torch, ftfy, wcwidth, omegaconf, antlr4-python3-runtime,
# jsonargparse, docstring_parser, typeshed_client for Python 3.12), which this script installs first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-runs}
mkdir -p "$OUT"
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_check_card.txt"

timeout 240 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_attention_backends.py tests/test_flex_attention.py \
  tests/test_compiled_decode.py 2>&1 | tee "$OUT/gpu_check_tests.log"

for backend in sdpa flex; do
  timeout 150 $PY scripts/bench_efficiency.py --sections decode train --device cuda --dtype bfloat16 \
    --hidden 4096 --layers 4 --repeats 3 --train_repeats 2 --attn_backend "$backend" \
    --json "$OUT/gpu_check_$backend.json" 2>&1 | tee "$OUT/gpu_check_$backend.log"
done
