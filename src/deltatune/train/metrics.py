"""Evaluation: accuracy and macro-F1 for classification, loss and perplexity for causal LM."""

from __future__ import annotations

import math

import torch
from torch import nn

from .batches import Encoded, to_device


def macro_f1(predictions: list[int], targets: list[int], num_labels: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in targets or predictions."""
    scores = []
    for c in range(num_labels):
        tp = sum(p == c and t == c for p, t in zip(predictions, targets))
        fp = sum(p == c and t != c for p, t in zip(predictions, targets))
        fn = sum(p != c and t == c for p, t in zip(predictions, targets))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


#: a causal LM's evaluation batch holds at most about this many bytes of float32 logits
LOGITS_BUDGET = 64 << 20


def causal_rows(model: nn.Module, data: Encoded, most: int = 64) -> int:
    """Rows per evaluation batch of a causal LM: as many as keep one batch's logits (rows x
    longest row x vocabulary, float32) within ``LOGITS_BUDGET``. Cross-entropy copies the
    logits twice more, so at 64 rows of 96 tokens over SmolLM2's 49,152-token vocabulary an
    evaluation took 3.6 GB, more than the training it measured."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = head.weight.shape[0] if head is not None else getattr(getattr(model, "config", None), "vocab_size", 1)
    longest = max((len(x) for x in data.input_ids), default=1)
    return max(1, min(most, LOGITS_BUDGET // (4 * longest * vocab)))


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, batch_size: int = 64, num_labels: int = 2,
             outputs: int | None = None) -> dict[str, float]:
    """Metrics of ``model`` on ``data`` in eval mode (restores the previous mode); ``outputs``:
    read only a classifier's first ``outputs`` logits (a head wider than this task's labels).
    A causal LM is evaluated in batches of at most ``batch_size`` rows that also keep their logits
    small (:func:`causal_rows`)."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        if data.task == "classification":
            predictions: list[int] = []
            total = 0.0
            for start in range(0, len(data), batch_size):
                batch = to_device(data.collate(list(range(start, min(start + batch_size, len(data))))), device)
                labels = batch.pop("labels")
                logits = model(**batch).logits[..., :outputs]
                total += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
                predictions += logits.argmax(-1).cpu().tolist()
            accuracy = sum(p == t for p, t in zip(predictions, data.labels)) / max(1, len(data))
            return {"accuracy": accuracy, "macro_f1": macro_f1(predictions, data.labels, num_labels),
                    "loss": total / max(1, len(data))}
        total, tokens = 0.0, 0
        batch_size = causal_rows(model, data, batch_size)
        for start in range(0, len(data), batch_size):
            batch = to_device(data.collate(list(range(start, min(start + batch_size, len(data))))), device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = logits[:, -batch["labels"].shape[1]:]  # prompt tuning prepends virtual positions
            shifted = batch["labels"][:, 1:]
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                               ignore_index=-100, reduction="sum")
            total += loss.item()
            tokens += int((shifted != -100).sum())
        mean = total / max(1, tokens)
        return {"loss": mean, "perplexity": math.exp(min(mean, 50))}
    finally:
        model.train(was_training)
