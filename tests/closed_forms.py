"""Closed-form trainable-parameter counts of the methods added after the founding six, one
function per method, computed by hand from the adapted modules' shapes (see closed_form.py)."""

from __future__ import annotations

from closed_form import _linear, closed_form  # noqa: F401


@closed_form("loha")
def _loha(model, config, modules):
    """Four factors per module: W1a, W2a (out, r) and W1b, W2b (r, in)."""
    total = 0
    for path in modules:
        fan_in, fan_out = _linear(model.get_submodule(path))
        r = (config.rank_pattern or {}).get(path, config.r)
        total += 2 * r * (fan_in + fan_out)
    return total
