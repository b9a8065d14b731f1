#!/usr/bin/env bash
# CUDA checks and GPU benchmarks, for a machine with one CUDA GPU (about 5 min on an H100).
#   bash experiments/gpu_checks.sh [OUT_DIR]      # default OUT_DIR: experiments/results
# 1. tests/test_gpu.py (-m gpu): the CUDA paths against CPU results and device-free invariants;
# 2. experiments/bench_token.py on CUDA in bf16: SD-XL at 1024² (the paper's latency setting) and
#    SD1.5 at 512², dense vs AT-EDM vs ToMe (edm and the tomesd package), random weights.
set -euo pipefail
out=${1:-experiments/results}
py=${PYTHON:-python}
mkdir -p "$out"
$py -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
rows=dense,at_edm,at_edm_dagger,tome,tome_sd,tomesd
$py experiments/bench_token.py --device cuda --dtype bf16 --archs sdxl --size 1024 --rounds 10 \
    --rows "$rows" --out "$out/bench_token_gpu.md"
$py experiments/bench_token.py --device cuda --dtype bf16 --archs sd15 --size 512 --rounds 10 \
    --rows dense,at_edm,at_edm_reuse,at_edm_dagger,tome,tome_sd,tomesd --append \
    --out "$out/bench_token_gpu.md"
