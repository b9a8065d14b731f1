#!/usr/bin/env bash
# Generate a large prompt set as N SLURM array tasks writing into one shared images dir, then
# evaluate the whole set once in a separate job:
#   bash slurm/sharded.sh N IMAGES_DIR [run.py overrides...]
#   bash slurm/sharded.sh 16 /scratch/$USER/edm/images/sd15-dense model=sd15 data=coco2014
# LAUNCHER (default slurm) picks the hydra/launcher preset for both steps. Step 1 blocks until
# every shard is done (Hydra waits for its array), so step 2 starts only after all shards; run
# this in tmux. Rerunning the script resumes: finished images are skipped, and the evaluation
# is reused when its inputs did not change (slurm/README.md, "Requeue safety").
set -euo pipefail
[[ $# -ge 2 ]] || { sed -n 2,9p "$0" >&2; exit 2; }
n=$1 images=$2
shift 2
launcher=${LAUNCHER:-slurm}
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
# 1. One array task per shard; gen.shard picks a disjoint, deterministic slice of the prompts.
"$py" run.py -m "gen.shard=range(0,$n)" gen.num_shards="$n" gen.images_dir="$images" \
  hydra/launcher="$launcher" "$@"
# 2. Evaluate-only job over the union of the shards (no pipeline generation).
"$py" run.py -m gen.enabled=false gen.images_dir="$images" hydra/launcher="$launcher" "$@"
