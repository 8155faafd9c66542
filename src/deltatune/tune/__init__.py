"""Choosing a delta configuration: ``sweep`` (a search over methods, ranks, learning rates and
targets with optuna, pruning weak trials) and ``plan`` (what fits a budget of parameters,
memory and minutes, from a measured probe)."""

# sweep (optuna is imported only when a sweep runs); plan: what fits a budget
from .plan import Budget, NothingFits, Plan, make_plan
from .sweep import Objective, resolve_targets, run_sweep
from .sweep_config import PrunerSettings, SweepConfig, load_sweep_config, parse_sweep_config
from .sweep_report import pareto_front
from .sweep_space import Choice, SearchSpace, parse_space

__all__ = ["Budget", "Choice", "NothingFits", "Objective", "Plan", "PrunerSettings", "SearchSpace", "SweepConfig",
           "load_sweep_config", "make_plan", "pareto_front", "parse_space", "parse_sweep_config", "resolve_targets",
           "run_sweep"]
