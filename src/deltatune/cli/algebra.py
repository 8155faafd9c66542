"""``deltatune extract``, ``deltatune compress``, ``deltatune fold`` and ``deltatune eigenbasis``."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import deltatune as dt
from ..algebra.compress import compress
from ..algebra.eigenbasis import eigen_basis, save_basis
from ..algebra.extract import extract_lora
from ..data.datasets import load_dataset
from ..errors import ConfigError, DeltaError
from ..io.artifact import head_rows, read_meta
from ..methods.head import find_head
from ..models.load import load_model, model_folder
from ..train.job import TrainJob


def _extract(args: argparse.Namespace) -> int:
    import torch

    finetuned, model_class = _load_finetuned(Path(args.finetuned))
    torch.manual_seed(args.seed)  # a head the fine-tune has and the base lacks starts random; carry it
    base = _load_like(args.base, model_class, finetuned.config)
    carry = args.modules_to_save
    if carry is None:
        head = find_head(finetuned)
        carry = [head] if head else []
    model, report = extract_lora(base, finetuned, args.rank, args.energy, targets=args.targets, modules_to_save=carry,
                                 name=args.name, randomized=args.randomized, seed=args.seed)
    print(report)
    summary = {"energy_kept": report.energy_kept, "relative_error": report.relative_error,
               "ranks": {layer.path: layer.rank for layer in report.layers}}
    dt.save(model, args.out, args.name, metrics={"extraction": summary},
            provenance={"model": args.base, "extracted_from": str(args.finetuned)})
    print(f"wrote {args.out}/")
    return 0


def _load_finetuned(directory: Path):
    """A full fine-tune saved with ``save_pretrained`` (or a ``train --method full`` folder) and its class name."""
    import transformers

    folder = directory if (directory / "config.json").is_file() else directory / "model"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{directory} holds no config.json (nor model/config.json); --finetuned takes a "
                          f"transformers model folder, such as the out folder of `deltatune train --method full`")
    config = transformers.AutoConfig.from_pretrained(folder)
    model_class = (getattr(config, "architectures", None) or [""])[0]
    model_type = getattr(transformers, model_class, None)
    if model_type is None or not hasattr(model_type, "from_pretrained"):
        raise ConfigError(f"{folder}/config.json names the architecture {model_class!r}, which transformers does not "
                          f"provide; extract in Python with deltatune.algebra.extract.extract_lora")
    return model_type.from_pretrained(folder).eval(), model_class


def _load_like(name: str, model_class: str, config):
    """The base model ``name`` (packaged name or folder) as ``model_class``, with ``config``'s labels."""
    import transformers

    kwargs = {}
    if model_class.endswith("ForSequenceClassification"):
        kwargs = {"num_labels": config.num_labels, "id2label": config.id2label, "label2id": config.label2id}
    return getattr(transformers, model_class).from_pretrained(model_folder(name), **kwargs).eval()


def _compress(args: argparse.Namespace) -> int:
    print(compress(args.directory, args.out, density=args.density, bits=args.bits))
    return 0


def _fold(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not empty; pass a new folder to --out (or remove it)")
    meta = read_meta(args.directory)
    name = args.model or meta.get("provenance", {}).get("model")
    if not name:
        raise ConfigError(f"{args.directory}/delta.json does not record its base model; pass --model (minilm, "
                          f"smollm2 or a transformers folder)")
    model, tokenizer = _base_for(meta, name, Path(args.directory))
    dt.load(model, args.directory)
    dt.fold(model)
    staging = out.with_name(f"{out.name}.partial-{os.getpid()}")
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"folded {meta['name']!r} ({meta['method']}) into {name} -> {out}/ (a plain transformers folder)")
    return 0


def _eigenbasis(args: argparse.Namespace) -> int:
    meta = read_meta(args.sources[0])
    name = args.model or meta.get("provenance", {}).get("model")
    if not name:
        raise ConfigError(f"{args.sources[0]}/delta.json does not record its base model; pass --model (minilm, "
                          f"smollm2 or a transformers folder)")
    model, _ = _base_for(meta, name, Path(args.sources[0]))
    basis = eigen_basis(model, args.sources, args.k, augment=args.augment, seed=args.seed)
    save_basis(basis, args.out)
    first = basis.sites[next(iter(basis.sites))]
    print(f"eigenlora basis of {len(args.sources)} deltas on {name}: {len(basis.sites)} modules, {basis.k} principal "
          f"+ {basis.augment} random components per side (first module's singular values "
          f"{[round(float(v), 4) for v in first.up_values]}) -> {args.out}")
    print(f"train a new task over it: deltatune train --method eigenlora --basis {args.out} --k {basis.size} ...")
    return 0


