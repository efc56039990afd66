"""Command line: ``vlmtune train CONFIG.yaml [key.path=value ...]``. Thin: parse -> config -> recipe."""

from __future__ import annotations

import argparse
import sys

from vlmtune.config import ConfigError, load_config, reference
from vlmtune.data.sharegpt import DataError


def _train(args: argparse.Namespace) -> int:
    from vlmtune.tracking import echo
    from vlmtune.train import train

    cfg = load_config(args.config, args.overrides, echo=echo)
    train(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtune", description="Fine-tune vision-language models component by component.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "train",
        help="fine-tune from a YAML config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train from a YAML file (vlmtune keys or flat LLaMA-Factory keys), then key.path=value overrides.",
        epilog="config reference:\n" + "\n".join(reference()),
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.max_steps=50 groups.projector.lr=1e-3")
    p.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
