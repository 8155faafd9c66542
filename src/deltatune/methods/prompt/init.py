"""Where prompt and prefix tuning start: the real tokens whose embeddings (prompt tuning) or
keys and values (prefix tuning) the trainable vectors copy.

``init`` names the start, with peft's ``prompt_tuning_init`` choices in lower case:
``"vocab"`` (peft's SAMPLE_VOCAB: tokens drawn uniformly from the vocabulary), ``"text"``
(the tokens of ``init_text``, or ``init_token_ids``, repeated or cut to length) and
``"random"`` (vectors that are no token's: what prompt and prefix tuning did before). A
config given ``init=None`` picks ``"text"`` when it has a text or token ids, else ``"vocab"``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from ...core.config import check
from ...errors import ConfigError

Init = Literal["vocab", "text", "random"]


def resolved_init(init: str | None, init_text: str | None, init_token_ids: tuple[int, ...] | None) -> str | None:
    """``init`` with ``None`` made explicit: ``"text"`` when a text or ids are given, else ``"vocab"``."""
    if init is not None:
        return init
    return "text" if init_text is not None or init_token_ids is not None else "vocab"


def plain_ids(ids: Any) -> Any:
    """Token ids from numpy or torch as a tuple of plain ints (anything else is left to the type check)."""
    if isinstance(ids, Iterable) and not isinstance(ids, (str, dict)):
        return tuple(int(i) if hasattr(i, "__index__") and not isinstance(i, (bool, str)) else i for i in ids)
    return ids


def check_init(init: str, init_text: str | None, init_token_ids: tuple[int, ...] | None) -> None:
    """The init fields agree: ``"text"`` has a text or ids, and ids are given only for ``"text"``.

    ``init_text`` with another ``init`` is only a record, as peft's ``prompt_tuning_init_text``
    is only used with TEXT (an imported peft adapter keeps its text that way)."""
    check(init_token_ids is None or len(init_token_ids) > 0, "init_token_ids is empty; pass None or some ids")
    if init == "text":
        check(init_text is not None or init_token_ids is not None,
              "init='text' needs init_text (tokenised with the model's tokenizer) or init_token_ids")
    else:
        check(init_token_ids is None, f"init_token_ids are used only with init='text', got init={init!r}; "
                                      f"drop init_token_ids or pass init='text'")


def tokenize(model: nn.Module, text: str) -> tuple[int, ...]:
    """``text``'s token ids (no special tokens) by the tokenizer saved with the model's checkpoint.

    Raises:
        ConfigError: the model was not loaded from a folder that holds a tokenizer, or the text
            tokenises to nothing.
    """
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    fix = "pass init_token_ids=tokenizer(text, add_special_tokens=False)['input_ids'] instead"
    if not source:
        raise ConfigError(f"init_text needs the model's tokenizer, but this {type(model).__name__} was not loaded "
                          f"from a checkpoint (config._name_or_path is empty); {fix}")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(f"init_text needs the model's tokenizer, which {source!r} does not provide "
                          f"({type(error).__name__}); {fix}") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"init_text {text!r} tokenises to nothing; give some words or init_token_ids")
    return tuple(int(i) for i in ids)


def start_tokens(
    count: int, vocab_size: int, init_token_ids: tuple[int, ...] | None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``count`` token ids: ``init_token_ids`` repeated or cut to length, or else drawn
    uniformly from ``range(vocab_size)`` with ``generator`` (torch's global RNG when ``None``).

    Raises:
        ConfigError: an id is outside the vocabulary.
    """
    if init_token_ids is None:
        return torch.randint(0, vocab_size, (count,), generator=generator)
    ids = torch.tensor(init_token_ids, dtype=torch.long)
    if int(ids.max()) >= vocab_size or int(ids.min()) < 0:
        bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
        raise ConfigError(f"init_token_ids contain id {bad}, outside the vocabulary of {vocab_size} tokens")
    return ids.repeat((count + len(ids) - 1) // len(ids))[:count]
