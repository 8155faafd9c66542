"""How well an edit took: efficacy, generalisation and specificity (the CounterFact measures).

- efficacy: on the edit prompt, the new object's first token is the top-1 next token (rate),
  and its probability (mean);
- generalisation: the same on the paraphrased prompts;
- specificity: on the neighbourhood prompts (other subjects, same relation), the mean
  ``KL(base || edited)`` of the next-token distributions, and the rate of prompts whose top-1
  token did not change.

The base's distributions are read with the model's deltas off (:func:`deltatune.base_only`).

Example:
    >>> scores = score_facts(model, tokenizer, facts)
    >>> scores.efficacy_top1, scores.specificity_kl
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.inject import base_only
from .facts import Fact
from .sites import pad_id, target_ids


def next_token_log_probs(model: nn.Module, tokenizer, prompts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Log-probabilities of the token after each prompt, ``(len(prompts), vocab)`` float32."""
    device = next(model.parameters()).device
    out = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            rows = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts[start:start + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(rows):
                ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
            with torch.no_grad():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            last = torch.tensor([len(r) - 1 for r in rows], device=device)
            out.append(F.log_softmax(logits[torch.arange(len(rows), device=device), last].float(), dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


@dataclass(frozen=True)
class FactScores:
    """One fact's measures (rates in [0, 1]; ``None`` where the fact has no such prompts)."""

    subject: str
    target: str
    efficacy_top1: float
    efficacy_probability: float
    generalisation_top1: float | None
    generalisation_probability: float | None
    specificity_kl: float | None
    specificity_unchanged: float | None


@dataclass(frozen=True)
class EditScores:
    """Measures averaged over facts, and each fact's."""

    efficacy_top1: float
    efficacy_probability: float
    generalisation_top1: float | None
    generalisation_probability: float | None
    specificity_kl: float | None
    specificity_unchanged: float | None
    facts: tuple[FactScores, ...]

    def summary(self) -> dict[str, float | None]:
        return {k: v for k, v in asdict(self).items() if k != "facts"}

    def __str__(self) -> str:
        def show(v):
            return "-" if v is None else f"{v:.3f}"
        return (f"efficacy top-1 {show(self.efficacy_top1)} (p {show(self.efficacy_probability)}), "
                f"paraphrases top-1 {show(self.generalisation_top1)} (p {show(self.generalisation_probability)}), "
                f"neighbourhood KL {show(self.specificity_kl)}, unchanged top-1 {show(self.specificity_unchanged)}")


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_facts(model: nn.Module, tokenizer, facts: Sequence[Fact]) -> EditScores:
    """Efficacy, generalisation and specificity of the model's active deltas against its base."""
    per_fact = []
    for fact in facts:
        wanted = target_ids(tokenizer, fact.target)[0]
        edited = next_token_log_probs(model, tokenizer, [fact.text, *fact.paraphrase_texts])
        top = edited.argmax(dim=-1)
        prob = edited[:, wanted].exp()
        kl = unchanged = None
        if fact.neighbourhood:
            after = next_token_log_probs(model, tokenizer, list(fact.neighbourhood))
            with base_only(model):
                before = next_token_log_probs(model, tokenizer, list(fact.neighbourhood))
            kl = float((before.exp() * (before - after)).sum(dim=-1).mean())
            unchanged = float((before.argmax(-1) == after.argmax(-1)).float().mean())
        para = len(fact.paraphrases) > 0
        per_fact.append(FactScores(
            fact.subject, fact.target, float(top[0] == wanted), float(prob[0]),
            float((top[1:] == wanted).float().mean()) if para else None,
            float(prob[1:].mean()) if para else None, kl, unchanged))

    def avg(name):
        return _mean([getattr(s, name) for s in per_fact if getattr(s, name) is not None])

    return EditScores(avg("efficacy_top1"), avg("efficacy_probability"), avg("generalisation_top1"),
                      avg("generalisation_probability"), avg("specificity_kl"), avg("specificity_unchanged"),
                      tuple(per_fact))
