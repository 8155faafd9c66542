"""The ``deltatune`` command line: a thin shell over the Python API.

Each command lives in its own module and registers its flags with ``add_parser``.
"""

from __future__ import annotations

import argparse
import sys

from . import algebra, bench, demo, generate, info, interop, merge, serve, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Delta tuning: train, save, merge and serve small deltas.")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (train, demo, info, generate, bench, algebra, merge, interop, serve):
        module.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deltatune`` console script; exit code 2 for bad input."""
    from ..errors import DeltaError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except DeltaError as error:
        print(f"deltatune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deltatune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
