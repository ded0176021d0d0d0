"""`insvie-jax bench` end to end on CPU (tiny sizes, ours vs the PyTorch reference on the same weights), and the
profile summariser on a CPU trace."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp

from insvie_jax.bench import profile

# Ours and the reference compute in float32 on CPU from the same weights and inputs: their outputs agree to
# float32 rounding (bf16 would be ~1e-2). A wrong reference (other weights, layout, inputs) gives ~1.
REL_DIFF_TOL = 1e-4


def test_bench_tiny_against_reference(env, tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "insvie_jax.cli", "bench", "--tiny", "transformer_fwdbwd",
                           "vae_encode", "--repeats", "2", "--out", str(out_json), "--profile", str(tmp_path / "prof"),
                           "--profile-calls", "1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    rows = {r["workload"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert set(rows) == {"transformer_fwdbwd", "vae_encode"}
    for name, row in rows.items():
        ours, ref = row["ours"], row["reference"]
        assert ours["median_s"] > 0 and len(ours["times"]) == 2 and ours["compile_s"] >= 0, (name, ours)
        assert ref["median_s"] > 0, (name, ref)
        assert row["speedup"] == ref["median_s"] / ours["median_s"]
        assert row["rel_diff"] < REL_DIFF_TOL, (name, row["rel_diff"])
        assert abs(sum(ours["profile"]["shares"].values()) - 1) < 1e-6
    assert rows["transformer_fwdbwd"]["ours"]["tflops"] > 0  # FLOPs counted for the transformer
    assert "transformer_fwdbwd" in proc.stdout and "rel diff" in proc.stdout  # the table


def test_profile_summary_of_a_cpu_trace(tmp_path):
    x = jnp.ones((256, 256))
    step = jax.jit(lambda x: jnp.tanh(x @ x) + 1.0)
    step(x).block_until_ready()
    summary = profile.summarize(profile.capture(lambda: step(x), 2, tmp_path), calls=2)
    assert abs(sum(summary["shares"].values()) - 1) < 1e-9
    assert summary["kernel_ms_per_call"] > 0 and summary["top_kernels"]
    assert profile.categorize("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "collectives"
    assert profile.categorize("all-gather-start.3") == "collectives"
    assert profile.categorize("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert profile.categorize("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT") == "matmul/gemm/conv"
    assert profile.categorize("loop_multiply_fusion_2") == "fusions/elementwise"
    assert profile.categorize("Memcpy DtoD") == "copies"
