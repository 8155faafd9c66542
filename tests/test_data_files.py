"""``--data`` files read with the ``datasets`` library: every format gives the same splits as the CSV."""

from __future__ import annotations

import json

import datasets
import pytest

from deltatune.cli import main
from deltatune.data.datasets import DataError, load_dataset

COLUMNS = dict(text_column="review", label_column="sentiment")


@pytest.fixture
def table(reviews_csv):
    return datasets.Dataset.from_csv(str(reviews_csv), cache_dir=str(reviews_csv.parent / "cache"))


def _write(table, path):
    """The same rows in the format named by ``path``'s suffix (or a save_to_disk folder)."""
    if path.suffix == ".parquet":
        table.to_parquet(str(path))
    elif path.suffix == ".jsonl":
        table.to_json(str(path), lines=True)
    elif path.suffix == ".json":
        path.write_text(json.dumps(table.to_list()))
    elif path.suffix == ".tsv":
        table.to_csv(str(path), sep="\t", index=False)
    elif path.suffix == ".arrow":
        folder = path.with_suffix("")
        table.save_to_disk(str(folder))
        return next(folder.glob("*.arrow"))
    elif path.name == "dict":
        datasets.DatasetDict({"train": table.select(range(80)), "test": table.select(range(80, len(table)))}
                             ).save_to_disk(str(path))
    else:
        table.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("name", ["r.parquet", "r.jsonl", "r.json", "r.tsv", "r.arrow", "saved", "dict"])
def test_every_format_gives_the_csvs_splits(table, reviews_csv, tmp_path, name):
    path = _write(table, tmp_path / name)
    expected = load_dataset(str(reviews_csv), 3, **COLUMNS)
    got = load_dataset(str(path), 3, **COLUMNS)
    assert got.sizes() == expected.sizes() and got.labels == ["neg", "pos"]
    assert got.train == expected.train and got.test == expected.test  # same texts, labels and order


def test_a_parquet_file_trains_from_the_command_line(table, tmp_path, tiny_bert):
    path = _write(table, tmp_path / "reviews.parquet")
    assert main(["train", "--model", str(tiny_bert), "--data", str(path), "--text-column", "review",
                 "--label-column", "sentiment", "--steps", "3", "--batch-size", "8", "--max-length", "16",
                 "--no-progress", "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"]["name"] == str(path) and sum(metrics["data"]["sizes"].values()) == 120


def test_a_missing_column_lists_the_columns_of_a_parquet_file(table, tmp_path):
    path = _write(table, tmp_path / "r.parquet")
    with pytest.raises(DataError, match=r"no column 'text'; its columns are \['review', 'sentiment'\]"):
        load_dataset(str(path))


def test_a_truncated_parquet_file_is_refused_by_name(table, tmp_path):
    path = _write(table, tmp_path / "r.parquet")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match=r"cannot read .*r\.parquet as parquet.*complete"):
        load_dataset(str(path), **COLUMNS)


def test_causal_lm_columns_from_jsonl(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) + "\n" for i in range(12)))
    splits = load_dataset(str(path), text_column="q", completion_column="a")
    assert splits.task == "causal_lm" and splits.sizes() == {"train": 9, "validation": 1, "test": 2}
    assert all(e.completion == e.text.replace("question", "answer") for e in splits.train)


def test_an_unknown_suffix_and_a_missing_file_are_named(tmp_path):
    with pytest.raises(DataError, match="unknown dataset .*a save_to_disk folder"):
        load_dataset(str(tmp_path / "data.xlsx"))
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "none.parquet"))


def test_reading_writes_nothing_beside_the_file(table, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    path = _write(table, folder / "r.parquet")
    load_dataset(str(path), **COLUMNS)
    assert [p.name for p in folder.iterdir()] == ["r.parquet"]
