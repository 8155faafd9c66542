"""``deltatune methods`` and ``deltatune inspect DIR``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.registry import method_specs
from ..io.artifact import TENSORS_FILE, read_meta


def _methods(args: argparse.Namespace) -> int:
    """Every registered method with what it declares about itself."""
    rows = [("method", "merge", "mixed batch", "compose", "peft", "lr", "what trains")]
    for spec in method_specs():
        rows.append((spec.name, "yes" if spec.mergeable else "no", spec.mixing.mode + ("" if spec.mixing.with_base else
                     ", own batch") if not spec.mixing.group_by else f"{spec.mixing.mode} by {', '.join(spec.mixing.group_by)}",
                     "stack only" if spec.stack_only else "fusion" if spec.fuses else "any block",
                     spec.peft.peft_type if spec.peft is not None else "-",
                     f"{spec.default_lr:g}" if spec.default_lr is not None else "API", spec.summary))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def _inspect(args: argparse.Namespace) -> int:
    meta = read_meta(args.directory)
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    size = (Path(args.directory) / TENSORS_FILE).stat().st_size
    config = {k: v for k, v in meta["config"].items() if v not in (None, [], ())}
    print(f"delta     {meta['name']} ({meta['method']}), deltatune {meta['deltatune_version']}, schema {meta['schema_version']}")
    print(f"config    {json.dumps(config)}")
    print(f"tensors   {len(meta['tensors'])} tensors, {meta['num_parameters']:,} parameters, {size:,} bytes")
    for key, info in list(meta["tensors"].items())[:8]:
        print(f"          {key} {info['shape']} {info['dtype']}")
    if len(meta["tensors"]) > 8:
        print(f"          ... {len(meta['tensors']) - 8} more")
    base = meta["base"]
    print(f"base      {base['model_class']} ({base['model_type']}), fingerprint {base['sha256'][:16]} over {len(base['modules'])} modules")
    labels = meta.get("labels")
    print(f"means     task {meta.get('task') or 'unknown'}, "
          f"{'labels ' + json.dumps(labels) if labels else 'no label names recorded'}")
    if meta.get("metrics"):
        print(f"metrics   {json.dumps(meta['metrics'])}")
    return 0


def add_parsers(commands) -> None:
    commands.add_parser("methods", help="list the registered delta methods").set_defaults(run=_methods)
    inspect = commands.add_parser("inspect", help="show a saved delta: method, config, tensors, size, base, task and "
                                                  "labels, metrics")
    inspect.add_argument("directory")
    inspect.add_argument("--json", action="store_true", help="print delta.json as it is")
    inspect.set_defaults(run=_inspect)
