"""What a run reports: metrics.jsonl fields, TensorBoard scalars, the peak-FLOPs table."""

import json
import struct
from types import SimpleNamespace

from tensorboardX.proto import event_pb2

from insvie_jax import config as configlib
from insvie_jax.train import loop
from insvie_jax.train import metrics as metricslib

FIELDS = {"step", "stage", "loss", "lr", "grad_norm", "step_s", "samples_per_s", "tflops_per_device", "mfu",
          "peak_memory_bytes", "skipped_steps"}


def _scalars(event_file):
    """(tag, step, value) of every scalar in a TensorBoard event file (TFRecord framing)."""
    out, data = [], event_file.read_bytes()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_metrics_jsonl_and_tensorboard(tmp_path):
    cfg = configlib.load("tiny", [f"train.run_dir={tmp_path}", "train.steps=6", "train.log_every=2",
                                  "data.num_frames=5", "data.height=32", "data.width=48"])
    summary = loop.run(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4, 5]
    for r in records:
        assert set(r) == FIELDS, set(r) ^ FIELDS
        assert r["step_s"] > 0 and r["samples_per_s"] > 0 and r["skipped_steps"] == 0
        assert r["tflops_per_device"] > 0  # from XLA's cost analysis of the compiled step
        assert r["mfu"] is None and r["peak_memory_bytes"] is None  # CPU: no peak FLOPs, no memory stats
    assert records[0]["lr"] == 0.0 and records[-1]["lr"] > 0  # warmup from 0
    assert summary["steps"] == 6 and summary["skipped_steps"] == 0

    (event_file,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    scalars = _scalars(event_file)
    losses = {step: value for tag, step, value in scalars if tag == "train/loss"}
    assert losses.keys() == {0, 2, 4, 5}
    assert abs(losses[4] - records[2]["loss"]) < 1e-6
    assert {"train/lr", "train/grad_norm", "train/samples_per_s"} <= {tag for tag, _, _ in scalars}


def test_peak_flops_table_by_device_kind():
    assert metricslib.peak_tflops(SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")) == 989.0
    assert metricslib.peak_tflops(SimpleNamespace(device_kind="TPU v5 lite")) == 197.0
    assert metricslib.peak_tflops(SimpleNamespace(device_kind="cpu")) is None
