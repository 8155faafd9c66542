"""Closed-form trainable-parameter counts of the methods added after the founding six, one
function per method, computed by hand from the adapted modules' shapes (see closed_form.py)."""

from __future__ import annotations

from closed_form import _linear, closed_form  # noqa: F401


@closed_form("vera")
def _vera(model, config, modules):
    """Per adapted layer: d (r) and b (out); the shared A and B are frozen."""
    return sum(config.r + _linear(model.get_submodule(p))[1] for p in modules if p)


@closed_form("vblora")
def _vblora(model, config, modules):
    """The shared bank (num_vectors x vector_length) plus, per adapted layer, logits over the
    bank for the r x in/L pieces of A and the out/L x r pieces of B."""
    pieces = sum(config.r * sum(_linear(model.get_submodule(p))) // config.vector_length for p in modules if p)
    return config.num_vectors * config.vector_length + pieces * config.num_vectors
