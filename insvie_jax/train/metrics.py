"""What a run reports: RUN/metrics.jsonl (one JSON object per logged step) and TensorBoard scalars.

Only process 0 writes; other processes get a writer that does nothing. When RUN is an object-storage URL, both
are written in a local folder and uploaded whole every `upload_every_s` seconds, after an error, and at close
(storage.Mirror: object storage has no append); a resumed run continues the uploaded metrics.jsonl.
"""

from __future__ import annotations

import json
import sys

from insvie_jax import storage

# Dense bf16 peak TFLOP/s per chip, from the vendors' data sheets; matched as a substring of device_kind.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "TPU v6": 918.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v4": 275.0,
}


def peak_tflops(device) -> float | None:
    """The chip's peak bf16 TFLOP/s, or None when unknown (CPU): MFU is then reported as null."""
    kind = getattr(device, "device_kind", "")
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops
    return None


def peak_memory_bytes(device) -> int | None:
    """Peak device memory in use so far, where the backend reports it (GPU, TPU; not CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return (stats or {}).get("peak_bytes_in_use")


def step_flops(cfg, latent: tuple[int, int, int], num_devices: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward) on one device."""
    from insvie_jax.models.family import forward_flops

    return 3 * forward_flops(cfg.model, *latent) * cfg.data.batch_size / num_devices


class MetricsWriter:
    def __init__(self, run_dir, enabled: bool = True, upload_every_s: float = 30.0):
        self.enabled = enabled
        self.jsonl = self.tensorboard = self.mirror = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.mirror = storage.Mirror(run_dir, resume=("metrics.jsonl",), every_s=upload_every_s)
            local = storage.path(self.mirror.local)
            self.jsonl = (local / "metrics.jsonl").open("a")
            self.tensorboard = SummaryWriter(str(local / "tensorboard"))

    def _sync(self, force: bool = False) -> None:
        if force and self.mirror.remote or self.mirror.due():
            self.tensorboard.flush()
            self.mirror.sync(force=True)

    def write(self, record: dict, prefix: str = "train") -> None:
        """One metrics.jsonl line; its numbers also as TensorBoard scalars `<prefix>/<key>`."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tensorboard.add_scalar(f"{prefix}/{key}", value, record["step"])
        self._sync()

    def image(self, tag: str, image, step: int) -> None:
        """A uint8 (H, W, 3) image in TensorBoard."""
        if self.enabled:
            self.tensorboard.add_image(tag, image, step, dataformats="HWC")
            self._sync()

    def error(self, step: int, message: str) -> None:
        """A problem the run survives: on stderr and in metrics.jsonl as {"step", "error"}."""
        print(f"insvie-jax train: {message}", file=sys.stderr, flush=True)
        if self.enabled:
            self.jsonl.write(json.dumps({"step": step, "error": message}) + "\n")
            self.jsonl.flush()
            self._sync(force=True)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
            self.mirror.close()
