"""The `llmemb` command: one parser, subcommands registered by the training and service packages."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from service.cli import register as register_service
    from training.cli import register as register_training

    parser = argparse.ArgumentParser(prog="llmemb", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_training(sub)
    register_service(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
