"""`imdispatch`: the dispatcher's command line (also `python -m dispatcher`)."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imdispatch", description="Dispatcher for IM long-connection servers."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('imdispatch')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "selfcheck",
        help="check that the compiled selection core is installed and agrees with the reference",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "selfcheck":
        from core_ext import selfcheck

        return 0 if selfcheck.run() else 1
    raise AssertionError(args.command)  # argparse only lets known commands through


if __name__ == "__main__":
    sys.exit(main())
