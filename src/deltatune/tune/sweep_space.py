"""A sweep's search space: methods, their options' choices, learning rates and targets.

Everything a method can take is read from its registration and its config dataclass
(:mod:`deltatune.core.registry`, :mod:`deltatune.core.options`), so the space knows no method
by name. Optuna parameters are named per method (``method``, ``lora.r``, ``lora.lr``,
``lora.targets``), so two methods' options never share a distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.config import ALL_LINEAR
from ..core.options import option_lookup
from ..core.registry import get_method, method_specs
from ..core.roles import ROLES
from ..errors import ConfigError

if TYPE_CHECKING:
    import optuna

#: a targets choice that leaves targets to the method (its default roles)
DEFAULT_TARGETS = "default"
#: keys of a method's entry in ``space.methods`` that are not options of the method
METHOD_KEYS = ("lr", "targets")


@dataclass(frozen=True)
class LearningRate:
    """A log-uniform range ``[low, high]``, one fixed value, or (both ``None``) the method's default."""

    low: float | None = None
    high: float | None = None

    def describe(self) -> str:
        if self.low is None:
            return "the method's default"
        return f"{self.low:g}" if self.low == self.high else f"log-uniform in [{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class MethodSpace:
    """What is searched for one method: option -> choices, its learning rate, targets choices
    (labels; empty for a method that takes no targets)."""

    method: str
    options: dict[str, tuple] = field(default_factory=dict)
    lr: LearningRate = LearningRate()
    targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class Choice:
    """One trial's configuration, as the sampler picked it."""

    method: str
    options: dict[str, Any]
    lr: float
    targets: str | None  # a targets label (see :func:`targets_label`); None: the method takes none

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "options": self.options, "lr": self.lr, "targets": self.targets}


def targets_label(value: Any, where: str) -> str:
    """The label of a targets choice: ``"default"``, ``"all-linear"``, or its roles / module
    patterns joined by commas (``[q, v]`` -> ``"q,v"``)."""
    if value in (None, DEFAULT_TARGETS):
        return DEFAULT_TARGETS
    if value == ALL_LINEAR:
        return ALL_LINEAR
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{where}: a targets choice is {DEFAULT_TARGETS!r}, {ALL_LINEAR!r}, or a list of roles "
                          f"({', '.join(ROLES)}) or module patterns, got {value!r}")
    if any("," in v for v in value):
        raise ConfigError(f"{where}: a targets choice lists each role or pattern as its own item (no commas), got "
                          f"{value!r}; write [q, v], not ['q,v']")
    return ",".join(v.strip() for v in value)


def target_items(label: str) -> list[str] | None:
    """The items of a targets label (``None`` for the method's default)."""
    return None if label == DEFAULT_TARGETS else label.split(",")


def is_role(item: str) -> bool:
    """Whether a targets item names roles (``q``, ``q|qkv``) rather than a module pattern."""
    return all(part in ROLES for part in item.split("|"))


def _number(value: Any, where: str) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: a learning rate must be a positive number, got {value!r}")
    return float(value)


def parse_lr(value: Any, where: str) -> LearningRate:
    """``default`` / absent, a number, ``[low, high]`` or ``{low: .., high: ..}`` (log-uniform)."""
    if value is None or value == DEFAULT_TARGETS:
        return LearningRate()
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"low", "high"})
        if unknown or set(value) != {"low", "high"}:
            raise ConfigError(f"{where}: a learning-rate range is {{low: 1e-4, high: 1e-2}}, got {value!r}")
        value = [value["low"], value["high"]]
    if isinstance(value, list):
        if len(value) != 2:
            raise ConfigError(f"{where}: a learning-rate range is [low, high] (log-uniform), got {value!r}; give one "
                              f"number for a fixed rate")
        low, high = (_number(v, where) for v in value)
        if low > high:
            raise ConfigError(f"{where}: the learning-rate range [{low:g}, {high:g}] has low > high; swap them")
        return LearningRate(low, high)
    rate = _number(value, where)
    return LearningRate(rate, rate)


def _choices(value: Any, where: str) -> tuple:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ConfigError(f"{where}: no choices; list at least one value, e.g. [4, 8]")
    for v in values:
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise ConfigError(f"{where}: choices must be numbers, strings, booleans or null, got {v!r}; set options "
                              f"that take lists or mappings in a train config instead")
    return tuple(dict.fromkeys(values))


def _parse_method(name: str, entry: Any, lr: LearningRate, targets: tuple[str, ...]) -> MethodSpace:
    where = f"space.methods.{name}"
    try:
        spec = get_method(name)
    except ConfigError as error:  # an unknown name: the message lists the registered methods
        raise ConfigError(f"space.methods: {error}") from None
    if not spec.trainable_from_flags:
        trainable = ", ".join(s.name for s in method_specs() if s.trainable_from_flags)
        raise ConfigError(f"{where}: method {name!r} is built with the Python API, not trained from options "
                          f"({spec.summary}); sweep over {trainable}")
    entry = {} if entry is None else entry
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping of option -> choices (e.g. {{r: [4, 8]}}), got {entry!r}")
    known = option_lookup(spec.config_class)
    options: dict[str, tuple] = {}
    for key, value in entry.items():
        if key in METHOD_KEYS:
            continue
        if key not in known:
            takes = ", ".join(sorted({o.name for o in known.values()})) or "no options"
            raise ConfigError(f"{where}: {key!r} is not an option of {name}; {name} takes {takes} "
                              f"(and {' and '.join(METHOD_KEYS)} for this method's own ranges)")
        option = known[key]
        choices = tuple(option.parse(v) if isinstance(v, str) and option.annotation is not str else v
                        for v in _choices(value, f"{where}.{key}"))
        for v in choices:  # the config class checks each value, without a model
            try:
                spec.config_class(**{option.name: v})
            except (ConfigError, TypeError, ValueError) as error:
                raise ConfigError(f"{where}.{key}: choice {v!r} is refused by {name}: {error}") from None
        options[option.name] = choices
    if "lr" in entry:
        lr = parse_lr(entry["lr"], f"{where}.lr")
    if "targets" in entry:
        if not spec.targeted:
            raise ConfigError(f"{where}.targets: {name} takes no targets ({spec.summary}); remove the key")
        targets = parse_targets(entry["targets"], f"{where}.targets")
    return MethodSpace(name, options, lr, targets if spec.targeted else ())


