"""The ``deltatune`` command line: a thin shell over the Python API.

Each command lives in its own module and registers its flags with ``add_parser``.
"""

from __future__ import annotations

import argparse
import sys

import os

from ..core.registry import PLUGIN_ENV, load_plugins
from ..errors import DeltaError, NotApplicableError
from . import algebra, bench, compare, demo, edit, federate, generate, info, interop, library, merge, plan, serve, sweep, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Delta tuning: train, save, merge and serve small deltas.")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import a module that registers delta methods (repeatable); also read from "
                             "$DELTATUNE_PLUGINS, and installed packages' deltatune.methods entry points load by "
                             "themselves")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (train, demo, compare, sweep, plan, info, generate, edit, bench, algebra, merge, interop, serve,
                   library, federate):
        module.add_parsers(commands)
    return parser


def _plugins(argv: list[str]) -> list[str]:
    """The ``--plugin`` modules, read before the full parser is built (their methods' flags are in it)."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--plugin", action="append", default=[])
    return early.parse_known_args(argv)[0].plugin


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deltatune`` console script: exit code 2 for bad input, 3 when the
    chosen method cannot apply to the model at all (:class:`NotApplicableError`: ``compare``
    records such a method as not applicable instead of stopping)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    plugins = _plugins(argv)
    try:
        if plugins:
            load_plugins(plugins)
            # processes this command starts (compare's trainings, servers) load them too
            known = [m for m in os.environ.get(PLUGIN_ENV, "").split(",") if m]
            os.environ[PLUGIN_ENV] = ",".join(dict.fromkeys([*known, *plugins]))
    except DeltaError as error:
        print(f"deltatune: error: {error}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except NotApplicableError as error:
        print(f"deltatune: error: {error}", file=sys.stderr)
        return NotApplicableError.exit_code
    except DeltaError as error:
        print(f"deltatune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deltatune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
