"""``deltatune sweep``: a search over methods, their options, learning rates and targets.

Each trial is an ordinary training job (:func:`deltatune.train.job.run_train`) whose delta is
kept in ``<out>/trials/<number>/``. Optuna samples the configurations (TPE) and stops weak
trials early by successive halving on the validation metric reported at each evaluation. The
study lives in ``<out>/study.db`` (SQLite), so running the same sweep again continues it:
finished trials are kept, and a trial that was running when the process died is marked failed
and its configuration run again in a new trial.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.config import ALL_LINEAR
from ..core.roles import default_targets
from ..core.targeting import select_modules
from ..errors import ConfigError, DeltaError
from ..io.atomic import write_text_atomic
from ..train.job import prepare, run_train
from .sweep_config import SweepConfig
from .sweep_report import ranked, write_report
from .sweep_space import is_role, target_items

STUDY_NAME = "sweep"
TRIALS = "trials"
PARTIAL = ".partial"

if TYPE_CHECKING:  # optuna is imported where it is used, so that importing deltatune.tune stays light
    import optuna


@dataclass
class Objective:
    """The validation metric the sweep optimises: accuracy for classification, loss for a causal LM."""

    metric: str
    direction: str  # "maximize" or "minimize"

    @classmethod
    def for_task(cls, task: str) -> "Objective":
        return cls("accuracy", "maximize") if task == "classification" else cls("loss", "minimize")


def resolve_targets(model: Any, label: str) -> list[str] | None:
    """The ``targets`` of a training job for a targets label: ``None`` (the method's default
    roles), ``["all-linear"]``, or module patterns (roles found in ``model``'s structure).

    Raises:
        TargetError: a role the model lacks, or a module pattern that matches nothing.
    """
    items = target_items(label)
    if items is None or items == [ALL_LINEAR]:
        return items
    patterns: list[str] = []
    for item in items:
        if is_role(item):
            patterns += default_targets(model, [item], "sweep")
        else:
            select_modules(model, [item])
            patterns.append(item)
    return list(dict.fromkeys(patterns))


class SweepLock:
    """``<out>/sweep.lock``: one process per sweep folder (a lock left by a dead process is taken over)."""

    def __init__(self, out: Path):
        self.path = out / "sweep.lock"

    def __enter__(self) -> "SweepLock":
        if self.path.exists():
            try:
                pid = int(self.path.read_text().strip() or 0)
            except ValueError:
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise ConfigError(f"another sweep (process {pid}) is running in {self.path.parent}; wait for it to "
                                  f"finish, or stop it, before running this sweep there")
        write_text_atomic(self.path, str(os.getpid()))
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_study(config: SweepConfig, out: Path, objective: Objective) -> optuna.Study:
    """Create the study in ``<out>/study.db``, or load it; a study made from another config is an error."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the sweep logs its own line per trial
    storage = optuna.storages.RDBStorage(f"sqlite:///{(out / 'study.db').resolve()}")
    pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    if config.pruner.enabled:
        pruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=config.pruner.min_resource or config.eval_every,
            reduction_factor=config.pruner.reduction_factor,
            min_early_stopping_rate=config.pruner.min_early_stopping_rate)
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction=objective.direction,
                                pruner=pruner, load_if_exists=True)
    identity = config.identity()
    recorded = study.user_attrs.get("config")
    if recorded is None:
        study.set_user_attr("config", identity)
        study.set_user_attr("objective", {"metric": objective.metric, "direction": objective.direction})
        for params in (config.space.fixed_params(t, "first_trials") for t in config.first_trials):
            study.enqueue_trial(params)
    elif recorded != identity:
        changed = sorted(k for k in set(recorded) | set(identity) if recorded.get(k) != identity.get(k))
        raise ConfigError(f"the sweep in {out} was started with other settings ({', '.join(changed)} differ); put "
                          f"them back to continue it, or pass another --out for a new sweep (only n_trials may change)")
    # seeded past the trials already run, so a resumed sweep does not repeat the first samples
    study.sampler = optuna.samplers.TPESampler(seed=int(config.job.get("seed", 0)) + len(study.trials))
    return study


def recover(study: optuna.Study, out: Path, log: Callable[[str], None]) -> None:
    """After an interruption: mark trials left running as failed, queue their configurations
    again (once), and remove half-written trial folders."""
    import optuna

    storage = study._storage  # the storage's own API takes trial ids; FrozenTrial has no public one
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial._trial_id, "note", "interrupted")
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        log(f"trial {trial.number} was running when the sweep stopped: marked failed, its configuration queued again")
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}  # a finished trial's attributes are read-only
    for trial in trials:
        if trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs.get("note") == "interrupted" \
                and trial.number not in retried:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    for partial in (out / TRIALS).glob(f"*{PARTIAL}"):
        shutil.rmtree(partial)


