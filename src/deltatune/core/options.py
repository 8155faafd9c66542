"""A method's options, read from its config dataclass: name, type, default and help text.

The CLI and the training job build their flags and YAML keys from these, so a new option
is one field of the config. Help comes from the field's ``metadata["help"]`` or else from
the config's docstring (``Args:`` entries); ``metadata["aliases"]`` adds other flag names.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from ..errors import ConfigError

#: fields every method has: where the delta goes (the job and the CLI handle them themselves)
TARGETING_FIELDS = frozenset({"targets", "target_types", "layers", "exclude", "modules_to_save"})


@dataclass(frozen=True)
class Option:
    """One method option: a config field that is not about targeting."""

    name: str
    annotation: Any
    default: Any
    help: str
    aliases: tuple[str, ...] = ()

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple("--" + n.replace("_", "-") for n in (self.name, *self.aliases))

    @property
    def choices(self) -> tuple | None:
        inner = _without_none(self.annotation)
        return typing.get_args(inner) if typing.get_origin(inner) is Literal else None

    def parse(self, text: str) -> Any:
        """The field's value from command-line text (``"8"``, ``"true"``, ``"a,b"``, JSON)."""
        return parse_value(self.annotation, text, self.name)


def _docstring_help(cls: type) -> dict[str, str]:
    """``name: text`` entries of the ``Args:`` sections of ``cls`` and its bases' docstrings."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = klass.__dict__.get("__doc__") or ""
        section = re.split(r"\n\s*Args:\s*\n", doc, maxsplit=1)
        if len(section) < 2:
            continue
        current = None
        for line in section[1].splitlines():
            entry = re.match(r"\s{4,8}(\w+):\s*(.*)", line)
            if entry and len(line) - len(line.lstrip()) <= 8:
                current = entry[1]
                found[current] = entry[2].strip()
            elif current and line.strip():
                found[current] += " " + line.strip()
            elif not line.strip():
                current = None
    return found


def config_options(config_class: type) -> list[Option]:
    """The options of a method's config class, in field order (targeting fields left out)."""
    hints = typing.get_type_hints(config_class)
    docs = _docstring_help(config_class)
    options = []
    for f in dataclasses.fields(config_class):
        if f.name in TARGETING_FIELDS or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        text = f.metadata.get("help") or docs.get(f.name, "")
        options.append(Option(f.name, hints[f.name], default, text, tuple(f.metadata.get("aliases", ()))))
    return options


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def _allows_none(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (Union, types.UnionType) and type(None) in typing.get_args(annotation)


def parse_value(annotation: Any, text: str, name: str = "value") -> Any:
    """Convert command-line ``text`` to a value of ``annotation``.

    Raises:
        ConfigError: the text is not a value of that type (the message names the option).
    """
    if _allows_none(annotation) and text.strip().lower() in ("none", "null", ""):
        return None
    kind = _without_none(annotation)
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if kind in (int, float, str):
            return kind(text)
        if origin is Literal:
            choices = typing.get_args(kind)
            match = [c for c in choices if str(c) == text]
            if not match:
                raise ConfigError(f"option {name}={text!r} is not one of {list(choices)}")
            return match[0]
        if origin in (tuple, list):
            inner = typing.get_args(kind)[0] if typing.get_args(kind) else str
            items = [t.strip() for t in text.split(",") if t.strip()]
            return tuple(parse_value(inner, t, name) for t in items)
        if origin is dict or kind is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError
            return value
    except (ValueError, json.JSONDecodeError):
        raise ConfigError(f"option {name}={text!r} is not a valid {_type_name(annotation)}") from None
    return text


def _type_name(annotation: Any) -> str:
    kind = _without_none(annotation)
    if typing.get_origin(kind) in (tuple, list):
        return "comma-separated list"
    if typing.get_origin(kind) is dict or kind is dict:
        return "JSON object"
    return getattr(kind, "__name__", str(kind))


def option_lookup(config_class: type) -> dict[str, Option]:
    """A config class's options by field name and by alias."""
    table = {}
    for option in config_options(config_class):
        for key in (option.name, *option.aliases):
            table[key] = option
    return table
