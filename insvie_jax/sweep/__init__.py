"""Sweeps: one base config, a grid or a list of overrides, one run folder per combination, one results table.

A sweep file (YAML):

    name: tiny-ablation                 # folder name under --dir (default: the file's stem)
    base: tiny                          # preset or YAML (relative to the sweep file)
    overrides: [train.steps=60]         # applied to every run
    grid:                               # cartesian product ...
      model.patch_embed: [double_ch, fix_proj]
      train.frame_loss_weight: [0.5, 1.0]
    runs:                               # ... and/or a list; with both, every run is crossed with every grid point
      - {lora.enabled: true, lora.rank: 16}

Layout of DIR/<name>/: one folder per run, named from its overrides (`patch_embed-fix_proj,frame_loss_weight-1.0`),
holding run.json (its overrides), config.yaml (the resolved config; `train.run_dir` is the folder itself) and
what `insvie-jax train` writes there; results.md, results.csv and loss_curves.png (`report`); commands-<kind>.sh
(`emit`). A run is finished when its checkpoint at `train.steps` exists; finished runs are skipped. DIR may be
an object-storage URL (gs://): run folders and the report go there, train.log is uploaded after each run.
"""

from insvie_jax.sweep.report import EVAL_COLUMNS, FINAL_LOSS_WINDOW, STATUS_FILE, collect, report, run_status
from insvie_jax.sweep.run import EMIT_KINDS, emit, launch_command, main, prepare, run_local
from insvie_jax.sweep.spec import MAX_NAME, SWEEP_KEYS, Run, Sweep, load, run_names

__all__ = ["EMIT_KINDS", "EVAL_COLUMNS", "FINAL_LOSS_WINDOW", "MAX_NAME", "STATUS_FILE", "SWEEP_KEYS", "Run", "Sweep",
           "collect", "emit", "launch_command", "load", "main", "prepare", "report", "run_local", "run_names",
           "run_status"]
