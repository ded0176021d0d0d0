"""`insvie-jax compile`: configs compiled by the real TPU compiler (libtpu) for abstract pod slices on this CPU
machine. The full-size matrix asserts that each compiles and fits its chip's HBM; the per-chip memory of every
row is kept in tools/PERFORMANCE.md ("TPU pod slices")."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import pytest

pytest.importorskip("libtpu", reason="the TPU compiler comes with jax[tpu] (pip install -e '.[test]')")

from insvie_jax import config  # noqa: E402
from insvie_jax.bench import aot  # noqa: E402
from insvie_jax.parallel import mesh as meshlib  # noqa: E402
from insvie_jax.parallel import topology  # noqa: E402

GIB = 2**30


def compile_cli(env, tmp_path, *args):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "insvie_jax.cli", "compile", *args, "--out", str(out)],
                          env={**env, "XLA_FLAGS": ""}, capture_output=True, text=True, timeout=1200)
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


# ---------------------------------------------------------------------------------------------------
# Topologies and meshes (no compilation)


@pytest.mark.parametrize("name,expected", [
    ("v5p-8", "v5p:2x2x1"), ("v5p-128", "v5p:4x4x4"), ("v5p-64", "v5p:2x4x4"), ("v5e-16", "v5e:4x4"),
    ("v5litepod-8", "v5e:2x4"), ("v6e-256", "v6e:16x16"), ("v4-32", "v4:2x2x4"), ("v5p:4x4x4", "v5p:4x4x4"),
])
def test_accelerator_types_name_their_libtpu_topology(name, expected):
    assert topology.topology_name(name) == expected


def test_unknown_topology_is_one_clear_error():
    with pytest.raises(topology.TopologyError, match="unknown TPU topology 'v9x'"):
        topology.topology_name("v9x")


def test_a_multi_host_slice_is_one_granule_and_ici_spans_its_hosts():
    """v5p:4x4x4 is 64 chips on 16 hosts joined by ICI: `ici_fsdp=-1` takes all 64 (this was refused as 16
    DCN granules before)."""
    devices = topology.abstract_devices("v5p:4x4x4")
    assert len(devices) == 64 and len({d.process_index for d in devices}) == 16
    cfg = config.load("cogvideox-2b-edit", ["mesh.ici_data=1", "mesh.ici_fsdp=-1"]).mesh
    mesh = meshlib.create_mesh(cfg, devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 64, "tensor": 1, "context": 1}


def test_slices_are_the_dcn_granules():
    devices = topology.abstract_devices("v5e:4x4", slices=2)
    cfg = config.load("tiny", ["mesh.ici_data=1", "mesh.ici_fsdp=-1", "mesh.dcn_data=2"]).mesh
    mesh = meshlib.create_mesh(cfg, devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 16, "tensor": 1, "context": 1}
    # each data row of the mesh is one slice
    for row in range(2):
        assert {d.slice_index for d in mesh.devices[row].flat} == {row}
    bad = config.load("tiny", ["mesh.ici_data=1", "mesh.ici_fsdp=-1"]).mesh
    with pytest.raises(config.ConfigError, match="multiply to 1, but there are 2 slices"):
        meshlib.create_mesh(bad, devices)


# ---------------------------------------------------------------------------------------------------
# The report of a small program (seconds to compile)


def test_tiny_report_counts_memory_collectives_and_flops():
    cfg = config.load("tiny", ["mesh.ici_data=1", "mesh.ici_fsdp=-1", "model.dtype=bfloat16"])
    # conftest asks for float32 matmuls everywhere; Mosaic refuses that precision on bf16 operands.
    with jax.default_matmul_precision("default"):
        report = aot.check(cfg, "v5e:2x2", edit=True)
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "context": 1}
    assert report["attention"] == "splash"  # `auto` on TPU, although this machine's backend is the CPU
    assert report["fits"] and [p["program"] for p in report["programs"]] == ["train_step", "edit_step"]
    train = report["programs"][0]
    m = train["memory"]
    assert m["total"] == m["arguments"] + m["temporaries"] + m["outputs"] - m["aliased"] + m["code"]
    assert m["aliased"] > 0  # the donated train state is updated in place
    # FSDP over 4 chips: the weights are gathered (inside the layer loop: counted once per layer) and the
    # gradients reduced.
    assert train["collectives"]["all-gather"]["count"] >= cfg.model.num_layers
    assert train["collectives"]["all-gather"]["bytes"] > 0
    assert train["state"]["params"] > 0 and train["state"]["opt_state"] == pytest.approx(2 * train["state"]["params"],
                                                                                         rel=0.05)
    assert train["step_s_at_mfu"] == pytest.approx(train["step_s_at_peak"] / 0.4)
    text = aot.format_report(report)
    assert "train_step: FITS" in text and "counts the scanned layer loop once" in text


def test_hlo_loop_trip_counts_multiply_collectives():
    hlo = """HloModule m

