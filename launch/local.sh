#!/usr/bin/env bash
# Starts N processes of one `insvie-jax` command (train when none is named) on this machine as one
# multi-process JAX job (a local stand-in for N hosts).
#   launch/local.sh N [train|encode] [CONFIG] [KEY=VALUE ...] [--OPTION ...]
#   e.g. launch/local.sh 2 tiny mesh.dcn_data=2 mesh.ici_data=4
#        launch/local.sh 2 encode tiny --list train.csv --out encoded/
# Each process gets INSVIE_COORDINATOR / INSVIE_PROCESS_ID / INSVIE_NUM_PROCESSES (see parallel/distributed.py).
# CPU: give each process its devices with XLA_FLAGS=--xla_force_host_platform_device_count=K JAX_PLATFORMS=cpu.
# GPUs: INSVIE_GPUS_PER_PROCESS=K gives process i the GPUs i*K ... i*K+K-1 (default: each sees all of them).
# Env: INSVIE_PORT (coordinator port; default random), PYTHON (default python). Exit status: the first failure.
set -euo pipefail
num=${1:?usage: launch/local.sh N [train|encode] [CONFIG] [KEY=VALUE ...]}
shift
command=train
case "${1:-}" in
  train | encode) command=$1; shift ;;
esac
port=${INSVIE_PORT:-$((20000 + RANDOM % 20000))}
python=${PYTHON:-python}
gpus_per_process=${INSVIE_GPUS_PER_PROCESS:-}
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < num; i++)); do
  device_ids=""
  if [[ -n "$gpus_per_process" ]]; then
    device_ids=$(seq -s, $((i * gpus_per_process)) $((i * gpus_per_process + gpus_per_process - 1)))
  fi
  INSVIE_COORDINATOR="127.0.0.1:${port}" INSVIE_PROCESS_ID=$i INSVIE_NUM_PROCESSES=$num \
    INSVIE_LOCAL_DEVICE_IDS=$device_ids "$python" -m insvie_jax.cli "$command" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { code=$?; [[ $status -ne 0 ]] || status=$code; }
done
exit "$status"
