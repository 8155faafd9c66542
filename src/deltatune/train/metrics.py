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


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, batch_size: int = 64, num_labels: int = 2,
             outputs: int | None = None) -> dict[str, float]:
    """Metrics of ``model`` on ``data`` in eval mode (restores the previous mode); ``outputs``:
    read only a classifier's first ``outputs`` logits (a head wider than this task's labels)."""
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