def trial_row(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """One leaderboard row: the trial's configuration, state and results."""
    attrs = trial.user_attrs
    result = attrs.get("result") or {}
    value = result.get("value")
    if value is None and trial.intermediate_values:
        value = trial.intermediate_values[trial.last_step]
    return {"trial": trial.number, "state": trial.state.name.lower(), **(attrs.get("choice") or {}),
            "value": value, **{k: v for k, v in result.items() if k != "value"},
            **({"note": attrs["note"]} if attrs.get("note") else {})}


class Trainer:
    """The objective: one trial trained as a job, its delta kept, pruning at each evaluation."""

    def __init__(self, config: SweepConfig, out: Path, objective: Objective, targets: dict[str, list[str] | None],
                 log: Callable[[str], None]):
        self.config, self.out, self.objective, self.targets, self.log = config, out, objective, targets, log

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        choice = self.config.space.suggest(trial)
        trial.set_user_attr("choice", choice.describe())
        folder = self.out / TRIALS / str(trial.number)
        staging = folder.with_name(folder.name + PARTIAL)
        for stale in (staging, folder):
            if stale.exists():
                shutil.rmtree(stale)
        job = self.config.trial_job(method=choice.method, options=choice.options, lr=choice.lr, out=str(staging),
                                    targets=None if choice.targets is None else self.targets[choice.targets])
        stopped: list[int] = []
        self.log(f"trial {trial.number}: {choice.method} {choice.options or ''} lr={choice.lr:.3g} "
                 f"targets={choice.targets or '-'}: training")

        def on_eval(step: int, metrics: dict[str, float]) -> bool:
            trial.report(metrics[self.objective.metric], step)
            if step != job.steps and trial.should_prune():  # a trial trained to the end is complete
                stopped.append(step)
                return True
            return False

        try:
            metrics = run_train(job, on_eval=on_eval if self.config.pruner.enabled else None)
        except KeyboardInterrupt:
            trial.set_user_attr("note", "interrupted")
            raise
        except DeltaError as error:
            trial.set_user_attr("note", f"error: {error}")
            self.log(f"trial {trial.number} failed: {error}")
            shutil.rmtree(staging, ignore_errors=True)  # the error is recorded; no half-written folder stays
            raise
        staging.rename(folder)
        value = metrics["validation"][self.objective.metric]
        trial.set_user_attr("result", {
            "value": value, "trainable_parameters": metrics["trainable_parameters"],
            "train_seconds": metrics["train_seconds"], "steps": metrics["steps"],
            "test": metrics["test"], "folder": str(Path(TRIALS) / str(trial.number))})
        state = f"pruned at step {stopped[0]}" if stopped else "complete"
        self.log(f"trial {trial.number}: validation {self.objective.metric} {value:.4f}, "
                 f"{metrics['trainable_parameters']:,} trainable parameters, {metrics['train_seconds']:.1f} s ({state})")
        if stopped:
            raise optuna.TrialPruned(f"validation {self.objective.metric} at step {stopped[0]} is in the weaker part "
                                     f"of its rung")
        return value


def finished(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``: complete and pruned ones."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def run_sweep(config: SweepConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or continue) a sweep until ``config.n_trials`` trials are complete or pruned, and
    write ``leaderboard.md``, ``leaderboard.json`` and ``pareto.png`` in ``config.out``.

    Returns:
        ``{"rows": [...], "summary": {...}, "markdown": "..."}``, the leaderboard rows best first.

    Raises:
        ConfigError: the model, data or a targets choice does not fit, or ``out`` holds a
            sweep started with other settings.
    """
    import optuna

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / TRIALS).mkdir(exist_ok=True)
    with SweepLock(out):
        probe = config.trial_job(method=next(iter(config.space.methods)), out=str(out / TRIALS / "probe"))
        splits, loaded = prepare(probe)  # the model and data load (or fail) once, before any trial
        objective = Objective.for_task(splits.task)
        labels = {label for m in config.space.methods.values() for label in m.targets}
        targets = {label: resolve_targets(loaded.model, label) for label in sorted(labels)}
        del splits, loaded
        study = open_study(config, out, objective)
        recover(study, out, log)
        summary = {"model": probe.model, "data": probe.data, "steps": probe.steps, "epochs": probe.epochs, "eval_every": config.eval_every, "metric": objective.metric,
                   "direction": objective.direction,
                   "pruner": (f"successive halving (min_resource {config.pruner.min_resource or config.eval_every}, "
                              f"reduction factor {config.pruner.reduction_factor})") if config.pruner.enabled else "none"}

        def report(study: optuna.Study, _trial: Any = None, chart: bool = False) -> str:
            rows = [trial_row(t) for t in study.get_trials(deepcopy=False)
                    if t.state != optuna.trial.TrialState.WAITING]
            return write_report(rows, summary, out, chart=chart)

        log(f"sweep in {out}: {finished(study)} of {config.n_trials} trials done")
        failed = 0  # failed trials do not count; as many failures as trials asked for end the run
        while (remaining := config.n_trials - finished(study)) > 0 and failed < config.n_trials:
            before = len(study.trials)
            study.optimize(Trainer(config, out, objective, targets, log), n_trials=remaining, catch=(DeltaError,),
                           callbacks=[report])
            failed += sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials[before:])
        if remaining > 0:
            log(f"stopped after {failed} failed trials (their errors are in the leaderboard); fix the cause and run "
                f"the sweep again to continue")
        markdown = report(study, chart=True)
    rows = [trial_row(t) for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.WAITING]
    return {"rows": ranked(rows, objective.direction == "maximize"), "summary": summary, "markdown": markdown}
