"""`insvie-jax`: one command, one function per subcommand; parsing only, no logic of its own."""

from __future__ import annotations

import argparse
import json
import sys

from insvie_jax import config as configlib

DEFAULT_CONFIG = "tiny-shapes"  # tiny models; training makes and encodes moving-shape clips first


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                        help=f"YAML file or preset name (default: {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.lr=3e-4")


def _split_config(args, default: str | None = DEFAULT_CONFIG) -> tuple[str | None, list[str]]:
    # `insvie-jax train model.num_layers=4` (no config named) means the default config with that override.
    # A YAML path may itself hold "=" (e.g. a sweep run's folder, runs/lora.rank=64/config.yaml).
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        return default, [args.config, *args.overrides]
    return args.config or default, list(args.overrides)


def cmd_prepare(args) -> int:
    from insvie_jax import storage
    from insvie_jax.data.prepare import prepare

    path, overrides = _split_config(args)
    cfg = prepare(configlib.load(path, overrides))
    target = storage.path(cfg.train.run_dir) / "config.yaml"
    storage.makedirs(target.parent)
    configlib.save(cfg, target)
    print(target)
    print(f"insvie-jax prepare: data ready; train with: insvie-jax train {target}", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from insvie_jax.data.batches import DataEnded
    from insvie_jax.data.prepare import prepare
    from insvie_jax.train import loop

    path, overrides = _split_config(args)
    cfg = prepare(configlib.load(path, overrides), then="training")  # with data.generate: clips made and encoded
    try:
        summary = loop.run(cfg)
    except (loop.TrainingStopped, DataEnded) as err:
        print(f"insvie-jax train: {err}", file=sys.stderr)
        return 3
    print(json.dumps(summary, indent=2))
    if "samples" in summary:
        print(f"insvie-jax train: validation edits (source | edit | target) in {summary['samples']}/ "
              "(contact_sheet.png and one mp4 per clip)", file=sys.stderr)
    if "edit_command" in summary:
        print(f"insvie-jax train: edit with this run:\n  {summary['edit_command']}", file=sys.stderr)
    return 143 if summary["interrupted"] else 0  # 128 + SIGTERM: stopped early, checkpoint saved


def cmd_config(args) -> int:
    import yaml

    path, overrides = _split_config(args)
    print(yaml.safe_dump(configlib.load(path, overrides).to_dict(), sort_keys=False), end="")
    return 0


def cmd_convert(args) -> int:
    from insvie_jax.convert.registry import UnsupportedConversion, convert_main

    try:
        convert_main(args.src, args.dst, to=args.to, dtype=args.dtype, merge_lora=args.merge_lora,
                     sat_config=args.sat_config, model=args.model,
                     config=configlib.load(args.config) if args.config else None)
    except UnsupportedConversion as err:
        print(f"insvie-jax: {err}", file=sys.stderr)
        return 2
    return 0


def _csv_rows(csv_path: str, test_folder: str | None) -> list[tuple[str, str]]:
    """InsViE's batch file: a header row, then `name, ..., instruction` (column 2 when a row has 3+ columns, else
    column 1); videos live in --test-folder, relative to the CSV's folder unless absolute."""
    import csv

    from insvie_jax import storage

    csv_file = storage.path(csv_path)
    if not csv_file.is_file():
        raise FileNotFoundError(f"CSV not found: {csv_file}: check --csv")
    folder = csv_file.parent / (test_folder or "")
    with storage.csv_text(csv_file) as f:
        rows = [row for row in list(csv.reader(f))[1:] if row and any(cell.strip() for cell in row)]
    short = [i + 2 for i, row in enumerate(rows) if len(row) < 2]
    if short:
        raise configlib.ConfigError(f"{csv_file}: rows {short} need a file name and an instruction")
    return [(str(folder / row[0].strip()), row[2 if len(row) >= 3 else 1].strip()) for row in rows]


def cmd_edit(args) -> int:
    from insvie_jax.sample import edit as editlib
    from insvie_jax.sample.video import VideoError
    from insvie_jax.train.export import find_run_checkpoint

    path, overrides = _split_config(args, default=None)
    shortcuts = {"seed": args.seed, "steps": args.steps, "text_scale": args.text_scale,
                 "source_scale": args.source_scale}
    overrides += [f"sample.{key}={value}" for key, value in shortcuts.items() if value is not None]
    run = find_run_checkpoint(args.checkpoint) if args.checkpoint else None
    if path is None:  # no config named: a training run's own (its VAE, text encoder, sizes), else the default
        path = run[0] / "config.yaml" if run else DEFAULT_CONFIG
    cfg = configlib.load(path, overrides)
    if bool(args.video) == bool(args.csv):
        raise configlib.ConfigError("pass either --video with --instruction, or --csv (with --test-folder)")
    if args.video and not args.instruction:
        raise configlib.ConfigError("--video needs --instruction \"what to change\"")
    jobs = [(args.video, args.instruction)] if args.video else _csv_rows(args.csv, args.test_folder)
    editor = editlib.Editor(cfg, args.checkpoint, args.vae, args.t5, ema=args.ema)
    failed = 0
    for video, instruction in jobs:
        try:
            result = editor.edit(video, instruction, args.out)
        except (VideoError, FileNotFoundError) as err:  # in a batch, the other rows still run
            print(f"insvie-jax: {'skipped: ' if len(jobs) > 1 else ''}{err}", file=sys.stderr)
            failed += 1
            continue
        print(result.out_dir / "edit.mp4")
    return (2 if len(jobs) == 1 else 1) if failed else 0


def _config_and_lists(args, command: str):
    """The resolved config and the triplet lists (--list, else data.paths) of `encode` / `filter`."""
    path, overrides = _split_config(args)
    cfg = configlib.load(path, overrides)
    lists = args.list or cfg.data.paths
    if not lists:
        raise configlib.ConfigError(f"{command}: name the triplet lists with --list (or data.paths=[...])")
    return cfg, lists


def cmd_encode(args) -> int:
    from insvie_jax.data.encode import encode_lists

    cfg, lists = _config_and_lists(args, "encode")
    manifest = encode_lists(cfg, lists, args.out, show_progress=not args.quiet)
    bad = manifest["bad"]
    print(json.dumps({"out": args.out, "count": manifest["count"], "bad": bad["count"], "bad_by_reason":
                      bad["by_reason"], "buckets": {k: v["count"] for k, v in manifest["buckets"].items()}}, indent=2))
    return 0


def cmd_filter(args) -> int:
    from insvie_jax.data import filters
    from insvie_jax.data.sources import read_lists

    cfg, lists = _config_and_lists(args, "filter")
    triplets, list_report = read_lists(lists, cfg.data.video_roots, cfg.data.allow_outside_root)
    rows = filters.filter_triplets(cfg, triplets, list_report, filters.make_judge(cfg.filter),
                                   show_progress=not args.quiet)
    filters.write_report(rows, args.report)
    summary = {"report": args.report, "triplets": len(rows), "kept": sum(r["keep"] for r in rows)}
    if args.kept:
        filters.write_kept(rows, args.kept)
        summary["kept_list"] = args.kept
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args) -> int:
    from insvie_jax import eval as evallib

    if not args.csv and not args.edits:
        raise configlib.ConfigError("eval: pass --csv LIST (an eval or InsViE CSV) and/or --edits OUT (edit outputs)")
    return evallib.main(args.csv or [], args.edits, args.out, args.video_roots, args.clip, args.judge, args.max_frames,
                        args.quiet)


