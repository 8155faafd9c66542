"""``deltatune bench``: deltatune side by side with peft, each measurement in a fresh process."""

from __future__ import annotations

import argparse

from ..bench import run as bench_run


def add_parsers(commands) -> None:
    parser = commands.add_parser("bench", help="benchmark deltatune against peft (writes bench/results.*)",
                                 description=bench_run.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_run.add_arguments(parser)
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    return bench_run.run(args)
