"""The device mesh: one mesh with named axes (data, fsdp, tensor, context), laid out on the physical devices.

Sizes come from `MeshConfig`: `ici_*` within a granule (fast links), `dcn_*` across granules; one `ici_*` and
one `dcn_*` may be -1 (the rest). A granule is a TPU slice (all of its hosts: ICI joins them) or, on GPU and
CPU, one process (host). Axis types are Auto: collectives are inserted by the compiler
from shardings (explicit-mode meshes reject the gathers of embedding lookups).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from insvie_jax.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor", "context")


def _resolve(sizes: list[int], total: int, kind: str) -> list[int]:
    """Fills the one -1 with what is left of `total`; checks that the product divides it."""
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh: at most one {kind}_* size may be -1, got {dict(zip(AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh: {kind}_* sizes must be positive or -1, got {dict(zip(AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if free:
        if total % known:
            raise ConfigError(f"mesh: {total} {kind} units cannot be split as {dict(zip(AXES, sizes))} "
                              f"(the fixed sizes' product {known} must divide {total})")
        sizes = list(sizes)
        sizes[free[0]] = total // known
    return sizes


def mesh_shapes(cfg: MeshConfig, num_devices: int, num_granules: int) -> tuple[list[int], list[int]]:
    """(ici shape, dcn shape), -1 resolved: `num_granules` slices/processes of num_devices/num_granules each."""
    dcn = _resolve([cfg.dcn_data, cfg.dcn_fsdp, cfg.dcn_tensor, cfg.dcn_context], num_granules, "dcn")
    if math.prod(dcn) != num_granules:
        raise ConfigError(f"mesh: dcn sizes {dict(zip(AXES, dcn))} multiply to {math.prod(dcn)}, but there are "
                          f"{num_granules} slices/processes: make their product {num_granules}")
    per_granule = num_devices // num_granules
    ici = _resolve([cfg.ici_data, cfg.ici_fsdp, cfg.ici_tensor, cfg.ici_context], per_granule, "ici")
    return ici, dcn


def _granules(devices) -> tuple[int, bool]:
    """(count, by process): the units that dcn_* spans. On TPU these are slices: every chip of one slice is
    joined by ICI, across its hosts too, so a multi-host slice is one granule. Elsewhere (GPU, CPU) they are
    processes (hosts): the links between hosts are the slow ones."""
    if devices[0].platform == "tpu":
        return len({getattr(d, "slice_index", 0) for d in devices}), False
    return len({d.process_index for d in devices}), True


def create_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """The 4-axis mesh over `devices` (default: all; abstract TPU devices for ahead-of-time compilation). With no
    -1 among the ici sizes and a product below the device count (single-process runs only), the first devices
    are used: a tiny config may ask for one device on a many-device host."""
    devices = list(devices if devices is not None else jax.devices())
    granules, by_process = _granules(devices)
    ici_sizes = [cfg.ici_data, cfg.ici_fsdp, cfg.ici_tensor, cfg.ici_context]
    single_process = len({d.process_index for d in devices}) == 1
    if single_process and -1 not in ici_sizes and math.prod(ici_sizes) < len(devices):
        devices = devices[: math.prod(ici_sizes)]
    ici, dcn = mesh_shapes(cfg, len(devices), granules)
    if math.prod(ici) * math.prod(dcn) != len(devices):
        raise ConfigError(f"mesh: ici {dict(zip(AXES, ici))} x dcn {dict(zip(AXES, dcn))} needs "
                          f"{math.prod(ici) * math.prod(dcn)} devices, there are {len(devices)}")
    if granules > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process,
                                                    allow_split_physical_axes=True)
    else:
        grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    return Mesh(np.asarray(grid), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def data_parallel_size(mesh: Mesh) -> int:
    """How many groups the batch is split into (the `batch` rule's axes: data x fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(mesh: Mesh, batch_size: int, where: str = "") -> None:
    """The global batch must split evenly over the data-parallel groups."""
    groups = data_parallel_size(mesh)
    if batch_size % groups:
        raise ConfigError(f"{where}data.batch_size={batch_size} must be a multiple of the data-parallel size {groups} "
                          f"(mesh data x fsdp = {dict(mesh.shape)})")