def cmd_bench(args) -> int:
    from insvie_jax import bench

    try:
        return bench.run(args)
    except ValueError as err:
        raise configlib.ConfigError(str(err)) from None


def _bench_parser(sub) -> None:
    from insvie_jax.bench import WORKLOADS

    bench = sub.add_parser("bench", help="time workloads against their PyTorch references (table + JSON)",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="workloads:\n" + "\n".join(f"  {k:20} {w.description}" for k, w in WORKLOADS.items()))
    bench.add_argument("workloads", nargs="*", metavar="WORKLOAD", help="default: the full list for one GPU")
    bench.add_argument("--preset", default="cogvideox-2b-edit", help="config preset or YAML (sizes, dtypes)")
    bench.add_argument("--tiny", action="store_true", help="the tiny preset, 4 sampling steps: a CPU smoke run")
    bench.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable), e.g. "
                       "mesh.ici_fsdp=2, data.batch_size=2")
    bench.add_argument("--remat", nargs="+", choices=configlib.choices("model.remat_policy"),
                       help="remat policies of transformer_fwdbwd / train_step (one row each)")
    bench.add_argument("--lora", choices=("off", "on", "both"), help="LoRA for transformer_fwdbwd / train_step")
    bench.add_argument("--tiled", choices=("off", "on", "both"), help="VAE tiling for vae_encode / vae_decode")
    bench.add_argument("--repeats", type=int, help="timed calls per workload (median; default 5, tiny 2)")
    bench.add_argument("--reference", choices=("auto", "none", "only"), default="auto",
                       help="the PyTorch reference: when importable (auto), never, or only it")
    bench.add_argument("--out", default="bench.json", help="JSON results (default bench.json; '' = none)")
    bench.add_argument("--profile", metavar="DIR", help="trace a few timed calls per workload into DIR and "
                       "report the time share per kernel category")
    bench.add_argument("--profile-calls", type=int, default=3, help="calls traced with --profile")
    bench.add_argument("--processes", type=int, default=1, help="JAX processes per workload, one per GPU, "
                       "joined through jax.distributed (train_step; no reference then)")
    bench.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS in the workload processes")
    bench.add_argument("--scratch", help="folder for the weights handed to the reference (default: temp)")
    bench.set_defaults(func=cmd_bench)


