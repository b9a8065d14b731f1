#!/usr/bin/env bash
# CUDA checks and GPU benchmarks, for a machine with one CUDA GPU (about 7 min on an H100 before
# the Table 5 block, the compiled-dense rows and the semi-structured export test were added:
# measure it on the next loan; drop --rounds if it runs over 8 minutes). at_edm uses the triton
# map kernels there (map_kernel=auto); at_edm_torchmap is the chunked PyTorch map it replaces.
#   bash experiments/gpu_checks.sh [OUT_DIR]      # default OUT_DIR: experiments/results
# 1. tests/test_gpu.py (-m gpu): the CUDA paths against CPU results and device-free invariants;
# 2. experiments/bench_token.py on CUDA in bf16: SD-XL at 1024² (the paper's latency setting) and
#    SD1.5 at 512², dense vs AT-EDM vs ToMe (edm and the tomesd package), random weights.
set -euo pipefail
out=${1:-experiments/results}
py=${PYTHON:-python}
mkdir -p "$out"
$py -m pytest -q -s -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
bench="$py experiments/bench_token.py --device cuda --dtype bf16"
$bench --rounds 20 --archs sdxl --size 1024 --rows dense,at_edm,at_edm_torchmap,at_edm_dagger,tome,tome_sd,tomesd \
    --out "$out/bench_token_gpu.md"
$bench --rounds 20 --archs sd15 --size 512 \
    --rows dense,dense_compiled,at_edm,at_edm_reuse,at_edm_dagger,tome,tome_sd,tomesd --append \
    --out "$out/bench_token_gpu.md"
$bench --rounds 20 --archs sd15 --size 512 --batch 16 \
    --rows dense,at_edm,at_edm_reuse,at_edm_dagger,tome_sd,tomesd --append \
    --out "$out/bench_token_gpu.md"
# 4 images with CFG: closest to the paper's latency setting (compute-bound on an H100)
# dense_compiled: the baseline a user would otherwise run (torch.compile, about a minute to compile)
$bench --rounds 10 --archs sdxl --size 1024 --batch 8 \
    --rows dense,dense_compiled,at_edm,at_edm_torchmap,at_edm_dagger,tome_sd,tomesd --append --out "$out/bench_token_gpu.md"
# OBS-Diff Table 5: one SD3.5-Large MMDiT block, batch 4, 1024² tokens, bf16: dense / 2:4
# (torch semi-structured sparse kernels) / structured 15-30 % (not yet run on a GPU)
$py experiments/bench_table5.py --device cuda --dtype bf16 --out "$out/bench_table5_gpu.md"
