"""``deltatune merge A B ... --method ... --out DIR``: merge saved deltas into one."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..algebra.merge_heads import HEAD_POLICIES
from ..algebra.merging import METHODS, merge_deltas
from ..io.artifact import read_meta, save
from ..models.load import ModelError, model_folder


def _heads(value: str) -> str | int:
    if value.lstrip("-").isdigit():
        return int(value)
    if value not in HEAD_POLICIES:
        raise argparse.ArgumentTypeError(f"--heads takes {', '.join(HEAD_POLICIES)} or a source index (0, 1, ...), "
                                         f"not {value!r}")
    return value


def load_base_model(meta: dict, model: str | None):
    """The base a saved delta was made for: ``model`` or its ``provenance.model``, as the
    model class recorded in its fingerprint (a classifier gets as many labels as its saved head has).

    Raises:
        ModelError: no model given and none recorded, or the recorded class is unknown.
    """
    import torch
    import transformers

    name = model or meta.get("provenance", {}).get("model")
    if not name:
        raise ModelError(f"delta {meta['name']!r} records no base model (provenance.model); "
                         f"pass --model NAME_OR_FOLDER")
    class_name = meta["base"].get("model_class") or "AutoModel"
    model_class = getattr(transformers, class_name, None)
    if model_class is None or not hasattr(model_class, "from_pretrained"):
        raise ModelError(f"delta {meta['name']!r} was made for {class_name}, which this transformers does not provide")
    options = {"dtype": torch.float32}
    if class_name.endswith("ForSequenceClassification"):
        saved = tuple(f"{path}.copy." for path in meta.get("modules_to_save", []))
        heads = [info["shape"] for key, info in meta["tensors"].items()
                 if key.startswith(saved) and len(info["shape"]) == 2]
        if heads:
            options["num_labels"] = heads[-1][0]
    from transformers.utils import logging

    logging.set_verbosity_error()
    return name, model_class.from_pretrained(model_folder(name), **options)


def _merge(args: argparse.Namespace) -> int:
    chosen = args.heads if isinstance(args.heads, int) and 0 <= args.heads < len(args.deltas) else 0
    meta = read_meta(args.deltas[chosen])  # the base gets the head shape of the delta whose head is kept
    model_name, model = load_base_model(meta, args.model)
    report = merge_deltas(model, [Path(d) for d in args.deltas], method=args.method, weights=args.weights,
                          density=args.density, rank=args.rank, seed=args.seed, penalty=args.penalty,
                          metric=args.metric, heads=args.heads, name=args.name)
    save(model, args.out, report.name, provenance={"model": model_name, "merge": report.to_dict()})
    if report.warning:
        print(f"deltatune: warning: {report.warning}", file=sys.stderr)
    print(report)
    print(json.dumps({"result": report.result, "weights": list(report.weights)}))
    print(f"wrote {args.out}/")
    return 0


def add_parsers(commands) -> None:
    merge = commands.add_parser("merge", help="merge saved deltas into one (linear, cat, svd, ties, dare, ...)")
    merge.add_argument("deltas", nargs="+", help="delta folders, all made for the same base")
    merge.add_argument("--method", default="linear",
                       help="; ".join(f"{name}: {text}" for name, text in METHODS.items()))
    merge.add_argument("--weights", type=float, nargs="+", default=None,
                       help="one weight per delta (default: 1 each for cat/ties/dare_ties, else 1/N each)")
    merge.add_argument("--density", type=float, default=0.5, help="fraction kept by ties, dare_* and magnitude_prune")
    merge.add_argument("--rank", type=int, default=None, help="compress the result to this rank (required for svd)")
    merge.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops")
    merge.add_argument("--penalty", type=float, default=1.0, help="metrics: weights exp(-penalty * metric), normalised")
    merge.add_argument("--metric", default="test.loss", help="metrics: dotted key into each delta.json's metrics")
    merge.add_argument("--heads", type=_heads, default="merge", metavar="{merge,identical,drop,INDEX}",
                       help="trained head copies (modules_to_save) to carry: merge (default: the weighted average "
                            "of heads with the same shapes and label names, weights normalised to sum 1, for every "
                            "method), identical (only if all are equal), drop (none), or a source index such as 0 "
                            "(that delta's head, e.g. to merge deltas of different tasks)")
    merge.add_argument("--model", default=None, help="the base (default: the first delta's provenance.model)")
    merge.add_argument("--name", default="merged", help="name of the merged delta")
    merge.add_argument("--out", required=True, help="output folder for the merged delta")
    merge.set_defaults(run=_merge)
