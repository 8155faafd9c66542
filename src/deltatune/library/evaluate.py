"""``deltatune eval --delta auto``: a dataset's test split, each row routed by the library."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from ..data.datasets import load_dataset
from ..data.files import DataError
from ..models.load import load_model
from .auto import route_auto
from .heads import RowHeads
from .index import Library


def routed_answers(model: torch.nn.Module, tokenizer: Any, library: Library, texts: list[str], *,
                   router: str = "centroid", top_k: int = 1, batch_size: int = 32,
                   max_length: int = 128) -> tuple[list[str], list[str]]:
    """``(chosen delta, answered label)`` for every text: routed by ``router`` over the library's
    deltas for the base, answered by the chosen delta's own head."""
    heads = RowHeads(model, library)
    choices, answers = [], []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        with torch.no_grad(), route_auto(model, library, batch, router=router, top_k=top_k, heads=False) as chosen:
            with heads.capture(chosen.deltas):
                model(**batch)
            choice = chosen.choice
        choices += choice
        answers += heads.answer(choice)
    return choices, answers


def evaluate_auto(library: Library, model_name: str, data: str, *, router: str = "centroid", top_k: int = 1,
                  seed: int = 0, max_length: int = 128, limit: int | None = None, text_column: str = "text",
                  label_column: str = "label", batch_size: int = 32) -> dict[str, Any]:
    """Accuracy on ``data``'s test split with no delta named: which delta each row went to, and
    whether its head gave the row's label.

    Raises:
        DataError: the dataset is not a classification task.
        LibraryError: the library has no delta for this base (see :func:`route_auto`).
    """
    splits = load_dataset(data, seed, text_column=text_column, label_column=label_column, limit=limit)
    if splits.task != "classification":
        raise DataError(f"eval --delta auto answers rows with the routed delta's head; dataset {splits.name!r} is a "
                        f"{splits.task} task, evaluate a named delta on it instead")
    torch.manual_seed(seed)
    loaded = load_model(model_name, splits.task, max(2, len(splits.labels)))
    model = loaded.model.eval()
    texts = [example.text for example in splits.test]
    choices, answers = routed_answers(model, loaded.tokenizer, library, texts, router=router, top_k=top_k,
                                      max_length=max_length, batch_size=batch_size)
    right = sum(answer == example.label for answer, example in zip(answers, splits.test))
    return {"delta": "auto", "router": router, "top_k": top_k if router == "arrow" else None, "library": str(library.db),
            "data": splits.describe(),
            "test": {"accuracy": right / len(texts), "routed": dict(Counter(choices).most_common())}}
