"""The user's own data files, read with the ``datasets`` library.

``--data`` takes a ``.csv``/``.tsv``, ``.json``/``.jsonl``, ``.parquet`` or ``.arrow`` file, or
a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (all its splits
are read: deltatune makes its own seeded, deduplicated split, as for every dataset). The files
are read in memory with a throw-away cache, so nothing is written beside them or under
``~/.cache``.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

from ..errors import DeltaError

#: file suffix -> (datasets builder, its extra arguments)
BUILDERS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".arrow": ("arrow", {}),
}
SUFFIXES = tuple(BUILDERS)


class DataError(DeltaError, ValueError):
    """A dataset is missing, empty, or does not have the columns or labels it needs."""


def is_data_path(name: str) -> bool:
    """Whether ``--data NAME`` names a file or ``save_to_disk`` folder (rather than a packaged dataset)."""
    return name.endswith(SUFFIXES) or (Path(name) / "dataset_dict.json").is_file() \
        or (Path(name) / "dataset_info.json").is_file()


def read_table(path: Path):
    """The rows of a data file or ``save_to_disk`` folder as one ``datasets.Dataset``."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets  # imported here: the packaged datasets and the CLI's start-up do not need it

    datasets.disable_progress_bars()
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as error:
            raise DataError(f"{path} is not a folder written by save_to_disk: {error}") from None
        if isinstance(loaded, datasets.DatasetDict):
            loaded = datasets.concatenate_datasets(list(loaded.values()))
        return loaded
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    if path.suffix not in BUILDERS:
        raise DataError(f"data file {path} must end in {', '.join(SUFFIXES)} (or be a save_to_disk folder)")
    builder, options = BUILDERS[path.suffix]
    if _no_rows(path):
        raise DataError(f"dataset {str(path)!r} is empty: it has no rows")
    with tempfile.TemporaryDirectory(prefix="deltatune-data-") as cache:
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                         keep_in_memory=True, **options)
        except Exception as error:  # the builders raise many kinds (ArrowInvalid, DatasetGenerationError, ...)
            cause = error.__cause__ or error
            raise DataError(f"cannot read {path} as {builder}: {type(cause).__name__}: {cause}; "
                                f"check that the file is complete and in that format") from None


def _no_rows(path: Path) -> bool:
    """A text file with nothing but a header (CSV/TSV) or nothing at all (JSON Lines); datasets cannot read those."""
    if path.suffix not in (".csv", ".tsv", ".jsonl"):
        return False
    with open(path, "rb") as handle:
        lines = list(itertools.islice((line for line in handle if line.strip()), 2))
    return len(lines) <= (1 if path.suffix != ".jsonl" else 0)


def read_columns(path: Path, wanted: list[str]) -> dict[str, list]:
    """The ``wanted`` columns of a data file; a missing one lists the columns that exist."""
    table = read_table(path)
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise DataError(
            f"{path} has no column {missing[0]!r}; its columns are {sorted(table.column_names)}. "
            f"Name the right ones with --text-column / --label-column / --completion-column"
        )
    return {c: table[c] for c in wanted}