%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]{0}) parameter(0)
  %c = s32[]{:T(128)} constant(7)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %x = f32[4]{0} get-tuple-element(%p), index=1
  %ag = f32[16]{0:T(128)} all-gather(f32[4]{0} %x), dimensions={0}
  %cp = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(f32[4]{0} %x), source_target_pairs={{0,1}}
  ROOT %t = (s32[], f32[4]{0}) tuple(%i, %x)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %w = (s32[], f32[4]{0}) while(%t0), condition=%cond, body=%body, metadata={op_name="while"}
  %ar = f32[4]{0} all-reduce(f32[4]{0} %a), to_apply=%sum
  ROOT %r = f32[4]{0} get-tuple-element(%w), index=1
}
"""
    found = aot.collectives(hlo)
    assert found["all-gather"] == {"count": 7, "bytes": 7 * 64}
    assert found["collective-permute"] == {"count": 7, "bytes": 7 * 16}
    assert found["all-reduce"] == {"count": 1, "bytes": 16}


def test_a_config_that_does_not_fit_says_why_and_exits_1(env, tmp_path):
    """XLA attention materialises (length x length) scores: 17 550 tokens at batch 4 per v5e chip do not fit."""
    proc, report = compile_cli(env, tmp_path, "tiny", "--topology", "v5e:2x2", "mesh.ici_data=-1",
                               "model.attention=xla", "data.num_frames=49", "data.height=480", "data.width=720",
                               "data.batch_size=16")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "train_step: DOES NOT FIT" in proc.stdout
    assert "model.attention=splash" in proc.stdout and "temporaries take" in proc.stdout
    assert not report["fits"] and report["programs"][0]["advice"]


def test_missing_topology_and_bad_config_are_one_line(env, tmp_path):
    proc, _ = compile_cli(env, tmp_path, "tiny", "--topology", "v9-8")
    assert proc.returncode == 2 and "'v9:2x4' (1 slice(s)) was refused by libtpu" in proc.stderr
    assert "v5p:4x4x4" in proc.stderr and "Traceback" not in proc.stderr
    proc, _ = compile_cli(env, tmp_path, "tiny", "--topology", "v5e:2x2", "mesh.ici_data=1", "mesh.ici_fsdp=-1",
                          "data.batch_size=6")
    assert proc.returncode == 2 and "data.batch_size=6 must be a multiple of the data-parallel size 4" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------
# The full-size matrix (49x480x720 unless stated, bf16 compute): each compiles and fits per chip.

FULL = [
    pytest.param("cogvideox-2b-edit", "v5p:2x2x2", 1, ["mesh.ici_data=1", "mesh.ici_fsdp=-1", "data.batch_size=8",
                 "model.remat_policy=full"], False, id="2b-full-v5p-8chips-fsdp8"),
    pytest.param("cogvideox-2b-edit", "v5e:2x4", 1, ["mesh.ici_data=1", "mesh.ici_fsdp=-1", "data.batch_size=8",
                 "model.remat_policy=full", "lora.enabled=true", "lora.rank=128"], True,
                 id="2b-lora-v5e-8-with-edit-step"),
    # The README's TPU example, as printed (64 chips on 16 hosts).
    pytest.param("cogvideox-2b-edit", "v5p:4x4x4", 1, ["mesh.ici_data=1", "mesh.ici_fsdp=-1", "data.batch_size=64",
                 "model.remat_policy=full"], False, id="2b-full-v5p-64chips-readme"),
    pytest.param("cogvideox-5b-edit", "v5p:4x4x4", 1, ["mesh.ici_data=1", "mesh.ici_fsdp=-1", "data.batch_size=64",
                 "model.remat_policy=full"], False, id="5b-full-v5p-64chips"),
    # 5B on 16 GiB chips: one clip per chip does not fit (21.2 GiB with full remat); each clip's sequence split
    # over 2 chips, the weights sharded over fsdp x context, the saved layer inputs in host memory.
    pytest.param("cogvideox-5b-edit", "v5e:4x4", 2, ["mesh.ici_data=1", "mesh.ici_fsdp=-1", "mesh.ici_context=2",
                 "mesh.dcn_data=2", "data.batch_size=16", "model.remat_policy=full_offload",
                 "mesh.logical_axis_rules=[[batch,[data,fsdp]],[length,context],[embed,[fsdp,context]],"
                 "[heads,tensor],[mlp,tensor],[head_dim,null],[vocab,tensor],[layers,null]]"], False,
                 id="5b-full-2-slices-v5e-16-context2"),
    # CogVideoX1.5 size: 81 frames at 768x1360, 85 680 video tokens, each clip's sequence split over 2 chips.
    pytest.param("cogvideox-2b-edit", "v6e:4x4", 1, ["mesh.ici_data=1", "mesh.ici_fsdp=-1", "mesh.ici_context=2",
                 "data.batch_size=8", "data.num_frames=81", "data.height=768", "data.width=1360",
                 "model.remat_policy=full"], False, id="2b-81x768x1360-v6e-16-context2"),
]


@pytest.mark.parametrize("preset,topo,slices,overrides,edit", FULL)
def test_full_size_configs_compile_and_fit(env, tmp_path, preset, topo, slices, overrides, edit):
    args = [preset, "--topology", topo, "--slices", str(slices), *overrides] + (["--edit"] if edit else [])
    proc, report = compile_cli(env, tmp_path, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["fits"] and report["attention"] == "splash"
    hbm = report["usable_bytes"]
    for program in report["programs"]:
        assert 0 < program["memory"]["total"] <= hbm
    print(json.dumps({p["program"]: {k: round(v / GIB, 2) for k, v in p["memory"].items()}
                      for p in report["programs"]}))


# ---------------------------------------------------------------------------------------------------
# launch/tpu_pod.sh --check: the same compile before any worker starts (gcloud stood in by a script that logs)


def _fake_gcloud(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.log"
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    gcloud.chmod(0o755)
    return bin_dir, log


@pytest.mark.parametrize("fits", [True, False], ids=["fits-then-launches", "does-not-fit-starts-nothing"])
def test_tpu_launcher_checks_before_starting_workers(env, tmp_path, fits):
    from pathlib import Path

    bin_dir, log = _fake_gcloud(tmp_path)
    root = Path(__file__).resolve().parent.parent
    overrides = ["mesh.ici_data=1", "mesh.ici_fsdp=-1", "model.dtype=bfloat16"]
    if not fits:
        overrides += ["model.attention=xla", "data.num_frames=49", "data.height=480", "data.width=720",
                      "data.batch_size=16"]
    python_dir = str(Path(sys.executable).parent)
    run_env = {**env, "XLA_FLAGS": "", "INSVIE_TOPOLOGY": "v5e:2x2",
               "PATH": f"{bin_dir}:{python_dir}:{env['PATH']}"}
    proc = subprocess.run(["bash", str(root / "launch/tpu_pod.sh"), "--check", "my-v5e-4", "zone-a", "tiny",
                           *overrides], env=run_env, capture_output=True, text=True, timeout=900)
    calls = log.read_text() if log.exists() else ""
    if fits:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "train_step: FITS" in proc.stdout
        assert "scp" in calls and "insvie_jax.cli train tiny mesh.ici_data=1" in calls
    else:
        assert proc.returncode == 1 and "DOES NOT FIT" in proc.stdout
        assert "nothing was started" in proc.stderr and calls == ""
