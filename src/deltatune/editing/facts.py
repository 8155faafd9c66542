"""A fact to write into a model: a subject, a prompt template, the new object; and files of them.

Example:
    >>> fact = Fact("France", "The capital of {} is", "Rome", paraphrases=("{}'s capital is",))
    >>> fact.text                      # 'The capital of France is'
    >>> facts = load_facts("facts.json")   # a JSON list or JSON lines of such records
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError

#: where a prompt template puts the subject
SLOT = "{}"


@dataclass(frozen=True)
class Fact:
    """One edit: after it, ``prompt.format(subject)`` should continue with ``target``.

    Attributes:
        subject: the entity whose association changes (``"France"``).
        prompt: a template with one ``{}`` where the subject goes (``"The capital of {} is"``).
        target: the new object (``"Rome"``); the model should continue the prompt with it.
        true_object: what the base model says now (``"Paris"``), for reports; optional.
        paraphrases: other templates with ``{}`` for the same relation (generalisation).
        neighbourhood: complete prompts about other subjects, same relation, that the edit
            should leave alone (specificity).
    """

    subject: str
    prompt: str
    target: str
    true_object: str | None = None
    paraphrases: tuple[str, ...] = field(default=())
    neighbourhood: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "paraphrases", tuple(self.paraphrases))
        object.__setattr__(self, "neighbourhood", tuple(self.neighbourhood))
        for name in ("subject", "prompt", "target"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"a fact needs a non-empty {name} string, got {value!r}")
        if self.subject != self.subject.strip():
            raise ConfigError(f"subject {self.subject!r} has surrounding spaces; give it as {self.subject.strip()!r}")
        for template in (self.prompt, *self.paraphrases):
            check_template(template, self.subject)

    @property
    def text(self) -> str:
        """The prompt with the subject in place."""
        return self.prompt.replace(SLOT, self.subject)

    @property
    def paraphrase_texts(self) -> tuple[str, ...]:
        return tuple(p.replace(SLOT, self.subject) for p in self.paraphrases)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["paraphrases"], data["neighbourhood"] = list(self.paraphrases), list(self.neighbourhood)
        return data


def check_template(template: str, subject: str) -> None:
    """Raise :class:`ConfigError` unless ``template`` holds exactly one ``{}`` for the subject."""
    count = template.count(SLOT)
    if count == 1:
        return
    if count > 1:
        raise ConfigError(f"prompt template {template!r} has {count} '{{}}' slots; write exactly one, where the "
                          f"subject {subject!r} goes")
    if subject in template:
        suggestion = template.replace(subject, SLOT, 1)
        raise ConfigError(f"prompt {template!r} names the subject but has no '{{}}' slot; write it as a template "
                          f"with {{}} where the subject goes: {suggestion!r}")
    raise ConfigError(f"the subject {subject!r} is not in the prompt {template!r} and the prompt has no '{{}}' slot; "
                      f"write the prompt as a template with {{}} where the subject goes (e.g. 'The capital of {{}} is')")


def fact_from_dict(data: Any, where: str = "fact") -> Fact:
    """A :class:`Fact` from a JSON record; unknown or missing keys are a :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object with subject, prompt and target, got {type(data).__name__}")
    known = {f.name for f in fields(Fact)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {', '.join(unknown)}; the keys are {', '.join(sorted(known))}")
    missing = [k for k in ("subject", "prompt", "target") if k not in data]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)}; every fact needs subject, prompt (with {{}}) and target")
    for key in ("paraphrases", "neighbourhood"):
        if key in data and (not isinstance(data[key], list) or not all(isinstance(p, str) for p in data[key])):
            raise ConfigError(f"{where}: {key} must be a list of strings, got {data[key]!r}")
    try:
        return Fact(**data)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def load_facts(path: str | Path) -> list[Fact]:
    """Facts from a JSON file (a list of records) or a JSON-lines file (one record a line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"facts file {str(path)!r} does not exist; give a JSON list or JSON lines of "
                          f"{{subject, prompt, target}} records")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [(f"{path.name} line {i}", json.loads(line))
                       for i, line in enumerate(text.splitlines(), 1) if line.strip()]
        else:
            data = json.loads(text)
            if not isinstance(data, list):
                raise ConfigError(f"{path.name} must hold a JSON list of facts, got a {type(data).__name__}")
            records = [(f"{path.name} fact {i}", item) for i, item in enumerate(data, 1)]
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path.name} is not valid JSON ({error}); use a JSON list, or .jsonl with one fact a line") from None
    if not records:
        raise ConfigError(f"{path.name} holds no facts")
    return [fact_from_dict(record, where) for where, record in records]


def packaged_facts() -> list[Fact]:
    """The facts SmolLM2-135M-Instruct completes correctly before editing (``data/facts.json``)."""
    return load_facts(Path(__file__).parent / "data" / "facts.json")
