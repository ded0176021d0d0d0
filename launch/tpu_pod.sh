#!/usr/bin/env bash
# Trains one config on every worker of a Cloud TPU VM slice (or of several slices), the same command everywhere.
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG [KEY=VALUE ...]     e.g. launch/tpu_pod.sh my-v5p-64 us-east5-a cogvideox-2b-edit
# Copies this checkout (and CONFIG, when it is a file) to ~/insvie-jax on every worker, installs it there once
# (pip install -e .[tpu,gcs]; INSVIE_REINSTALL=1 again), then runs `python3 -m insvie_jax.cli train CONFIG ...` on all
# workers (gcloud --worker=all). JAX's TPU detection finds the coordinator (worker 0) and every process's rank.
# Multi-slice: INSVIE_SLICES=N trains on the N slices TPU_NAME-0 ... TPU_NAME-<N-1> (e.g. a queued resource made
# with --node-count N --node-prefix TPU_NAME) joined over the data-centre network; give the config
# mesh.dcn_data=N (or another dcn_* axis). The run folder (train.run_dir) must be a path every worker can write
# and that survives the VMs (a gcsfuse or Filestore mount). Env: INSVIE_PROJECT (gcloud --project).
# --check (first argument): compile the train step for the slice here first (`insvie-jax compile`, needs
# jax[tpu] on this machine, no TPU) and start nothing unless it fits; the topology is the slice's accelerator type
# (gcloud describe) or INSVIE_TOPOLOGY (e.g. v5p:4x4x4).
set -euo pipefail
check=0
if [[ "${1:-}" == "--check" ]]; then
  check=1
  shift
fi
if [[ $# -lt 3 ]]; then
  echo "usage: launch/tpu_pod.sh [--check] TPU_NAME ZONE CONFIG [KEY=VALUE ...]" >&2
  exit 2
fi
name=$1 zone=$2 config=$3
shift 3
slices=${INSVIE_SLICES:-1}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
if [[ -n "${INSVIE_PROJECT:-}" ]]; then
  where+=(--project "$INSVIE_PROJECT")
fi

if [[ "$check" -eq 1 ]]; then
  first=$name
  if [[ "$slices" -gt 1 ]]; then first=$name-0; fi
  topology=${INSVIE_TOPOLOGY:-$("${gcloud_tpu[@]}" describe "$first" "${where[@]}" --format='value(acceleratorType)')}
  if ! (cd "$root" && python3 -m insvie_jax.cli compile "$config" --topology "$topology" --slices "$slices" "$@"); then
    echo "launch/tpu_pod.sh: the config does not compile or fit on $topology (see above); nothing was started" >&2
    exit 1
  fi
fi

nodes=("$name")
if [[ "$slices" -gt 1 ]]; then
  nodes=()
  for ((i = 0; i < slices; i++)); do nodes+=("$name-$i"); done
fi

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
tar -C "$root" --exclude=.git --exclude='./.venv*' --exclude=./runs --exclude=./sweeps -czf "$staging/insvie-jax.tgz" .
files=("$staging/insvie-jax.tgz")
remote_config=$config
if [[ -f "$config" ]]; then
  cp "$config" "$staging/launch-config.yaml"
  files+=("$staging/launch-config.yaml")
  remote_config=../launch-config.yaml  # relative to ~/insvie-jax, where the command runs
fi

install="mkdir -p ~/insvie-jax && tar -xzf ~/insvie-jax.tgz -C ~/insvie-jax && cd ~/insvie-jax"
install+=" && { [[ -f .insvie-installed && -z '${INSVIE_REINSTALL:-}' ]] || { python3 -m pip install --quiet -e '.[tpu,gcs]' && touch .insvie-installed; }; }"
for node in "${nodes[@]}"; do
  "${gcloud_tpu[@]}" scp "${files[@]}" "$node:" --worker=all "${where[@]}"
  "${gcloud_tpu[@]}" ssh "$node" --worker=all "${where[@]}" --command "$install"
done

train=$(printf '%q ' python3 -m insvie_jax.cli train "$remote_config" "$@")
if [[ "$slices" -eq 1 ]]; then
  "${gcloud_tpu[@]}" ssh "$name" --worker=all "${where[@]}" --command "cd ~/insvie-jax && $train"
  exit 0
fi
coordinator=$("${gcloud_tpu[@]}" describe "${nodes[0]}" "${where[@]}" --format='value(networkEndpoints[0].ipAddress)')
pids=()
for ((i = 0; i < slices; i++)); do
  megascale="export MEGASCALE_COORDINATOR_ADDRESS=$coordinator:8080 MEGASCALE_NUM_SLICES=$slices MEGASCALE_SLICE_ID=$i"
  "${gcloud_tpu[@]}" ssh "${nodes[$i]}" --worker=all "${where[@]}" --command "$megascale && cd ~/insvie-jax && $train" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
