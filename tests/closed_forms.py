"""Closed-form trainable-parameter counts of the methods added after the founding six, one
function per method, computed by hand from the adapted modules' shapes (see closed_form.py)."""

from __future__ import annotations

from closed_form import _linear, closed_form  # noqa: F401


@closed_form("vera")
def _vera(model, config, modules):
    """Per adapted layer: d (r) and b (out); the shared A and B are frozen."""
    return sum(config.r + _linear(model.get_submodule(p))[1] for p in modules if p)