def parse_targets(value: Any, where: str) -> tuple[str, ...]:
    """Targets choices: a list whose items are ``default``, ``all-linear`` or a list of roles /
    module patterns; a single such value is one choice."""
    if value is None:
        return (DEFAULT_TARGETS,)
    if not isinstance(value, list) or (value and all(isinstance(v, str) for v in value)
                                       and not any(v in (DEFAULT_TARGETS, ALL_LINEAR) for v in value)):
        value = [value]  # one choice: a label or one list of roles / patterns
    if not value:
        raise ConfigError(f"{where}: no choices; use [default] for the methods' own targets")
    return tuple(dict.fromkeys(targets_label(v, where) for v in value))


@dataclass(frozen=True)
class SearchSpace:
    """The methods searched over and, per method, what is searched."""

    methods: dict[str, MethodSpace]

    def suggest(self, trial: optuna.Trial) -> Choice:
        """Sample (or take the enqueued values of) one configuration."""
        method = trial.suggest_categorical("method", list(self.methods))
        space = self.methods[method]
        options = {name: trial.suggest_categorical(f"{method}.{name}", list(choices))
                   for name, choices in space.options.items()}
        if space.lr.low is None:
            lr = get_method(method).default_lr
        elif space.lr.low == space.lr.high:
            lr = space.lr.low
        else:
            lr = trial.suggest_float(f"{method}.lr", space.lr.low, space.lr.high, log=True)
        targets = trial.suggest_categorical(f"{method}.targets", list(space.targets)) if space.targets else None
        return Choice(method, options, lr, targets)

    def fixed_params(self, entry: Any, where: str) -> dict[str, Any]:
        """Optuna parameters of a ``first_trials`` entry (``{method: lora, r: 4, lr: 0.01}``);
        keys left out are sampled."""
        if not isinstance(entry, dict) or "method" not in entry:
            raise ConfigError(f"{where}: a first trial is a mapping with a method, e.g. {{method: lora, r: 8}}, "
                              f"got {entry!r}")
        method = entry["method"]
        if method not in self.methods:
            raise ConfigError(f"{where}: method {method!r} is not in space.methods ({', '.join(self.methods)}); "
                              f"add it there or pick one of those")
        space = self.methods[method]
        params: dict[str, Any] = {"method": method}
        for key, value in entry.items():
            if key == "method":
                continue
            if key == "lr":
                rate = _number(value, f"{where}.lr")
                if space.lr.low is None or space.lr.low == space.lr.high:
                    raise ConfigError(f"{where}.lr: the learning rate of {method} is not searched "
                                      f"({space.lr.describe()}); remove lr here or give a range in the space")
                if not space.lr.low <= rate <= space.lr.high:
                    raise ConfigError(f"{where}.lr: {rate:g} is outside {method}'s range {space.lr.describe()}")
                params[f"{method}.lr"] = rate
            elif key == "targets":
                if not space.targets:
                    raise ConfigError(f"{where}.targets: {method} takes no targets; remove the key")
                label = targets_label(value, f"{where}.targets")
                if label not in space.targets:
                    raise ConfigError(f"{where}.targets: {label!r} is not a targets choice of {method} "
                                      f"({', '.join(space.targets)})")
                params[f"{method}.targets"] = label
            else:
                option = option_lookup(get_method(method).config_class).get(key)
                name = option.name if option else key
                if name not in space.options:
                    raise ConfigError(f"{where}: {key!r} is not searched for {method} (searched: "
                                      f"{', '.join(space.options) or 'nothing'}); add it under space.methods.{method}")
                if value not in space.options[name]:
                    raise ConfigError(f"{where}.{key}: {value!r} is not one of the choices {list(space.options[name])}")
                params[f"{method}.{name}"] = value
        return params


def parse_space(data: Any, where: str = "space") -> SearchSpace:
    """The ``space`` section of a sweep config.

    Raises:
        ConfigError: naming the key, what is wrong and the fix (an unknown method lists the
            registered ones; an option its config lacks lists its options).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with methods (and lr, targets), got {data!r}")
    unknown = sorted(set(data) - {"methods", "lr", "targets"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; the space takes methods, lr and targets")
    methods = data.get("methods")
    if isinstance(methods, list):
        methods = {m: {} for m in methods}
    if not isinstance(methods, dict) or not methods:
        names = ", ".join(s.name for s in method_specs() if s.trainable_from_flags)
        raise ConfigError(f"{where}.methods: list the methods to search (a list, or a mapping of method -> option "
                          f"choices such as lora: {{r: [4, 8]}}); methods: {names}")
    lr = parse_lr(data.get("lr"), f"{where}.lr")
    targets = parse_targets(data.get("targets"), f"{where}.targets")
    return SearchSpace({str(name): _parse_method(str(name), entry, lr, targets) for name, entry in methods.items()})
