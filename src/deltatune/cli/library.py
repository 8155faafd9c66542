"""``deltatune library add|list|search|show|rm|verify|centroid``: the SQLite index of delta folders."""

from __future__ import annotations

import argparse
import json

from ..library import LIBRARY_ENV, OK, DeltaRecord, Library, Query, default_db


def _library(args: argparse.Namespace) -> Library:
    return Library(args.db)


def _table(records: list[DeltaRecord], as_json: bool) -> None:
    if as_json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
        return
    if not records:
        print("(no deltas)")
        return
    rows = [("name", "status", "method", "task", "base", "accuracy", "tags")]
    for r in records:
        accuracy = r.metrics.get("test.accuracy", r.metrics.get("accuracy"))
        rows.append((r.name, r.status, r.method, r.task or "-", f"{r.model_class or '?'} {r.fingerprint[:12]}",
                     f"{accuracy:.3f}" if accuracy is not None else "-", ",".join(r.tags) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for r in records:
        if r.status != OK:
            print(f"{r.name}: {r.status}: {r.problem}")


def _add(args: argparse.Namespace) -> int:
    record = _library(args).add(args.folder, name=args.name, tags=args.tag, note=args.note, replace=args.replace)
    print(f"added {record.name} ({record.method}, {record.model_class} {record.fingerprint[:12]}) to {args.db}")
    return 0


def _list(args: argparse.Namespace) -> int:
    _table(_library(args).list(), args.json)
    return 0


def _search(args: argparse.Namespace) -> int:
    query = Query(fingerprint=args.fingerprint, base=args.base, method=args.method, task=args.task,
                  labels=tuple(args.label), tags=tuple(args.tag), metrics=tuple(args.metric), text=args.text)
    _table(_library(args).search(query), args.json)
    return 0


def _show(args: argparse.Namespace) -> int:
    print(json.dumps(_library(args).get(args.name).to_dict(), indent=2))
    return 0


def _rm(args: argparse.Namespace) -> int:
    _library(args).remove(args.name)
    print(f"removed {args.name} from {args.db} (its folder is untouched)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    records = _library(args).verify()
    for r in records:
        print(f"{r.name}: {r.status}" + (f": {r.problem}" if r.problem else ""))
    bad = [r for r in records if r.status != OK]
    print(f"{len(records) - len(bad)} of {len(records)} deltas ok")
    return 1 if bad else 0


def _centroid(args: argparse.Namespace) -> int:
    from ..data.datasets import load_dataset
    from ..library import embed_texts
    from ..models.load import load_model

    library = _library(args)
    library.get(args.name)  # an unknown name fails before the model loads
    splits = load_dataset(args.data, args.seed, text_column=args.text_column, label_column=None)
    texts = [example.text for example in splits.train][: args.limit]
    loaded = load_model(args.model, splits.task, 2 if splits.task == "classification" else None)
    loaded.model.eval()
    vectors = embed_texts(loaded.model, loaded.tokenizer, texts, max_length=args.max_length)
    library.set_centroid(args.name, vectors.mean(0), len(texts))
    print(f"stored the centroid of {len(texts)} training examples of {args.data} for {args.name} "
          f"({vectors.shape[1]} dimensions)")
    return 0


def add_parsers(commands) -> None:
    library = commands.add_parser("library", help="an index of delta folders (SQLite): add, list, search, verify")
    library.add_argument("--db", default=str(default_db()),
                         help=f"the library's database file (default: ${LIBRARY_ENV}, else ~/.deltatune/library.db)")
    actions = library.add_subparsers(dest="action", required=True)

    add = actions.add_parser("add", help="index a delta folder (its delta.json, metrics.json and checksums)")
    add.add_argument("folder", help="a delta folder (written by train --out or deltatune.save)")
    add.add_argument("--name", default=None, help="the name in the library (default: the delta's saved name)")
    add.add_argument("--tag", action="append", default=[], help="a tag to search by (repeatable)")
    add.add_argument("--note", default="", help="free text, searched by search --text")
    add.add_argument("--replace", action="store_true", help="record this folder under a name already taken")
    add.set_defaults(run=_add)

    listing = actions.add_parser("list", help="every delta with its folder's status (ok, changed, missing, corrupt)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_list)

    search = actions.add_parser("search", help="deltas that pass every filter given")
    search.add_argument("--fingerprint", default=None, help="base fingerprint (delta.json base.sha256) or its prefix")
    search.add_argument("--base", default=None, help="the base's model class or model type (bert)")
    search.add_argument("--method", default=None)
    search.add_argument("--task", default=None, help="classification or causal_lm")
    search.add_argument("--label", action="append", default=[], help="a label name the delta knows (repeatable)")
    search.add_argument("--tag", action="append", default=[], help="a tag it carries (repeatable)")
    search.add_argument("--metric", action="append", default=[], metavar="NAME>=VALUE",
                        help="a metric threshold, e.g. 'accuracy>=0.8' (repeatable)")
    search.add_argument("--text", default=None, help="words in the name or note")
    search.add_argument("--json", action="store_true")
    search.set_defaults(run=_search)

    show = actions.add_parser("show", help="everything recorded of one delta, as JSON")
    show.add_argument("name")
    show.set_defaults(run=_show)

    rm = actions.add_parser("rm", help="take a delta out of the index (its folder stays)")
    rm.add_argument("name")
    rm.set_defaults(run=_rm)

    verify = actions.add_parser("verify", help="hash every folder again; exit 1 when one is changed, missing or corrupt")
    verify.set_defaults(run=_verify)

    centroid = actions.add_parser("centroid", help="store the mean embedding of a delta's training examples "
                                                   "(for route_auto's centroid router)")
    centroid.add_argument("name")
    centroid.add_argument("--model", required=True, help="the base: minilm, smollm2 or a local folder")
    centroid.add_argument("--data", required=True, help="the dataset the delta was trained on")
    centroid.add_argument("--text-column", default="text")
    centroid.add_argument("--seed", type=int, default=0, help="the split seed of its training")
    centroid.add_argument("--limit", type=int, default=512, help="embed at most this many training examples")
    centroid.add_argument("--max-length", type=int, default=128)
    centroid.set_defaults(run=_centroid)
