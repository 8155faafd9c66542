"""Batched text completion for causal LMs: rows of several deltas generated in one ``generate``.

Rows are left-padded into one batch and routed to their deltas for every decoding step, so
requests for different deltas share each forward. A :class:`RowStreamer` hands each row's new
text to a callback as tokens arrive (server-sent events); the pieces of a row add up to the
text of the finished completion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer

from .engine import CAUSAL_LM, Engine, Work
from .errors import ApiError

#: ``(work index, choice index, new text, finish reason or None)``
OnText = Callable[[int, int, str, "str | None"], None]


@dataclass(frozen=True)
class Sampling:
    """Settings a batch shares: requests are batched together only when these are equal."""

    max_tokens: int
    temperature: float


@dataclass
class Choice:
    """One finished completion: its text, why it stopped (``"stop"``: end of sequence, ``"length"``:
    ``max_tokens`` reached) and token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def _decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class RowStreamer(BaseStreamer):
    """Receives each decoding step's tokens (one per row) and reports each row's new text."""

    def __init__(self, tokenizer, rows: int, eos: set[int], on_piece: Callable[[int, str, str | None], None]) -> None:
        self.tokenizer, self.eos, self.on_piece = tokenizer, eos, on_piece
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.sent = [""] * rows
        self.done = [False] * rows
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            self.tokens[row].append(token)
            self.done[row] = token in self.eos
            text = _decode(self.tokenizer, self.tokens[row])
            if text.startswith(self.sent[row]) and not text.endswith("\ufffd"):  # hold back half a character
                self._send(row, text[len(self.sent[row]):], None)

    def end(self) -> None:
        pass

    def finish(self, choices: Sequence[Choice]) -> None:
        """Send what is left of each row's final text, with its finish reason."""
        for row, choice in enumerate(choices):
            rest = choice.text[len(self.sent[row]):] if choice.text.startswith(self.sent[row]) else ""
            self.on_piece(row, rest, choice.finish_reason)

    def _send(self, row: int, piece: str, finish: str | None) -> None:
        if piece:
            self.sent[row] += piece
            self.on_piece(row, piece, finish)


def complete(engine: Engine, works: Sequence[Work], sampling: Sampling, on_text: OnText | None = None) -> list:
    """Completions of every prompt of every work (one :class:`Choice` per prompt), or each work's error.

    Args:
        engine: the serving engine (a causal LM).
        works: one per request; ``texts`` are its prompts.
        sampling: ``max_tokens`` and ``temperature`` (0: greedy) shared by all works.
        on_text: called from this thread with each new piece of text, for streaming.
    """
    if engine.task != CAUSAL_LM:
        raise ApiError(400, "wrong_task", "this server runs a classifier; use /v1/classify")
    results: list = [None] * len(works)
    ready = []
    for i, work in enumerate(works):
        try:
            engine.check_lengths(work.texts, extra=sampling.max_tokens)
            ready.append(i)
        except ApiError as error:
            results[i] = error

    def forward(group: list[int], group_works: list[Work]) -> list[list[Choice]]:
        owners = [ready[i] for i in group]
        return _generate(engine, owners, group_works, sampling, on_text)

    for i, output in zip(ready, engine.run([works[i] for i in ready], forward)):
        results[i] = output
    return results


def _eos_ids(engine: Engine) -> set[int]:
    eos = engine.model.generation_config.eos_token_id
    if eos is None:
        eos = engine.tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()


@torch.no_grad()
def _generate(engine: Engine, owners: list[int], works: list[Work], sampling: Sampling,
              on_text: OnText | None) -> list[list[Choice]]:
    model, tokenizer = engine.model, engine.tokenizer
    prompts = [text for work in works for text in work.texts]
    deltas = [work.delta for work in works for _ in work.texts]
    where = [(owner, choice) for owner, work in zip(owners, works) for choice in range(len(work.texts))]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    device = next(model.parameters()).device
    eos = _eos_ids(engine)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    options = ({"do_sample": True, "temperature": sampling.temperature, "top_k": 0, "top_p": 1.0}
               if sampling.temperature > 0 else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None})
    streamer = None
    if on_text is not None:
        streamer = RowStreamer(tokenizer, len(prompts), eos, lambda row, piece, end: on_text(*where[row], piece, end))
    with engine.routed(deltas):
        out = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=sampling.max_tokens,
                             eos_token_id=sorted(eos) or None, pad_token_id=pad, streamer=streamer, **options)
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    prompt_lengths = batch["attention_mask"].sum(dim=1).tolist()
    choices = []
    for row, tokens in enumerate(new):
        end = next((i for i, t in enumerate(tokens) if t in eos), None)
        kept = tokens if end is None else tokens[: end + 1]
        choices.append(Choice(_decode(tokenizer, kept), "length" if end is None else "stop", int(prompt_lengths[row]),
                              len(kept)))
    if streamer is not None:
        streamer.finish(choices)
    out_by_work, row = [], 0
    for work in works:
        out_by_work.append(choices[row: row + len(work.texts)])
        row += len(work.texts)
    return out_by_work
