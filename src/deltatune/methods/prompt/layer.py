"""Prompt tuning: trainable soft-prompt vectors prepended to the input embeddings.

Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"
(arXiv:2104.08691).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.config import DeltaConfig, check
from ...core.rows import gathered
from ...core.slot import get_slot
from ...core.unit import DeltaUnit
from ...errors import DeltaError, NotApplicableError
from .init import Init, check_init, plain_ids, resolved_init


@dataclass(frozen=True)
class PromptConfig(DeltaConfig):
    """Prompt tuning.

    Args:
        num_virtual_tokens: length of the soft prompt.
        init: where the prompt starts: ``"vocab"``, the embeddings of tokens drawn from the
            vocabulary (with ``seed``); ``"text"``, the embeddings of ``init_text``'s tokens
            (or of ``init_token_ids``), repeated or cut to length; ``"random"``, standard normal
            vectors (peft's RANDOM; far from any token, so the model starts off its usual
            inputs). Default: ``"text"`` when ``init_text`` or ``init_token_ids`` is given,
            else ``"vocab"``.
        init_token_ids: the token ids of ``init="text"``; when only ``init_text`` is given,
            the model's own tokenizer (saved with its checkpoint) finds them at attach, and
            the saved delta records them.
        init_text: the text of ``init="text"``; with another ``init`` only a record (as peft's
            ``prompt_tuning_init_text``).
        seed: seed for drawing the vocabulary tokens of ``init="vocab"``.
    """

    method = "prompt"

    num_virtual_tokens: int = 20
    init_token_ids: tuple[int, ...] | None = None
    init_text: str | None = None
    seed: int = 0
    init: Init | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "init_token_ids", plain_ids(self.init_token_ids))
        object.__setattr__(self, "init", resolved_init(self.init, self.init_text, self.init_token_ids))
        super().__post_init__()

    def validate(self) -> None:
        check(self.num_virtual_tokens > 0, f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        check_init(self.init, self.init_text, self.init_token_ids)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PromptConfig":
        """Also reads files from before ``init`` was a field: their prompts started from
        ``init_token_ids`` when given, else from drawn vocabulary tokens (``init_text`` was a record)."""
        if isinstance(data, dict) and "init" not in data:
            data = {**data, "init": "text" if data.get("init_token_ids") is not None else "vocab"}
        return super().from_dict(data)

    @classmethod
    def from_text(cls, text: str, tokenizer: Any, **fields: Any) -> "PromptConfig":
        """A config whose prompt starts from the embeddings of ``text``'s tokens."""
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise DeltaError(f"prompt init text {text!r} tokenises to nothing")
        return cls(init_token_ids=tuple(ids), init_text=text, **fields)


class SoftPrompt(DeltaUnit):
    """Prepends ``num_virtual_tokens`` learned vectors to the model's input embeddings and
    extends ``attention_mask``, ``token_type_ids`` and token-level ``labels`` to match."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.prompt = nn.Parameter(init.detach().clone().float())

    @property
    def length(self) -> int:
        return self.prompt.shape[0]

    def forward_pre(self, module, args, kwargs):
        return prepend_prompt(module, args, kwargs, lambda batch, dtype: self.prompt.to(dtype).expand(batch, -1, -1))

    @classmethod
    def mixed_pre(cls, units, module, args, kwargs, routing):
        """Rows with different soft prompts of one length; rows without a prompt (the base,
        or a delta of another method) cannot share the batch: the prompt shifts positions."""
        if any(u is None for u in units) or bool((routing.index == routing.base_index).any()):
            raise NotApplicableError(
                "prompt-tuning rows cannot share a batch with rows of the base or of other methods (the soft prompt "
                "shifts token positions); route those rows in a batch of their own"
            )
        lengths = sorted({u.length for u in units})
        if len(lengths) > 1:
            raise NotApplicableError(
                f"prompt-tuning deltas with different lengths {lengths} cannot share a batch; group rows by length"
            )
        cache = get_slot(module).mixed_cache
        return prepend_prompt(module, args, kwargs,
                              lambda batch, dtype: gathered(units, routing.index, lambda u: u.prompt, 0.0, cache,
                                                            "prompt").to(dtype))

    def fingerprint_module(self, module, model):
        return model.get_input_embeddings()


def prepend_prompt(module: nn.Module, args: tuple, kwargs: dict, make_prompt) -> tuple[tuple, dict]:
    """The model call's inputs with ``make_prompt(batch, dtype)`` (``(batch, n, dim)``) before the
    input embeddings, and ``attention_mask``, ``token_type_ids`` and token ``labels`` extended."""
    if len(args) > 1:
        raise DeltaError("with prompt tuning, pass model inputs by keyword (input_ids=..., attention_mask=...)")
    kwargs = dict(kwargs)
    if args:
        kwargs["input_ids"] = args[0]
    past = kwargs.get("past_key_values")
    if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0:
        return (), _cached_step(kwargs, past.get_seq_length())
    embeds = kwargs.pop("inputs_embeds", None)
    input_ids = kwargs.pop("input_ids", None)
    if embeds is None:
        if input_ids is None:
            raise DeltaError("prompt tuning needs input_ids or inputs_embeds")
        embeds = module.get_input_embeddings()(input_ids)
    batch, seq = embeds.shape[:2]
    prompt = make_prompt(batch, embeds.dtype)
    n = prompt.shape[1]
    kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
    types = kwargs.get("token_type_ids")
    if types is not None:
        kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], dim=1)
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() == 2 and labels.shape[1] == seq:
        kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
    kwargs.pop("position_ids", None)  # the model numbers all positions, virtual ones included
    kwargs.pop("cache_position", None)
    return (), kwargs


def _cached_step(kwargs: dict, cached: int) -> dict:
    """A generation step after the first: the prompt is in the KV cache already, but the
    caller's mask and positions do not count its virtual tokens."""
    new = kwargs["input_ids"].shape[1] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"].shape[1]
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.shape[1] < cached + new:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], cached + new - mask.shape[1]), mask], dim=1)
    kwargs.pop("position_ids", None)
    if kwargs.get("cache_position") is not None:
        kwargs["cache_position"] = torch.arange(cached, cached + new, device=kwargs["cache_position"].device)
    return kwargs
