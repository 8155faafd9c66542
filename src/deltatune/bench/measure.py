"""One measurement per process: ``python -m deltatune.bench.measure <kind> '<json-args>'`` prints one JSON line.

The runner (``bench/run.py``) starts one such process per measurement, so peak memory is
that measurement's own.
"""

from __future__ import annotations

import json
import sys

from .decode import decode
from .mixed import mixed
from .precision import precision_ratios, precision_run
from .ratios import inference_ratios, mixed_train, train_ratios
from .serve import serve_rows
from .swap import swap_costs
from .workers import equivalence, setup, train_step


def _swap(args: dict) -> dict:
    return swap_costs(args.get("model", "minilm"), args.get("repeats", 20), args.get("threads", 2))


def _serve(args: dict) -> dict:
    # one torch thread: the HTTP clients and the event loop share the process and need a core
    return {"rows": serve_rows(args.get("model", "minilm"), threads=1)}


KINDS = {"train_step": train_step, "train_ratios": train_ratios, "equivalence": equivalence,
         "inference_ratios": inference_ratios, "mixed": mixed, "mixed_train": mixed_train,
         "decode": decode, "swap": _swap, "serve": _serve, "precision_run": precision_run,
         "precision_ratios": precision_ratios}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in KINDS:
        raise SystemExit(f"usage: python -m deltatune.bench.measure {{{'|'.join(KINDS)}}} '<json-args>'")
    args = json.loads(argv[1])
    setup(args.get("threads", 2))
    print(json.dumps(KINDS[argv[0]](args)), flush=True)


if __name__ == "__main__":
    main()
