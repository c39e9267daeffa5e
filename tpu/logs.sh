#!/usr/bin/env bash
# Follows the run log of worker 0 (WORKER=3 tpu/logs.sh for another one; Ctrl-C stops following).
set -euo pipefail
source "$(dirname "$0")/env.sh"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
    --worker="${WORKER:-0}" --command="tail -n 200 -F ~/$LOG"
