"""Closed-form trainable-parameter counts of the methods added after the founding six, one
function per method, computed by hand from the adapted modules' shapes (see closed_form.py)."""

from __future__ import annotations

from closed_form import _linear, closed_form  # noqa: F401


@closed_form("loraxs")
def _loraxs(model, config, modules):
    return len(modules) * config.r * config.r  # one r x r matrix per module; the SVD factors are frozen


@closed_form("edora")
def _edora(model, config, modules):
    # an r x r matrix and a magnitude per output for each module
    return sum(config.r * config.r + _linear(model.get_submodule(p))[1] for p in modules)


@closed_form("abba")
def _abba(model, config, modules):
    # two trained pairs B_k (out, r_k), A_k (r_k, in) per module
    return sum((config.r1 + config.r2) * sum(_linear(model.get_submodule(p))) for p in modules)
