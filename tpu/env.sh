# Settings shared by the tpu/ scripts. Override any of them in the environment, e.g.
#   TPU_NAME=tropd-v4 ACCELERATOR=v4-8 ZONE=us-central2-b tpu/create.sh
# (source this file by hand to use the same values in your own gcloud commands.)

: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${ZONE:=us-east5-a}"                # a zone that has the accelerator (v5p: us-east5-a)
: "${TPU_NAME:=tropd}"
: "${ACCELERATOR:=v5p-8}"              # v5p-8 (4 chips), v4-8, v5litepod-16, v6e-8, ...
: "${SPOT:=0}"                         # 1: a preemptible (spot) slice
: "${REPO_DIR:=tropd_jax}"             # checkout directory on every worker (under ~)
: "${LOG:=tropd.log}"                  # run log on every worker (under ~)

# The TPU VM image for each TPU generation.
if [[ -z "${RUNTIME_VERSION:-}" ]]; then
  case "$ACCELERATOR" in
    v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) echo "set RUNTIME_VERSION for ACCELERATOR=$ACCELERATOR" >&2; exit 2 ;;
  esac
fi

# Runs a command on every worker of the slice (one for a single-host slice), all at once.
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
      --worker=all --command="$1"
}

# Number of workers (hosts) of the slice: 1 for v5p-8, v4-8, v5litepod-8; 4 for v5litepod-16 ...
num_workers() {
  gcloud compute tpus tpu-vm describe "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
      --format="value(networkEndpoints[].ipAddress)" | tr ';,' '\n\n' | grep -c .
}
