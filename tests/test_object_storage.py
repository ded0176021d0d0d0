"""Run and data folders on object storage: training whose train.run_dir and data.paths are gs:// URLs, served
offline by tests/_fake_gcs.py, through the same libraries a pod uses: etils.epath (fsspec "gcs") for
config.yaml, metrics.jsonl, TensorBoard, samples and manifests; orbax with tensorstore's GCS driver for
checkpoints (and grain's iterator state); array_record's own GCS reader for the shards.

- Two processes (launch/local.sh, the pod case) train 2 steps on ArrayRecord shards in gs://, then resume to 4
  from the gs:// checkpoint: checkpoints collective, config.yaml and metrics.jsonl from process 0 alone.
- `encode` from a gs:// list of gs:// videos into gs:// shards; `export` of the gs:// run.
- Sample videos, data videos, the pipeline's bad-record report, metrics uploads while a run goes, a sweep folder.
- Object storage's limits (no append) and unknown URL schemes.
"""

import json
import os
import subprocess
from pathlib import Path

import av
import jax
import numpy as np
import pytest
import yaml
from flax import nnx
from _data_clips import write_insvie_csv, write_pair
from _fake_gcs import BUCKET, FakeGCS, install

from insvie_jax import config as configlib
from insvie_jax import storage
from insvie_jax import sweep as sweeplib
from insvie_jax.data import records
from insvie_jax.data import video as data_video
from insvie_jax.data.encode import encode_lists
from insvie_jax.data.pipeline import BadRecordLog, read_bad_records
from insvie_jax.convert.api import load_transformer
from insvie_jax.sample import video as sample_video
from insvie_jax.train.export import export_model
from insvie_jax.train.metrics import MetricsWriter

ROOT = Path(__file__).resolve().parent.parent
CLIP = ["data.num_frames=5", "data.height=32", "data.width=48"]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    keys = ("FAKE_GCS_ROOT", "FAKE_GCS_URL", "TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT",
            "STORAGE_EMULATOR_HOST", "GCE_METADATA_ROOT")
    saved = {k: os.environ.get(k) for k in keys}
    server = FakeGCS(str(tmp_path_factory.mktemp("gcs")))
    install(server.root, server.url)
    yield server
    server.close()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _records(server, run: str) -> list[dict]:
    return [json.loads(line) for line in Path(server.local(f"{run}/metrics.jsonl")).read_text().splitlines()]


def _steps(server, run: str) -> list[int]:
    folder = Path(server.local(f"{run}/checkpoints"))
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


def test_samples_videos_and_bad_records_on_gs(gcs):
    """What validation (samples/<step>/<clip>.mp4), the edit command and the data pipeline write there."""
    frames = np.random.default_rng(0).integers(0, 256, (5, 32, 48, 3), np.uint8)
    sample = f"gs://{BUCKET}/runs/x/samples/4/00.mp4"
    sample_video.write_mp4(sample, frames, 8)
    data_video.write_video(f"gs://{BUCKET}/clips/a.mp4", frames)
    assert data_video.probe(f"gs://{BUCKET}/clips/a.mp4").num_frames == 5  # read back through storage
    assert sample_video.read_clip(sample, 32, 48, max_frames=9).frames.shape == (5, 32, 48, 3)  # `edit --video`
    for url in (sample, f"gs://{BUCKET}/clips/a.mp4"):
        with av.open(gcs.local(url)) as video:
            decoded = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
        assert len(decoded) == 5 and decoded[0].shape == (32, 48, 3)
    report = f"gs://{BUCKET}/runs/x/report"
    log = BadRecordLog(report)
    for sample_name in ("a", "b", "a"):  # a restored iterator may meet a record twice
        assert not log({"__bad__": sample_name, "reason": "non-finite values in 'text'"})
    assert sorted(e["sample"] for e in read_bad_records(report).entries) == ["a", "b"]


