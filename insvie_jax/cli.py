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
    try:
        summary = loop.run(cfg)
    except loop.TrainingStopped as err:
        print(f"insvie-jax train: {err}", file=sys.stderr)
        return 3
    print(json.dumps(summary, indent=2))
    return 143 if summary["interrupted"] else 0  # 128 + SIGTERM: stopped early, checkpoint saved


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
