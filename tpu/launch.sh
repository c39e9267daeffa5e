#!/usr/bin/env bash
# Starts the run on every worker, in the background; its log goes to ~/$LOG on each worker.
#   tpu/launch.sh configs/aime.py --config.workdir=gs://BUCKET/tropd/aime \
#       --config.data.train_path=gs://BUCKET/data/openthoughts3_math.jsonl
# The first argument is the config (path[:variant]); the rest are --config.* overrides.
# Re-running the same command resumes from the last checkpoint in the workdir.
set -euo pipefail
source "$(dirname "$0")/env.sh"
if [[ $# -lt 1 ]]; then
  echo "usage: tpu/launch.sh CONFIG[:VARIANT] [--config.a.b=value ...]" >&2
  exit 2
fi
config="$1"; shift
args="--config=$(printf '%q' "$config")"
for a in "$@"; do args+=" $(printf '%q' "$a")"; done
# Multi-host slices: every worker joins one jax.distributed job (tropd_jax.main --tpu_pod).
if [[ "$(num_workers)" -gt 1 ]]; then args+=" --tpu_pod"; fi
on_all_workers "cd ~/$REPO_DIR && . .venv/bin/activate
  if [ -f ~/tropd.pid ] && kill -0 \$(cat ~/tropd.pid) 2>/dev/null; then
    echo \"worker \$(hostname): a run is already going (pid \$(cat ~/tropd.pid))\"; exit 1; fi
  nohup python -m tropd_jax.main $args >> ~/$LOG 2>&1 < /dev/null &
  echo \$! > ~/tropd.pid
  echo \"worker \$(hostname): started pid \$(cat ~/tropd.pid), log ~/$LOG\""
