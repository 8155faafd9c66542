"""Labelled data: the packaged datasets, user CSV/JSONL files, deduplicated seeded splits."""

from .datasets import DATASETS, Example, Splits, load_dataset

__all__ = ["DATASETS", "Example", "Splits", "load_dataset"]
