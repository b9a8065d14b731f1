#!/usr/bin/env bash
# Upload the offline W&B runs that jobs wrote on nodes without internet. Run it where there is
# internet (a login node), after the sweep:
#   bash slurm/wandb-sync.sh [OUTPUT_ROOT] [wandb sync options, e.g. --dry-run]
# OUTPUT_ROOT defaults to $EDM_OUTPUT_ROOT, else ./outputs. Each run's files are in
# <output_dir>/wandb/offline-run-*; a requeued job leaves one such folder per attempt.
set -euo pipefail
root=${1:-${EDM_OUTPUT_ROOT:-outputs}}
shift || true
mapfile -d '' runs < <(find "$root" -type d -name 'offline-run-*' -print0 | sort -z)
if ((${#runs[@]} == 0)); then echo "no offline W&B runs under $root"; exit 0; fi
echo "syncing ${#runs[@]} offline run(s) from $root" >&2
exec wandb sync --skip-synced "$@" "${runs[@]}"
