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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="insvie-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="train an edit model (default: the tiny config on synthetic data)")
    _config_args(train)
    train.set_defaults(func=cmd_train)
    show = sub.add_parser("config", help="print the resolved config")
    _config_args(show)
    show.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except configlib.ConfigError as err:
        print(f"insvie-jax: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
