#!/usr/bin/env bash
# ImageReward parity: edm's scorer (transformers 5, timm >= 1, setuptools >= 81) against the upstream
# `image-reward==1.5` package, run in an isolated venv with its own pins, on a checkpoint in the
# official key layout (random weights). Passes when every reward agrees within 1e-5 and every
# prompt tokenises to the same ids. Not part of CI: it needs PyPI once to build the venv (~5 min)
# and ~4 GB of RAM (the full-size ViT-L + BERT-base model, twice).
#
#   bash experiments/image_reward_parity/run_parity.sh [WORK_DIR]
#   env: IR_ENV=/tmp/ir_env (venv location, reused if present), PARITY_THREADS=2
# Output: experiments/image_reward_parity/parity_output.log
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
ENV_DIR="${IR_ENV:-/tmp/ir_env}"
WORK="${1:-/tmp/ir_parity}"
PROJECT_PY="$ROOT/.venv/bin/python"
export PYTHONWARNINGS=ignore

{
echo "# ImageReward parity run $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(nproc) cores"
if [ ! -x "$ENV_DIR/bin/python" ]; then
  echo "# building the upstream env in $ENV_DIR"
  python3 -m venv "$ENV_DIR"
  "$ENV_DIR/bin/pip" install -q --no-deps -r "$HERE/requirements-upstream.txt"
fi
# torch/torchvision: image-reward pins neither; the upstream env reuses the project's exact builds
# (torch 2.14.1, torchvision 0.29.1) through a .pth file instead of downloading them again.
SP_PROJECT="$("$PROJECT_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
SP_ENV="$("$ENV_DIR/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$ENV_DIR/project_torch"
for d in torch torchgen functorch torchvision torchvision.libs nvidia triton cuda \
         "$(cd "$SP_PROJECT" && ls -d torch-*.dist-info torchvision-*.dist-info)"; do
  for e in $d; do
    if [ -e "$SP_PROJECT/$e" ]; then ln -sfn "$SP_PROJECT/$e" "$ENV_DIR/project_torch/$e"; fi
  done
done
echo "$ENV_DIR/project_torch" > "$SP_ENV/zz_project_torch.pth"
echo "# upstream env: $("$ENV_DIR/bin/python" -c 'from importlib.metadata import version as v; import setuptools, torch; print("image-reward", v("image-reward"), "timm", v("timm"), "transformers", v("transformers"), "setuptools", setuptools.__version__, "torch", torch.__version__)')"

rm -rf "$WORK" && mkdir -p "$WORK"
echo "\$ HF_HOME=$WORK/hf HF_HUB_OFFLINE=1 $ENV_DIR/bin/python upstream_side.py $WORK"
HF_HOME="$WORK/hf" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  "$ENV_DIR/bin/python" "$HERE/upstream_side.py" "$WORK"
echo "\$ .venv/bin/python edm_side.py $WORK"
cd "$ROOT" && "$PROJECT_PY" "$HERE/edm_side.py" "$WORK"
} 2>&1 | tee "$HERE/parity_output.log"
