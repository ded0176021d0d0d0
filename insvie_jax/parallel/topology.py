"""TPU chips and pod-slice topologies, for checking a config against a slice before renting it.

`abstract_devices("v5p:4x4x4", slices=2)` gives the devices of the slice(s) as libtpu describes them, with
their hosts (`process_index`) and slices (`slice_index`), on any machine that has libtpu installed
(`pip install "jax[tpu]"`); JAX compiles for them ahead of time with the real TPU compiler. Names may be
libtpu topologies (`v5p:4x4x4`, `v5e:4x4`, `v6e:4x4`, `v4:2x2x2`) or Cloud TPU accelerator types
(`v5p-128`, `v5litepod-16`, `v5e-16`, `v6e-16`, `v4-32`): for v4 and v5p the number counts TensorCores, two
per chip (v5p-128 is 64 chips, 4x4x4); for v5e and v6e it counts chips.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re


GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int  # high-bandwidth memory per chip
    peak_tflops: float  # dense bf16, from the vendor's data sheet

    @property
    def usable_bytes(self) -> int:
        """What a program may use: libtpu keeps a quarter GiB back (it reports 15.75 GiB available on a v5e)."""
        return self.hbm_bytes - GIB // 4


# device_kind (as libtpu reports it) -> chip. Matched exactly: "TPU v5" is v5p, "TPU v5 lite" is v5e.
CHIPS = {
    "TPU v4": Chip("v4", 32 * GIB, 275.0),
    "TPU v5 lite": Chip("v5e", 16 * GIB, 197.0),
    "TPU v5": Chip("v5p", 95 * GIB, 459.0),
    "TPU v6 lite": Chip("v6e", 32 * GIB, 918.0),
}

_THREE_D = {"v4", "v5p"}  # 3D torus generations (accelerator types count TensorCores: 2 per chip)
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}


class TopologyError(ValueError):
    """A topology name that libtpu does not know, or libtpu missing; the message says what to do."""


def quiet_libtpu_without_tpu() -> None:
    """Where libtpu is installed (jax[tpu]) but no TPU is attached, it looks for a Cloud TPU VM's metadata and
    prints screens of warnings whenever JAX starts; these settings tell it there is none."""
    if os.path.exists("/dev/accel0") or glob.glob("/dev/vfio/[0-9]*"):
        return
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5p-8"),
                       ("TPU_WORKER_HOSTNAMES", "localhost")):
        os.environ.setdefault(key, value)


def chip_of(device) -> Chip | None:
    return CHIPS.get(getattr(device, "device_kind", ""))


def _shape_for(chips: int, dims: int) -> str:
    """The usual slice shape for a chip count: 2D slices as square as possible (wider second axis), 3D ones
    grown from 2x2x1 by doubling the smallest axis."""
    if dims == 2:
        a = 2 ** (int(math.log2(chips)) // 2)
        return f"{a}x{chips // a}"
    shape = [1, 1, 1] if chips < 4 else [2, 2, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        last = max(i for i, s in enumerate(shape) if s == smallest)
        shape[last] *= 2
    return "x".join(map(str, shape))


def topology_name(name: str) -> str:
    """libtpu's topology name (`v5p:4x4x4`) for a topology or accelerator-type name."""
    name = name.strip().lower()
    if ":" in name:
        gen, shape = name.split(":", 1)
        return f"{_ALIASES.get(gen, gen)}:{shape}"
    match = re.fullmatch(r"(v\d+[a-z]*(?:pod)?)-(\d+)", name)
    if not match:
        raise TopologyError(f"unknown TPU topology {name!r}: give a libtpu topology such as v5p:4x4x4, v5e:4x4, "
                            "v6e:4x4, or an accelerator type such as v5p-128, v5e-16, v6e-16")
    gen, count = _ALIASES.get(match.group(1), match.group(1)), int(match.group(2))
    chips = count // 2 if gen in _THREE_D else count
    if chips < 1 or chips & (chips - 1):
        raise TopologyError(f"TPU accelerator type {name!r}: expected a power-of-two size")
    return f"{gen}:{_shape_for(chips, 3 if gen in _THREE_D else 2)}"


def abstract_devices(name: str, slices: int = 1) -> list:
    """The devices of `slices` slices of topology `name` (no TPU needed, only libtpu)."""
    # Several processes may compile at once (test workers, parallel checks): libtpu's lock would refuse them.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    quiet_libtpu_without_tpu()
    from jax.experimental import topologies

    topology = topology_name(name)
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, num_slices=slices).devices)
    except Exception as err:  # noqa: BLE001 - libtpu's errors are long; one line says what to do
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "tpu" in text.lower() and ("not found" in text.lower() or "unknown backend" in text.lower()
                                      or "no module" in text.lower() or "libtpu" in text.lower()):
            import jax

            raise TopologyError(f"the TPU compiler is not installed: pip install 'jax[tpu]=={jax.__version__}' "
                                f"(or pip install -e '.[tpu]'); {text}") from None
        raise TopologyError(f"TPU topology {topology!r} ({slices} slice(s)) was refused by libtpu: {text} (chips "
                            f"known here: {', '.join(c.name for c in CHIPS.values())}, e.g. v5p:4x4x4, v5e:4x4)") from None