def cmd_compile(args) -> int:
    from insvie_jax import aot
    from insvie_jax.parallel.topology import TopologyError

    path, overrides = _split_config(args)
    cfg = configlib.load(path, overrides)
    try:
        report = aot.check(cfg, args.topology, slices=args.slices, edit=args.edit, mfu=args.mfu)
    except TopologyError as err:
        print(f"insvie-jax compile: {err}", file=sys.stderr)
        return 2
    print(aot.format_report(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["fits"] else 1


def cmd_sweep(args) -> int:
    from insvie_jax import sweep

    if args.file == "report" and args.target:
        sweep.report(args.target)
        print(f"{args.target}/results.md")
        return 0
    overrides = [args.target, *args.overrides] if args.target else list(args.overrides)
    return sweep.main(args.file, args.dir, overrides, args.emit, args.processes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="insvie-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="train an edit model (default: tiny-shapes, tiny models on generated "
                                         "moving-shape clips)",
                           description="Trains the config's stages one after another (none: one stage of "
                                       "train.steps), resuming train.run_dir if it holds checkpoints. Change a "
                                       "stage with stages.<name>.steps=N or stages.<name>.<section>.<key>=VALUE.")
    _config_args(train)
    train.set_defaults(func=cmd_train)
    prep = sub.add_parser("prepare", help="make and encode the clips a data.generate config trains on (what train "
                                          "does first); writes the prepared config to train.run_dir/config.yaml",
                          description="Generates data.generate moving-shape triplets (and data.generate_val "
                                      "held-out ones), encodes them with the config's VAE and T5 into ArrayRecord "
                                      "shards, and writes the config training reads (data.paths filled in).")
    _config_args(prep)
    prep.set_defaults(func=cmd_prepare)
    show = sub.add_parser("config", help="print the resolved config")
    _config_args(show)
    show.set_defaults(func=cmd_config)
    from insvie_jax.convert import registry  # light: names only; a codec's module loads when it is used

    convert = sub.add_parser("convert", help="convert a checkpoint (" + ", ".join(registry.MODELS) + ") between "
                                             "formats")
    convert.add_argument("src", help="SAT folder or .pt, diffusers or Hugging Face folder, or native folder "
                                     "(model and format detected)")
    convert.add_argument("dst", help="output folder (or .pt for SAT); must not exist")
    convert.add_argument("--model", choices=tuple(registry.MODELS),
                         help="what SRC holds (default: detected from its files)")
    convert.add_argument("--to", choices=tuple(registry.all_formats()), default="native",
                         help="; ".join(f"{m}: {'|'.join(registry.formats(m))}" for m in registry.MODELS))
    convert.add_argument("--dtype", choices=tuple(registry.DTYPE_NAMES), default="fp32")
    convert.add_argument("--merge-lora", action="store_true", help="merge SAT LoRA adapters into the weights")
    convert.add_argument("--sat-config", help="SAT model yaml, when the shapes cannot tell the config")
    convert.add_argument("--config", help="YAML or preset whose section of the model gives what the checkpoint cannot "
                                          "tell (a SAT 3d-vae.pt's norm groups, temporal compression, scaling factor; "
                                          "a text encoder's dtypes), e.g. tiny")
    convert.set_defaults(func=cmd_convert)
    edit = sub.add_parser("edit", help="edit a video as an instruction says (or a CSV batch of them)")
    _config_args(edit)
    edit.add_argument("--video", help="source video file")
    edit.add_argument("--instruction", help="what to change, e.g. \"make it snow\"")
    edit.add_argument("--csv", help="InsViE batch file: header, then name[, ...], instruction per row")
    edit.add_argument("--test-folder", help="folder of the CSV's videos (relative to the CSV's folder)")
    edit.set_defaults(config=None)  # none named: the --checkpoint run's config.yaml, else the default config
    edit.add_argument("--checkpoint", help="transformer: a training run folder (latest checkpoint) or "
                      "RUN/checkpoints/STEP, with the run's config; or SAT, diffusers or native (default: random "
                      "weights)")
    edit.add_argument("--ema", action="store_true", help="the run's EMA weights (train.ema_decay > 0)")
    edit.add_argument("--vae", help="diffusers vae/ folder or SAT 3d-vae.pt (default: vae.path; empty = random)")
    edit.add_argument("--t5", help="Hugging Face T5 folder (default: text_encoder.path; empty = random)")
    edit.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    edit.add_argument("--seed", type=int, help="sample.seed")
    edit.add_argument("--steps", type=int, help="sample.steps")
    edit.add_argument("--text-scale", type=float, help="sample.text_scale")
    edit.add_argument("--source-scale", type=float, help="sample.source_scale")
    edit.set_defaults(func=cmd_edit)
    encode = sub.add_parser("encode", help="pre-encode triplet lists (VAE posteriors + T5) into ArrayRecord shards")
    _config_args(encode)
    encode.add_argument("--list", action="append", help="InsViE CSV, pair CSV or JSONL (repeatable; default "
                        "data.paths)")
    encode.add_argument("--out", required=True, help="output folder (an existing one is resumed)")
    encode.add_argument("--quiet", action="store_true", help="no progress bar")
    encode.set_defaults(func=cmd_encode)
    filt = sub.add_parser("filter", help="score triplets (motion, quality, edit consistency, optional judge)")
    _config_args(filt)
    filt.add_argument("--list", action="append", help="InsViE CSV, pair CSV or JSONL (repeatable; default "
                      "data.paths)")
    filt.add_argument("--report", required=True, help="CSV report: scores, keep, reasons per triplet")
    filt.add_argument("--kept", help="also write the kept triplets as a JSONL list (for encode)")
    filt.add_argument("--quiet", action="store_true", help="no progress bar")
    filt.set_defaults(func=cmd_filter)
    _bench_parser(sub)
    comp = sub.add_parser("compile", help="compile a config's train step for a TPU pod slice on this machine "
                          "(no TPU needed): per-chip memory, FITS / DOES NOT FIT, collectives, FLOPs")
    _config_args(comp)
    comp.add_argument("--topology", required=True, help="TPU slice: v5p:4x4x4, v5e:4x4, v6e:4x4, v4:2x2x2, or an "
                      "accelerator type (v5p-128, v5e-16, v6e-16)")
    comp.add_argument("--slices", type=int, default=1, help="number of such slices (multi-slice over DCN)")
    comp.add_argument("--edit", action="store_true", help="also compile one 3-way-guided sampling step")
    comp.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the step-time estimate")
    comp.add_argument("--out", help="write the report as JSON here")
    comp.set_defaults(func=cmd_compile)
    ev = sub.add_parser("eval", help="measure edits: source preservation, temporal consistency, target match, CLIP "
                                     "scores (per-clip CSV + summary)")
    ev.add_argument("--csv", action="append", help="eval CSV (source, edit, instruction[, target, source_caption, "
                    "edited_caption]), pair CSV (source, target, instruction) or InsViE CSV (repeatable)")
    ev.add_argument("--edits", help="`insvie-jax edit --out` folder: the edited clips of an InsViE CSV, or (no --csv) "
                    "every <name>/meta.json in it")
    ev.add_argument("--video-roots", nargs="+", default=["source", "edit"], metavar="DIR",
                    help="an InsViE CSV's source and edited-clip folders, relative to it (default: source edit)")
    ev.add_argument("--out", default="eval", help="per_clip.csv, summary.md, summary.json go here (default: eval)")
    ev.add_argument("--clip", help="Hugging Face CLIP folder (config.json, model.safetensors, vocab.json, merges.txt): "
                    "adds clip_text, clip_frame, clip_direction")
    ev.add_argument("--judge", default="", help="VLM judge: http(s) URL or module:function (as filter.judge); "
                    "default: none")
    ev.add_argument("--max-frames", type=int, default=49, help="frames measured per clip (default 49)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)
    sweep = sub.add_parser("sweep", help="train a grid or list of config variants, tabulate and plot their metrics",
                           usage="insvie-jax sweep FILE [KEY=VALUE ...] [--dir D] [--emit local|slurm|tpu]\n"
                                 "       insvie-jax sweep report SWEEP_FOLDER")
    sweep.add_argument("file", help="sweep YAML (base, overrides, grid and/or runs), or `report`")
    sweep.add_argument("target", nargs="?", help="after `report`: the sweep's folder (DIR/<name>); otherwise an "
                       "override for every run")
    sweep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every run")
    sweep.add_argument("--dir", default="sweeps", help="where the sweep's folder goes (default: sweeps)")
    sweep.add_argument("--emit", choices=("local", "slurm", "tpu"), help="write one launch command per unfinished "
                       "run (DIR/<name>/commands-<kind>.sh) instead of training here")
    sweep.add_argument("--processes", type=int, default=1, help="processes per run for --emit local (default: 1)")
    sweep.set_defaults(func=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting positional KEY=VALUE overrides at the first option: take the ones after it too.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from insvie_jax.convert.sat import ConvertError
    from insvie_jax.models.params import ParamMismatch

    try:
        return args.func(args)
    except (configlib.ConfigError, ConvertError, ParamMismatch, FileNotFoundError, FileExistsError) as err:
        print(f"insvie-jax: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
