"""Closed-form trainable-parameter counts of the methods added after the founding six, one
function per method, computed by hand from the adapted modules' shapes (see closed_form.py)."""

from __future__ import annotations

from closed_form import _linear, closed_form  # noqa: F401


@closed_form("adalora")
def _adalora(model, config, modules):
    """Q (r x in), lambda (r), P (out x r) per module, r from rank_pattern else init_r."""
    total = 0
    for path in modules:
        fan_in, fan_out = _linear(model.get_submodule(path))
        rank = (config.rank_pattern or {}).get(path, config.init_r)
        total += rank * fan_in + rank + fan_out * rank
    return total


@closed_form("dylora")
def _dylora(model, config, modules):
    """A (r x in) and B (out x r) per module: every rank up to r shares them."""
    return sum(config.r * sum(_linear(model.get_submodule(path))) for path in modules)
