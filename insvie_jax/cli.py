"""`insvie-jax`: one command, one function per subcommand; parsing only, no logic of its own."""

from __future__ import annotations

import argparse
import json
import sys

from insvie_jax import config as configlib

DEFAULT_CONFIG = "tiny"


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                        help=f"YAML file or preset name (default: {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.lr=3e-4")


def _split_config(args) -> tuple[str, list[str]]:
    # `insvie-jax train model.num_layers=4` (no config named) means the default config with that override.
    if args.config and "=" in args.config:
        return DEFAULT_CONFIG, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def cmd_train(args) -> int:
    from insvie_jax.train import loop

    path, overrides = _split_config(args)
    cfg = configlib.load(path, overrides)
    summary = loop.run(cfg)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_config(args) -> int:
    import yaml

    path, overrides = _split_config(args)
    print(yaml.safe_dump(configlib.load(path, overrides).to_dict(), sort_keys=False), end="")
    return 0


def cmd_convert(args) -> int:
    from insvie_jax.convert import convert_main

    convert_main(args.src, args.dst, to=args.to, dtype=args.dtype, merge_lora=args.merge_lora,
                 sat_config=args.sat_config)
    return 0


def cmd_encode(args) -> int:
    from insvie_jax.data.encode import encode_lists

    path, overrides = _split_config(args)
    cfg = configlib.load(path, overrides)
    lists = args.list or cfg.data.paths
    if not lists:
        raise configlib.ConfigError("encode: name the triplet lists with --list (or data.paths=[...])")
    manifest = encode_lists(cfg, lists, args.out, show_progress=not args.quiet)
    bad = manifest["bad"]
    print(json.dumps({"out": args.out, "count": manifest["count"], "bad": bad["count"], "bad_by_reason":
                      bad["by_reason"], "buckets": {k: v["count"] for k, v in manifest["buckets"].items()}}, indent=2))
    return 0


def cmd_filter(args) -> int:
    from insvie_jax.data import filters
    from insvie_jax.data.sources import read_lists

    path, overrides = _split_config(args)
    cfg = configlib.load(path, overrides)
    lists = args.list or cfg.data.paths
    if not lists:
        raise configlib.ConfigError("filter: name the triplet lists with --list (or data.paths=[...])")
    triplets, list_report = read_lists(lists, cfg.data.video_roots)
    rows = filters.filter_triplets(cfg, triplets, list_report, filters.make_judge(cfg.data),
                                   show_progress=not args.quiet)
    filters.write_report(rows, args.report)
    summary = {"report": args.report, "triplets": len(rows), "kept": sum(r["keep"] for r in rows)}
    if args.kept:
        filters.write_kept(rows, args.kept)
        summary["kept_list"] = args.kept
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="insvie-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="train an edit model (default: the tiny config on synthetic data)")
    _config_args(train)
    train.set_defaults(func=cmd_train)
    show = sub.add_parser("config", help="print the resolved config")
    _config_args(show)
    show.set_defaults(func=cmd_config)
    convert = sub.add_parser("convert", help="convert a transformer checkpoint between SAT, diffusers and native")
    convert.add_argument("src", help="SAT folder or .pt, diffusers folder, or native folder (format detected)")
    convert.add_argument("dst", help="output folder (or .pt for SAT); must not exist")
    convert.add_argument("--to", choices=("native", "sat", "diffusers"), default="native")
    convert.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    convert.add_argument("--merge-lora", action="store_true", help="merge SAT LoRA adapters into the weights")
    convert.add_argument("--sat-config", help="SAT model yaml, when the shapes cannot tell the config")
    convert.set_defaults(func=cmd_convert)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from insvie_jax.convert.sat import NotACheckpoint
    from insvie_jax.models.params import ParamMismatch

    try:
        return args.func(args)
    except (configlib.ConfigError, NotACheckpoint, ParamMismatch, FileNotFoundError, FileExistsError) as err:
        print(f"insvie-jax: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
