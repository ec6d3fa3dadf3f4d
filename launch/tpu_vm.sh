#!/usr/bin/env bash
# TPU VM pod slice: run the same command on every worker; jax.distributed.initialize() is called
# by haf_jax.train when TPU_WORKER_HOSTNAMES lists several hosts.
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
# WORKDIR must be visible to all workers (e.g. a gs:// bucket or a shared filesystem).
set -euo pipefail
name=$1; zone=$2; config=$3; workdir=$4; shift 4
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  cd ~/haf_jax && python -m haf_jax.train --config=$config --workdir=$workdir $*"
