"""The ``deltatune`` command line: a thin shell over the Python API."""

from __future__ import annotations

import argparse
import json
import sys


def _methods(args: argparse.Namespace) -> int:
    from .core.registry import get_method, method_names

    for name in method_names():
        spec = get_method(name)
        merge = "mergeable" if spec.mergeable else "not mergeable"
        print(f"{name:8s} {merge:14s} {spec.summary}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .io.artifact import read_meta

    meta = read_meta(args.directory)
    print(json.dumps(meta, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deltatune`` console script."""
    from .errors import DeltaError

    parser = argparse.ArgumentParser(prog="deltatune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("methods", help="list the registered delta methods").set_defaults(run=_methods)
    inspect = commands.add_parser("inspect", help="show a saved delta's description")
    inspect.add_argument("directory")
    inspect.set_defaults(run=_inspect)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except DeltaError as error:
        print(f"deltatune: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
