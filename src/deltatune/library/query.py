"""A library search as data: each filter one SQL condition, all of them required."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import LibraryError

_THRESHOLD = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.\-]*)\s*(>=|<=|==|!=|=|>|<)\s*([-+0-9.eE]+|nan|inf)\s*")
_OPERATORS = {">=": ">=", "<=": "<=", "==": "=", "=": "=", "!=": "!=", ">": ">", "<": "<"}


@dataclass(frozen=True)
class Threshold:
    """``metric op value``: ``accuracy>=0.8``. A bare name (``accuracy``) matches the delta's metric
    of exactly that key, else its ``test.`` one, else any key ending in ``.accuracy``."""

    metric: str
    operator: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Threshold:
        match = _THRESHOLD.fullmatch(text)
        if match is None:
            raise LibraryError(f"metric filter {text!r} is not 'NAME OP NUMBER' (OP one of >=, <=, >, <, ==, !=); "
                               f"e.g. 'accuracy>=0.8' or 'test.macro_f1>0.7'")
        value = float(match.group(3))
        if not math.isfinite(value):
            raise LibraryError(f"metric filter {text!r} compares with {value}; give a finite number")
        return cls(match.group(1), _OPERATORS[match.group(2)], value)


@dataclass(frozen=True)
class Query:
    """What to look for; empty fields do not filter.

    Args:
        fingerprint: the base fingerprint (``delta.json``'s ``base.sha256``) or a prefix of it.
        base: the base's model class or model type (``BertForSequenceClassification``, ``bert``).
        method: the delta's method (``lora``).
        task: the task (``classification``, ``causal_lm``).
        labels: label names the delta's head must all know.
        tags: tags the entry must all carry.
        metrics: thresholds such as ``"accuracy>=0.8"`` (see :class:`Threshold`).
        text: words that must each appear in the entry's name or note (case-insensitive).
    """

    fingerprint: str | None = None
    base: str | None = None
    method: str | None = None
    task: str | None = None
    labels: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    text: str | None = None

    def sql(self) -> tuple[str, list[Any]]:
        """The ``WHERE`` condition over ``deltas d`` and its parameters."""
        conditions: list[str] = ["1"]
        params: list[Any] = []
        if self.fingerprint:
            if not re.fullmatch(r"[0-9a-fA-F]{1,64}", self.fingerprint):
                raise LibraryError(f"fingerprint {self.fingerprint!r} is not hexadecimal; give the base sha256 of a "
                                   f"delta.json (or its first characters)")
            conditions.append("substr(d.fingerprint, 1, ?) = ?")
            params += [len(self.fingerprint), self.fingerprint.lower()]
        if self.base:
            conditions.append("(d.model_class = ? OR d.model_type = ?)")
            params += [self.base, self.base]
        if self.method:
            conditions.append("d.method = ?")
            params.append(self.method)
        if self.task:
            conditions.append("d.task = ?")
            params.append(self.task)
        for label in self.labels:
            conditions.append("EXISTS (SELECT 1 FROM labels l WHERE l.delta_id = d.id AND l.label = ?)")
            params.append(label)
        for tag in self.tags:
            conditions.append("EXISTS (SELECT 1 FROM tags t WHERE t.delta_id = d.id AND t.tag = ?)")
            params.append(tag)
        for text in self.metrics:
            threshold = Threshold.parse(text)
            # the one metric the name means for this delta: exact key, else test.<name>, else *.<name>
            conditions.append(
                "EXISTS (SELECT 1 FROM metrics m WHERE m.delta_id = d.id AND m.key = ("
                "SELECT k.key FROM metrics k WHERE k.delta_id = d.id AND (k.key = ? OR k.key LIKE '%.' || ? ESCAPE '\\') "
                "ORDER BY k.key = ? DESC, k.key = 'test.' || ? DESC, k.key LIMIT 1) "
                f"AND m.value {threshold.operator} ?)")
            escaped = _like_escape(threshold.metric)
            params += [threshold.metric, escaped, threshold.metric, threshold.metric, threshold.value]
        for word in (self.text or "").split():
            conditions.append("(d.name LIKE ? ESCAPE '\\' OR d.note LIKE ? ESCAPE '\\')")
            pattern = f"%{_like_escape(word)}%"
            params += [pattern, pattern]
        return " AND ".join(conditions), params


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
