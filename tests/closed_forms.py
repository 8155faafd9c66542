"""Closed-form trainable-parameter counts of the methods added after the founding six, one
function per method, computed by hand from the adapted modules' shapes (see closed_form.py)."""

from __future__ import annotations

from closed_form import _linear, closed_form  # noqa: F401


@closed_form("oft")
def _oft(model, config, modules):
    """Per module: one strict upper triangle n(n-1)/2 per block (one in all with block_share),
    n = the block size (input width / r when r is given)."""
    total = 0
    for path in modules:
        fan_in = _linear(model.get_submodule(path))[0]
        size = fan_in // config.r if config.r is not None else (config.block_size or 32)
        total += (1 if config.block_share else fan_in // size) * size * (size - 1) // 2
    return total


@closed_form("ether")
def _ether(model, config, modules):
    """Per module: one normal u per block over the input width (``in`` numbers); ETHER+ also
    v there and u, v over the output width (``2 in + 2 out``)."""
    total = 0
    for path in modules:
        fan_in, fan_out = _linear(model.get_submodule(path))
        total += fan_in if config.variant == "ether" else 2 * (fan_in + fan_out)
    return total
