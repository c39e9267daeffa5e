#!/usr/bin/env bash
# Copies this checkout to every worker and installs the pinned requirements there
# (Python 3.11 in ~/$REPO_DIR/.venv, jax[tpu] + libtpu from requirements-tpu.txt).
# Re-run it after changing the code: it syncs the files and reinstalls only what changed.
set -euo pipefail
source "$(dirname "$0")/env.sh"
root="$(cd "$(dirname "$0")/.." && pwd)"
archive="$(mktemp -d)/tropd_jax.tar.gz"
tar -C "$root" --exclude=.git --exclude='.venv*' --exclude=.ci-venv --exclude=runs \
    --exclude='__pycache__' -czf "$archive" .
gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":tropd_jax.tar.gz --project="$PROJECT" \
    --zone="$ZONE" --worker=all
on_all_workers "set -e
  mkdir -p ~/$REPO_DIR && tar -C ~/$REPO_DIR -xzf ~/tropd_jax.tar.gz
  command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
  export PATH=\$HOME/.local/bin:\$PATH
  cd ~/$REPO_DIR
  [ -d .venv ] || uv venv --python 3.11 .venv
  . .venv/bin/activate
  uv pip install -q -r requirements.txt -r requirements-tpu.txt
  uv pip install -q -e . --no-deps
  python -c 'import jax; print(jax.local_device_count(), jax.local_devices()[0].device_kind)'"
