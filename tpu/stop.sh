#!/usr/bin/env bash
# Stops the run on every worker with SIGTERM: the trainer saves a checkpoint of the step it is in
# and exits; re-running tpu/launch.sh resumes from it. DELETE=1 also deletes the TPU VM.
set -euo pipefail
source "$(dirname "$0")/env.sh"
on_all_workers "if [ -f ~/tropd.pid ] && kill -0 \$(cat ~/tropd.pid) 2>/dev/null; then
    pid=\$(cat ~/tropd.pid); kill -TERM \$pid
    for i in \$(seq 600); do kill -0 \$pid 2>/dev/null || break; sleep 1; done
    echo \"worker \$(hostname): pid \$pid stopped\"
  else echo \"worker \$(hostname): no run\"; fi
  rm -f ~/tropd.pid"
if [[ "${DELETE:-0}" == 1 ]]; then
  gcloud compute tpus tpu-vm delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --quiet
fi