def _base_for(meta: dict, name: str, directory: Path):
    """The delta's base model and tokenizer, built as the delta's ``model_class`` records."""
    import torch
    import transformers

    model_class = meta["base"].get("model_class") or ""
    torch.manual_seed(0)
    if model_class.endswith("ForSequenceClassification"):
        rows = head_rows(meta)
        if rows is None:
            print("deltatune: warning: the delta carries no classification head; the folded model keeps the base's "
                  "untrained one", file=sys.stderr)
        recorded = meta.get("labels")
        labels = list(recorded) if recorded and len(recorded) == rows else _run_labels(directory, rows)
        loaded = load_model(name, "classification", rows, labels)
        return loaded.model, loaded.tokenizer
    if model_class.endswith(("ForCausalLM", "LMHeadModel")):
        loaded = load_model(name, "causal_lm")
        return loaded.model, loaded.tokenizer
    model_type = getattr(transformers, model_class, None)
    if model_type is None or not hasattr(model_type, "from_pretrained"):
        raise ConfigError(f"delta {meta['name']!r} was made on a {model_class or 'non-transformers model'}, which "
                          f"cannot be rebuilt from a folder; fold it in Python with deltatune.fold(model)")
    folder = model_folder(name)
    return model_type.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)


def _run_labels(directory: Path, rows: int | None) -> list[str] | None:
    """The label names of the training run the delta came from (its ``config.yaml``), if known."""
    if not (directory / "config.yaml").is_file():
        return None
    try:
        job = TrainJob.from_yaml(directory / "config.yaml")
        labels = load_dataset(job.data, job.seed, text_column=job.text_column, label_column=job.label_column,
                              completion_column=job.completion_column, limit=job.limit).labels
    except DeltaError:
        return None
    return labels if labels and len(labels) == rows else None


def _bits(value: str) -> int:
    if value == "ternary":
        return 2
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits takes 8, 2 or ternary, not {value!r}") from None


def add_parsers(commands) -> None:
    extract = commands.add_parser("extract", help="extract a LoRA from a full fine-tune and its base (truncated SVD)")
    extract.add_argument("--base", required=True, help="the base: minilm, smollm2 or a transformers folder")
    extract.add_argument("--finetuned", required=True, metavar="DIR",
                         help="the full fine-tune: a transformers folder, or a `train --method full` out folder")
    size = extract.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="rank of every layer's LoRA")
    size.add_argument("--energy", type=float, help="per layer, the smallest rank keeping this fraction of the change")
    extract.add_argument("--targets", nargs="+", default=None, help="module patterns (default: every changed Linear)")
    extract.add_argument("--modules-to-save", nargs="*", default=None, metavar="PATTERN",
                         help="modules copied whole from the fine-tune (default: its classification head, if any)")
    extract.add_argument("--randomized", action="store_true", help="randomised SVD (faster on large layers)")
    extract.add_argument("--seed", type=int, default=0, help="seed of the randomised SVD and of a new head")
    extract.add_argument("--name", default="extracted", help="the delta's name")
    extract.add_argument("--out", required=True, help="output delta folder")
    extract.set_defaults(run=_extract)

    compress = commands.add_parser("compress", help="sparsify and/or quantise a saved delta (it still loads as one)")
    compress.add_argument("directory", help="a delta folder")
    compress.add_argument("--density", type=float, default=None, help="keep this fraction of each tensor (top-k)")
    compress.add_argument("--bits", type=_bits, default=None, help="8 (int8) or 2 / ternary, one scale per tensor")
    compress.add_argument("--out", required=True, help="output delta folder")
    compress.set_defaults(run=_compress)

    fold = commands.add_parser("fold", help="merge a delta into its base and save a plain transformers folder")
    fold.add_argument("directory", help="a delta folder")
    fold.add_argument("--out", required=True, help="the model folder to write (new or empty)")
    fold.add_argument("--model", default=None, help="the base (default: the one recorded in delta.json)")
    fold.set_defaults(run=_fold)

    basis = commands.add_parser("eigenbasis", help="the principal subspace of several LoRA deltas of one base, per "
                                                   "module: the frozen basis of `train --method eigenlora --basis`")
    basis.add_argument("sources", nargs="+", metavar="DIR", help="two or more low-rank delta folders of one base")
    basis.add_argument("--k", type=int, required=True, help="principal components kept per side of each module")
    basis.add_argument("--augment", type=int, default=0, help="random orthogonal components added after them")
    basis.add_argument("--seed", type=int, default=0, help="seed of the random components")
    basis.add_argument("--model", default=None, help="the base (default: the one the first delta records)")
    basis.add_argument("--out", required=True, help="the basis file to write (.safetensors)")
    basis.set_defaults(run=_eigenbasis)
