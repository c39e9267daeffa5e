#!/usr/bin/env bash
# Creates the TPU VM (or pod slice) $TPU_NAME with $ACCELERATOR in $ZONE.
#   ACCELERATOR=v5p-8 ZONE=us-east5-a tpu/create.sh           # on-demand
#   ACCELERATOR=v4-8 ZONE=us-central2-b SPOT=1 tpu/create.sh  # spot (preemptible)
set -euo pipefail
source "$(dirname "$0")/env.sh"
extra=()
if [[ "$SPOT" == 1 ]]; then extra+=(--spot); fi
gcloud compute tpus tpu-vm create "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME_VERSION" ${extra[@]+"${extra[@]}"}
gcloud compute tpus tpu-vm describe "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
    --format="value(state,acceleratorType,networkEndpoints[].ipAddress)"