def test_encode_reads_lists_and_videos_from_gs_and_writes_shards_there(gcs):
    """`insvie-jax encode --list gs://.../train.csv --out gs://.../enc`: the CSV and videos are read from the
    bucket, the shards uploaded whole, and read back by array_record's GCS reader."""
    clips = f"gs://{BUCKET}/clips-encode"
    names = ["v0.mp4", "v1.mp4"]
    for i, name in enumerate(names):  # as `gsutil cp` would put them there
        write_pair(Path(gcs.local(clips)), name, num_frames=5, height=32, width=48, seed=i)
    write_insvie_csv(Path(gcs.local(clips)) / "train.csv", [*names, "missing.mp4"])
    out = f"gs://{BUCKET}/enc"
    cfg = configlib.load("tiny", CLIP)
    manifest = encode_lists(cfg, [f"{clips}/train.csv"], out, show_progress=False)
    assert manifest["count"] == 2 and manifest["bad"]["by_reason"] == {"missing file": 1}
    assert sorted(os.listdir(gcs.local(out))) == ["encode_config.json", "manifest.json",
                                                  "part-00000-2x4x6.array_record", "part-00000.done.json"]
    stored = [records.unpack(raw) for raw in records.read_all(f"{out}/part-00000-2x4x6.array_record")]
    assert [r["name"] for r in stored] == ["train.csv:2:v0.mp4", "train.csv:3:v1.mp4"]
    assert all(records.check_record(r) is None for r in stored)


