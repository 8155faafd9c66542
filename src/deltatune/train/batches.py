"""Turning examples into padded tensor batches, deterministically by step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.chat import chat_prompt
from ..data.datasets import DataError, Example

IGNORE = -100


@dataclass
class Encoded:
    """Tokenised examples: one id list (and label or label-id list) per example."""

    input_ids: list[list[int]]
    labels: list  # int per example (classification) or list[int] per example (causal LM)
    task: str
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """A right-padded batch of the given rows."""
        ids = [self.input_ids[i] for i in rows]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, x in enumerate(ids):
            input_ids[r, : len(x)] = torch.tensor(x)
            mask[r, : len(x)] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if self.task == "classification":
            batch["labels"] = torch.tensor([self.labels[i] for i in rows], dtype=torch.long)
        else:
            labels = torch.full((len(ids), width), IGNORE, dtype=torch.long)
            for r, i in enumerate(rows):
                labels[r, : len(self.labels[i])] = torch.tensor(self.labels[i])
            batch["labels"] = labels
        return batch


def encode(examples: list[Example], tokenizer, task: str, max_length: int, labels: list[str] | None = None) -> Encoded:
    """Tokenise examples; causal LM examples learn only from their completion tokens."""
    if max_length < 8:
        raise DataError(f"max_length {max_length} is too small; use at least 8 tokens (64 suits short texts)")
    if task == "classification":
        index = {label: i for i, label in enumerate(labels or [])}
        ids = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)["input_ids"]
        return Encoded(ids, [index[e.label] for e in examples], task, tokenizer.pad_token_id)
    prompts = [chat_prompt(tokenizer, e.text) for e in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer([e.completion + (tokenizer.eos_token or "") for e in examples], add_special_tokens=False)["input_ids"]
    all_ids, all_labels, too_long = [], [], 0
    for p, a in zip(prompt_ids, answer_ids):
        if len(p) >= max_length:
            too_long += 1
            continue
        ids = (p + a)[:max_length]
        all_ids.append(ids)
        all_labels.append([IGNORE] * len(p) + ids[len(p):])
    if not all_ids:
        raise DataError(f"every prompt is longer than max_length {max_length}; raise --max-length")
    return Encoded(all_ids, all_labels, task, tokenizer.pad_token_id)


class BatchPlan:
    """Which rows make up global step ``s``: a seeded permutation per epoch, so a run
    resumed at any step sees exactly the batches an uninterrupted run would."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.steps_per_epoch = max(1, math.ceil(size / batch_size))
        self._epoch, self._order = -1, None

    def rows(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order, self._epoch = torch.randperm(self.size, generator=generator).tolist(), epoch
        return self._order[index * self.batch_size:(index + 1) * self.batch_size]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return batch if device.type == "cpu" else {k: v.to(device, non_blocking=True) for k, v in batch.items()}
