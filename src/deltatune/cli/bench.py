"""``deltatune bench``: deltatune side by side with peft, each measurement in a fresh process."""

from __future__ import annotations

import argparse


def add_parsers(commands) -> None:
    from ..bench.run import __doc__ as doc
    from ..bench.run import add_arguments

    parser = commands.add_parser("bench", help="benchmark deltatune against peft (writes bench/results.*)",
                                 description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from ..bench.run import run

    return run(args)
