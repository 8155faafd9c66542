"""Batched text completion for causal LMs: rows of several requests and deltas in one ``generate``.

Rows are left-padded into one batch and routed to their deltas for every decoding step, so
requests for different deltas share each forward; each row keeps its own sampling settings
and generator (``sampling.py``). A :class:`RowStreamer` hands each row's new text to a
callback as tokens arrive (server-sent events), holding back text that may begin a stop
string; the pieces of a row add up to the text of the finished completion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .engine import CAUSAL_LM, Engine, Work
from .errors import ApiError
from .sampling import Generation, RowSampler, RowStops, held_back, stop_index

#: ``(work index, choice index, new text, the finished Choice with the row's last piece, else None)``
OnText = Callable[[int, int, str, "Choice | None"], None]


@dataclass
class TokenLogprob:
    """One generated token: its text, log-probability, offset in the completion, and the alternatives."""

    token: str
    logprob: float
    offset: int
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Choice:
    """One finished completion: its text, why it stopped (``"stop"``: end of sequence or a stop
    string, ``"length"``: ``max_tokens`` reached), token counts and, when asked, log-probabilities."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


def _decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class RowStreamer(BaseStreamer):
    """Receives each decoding step's tokens (one per row) and reports each row's new text."""

    def __init__(self, tokenizer, settings: list[Generation], eos: set[int],
                 on_piece: Callable[[int, str, Choice | None], None]) -> None:
        self.tokenizer, self.settings, self.eos, self.on_piece = tokenizer, settings, eos, on_piece
        self.tokens: list[list[int]] = [[] for _ in settings]
        self.sent = [""] * len(settings)
        self.done = [False] * len(settings)
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
            stops = self.settings[row].stop
            cut = stop_index(text, stops) if stops else None
            if cut is not None:
                self.done[row] = True
                text = text[:cut]
            elif stops:
                text = text[:len(text) - held_back(text, stops)]
            if text.startswith(self.sent[row]) and not text.endswith("\ufffd"):  # hold back half a character
                self._send(row, text[len(self.sent[row]):], None)

    def end(self) -> None:
        pass

    def finish(self, choices: Sequence[Choice]) -> None:
        """Send what is left of each row's final text, with the finished choice."""
        for row, choice in enumerate(choices):
            rest = choice.text[len(self.sent[row]):] if choice.text.startswith(self.sent[row]) else ""
            self.on_piece(row, rest, choice)

    def _send(self, row: int, piece: str, finished: Choice | None) -> None:
        if piece:
            self.sent[row] += piece
            self.on_piece(row, piece, finished)


def complete(engine: Engine, works: Sequence[Work], on_text: OnText | None = None,
             cancelled: Callable[[int], bool] | None = None) -> list:
    """Completions of every row of every work (one :class:`Choice` per row), or each work's error.

    Args:
        engine: the serving engine (a causal LM).
        works: one per request; ``texts`` are its rows (prompts, repeated ``n`` times),
            ``options`` its :class:`Generation`.
        on_text: called from this thread with each new piece of text, for streaming.
        cancelled: ``cancelled(work index)`` is true once that work's client has gone away;
            its rows stop generating.
    """
    if engine.task != CAUSAL_LM:
        raise ApiError(400, "wrong_task", "this server runs a classifier; use /v1/classify")
    results: list = [None] * len(works)
    ready = []
    for i, work in enumerate(works):
        try:
            engine.check_lengths(work.texts, extra=work.options.max_tokens, special=not work.options.chat)
            ready.append(i)
        except ApiError as error:
            results[i] = error

    def forward(group: list[int], group_works: list[Work]) -> list[list[Choice]]:
        owners = [ready[i] for i in group]
        return _generate(engine, owners, group_works, on_text, cancelled or (lambda _: False))

    for i, output in zip(ready, engine.run([works[i] for i in ready], forward)):
        results[i] = output
    return results


def _eos_ids(engine: Engine) -> set[int]:
    eos = engine.model.generation_config.eos_token_id
    if eos is None:
        eos = engine.tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()


@torch.no_grad()
def _generate(engine: Engine, owners: list[int], works: list[Work], on_text: OnText | None,
              cancelled: Callable[[int], bool]) -> list[list[Choice]]:
    model, tokenizer = engine.model, engine.tokenizer
    rows = [(owner, work, choice) for owner, work in zip(owners, works) for choice in range(len(work.texts))]
    settings = [work.options for _, work, _ in rows]
    ids = [tokenizer(work.texts[c], add_special_tokens=not work.options.chat)["input_ids"] for _, work, c in rows]
    batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    prompt_length = batch["input_ids"].shape[1]
    device = next(model.parameters()).device
    eos = _eos_ids(engine)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    sampler = RowSampler(settings, prompt_length, [c % w.options.n for _, w, c in rows])
    stops = RowStops(settings, prompt_length, eos, lambda tokens: _decode(tokenizer, tokens),
                     lambda row: cancelled(rows[row][0]))
    streamer = None
    if on_text is not None:
        streamer = RowStreamer(tokenizer, settings, eos, lambda row, piece, end: on_text(rows[row][0], rows[row][2],
                                                                                         piece, end))
    config = GenerationConfig(do_sample=False, max_new_tokens=max(s.max_tokens for s in settings),
                              eos_token_id=sorted(eos) or None, pad_token_id=pad)
    with engine.routed([work.delta for _, work, _ in rows]):
        out = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             generation_config=config, logits_processor=LogitsProcessorList([sampler]),
                             stopping_criteria=StoppingCriteriaList([stops]), streamer=streamer)
    new = out[:, prompt_length:].tolist()
    choices = [_choice(tokenizer, tokens, len(ids[row]), settings[row], stops.reasons[row], eos,
                       sampler.records[row]) for row, tokens in enumerate(new)]
    if streamer is not None:
        streamer.finish(choices)
    out_by_work, row = [], 0
    for work in works:
        out_by_work.append(choices[row: row + len(work.texts)])
        row += len(work.texts)
    return out_by_work


def _choice(tokenizer, tokens: list[int], prompt_tokens: int, setting: Generation, reason: str | None, eos: set[int],
            record) -> Choice:
    """A row's completion: its tokens up to its end, cut before its first stop string."""
    end = next((i for i, t in enumerate(tokens) if t in eos), None)
    kept = tokens[: setting.max_tokens] if end is None else tokens[: end + 1]
    text = _decode(tokenizer, kept)
    finish = "stop" if end is not None else "length"
    cut = stop_index(text, setting.stop) if setting.stop else None
    if cut is not None:  # the tokens up to the one that completed the stop string count
        text, finish = text[:cut], "stop"
        kept = kept[:next(k for k in range(1, len(kept) + 1)
                          if stop_index(_decode(tokenizer, kept[:k]), setting.stop) is not None)]
    elif reason == "length":
        finish = "length"
    logprobs = None
    if setting.logprobs is not None:
        logprobs, before = [], ""
        for i, token in enumerate(kept):  # a token's text is what it adds to the decoded text (spaces included)
            def piece(t: int) -> str:
                return _decode(tokenizer, kept[:i] + [t])[len(before):]
            top = [(piece(t), lp) for t, lp in record.top[i]]
            logprobs.append(TokenLogprob(piece(token), record.logprobs[i], len(before), top))
            before = _decode(tokenizer, kept[: i + 1])
    return Choice(text, finish, prompt_tokens, len(kept), logprobs)
