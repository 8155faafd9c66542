"""Type checks of JSON data against annotations (through pydantic), and the one message format
for what they find: ``<where>: field 'a.b' must be <expected type>, got <value>; <fix>``.

Checks are strict, as a file's JSON types are exact: ``"8"`` is not an integer, ``1`` is not
``true``, ``NaN`` is not a number; an integer is a number.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal, Union

import pydantic_core
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from ..errors import ConfigError

#: pydantic settings of every check: exact JSON types, finite numbers, unknown object members kept
STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")

_NAMES = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), type(None): ("null", "nulls")}
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def describe_type(annotation: Any, plural: bool = False) -> str:
    """``annotation`` in words: ``list[Annotated[int, Field(ge=0)]] | None`` -> ``"a list of
    integers >= 0 or null"``. An ``Annotated[..., Field(description=...)]`` is its description.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        infos = [m for m in args[1:] if isinstance(m, FieldInfo)]
        described = [info.description for info in infos if info.description]
        bounds = "".join(f" {sign} {getattr(c, bound)}" for info in infos for c in info.metadata
                         for bound, sign in _BOUNDS if hasattr(c, bound))
        return described[0] if described else describe_type(args[0], plural) + bounds
    if origin in (Union, types.UnionType):
        ordered = sorted(args, key=lambda a: a is type(None))  # null last
        return " or ".join(describe_type(a, plural) for a in ordered)
    if origin is Literal:
        return " or ".join(repr(a) for a in args) if len(args) < 3 else "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, set, frozenset):
        items = f" of {describe_type(args[0], plural=True)}" if args and args[0] is not Any else ""
        return ("lists" if plural else "a list") + items
    if origin is dict:
        values = f" mapping strings to {describe_type(args[1], plural=True)}" if len(args) == 2 and args[1] is not Any else ""
        return ("objects" if plural else "an object") + values
    if annotation is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return "objects" if plural else "an object"
    if annotation is Any:
        return "JSON values" if plural else "any JSON value"
    if annotation in _NAMES:
        return _NAMES[annotation][plural]
    return getattr(annotation, "__name__", str(annotation))


def _annotation_at(root: Any, path: tuple) -> Any:
    """The annotation of the value at ``path`` inside a value annotated ``root``."""
    annotation = root
    for key in path:
        while typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        if typing.get_origin(annotation) in (Union, types.UnionType):  # the member that can hold ``key``
            holders = (dict, BaseModel) if isinstance(key, str) else (list, tuple)
            bases = [(a, typing.get_origin(a) or a) for a in typing.get_args(annotation)]
            members = [a for a, base in bases if isinstance(base, type) and issubclass(base, holders)]
            annotation = members[0] if members else Any
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(key)
            annotation = Any if field is None else typing.Annotated[field.annotation, field]
        elif origin is dict and len(args) == 2:
            annotation = args[1]
        elif origin in (list, tuple) and args:
            annotation = args[0]
        else:
            return Any
    return annotation


def _data_path(document: Any, error: dict) -> tuple:
    """The error's location as keys into ``document``, without pydantic's union-member tags."""
    loc = error["loc"]
    keys = loc[:-1] if error["type"] == "missing" else loc
    path, node = [], document
    for key in keys:
        if (isinstance(node, dict) and key in node) or (isinstance(node, list) and isinstance(key, int)
                                                        and 0 <= key < len(node)):
            path.append(key)
            node = node[key]
    return (*path, loc[-1]) if error["type"] == "missing" else tuple(path)


def _dotted(path: tuple) -> str:
    return "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in path).lstrip(".")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validation_message(error: ValidationError, root: Any, document: Any, where: str, fix: str = "",
                       prefix: tuple = ()) -> str:
    """One message for a pydantic ``error`` found checking ``document`` against ``root``.

    Args:
        error: what pydantic found.
        root: the annotation (or model class) ``document`` was checked against.
        document: the checked data, for the offending values and to tell keys from union tags.
        where: what holds the data, to start the message (a file path, a config class).
        fix: what to do about it, to end the message.
        prefix: the path of ``document`` inside ``where`` (a config field's name).
    """
    problems: dict[tuple, str] = {}
    for item in error.errors(include_url=False):
        path = _data_path(document, item)
        if path in problems:  # one line per value, however many union members refused it
            continue
        expected = describe_type(_annotation_at(root, path))
        name = _dotted((*prefix, *path))
        subject = f"field '{name}'" if name else "the document"
        problems[path] = (f"{subject} is missing (it must be {expected})" if item["type"] == "missing"
                          else f"{subject} must be {expected}, got {_shown(item['input'])}")
    first, *rest = problems.values()
    more = f" (and {len(rest)} more problem{'s' if len(rest) > 1 else ''})" if rest else ""
    return f"{where}: {first}{more}" + (f"; {fix}" if fix else "")


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls, include_extras=True)
    except Exception:  # noqa: BLE001  (names that do not resolve: leave the class unchecked)
        return {}


@functools.cache
def tuple_fields(cls: type) -> tuple[str, ...]:
    """The dataclass fields of ``cls`` annotated as a tuple (or a tuple or None)."""
    hints = _hints(cls)
    def is_tuple(annotation: Any) -> bool:
        origin = typing.get_origin(annotation)
        return origin is tuple or (origin in (Union, types.UnionType) and any(map(is_tuple, typing.get_args(annotation))))
    return tuple(f.name for f in dataclasses.fields(cls) if is_tuple(hints.get(f.name)))


@functools.cache
def _field_checkers(cls: type) -> tuple[tuple[str, Any, TypeAdapter], ...]:
    """(name, annotation, checker) for each dataclass field of ``cls`` whose annotation pydantic can check."""
    hints = _hints(cls)
    checkers = []
    for field in dataclasses.fields(cls):
        if field.name not in hints:
            continue
        try:
            checkers.append((field.name, hints[field.name], TypeAdapter(hints[field.name], config=STRICT)))
        except Exception:  # noqa: BLE001  (a type pydantic cannot check: leave that field to the class)
            continue
    return tuple(checkers)


def check_field_types(instance: Any) -> None:
    """Raise :class:`ConfigError` naming the first dataclass field of ``instance`` whose value
    does not have its annotated type, read as JSON (a tuple field takes a list)."""
    where = type(instance).__name__
    for name, annotation, checker in _field_checkers(type(instance)):
        value = getattr(instance, name)
        try:
            text = pydantic_core.to_json(value)
        except ValueError:  # PydanticSerializationError: not JSON data at all
            raise ConfigError(f"{where}: field '{name}' must be {describe_type(annotation)}, got {_shown(value)}") from None
        try:
            checker.validate_json(text)
        except ValidationError as error:
            document = pydantic_core.from_json(text, allow_inf_nan=True)
            raise ConfigError(validation_message(error, annotation, document, where, prefix=(name,))) from None