def test_a_sweep_folder_on_gs(gcs):
    """`insvie-jax sweep --dir gs://...`: run folders, launch lines and the report go to the bucket, and a run's
    config.yaml there is what `insvie-jax train gs://.../config.yaml` loads."""
    sweep = sweeplib.load(ROOT / "configs" / "sweeps" / "tiny-ablation.yaml", root=f"gs://{BUCKET}/sweeps")
    assert str(sweep.folder) == f"gs://{BUCKET}/sweeps/tiny-ablation"
    commands = sweeplib.emit(sweep, "local")
    assert Path(gcs.local(str(commands))).read_text().count("launch/local.sh") == len(sweep.runs)
    for number, run in enumerate(sweep.runs):
        assert configlib.load(str(run.config_path)).train.run_dir == str(run.folder)
        lines = (json.dumps({"step": i, "loss": number + 1 / (i + 1), "step_s": 0.1}) for i in range(3))
        (run.folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    rows = sweeplib.report(sweep.folder)
    assert [row["final_loss"] for row in rows] == pytest.approx([n + 11 / 18 for n in range(len(sweep.runs))])
    assert {"results.md", "results.csv", "loss_curves.png"} <= set(os.listdir(gcs.local(str(sweep.folder))))


def test_metrics_are_uploaded_while_the_run_goes(gcs):
    """metrics.jsonl and the TensorBoard events reach the bucket every upload_every_s, not only at the end (what
    a killed run keeps), and a new writer continues the uploaded file."""
    run = f"gs://{BUCKET}/runs/metrics"
    writer = MetricsWriter(run, upload_every_s=0)
    writer.write({"step": 0, "loss": 1.5})
    assert _records(gcs, run) == [{"step": 0, "loss": 1.5}]  # uploaded before close
    assert os.path.getsize(gcs.local(f"{run}/tensorboard/{os.listdir(gcs.local(f'{run}/tensorboard'))[0]}")) > 0
    writer.close()
    slow = MetricsWriter(run, upload_every_s=3600)
    slow.write({"step": 1, "loss": 1.25})
    assert len(_records(gcs, run)) == 1  # not due yet
    slow.error(2, "a checkpoint save failed")  # errors are uploaded at once
    assert _records(gcs, run)[1:] == [{"step": 1, "loss": 1.25}, {"step": 2, "error": "a checkpoint save failed"}]
    slow.close()


def test_object_storage_refuses_append_and_names_unknown_schemes(gcs):
    path = storage.path(f"gs://{BUCKET}/append.txt")
    path.write_text("a")
    with pytest.raises(NotImplementedError):
        path.open("a")  # why metrics.jsonl goes through storage.Mirror
    with pytest.raises(storage.StorageError, match="unsupported URL scheme 'ftp://'"):
        storage.path("ftp://host/run")


def _launch(env, cwd, run: str, data: str, steps: int) -> str:
    out = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "2", "tiny", f"train.run_dir={run}",
                          "mesh.ici_data=1", "mesh.dcn_data=2", *CLIP, "data.source=arrayrecord",
                          f"data.paths=[{data}]", "data.batch_size=4", f"train.steps={steps}", "train.log_every=1",
                          "checkpoint.every=2", "checkpoint.keep=5", "train.sample_every=0"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=cwd, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count('"steps": 2') == 2, out.stdout  # both processes trained 2 steps
    return out.stderr


def test_a_two_process_run_and_its_data_on_gs_write_there_and_resume(gcs, env, tmp_path):
    """The pod case: each process reads its share of gs:// shards; checkpoints (with each process's grain
    iterator state) are written collectively, config.yaml and metrics.jsonl by process 0 alone; a rerun
    resumes from the gs:// checkpoint and continues the uploaded metrics.jsonl. Nothing lands on local disk."""
    data, run = f"gs://{BUCKET}/data", f"gs://{BUCKET}/runs/pod"
    cfg = configlib.load("tiny", CLIP)
    latent = configlib.latent_shape(cfg)
    records.write_synthetic(data, {latent[:3]: 16}, (cfg.model.text_length, cfg.model.text_embed_dim),
                            latent_channels=latent[3], shard_size=8)
    assert sorted(os.listdir(gcs.local(data))) == ["manifest.json", *(f"part-0000{i}-2x4x6.array_record"
                                                                      for i in range(2))]
    site = tmp_path / "site"  # makes each `python` of launch/local.sh install the fake GCS before running
    site.mkdir()
    (site / "sitecustomize.py").write_text("import _fake_gcs\n_fake_gcs.install_from_env()\n")
    env = dict(env, PYTHONPATH=os.pathsep.join([str(site), str(ROOT / "tests"), str(ROOT)]))  # 1 device each
    work = tmp_path / "cwd"
    work.mkdir()

    _launch(env, work, run, data, steps=2)
    assert [r["step"] for r in _records(gcs, run)] == [0, 1]  # one writer: one record per step
    assert _steps(gcs, run) == [2]
    state = Path(gcs.local(f"{run}/checkpoints/2/state"))
    assert (state / "manifest.ocdbt").exists()  # the processes' parts, merged by orbax
    iterators = set(os.listdir(gcs.local(f"{run}/checkpoints/2/data")))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= iterators  # each process's grain iterator state

    stderr = _launch(env, work, run, data, steps=4)
    assert "resuming gs://insvie-test/runs/pod from checkpoint 2" in stderr
    assert _steps(gcs, run) == [2, 4]
    assert [r["step"] for r in _records(gcs, run)] == [0, 1, 2, 3]
    saved = yaml.safe_load(Path(gcs.local(f"{run}/config.yaml")).read_text())
    assert saved["train"]["steps"] == 4 and saved["train"]["run_dir"] == run
    assert len(os.listdir(gcs.local(f"{run}/tensorboard"))) == 2  # one event file per run
    assert os.listdir(work) == []

    # `insvie-jax export` of the gs:// run, here (one process): checkpoints 2 and 4 hold different weights.
    models = {step: load_transformer(export_model(run, tmp_path / f"out{step}", step=step))[0] for step in (2, 4)}
    weights = {step: jax.tree.leaves(nnx.state(model)) for step, model in models.items()}
    assert len(weights[2]) == len(weights[4]) > 0
    assert any(not np.array_equal(a, b) for a, b in zip(weights[2], weights[4]))
