"""A sweep's YAML config: the fixed training settings, the search space, the trial count and
the pruner, checked with errors that name the key and the fix.

```yaml
model: minilm
data: movie-reviews
steps: 60
eval_every: 10
batch_size: 16
seed: 0
n_trials: 6
space:
  methods:
    lora: {r: [4, 8]}
    ia3: {}
  lr: [1.0e-4, 3.0e-2]        # log-uniform; a number fixes it; absent: each method's default
  targets: [default, all-linear, [q, v]]
pruner: {reduction_factor: 2}  # successive halving on validation accuracy; "none" to train every trial out
first_trials:                  # run these first (keys left out are sampled)
  - {method: lora, r: 8, lr: 1.0e-3}
```
Every other top-level key is a training-job field (``TrainJob``: ``text_column``, ``max_length``,
``limit``, ``dtype``, ...) applied to every trial.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.typecheck import check_field_types
from ..errors import ConfigError
from ..train.job import TrainJob
from .sweep_space import SearchSpace, parse_space

#: job fields a sweep sets per trial (or itself), not from the config's top level
PER_TRIAL = frozenset({"method", "lr", "targets", "options", "out", "eval_every", "save_every", "progress"})
#: the sweep's own keys
SWEEP_KEYS = ("space", "n_trials", "out", "eval_every", "pruner", "first_trials")


@dataclass(frozen=True)
class PrunerSettings:
    """Successive halving (optuna's ``SuccessiveHalvingPruner``) over the validation metric
    reported at each evaluation; ``min_resource`` in training steps (default: ``eval_every``)."""

    enabled: bool = True
    min_resource: int | None = None
    reduction_factor: int = 2
    min_early_stopping_rate: int = 0


@dataclass
class SweepConfig:
    """A whole sweep: ``job`` holds the training-job fields every trial shares."""

    space: SearchSpace
    job: dict[str, Any] = field(default_factory=dict)
    n_trials: int = 10
    out: str = "runs/sweep"
    eval_every: int = 0
    pruner: PrunerSettings = PrunerSettings()
    first_trials: list[dict[str, Any]] = field(default_factory=list)

    def trial_job(self, **per_trial: Any) -> TrainJob:
        """The training job of one trial (``method``, ``lr``, ``targets``, ``options``, ``out``)."""
        return TrainJob(**self.job, eval_every=self.eval_every, progress=False, **per_trial)

    def identity(self) -> dict[str, Any]:
        """What must not change when a sweep resumes (all but the trial count and the folder)."""
        return json.loads(json.dumps({
            "job": self.job, "eval_every": self.eval_every, "pruner": dataclasses.asdict(self.pruner),
            "space": {name: {"options": {k: list(v) for k, v in m.options.items()},
                             "lr": [m.lr.low, m.lr.high], "targets": list(m.targets)}
                      for name, m in self.space.methods.items()},
            "first_trials": self.first_trials,
        }))


def _int(value: Any, key: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"sweep config: {key} must be an integer >= {least}, got {value!r}")
    return value


def parse_pruner(value: Any) -> PrunerSettings:
    """``none`` / ``false``, absent (defaults) or ``{min_resource, reduction_factor, min_early_stopping_rate}``."""
    if value in ("none", False):
        return PrunerSettings(enabled=False)
    if value is None:
        return PrunerSettings()
    known = [f.name for f in dataclasses.fields(PrunerSettings) if f.name != "enabled"]
    if not isinstance(value, dict) or set(value) - set(known):
        raise ConfigError(f"sweep config: pruner must be 'none' or a mapping of {', '.join(known)}, got {value!r}")
    settings = PrunerSettings(**value)
    if settings.min_resource is not None:
        _int(settings.min_resource, "pruner.min_resource", 1)
    _int(settings.reduction_factor, "pruner.reduction_factor", 2)
    _int(settings.min_early_stopping_rate, "pruner.min_early_stopping_rate", 0)
    return settings


def parse_sweep_config(data: Any, where: str = "sweep config") -> SweepConfig:
    """A :class:`SweepConfig` from the YAML's mapping.

    Raises:
        ConfigError: an unknown key (the valid ones listed), a bad value, a method or option
            that does not exist, or pruning without evaluations.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping (model, data, steps, space, ...), got {type(data).__name__}")
    data = dict(data)
    job_fields = {f.name for f in dataclasses.fields(TrainJob)} - PER_TRIAL
    unknown = sorted(set(data) - job_fields - set(SWEEP_KEYS))
    if unknown:
        searched = sorted(set(data) & (PER_TRIAL - set(SWEEP_KEYS)))
        hint = (f"; {', '.join(searched)} are searched: set them under space (space.methods, space.lr, space.targets)"
                if searched else "")
        raise ConfigError(f"{where}: unknown key(s) {unknown}{hint}; valid: {', '.join(SWEEP_KEYS)} and the training "
                          f"settings {', '.join(sorted(job_fields))}")
    if "space" not in data:
        raise ConfigError(f"{where}: no 'space'; add space: {{methods: {{lora: {{r: [4, 8]}}}}, lr: [1.0e-4, 1.0e-2]}}")
    space = parse_space(data.pop("space"))
    n_trials = _int(data.pop("n_trials", 10), "n_trials", 1)
    out = str(data.pop("out", "runs/sweep"))
    pruner = parse_pruner(data.pop("pruner", None))
    first_trials = data.pop("first_trials", None) or []
    if not isinstance(first_trials, list):
        raise ConfigError(f"{where}: first_trials must be a list of trials, e.g. [{{method: lora, r: 8}}]")
    for i, entry in enumerate(first_trials):
        space.fixed_params(entry, f"first_trials[{i}]")
    steps = data.get("steps")
    eval_every = data.pop("eval_every", None)
    if eval_every is None:
        if pruner.enabled and not steps:
            raise ConfigError(f"{where}: pruning needs evaluations during training: set eval_every (and steps), or "
                              f"pruner: none")
        eval_every = max(1, steps // 10) if steps else 0
    eval_every = _int(eval_every, "eval_every", 0 if not pruner.enabled else 1)
    config = SweepConfig(space, data, n_trials, out, eval_every, pruner, first_trials)
    try:  # the shared fields, checked as a training job checks them (types, dtype, quantize, ...)
        check_field_types(config.trial_job(method=next(iter(space.methods))))
    except ConfigError as error:
        raise ConfigError(f"{where}: {str(error).replace('TrainJob: field', 'setting')}") from None
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from None
    return config


def load_sweep_config(path: str | Path, **overrides: Any) -> SweepConfig:
    """A sweep config from YAML; ``overrides`` (command-line flags that are not ``None``) win."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep config {str(path)!r} not found; pass --config FILE.yaml (see docs/SWEEP.md)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if isinstance(data, dict):
        data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_sweep_config(data, str(path))
