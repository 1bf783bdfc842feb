"""`imnode`: the IM node's command line (also `python -m imnode`)."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imnode",
        description="TCP long-connection IM server balanced by imdispatch. "
        "The server itself (`imnode serve`) is not built yet.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('imdispatch')}")
    return parser


def main(argv: list[str] | None = None) -> int:
    _parser().parse_args(argv)
    _parser().print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
