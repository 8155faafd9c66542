"""The base of every method's config: a frozen, validated, serialisable dataclass."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ..errors import ConfigError
from .typecheck import check_field_types, tuple_fields

SCHEMA_VERSION = 1

#: ``targets="all-linear"``: every Linear / Conv1D inside the transformer blocks, never the head
ALL_LINEAR = "all-linear"


def _as_tuple(value: Any) -> Any:
    """A pattern or index list as a tuple (one pattern or index alone becomes a 1-tuple); a value
    that is no list at all (a number, an object) is returned as it is, for the type check to name."""
    if value is None or isinstance(value, Mapping) or not isinstance(value, Iterable):
        return (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class DeltaConfig:
    """Where a delta goes; subclasses add what it is.

    Args:
        targets: module-name patterns. A plain pattern is a glob matched against the full
            dotted name or any dotted suffix of it (``"query"``, ``"layer.*.attention.self.query"``);
            a pattern starting with ``re:`` is a regular expression matched against the full name.
            ``None`` uses the method's default roles, found from the model's structure
            (see :mod:`deltatune.core.roles`); ``"all-linear"`` selects every Linear / Conv1D
            inside the transformer blocks, never the output head.
        target_types: module class names (``"Linear"``, ``"Conv1D"``); subclasses match too.
        layers: keep only modules whose first numeric name component is one of these.
        exclude: patterns (same syntax as ``targets``) of modules never to adapt.
        modules_to_save: patterns of extra modules (a new classifier head) that train fully
            and are saved with the delta.
    """

    method: ClassVar[str] = ""

    targets: tuple[str, ...] | None = None
    target_types: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None
    exclude: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in tuple_fields(type(self)):
            value = _as_tuple(getattr(self, name))
            if value is None and name in ("target_types", "exclude", "modules_to_save"):
                value = ()
            object.__setattr__(self, name, value)
        check_field_types(self)
        if self.targets is not None and len(self.targets) == 0:
            raise ConfigError("targets=() selects nothing; pass None for the method's default or name modules")
        if self.targets is not None and ALL_LINEAR in self.targets and len(self.targets) > 1:
            raise ConfigError(
                f"targets {list(self.targets)} mix {ALL_LINEAR!r} with other patterns; pass targets={ALL_LINEAR!r} "
                f"alone (narrow it with layers=[...] or exclude=[...]) or list the patterns"
            )
        if self.layers is not None and any(not isinstance(i, int) or i < 0 for i in self.layers):
            raise ConfigError(f"layers must be non-negative integers, got {self.layers!r}")
        self.validate()

    def validate(self) -> None:
        """Check method-specific fields; raise :class:`ConfigError` naming the field and the fix."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_dict` turns back into an equal config."""
        out: dict[str, Any] = {"method": self.method, "schema_version": SCHEMA_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeltaConfig":
        """Build a config from :meth:`to_dict` output; unknown fields and values of the wrong
        type (``r="8"``, ``targets=3.5``) are a :class:`ConfigError` naming the field."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a {cls.__name__} is read from a JSON object of its fields, got {data!r}")
        data = dict(data)
        method = data.pop("method", cls.method)
        version = data.pop("schema_version", SCHEMA_VERSION)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ConfigError(f"{cls.__name__}: field 'schema_version' must be an integer, got {version!r}")
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"config schema version {version} is newer than this deltatune understands "
                f"({SCHEMA_VERSION}); upgrade deltatune"
            )
        if method != cls.method:
            raise ConfigError(f"config is for method {method!r}, not {cls.method!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown field(s) {unknown} for {cls.__name__}; valid fields: {sorted(known)}"
            )
        return cls(**data)

    def for_saving(self) -> "DeltaConfig":
        """The config a saved delta records; a method whose saved form differs from its
        training form (prefix tuning's MLP) overrides this."""
        return self

    def shared_with(self, owner: str) -> "DeltaConfig":
        """This config for a delta trained in one run together with delta ``owner`` of the same
        method (``train --multi`` passes its first task of each method). A method whose deltas
        share trained parts across tasks (one hypernetwork for many task embeddings) returns a
        config that uses ``owner``'s; the default shares nothing."""
        return self

    def replace(self, **changes: Any) -> "DeltaConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def check(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)
