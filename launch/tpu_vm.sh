#!/usr/bin/env bash
# Train on an existing Cloud TPU VM (single host or pod slice) from a laptop: every worker runs the
# same command; haf_jax.train calls jax.distributed.initialize() when TPU_WORKER_HOSTNAMES lists
# several hosts.
#
#   launch/tpu_vm.sh [--dry-run] [--setup] [--no-tail | --tail-only] TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#
#   --setup      copy this checkout (git archive of HEAD) to every worker and pip install it
#                there with the `tpu` extra, into ~/haf_jax and the venv ~/haf_jax_venv
#   --dry-run    print the exact gcloud commands, one per line, and run nothing
#   --no-tail    start the job and return; --tail-only: only follow worker 0's log
#
# Nothing is created: the TPU VM and the bucket must exist (the script stops with the command to
# create a missing TPU VM). WORKDIR must be visible to all workers: a gs:// bucket or a shared
# filesystem. The job runs detached (setsid nohup) and logs to ~/haf_jax_train.log on each
# worker, so closing the laptop does not stop it; the log of worker 0 is followed until Ctrl-C.
set -euo pipefail

usage() {
  grep -m1 '^#   launch/tpu_vm.sh' "$0" | sed 's/^#   /usage: /' >&2
  exit 2
}

dry_run=0 setup=0 run=1 tail_log=1
while [[ $# -gt 0 && $1 == --* && $1 != --config* ]]; do
  case $1 in
    --dry-run) dry_run=1 ;;
    --setup) setup=1 ;;
    --no-tail) tail_log=0 ;;
    --tail-only) run=0 ;;
    --help | -h) usage ;;
    *) echo "error: unknown option $1" >&2; usage ;;
  esac
  shift
done
[[ $# -ge 4 ]] || { echo "error: expected TPU_NAME ZONE CONFIG WORKDIR, got $# argument(s)" >&2; usage; }
name=$1 zone=$2 config=$3 workdir=$4
shift 4

repo=$(cd "$(dirname "$0")/.." && pwd)
log=haf_jax_train.log
archive=${TMPDIR:-/tmp}/haf_jax-$name.tar.gz

# One word quoted for a POSIX shell: as is when plain, else in single (or, holding one, double) quotes.
shq() {
  local s=$1
  if [[ $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s != *"'"* ]]; then
    printf "'%s'" "$s"
  else
    s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//\$/\\\$}; s=${s//\`/\\\`}
    printf '"%s"' "$s"
  fi
}
quoted() { local out=() w; for w in "$@"; do out+=("$(shq "$w")"); done; echo "${out[*]}"; }

# Print (dry run: the exact command, quoted so it can be pasted) or run one command.
do_cmd() {
  if [[ $dry_run == 1 ]]; then quoted "$@"; else "$@"; fi
}

# The job as the workers' shell reads it (each argument quoted).
train_cmd=$(quoted python -m haf_jax.train --config="$config" --workdir="$workdir" "$@")

ssh_all() { do_cmd gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"; }

if [[ $dry_run == 0 ]]; then
  command -v gcloud > /dev/null || { echo "error: gcloud not found (install the Google Cloud CLI)" >&2; exit 2; }
  if ! gcloud compute tpus tpu-vm describe "$name" --zone="$zone" --format='value(state)' > /dev/null; then
    echo "error: no TPU VM $name in zone $zone (or no access); this script creates nothing. Create one, e.g.:" >&2
    echo "  gcloud compute tpus tpu-vm create $name --zone=$zone --accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite" >&2
    exit 1
  fi
else
  do_cmd gcloud compute tpus tpu-vm describe "$name" --zone="$zone" --format='value(state)'
fi

if [[ $setup == 1 ]]; then
  if [[ $dry_run == 0 && -n $(git -C "$repo" status --porcelain --untracked-files=no) ]]; then
    echo "note: uncommitted changes in $repo are not copied (git archive of HEAD)" >&2
  fi
  do_cmd git -C "$repo" archive --format=tar.gz --output="$archive" HEAD
  do_cmd gcloud compute tpus tpu-vm scp "$archive" "$name":haf_jax.tar.gz --zone="$zone" --worker=all
  # (TPU VM images may lack python3-venv: installed with apt when venv fails)
  ssh_all "rm -rf ~/haf_jax && mkdir ~/haf_jax && tar xzf ~/haf_jax.tar.gz -C ~/haf_jax && { python3 -m venv ~/haf_jax_venv || { sudo apt-get install -y -q python3-venv && python3 -m venv ~/haf_jax_venv; }; } && ~/haf_jax_venv/bin/pip install -q -e \"\$HOME/haf_jax[tpu]\""
fi

if [[ $run == 1 ]]; then
  ssh_all "cd ~/haf_jax && . ~/haf_jax_venv/bin/activate && setsid nohup $train_cmd > ~/$log 2>&1 < /dev/null &"
fi

if [[ $tail_log == 1 ]]; then
  do_cmd gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=0 --command="tail -n +1 -F ~/$log"
fi
