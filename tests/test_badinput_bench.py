"""`insvie-jax bench` without torch: the rows say the reference was skipped and how to install it, instead of
empty reference columns."""

import json
import subprocess
import sys

from insvie_jax.bench import format_table

BLOCK_TORCH = ("import sys; sys.modules['torch'] = None  # as if not installed\n"
               "from insvie_jax.cli import main; sys.exit(main(sys.argv[1:]))")


def test_bench_without_torch_says_the_reference_was_skipped(env, tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "bench", "--tiny", "attention", "--repeats", "1",
                           "--out", str(out_json)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    message = "reference skipped: torch not installed (pip install 'insvie-jax[test]')"
    (row,) = json.loads(out_json.read_text())["rows"]
    assert row["ours"]["median_s"] > 0 and row["reference"] == {"skipped": message}
    table = proc.stdout.splitlines()
    assert table[table.index(next(line for line in table if line.startswith("attention"))) + 1] == f"    {message}"
    assert "-x" not in proc.stdout  # empty ratio columns are "-"


def test_table_marks_missing_ratios_with_a_dash():
    row = {"label": "vae_encode", "workload": "vae_encode", "ours": {"median_s": 0.5},
           "reference": {"skipped": "reference skipped: torch not installed (pip install 'insvie-jax[test]')"}}
    body = format_table([row]).splitlines()[2:]
    assert body[0].split()[-3:] == ["-", "-", "-"]
    assert body[1] == "    reference skipped: torch not installed (pip install 'insvie-jax[test]')"
