#!/usr/bin/env bash
# DeepCache parity: edm's hook-based DeepCache (edm/methods/cache/deepcache.py) against the
# `DeepCache` package's DeepCacheSDHelper (which forks the UNet forward), on the tiny digits,
# SD1.5 and SDXL UNets, every skip branch: images must be bit-identical.
# The package is unmaintained (pins old diffusers), so it goes into its own venv without its
# dependencies; its helper file imports nothing of its own and is loaded by path.
#   bash experiments/deepcache_parity/run_parity.sh     # writes parity_output.log next to this file
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${DEEPCACHE_VENV:-/tmp/deepcache-venv}
[ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --no-deps DeepCache==0.1.1
helper=$(ls "$venv"/lib/python3*/site-packages/DeepCache/extension/deepcache.py)
DEEPCACHE_HELPER="$helper" .venv/bin/python -m pytest -q -rs -p no:cacheprovider \
    tests/test_cache.py -k deepcache_equals_the_deepcache_package 2>&1 \
    | tee experiments/deepcache_parity/parity_output.log
