"""Choosing a delta configuration: ``sweep`` (a search over methods, ranks, learning rates and
targets with optuna, pruning weak trials) and ``plan`` (what fits a budget of parameters,
memory and minutes, from a measured probe)."""

# plan: what fits a budget
from .plan import Budget, NothingFits, Plan, make_plan  # noqa: E402

__all__ = ["Budget", "NothingFits", "Plan", "make_plan"]
