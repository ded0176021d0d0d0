"""Multi-process start-up: `initialize()` joins this process to the others before any device is used.

Explicit: INSVIE_COORDINATOR (host:port of process 0), INSVIE_PROCESS_ID, INSVIE_NUM_PROCESSES (what
launch/local.sh sets). Otherwise jax's own cluster detection (SLURM, TPU pods, ...) decides; a lone process
with none of these stays single-process. INSVIE_LOCAL_DEVICE_IDS (comma-separated) names the local devices this
process drives; JAX's SLURM detection otherwise gives each process the one device numbered SLURM_LOCALID, which
is right for one process per GPU but not for one process per node (launch/slurm.sbatch sets it there).
"""

from __future__ import annotations

import os

import jax

ENV_COORDINATOR = "INSVIE_COORDINATOR"
ENV_PROCESS_ID = "INSVIE_PROCESS_ID"
ENV_NUM_PROCESSES = "INSVIE_NUM_PROCESSES"
ENV_LOCAL_DEVICE_IDS = "INSVIE_LOCAL_DEVICE_IDS"


def _cluster_detected() -> bool:
    # jax's own detection table (SLURM, Open MPI, TPU, k8s), as jax.distributed.initialize() consults it.
    from jax._src.clusters import ClusterEnv

    return any(not env.opt_in_only_method and env.is_env_present() for env in ClusterEnv._cluster_types)


def initialize() -> None:
    """Calls jax.distributed.initialize once, from the INSVIE_* variables or a detected cluster."""
    if jax.distributed.is_initialized():
        return
    local_ids = os.environ.get(ENV_LOCAL_DEVICE_IDS)
    local_device_ids = [int(i) for i in local_ids.split(",")] if local_ids else None
    explicit = [os.environ.get(k) for k in (ENV_COORDINATOR, ENV_PROCESS_ID, ENV_NUM_PROCESSES)]
    if any(explicit):
        if not all(explicit):
            raise RuntimeError(f"set all of {ENV_COORDINATOR}, {ENV_PROCESS_ID}, {ENV_NUM_PROCESSES} (or none); "
                               f"got {dict(zip((ENV_COORDINATOR, ENV_PROCESS_ID, ENV_NUM_PROCESSES), explicit))}")
        if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        jax.distributed.initialize(coordinator_address=explicit[0], process_id=int(explicit[1]),
                                   num_processes=int(explicit[2]), local_device_ids=local_device_ids)
    elif _cluster_detected():
        jax.distributed.initialize(local_device_ids=local_device_ids)


def is_main_process() -> bool:
    """Process 0 writes logs and run files (orbax coordinates checkpoint writes itself)."""
    return jax.process_index() == 0


def barrier(name: str, timeout_s: float = 7 * 24 * 3600) -> None:
    """Waits until every process reached the barrier `name` (a no-op for one process).

    Through jax's coordination service rather than a device collective (multihost_utils.sync_global_devices):
    it needs no compiled program or device memory, and a process may wait there for hours (others still
    working) without gloo/NCCL collective timeouts. The long default timeout does not hang a broken job: the
    service stops every process when one dies (heartbeats) or exits on an error (its shutdown barrier fails
    after jax's 5 minutes; measured on CPU).
    """
    if jax.process_count() == 1:
        return
    from jax._src.distributed import global_state

    global_state.client.wait_at_barrier(name, int(timeout_s * 1000))
