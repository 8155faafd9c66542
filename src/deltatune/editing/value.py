"""The value of an edit: the vector a layer must add at the subject's last token for the model
to continue the prompt with the new object (ROME's v* search, also MEMIT's target search).

A vector ``delta`` is added to the output of one down projection at the subject's last token
(in every context) and optimised with Adam on the new object's negative log-likelihood, plus
a KL term keeping the next-token distribution after ``"{subject} is a"`` close to the base's
(the subject's "essence"), plus weight decay ``||delta||² / ||v||²``; its norm is clamped to
``clamp * ||v||``, ``v`` the layer's output there before the edit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, EditError
from .facts import Fact
from .sites import Prompt, batch, contexts, first, frozen, mean_at_subject, pad_id, subject_prompt

ESSENCE = "{} is a"


@dataclass(frozen=True)
class EditSettings:
    """How the value is searched for.

    Args:
        steps: most Adam steps.
        lr: Adam's learning rate on the added vector.
        kl_weight: weight of the KL term on ``"{subject} is a"``.
        weight_decay: weight of ``||delta||² / ||v||²``.
        clamp: the largest ``||delta|| / ||v||``.
        stop_probability: stop early once the new object's mean probability reaches this.
        min_probability: below this at the end the edit failed (:class:`EditError`, nothing written).
        mom2_weight: MEMIT's λ, the weight of the key statistics against the new keys.
    """

    steps: int = 25
    lr: float = 0.5
    kl_weight: float = 0.0625
    weight_decay: float = 0.5
    clamp: float = 4.0
    stop_probability: float = 0.95
    min_probability: float = 0.2
    mom2_weight: float = 15000.0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"edit steps must be a positive integer, got {self.steps!r}")
        for name in ("lr", "clamp", "mom2_weight"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"edit {name} must be positive, got {getattr(self, name)!r}")
        for name in ("kl_weight", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"edit {name} must be 0 or positive, got {getattr(self, name)!r}")
        if not 0 <= self.min_probability <= self.stop_probability <= 1:
            raise ConfigError(f"need 0 <= min_probability <= stop_probability <= 1, got {self.min_probability!r} "
                              f"and {self.stop_probability!r}")


@dataclass(frozen=True)
class Value:
    """The found vector: ``delta`` to add at the layer's output, the output ``v`` before it,
    the new object's mean probability reached and the steps taken."""

    delta: torch.Tensor
    output: torch.Tensor
    probability: float
    steps: int


def optimise_value(model: nn.Module, tokenizer, fact: Fact, path: str, settings: EditSettings) -> Value:
    """The vector the module at ``path`` must add at the subject's last token so that the prompt
    continues with ``fact.target``.

    Raises:
        EditError: the new object's probability stays below ``settings.min_probability``.
    """
    rewrites = contexts(tokenizer, fact.prompt, fact.subject, fact.target)
    essence = [subject_prompt(tokenizer, ESSENCE, fact.subject)]
    prompts: list[Prompt] = rewrites + essence
    device = next(model.parameters()).device
    ids, mask = batch(prompts, pad_id(tokenizer), with_target=True)
    ids, mask = ids.to(device), mask.to(device)
    rows = torch.arange(len(prompts), device=device)
    positions = torch.tensor([p.subject_index for p in prompts], device=device)
    # where each rewrite row predicts each target token: (row, position, token)
    targets = [(i, len(p.ids) - 1 + j, t) for i, p in enumerate(rewrites) for j, t in enumerate(p.target)]
    t_rows, t_pos, t_ids = (torch.tensor(c, device=device) for c in zip(*targets))
    essence_row, essence_pos = len(rewrites), len(essence[0].ids) - 1
    with frozen(model):
        output = mean_at_subject(model, tokenizer, path, rewrites, inputs=False)
        delta = torch.zeros_like(output, dtype=torch.float32, requires_grad=True)
        module = model.get_submodule(path)

        def add(_module, _args, out):
            main = first(out)
            added = main.clone()
            added[rows, positions] = main[rows, positions] + delta.to(main.dtype)
            return (added, *out[1:]) if isinstance(out, tuple) else added

        handle = module.register_forward_hook(add)
        try:
            with torch.no_grad():
                base_essence = F.log_softmax(_logits(model, ids, mask)[essence_row, essence_pos].float(), dim=-1)
            optimiser = torch.optim.Adam([delta], lr=settings.lr)
            limit = settings.clamp * float(output.norm())
            probability, step = 0.0, 0
            for step in range(settings.steps + 1):
                logits = _logits(model, ids, mask).float()
                log_probs = F.log_softmax(logits, dim=-1)
                token_nll = -log_probs[t_rows, t_pos, t_ids]
                row_nll = torch.zeros(len(rewrites), device=device).index_add(0, t_rows, token_nll)
                row_nll = row_nll / len(rewrites[0].target)
                probability = float(torch.exp(-row_nll.detach()).mean())
                if probability >= settings.stop_probability or step == settings.steps:
                    break
                kl = F.kl_div(log_probs[essence_row, essence_pos], base_essence, log_target=True, reduction="sum")
                decay = delta.square().sum() / float(output.square().sum())
                loss = row_nll.mean() + settings.kl_weight * kl + settings.weight_decay * decay
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                with torch.no_grad():
                    norm = float(delta.norm())
                    if norm > limit:
                        delta.mul_(limit / norm)
        finally:
            handle.remove()
    if probability < settings.min_probability:
        raise EditError(f"the edit {fact.text!r} -> {fact.target!r} did not converge at {path}: the new object's "
                        f"probability is {probability:.3f} after {step} steps, below {settings.min_probability}; "
                        f"nothing was written. Give more steps or a higher lr, a larger clamp, or edit another layer "
                        f"(--layers)")
    return Value(delta.detach().to(torch.float64), output, probability, step)


def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits
