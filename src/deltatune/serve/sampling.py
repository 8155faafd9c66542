"""Per-row sampling inside one batched ``generate``: every row keeps its own settings and RNG.

``transformers``' ``generate`` runs the batch (KV cache, positions of left-padded rows, the
deltas routed per row) with greedy selection; :class:`RowSampler`, its logits processor,
picks each row's token itself and returns scores in which that token is the only finite
one. So requests with different temperatures, top-p, top-k, penalties and seeds share one
batch, and a seeded request draws from its own ``torch.Generator``: its text does not depend
on which other requests were batched with it. :class:`RowStops` ends a row at its own
``max_tokens``, at a stop string, or when its client has gone away.

The log-probabilities reported (``logprobs``) are those of the model's raw distribution,
before penalties, temperature and truncation (as vLLM reports them by default).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, StoppingCriteria

#: temperatures below this decode greedily (dividing logits by them overflows; vLLM does the same)
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class Generation:
    """How one request's rows are generated (OpenAI's fields, checked by the request schema).

    Attributes:
        max_tokens: most new tokens per row.
        temperature: 0 decodes greedily; above 0 samples from ``softmax(logits / temperature)``.
        top_p: nucleus sampling: the smallest set of tokens whose probabilities add up to ``top_p``.
        top_k: only the ``top_k`` most likely tokens (0: all).
        stop: strings that end a row; the stop string is not part of the text.
        seed: seeds the row's own generator (choice ``j`` of a request uses ``seed + j``).
        logprobs: report this many most likely tokens per position (``None``: none; 0: only the chosen one).
        presence_penalty: subtracted from the logit of every token already generated.
        frequency_penalty: subtracted once per earlier occurrence of the token in the generated text.
        n: choices per prompt (a request's rows hold each prompt ``n`` times in a row).
        chat: the prompts are rendered chat templates (tokenised without adding special tokens again).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    chat: bool = False


@dataclass
class TokenRecord:
    """A row's generated tokens and, when asked for, their log-probabilities."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()  # a fresh non-deterministic seed, as an unseeded request expects
    else:
        generator.manual_seed(seed % (2 ** 63))
    return generator


def penalised(logits: torch.Tensor, generated: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties: ``logit[t] -= count[t] * frequency + (count[t] > 0) * presence``."""
    if not generated or (presence == 0 and frequency == 0):
        return logits
    ids, counts = torch.tensor(generated, device=logits.device).unique(return_counts=True)
    logits = logits.clone()
    logits[ids] -= counts.to(logits.dtype) * frequency + presence
    return logits


def truncated(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` with every token outside the top ``top_k`` and the top-``top_p`` nucleus at ``-inf``."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probabilities = torch.softmax(ordered, dim=-1)
        before = torch.cumsum(probabilities, dim=-1) - probabilities  # mass of the tokens ranked above
        dropped = order[1:][before[1:] >= top_p]  # the most likely token always stays
        logits = logits.clone()
        logits[dropped] = float("-inf")
    return logits


class RowSampler(LogitsProcessor):
    """Chooses every row's next token with that row's :class:`Generation` and generator."""

    def __init__(self, settings: list[Generation], prompt_length: int, choices: list[int]) -> None:
        self.settings, self.prompt_length = settings, prompt_length
        self.generators = [_generator(None if s.seed is None else s.seed + c) if s.temperature >= GREEDY_BELOW else None
                           for s, c in zip(settings, choices)]
        self.records = [TokenRecord() for _ in settings]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = torch.empty(len(self.settings), dtype=torch.long)
        for row, setting in enumerate(self.settings):
            logits = scores[row]
            generated = self.records[row].tokens
            logits = penalised(logits, generated, setting.presence_penalty, setting.frequency_penalty)
            if setting.temperature < GREEDY_BELOW:
                token = int(torch.argmax(logits))
            else:
                logits = truncated(logits / setting.temperature, setting.top_k, setting.top_p)
                probabilities = torch.softmax(logits, dim=-1)
                token = int(torch.multinomial(probabilities.cpu(), 1, generator=self.generators[row]))
            chosen[row] = token
            self._record(row, scores[row], token, setting.logprobs)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(self.settings)), chosen.to(scores.device)] = 0.0
        return out

    def _record(self, row: int, raw: torch.Tensor, token: int, top: int | None) -> None:
        record = self.records[row]
        record.tokens.append(token)
        if top is None:
            return
        logprobs = torch.log_softmax(raw.float(), dim=-1)
        record.logprobs.append(float(logprobs[token]))
        if top > 0:
            values, ids = torch.topk(logprobs, top)
            record.top.append(list(zip(ids.tolist(), values.tolist())))
        else:
            record.top.append([])


class RowStops(StoppingCriteria):
    """Ends each row at its ``max_tokens``, its first stop string, an end-of-sequence token, or when
    ``cancelled(row)`` says its client is gone."""

    def __init__(self, settings: list[Generation], prompt_length: int, eos: set[int],
                 decode: Callable[[list[int]], str], cancelled: Callable[[int], bool]) -> None:
        self.settings, self.prompt_length, self.eos = settings, prompt_length, eos
        self.decode, self.cancelled = decode, cancelled
        self.reasons: list[str | None] = [None] * len(settings)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, setting in enumerate(self.settings):
            if self.reasons[row] is None:
                self.reasons[row] = self._reason(row, setting, input_ids[row, self.prompt_length:].tolist())
            done[row] = self.reasons[row] is not None
        return done

    def _reason(self, row: int, setting: Generation, new: list[int]) -> str | None:
        if new and new[-1] in self.eos:
            return "stop"
        if setting.stop and stop_index(self.decode(new), setting.stop) is not None:
            return "stop"
        if len(new) >= setting.max_tokens:
            return "length"
        if self.cancelled(row):
            return "cancelled"
        return None


def stop_index(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string begins in ``text`` (``None``: no stop string in it)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could begin a stop string (not streamed yet)."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)
