"""Closed-form trainable-parameter counts of the methods added after the founding six, one
function per method, computed by hand from the adapted modules' shapes (see closed_form.py)."""

from __future__ import annotations

from closed_form import _linear, closed_form  # noqa: F401


@closed_form("road")
def _road(model, config, modules):
    """RoAd: an angle and a scale per output pair (road_1), per output (road_2), or two per output (road_4)."""
    per_output = {"road_1": 1, "road_2": 2, "road_4": 4}[config.variant]  # angles + scales per output element
    return sum(per_output * _linear(model.get_submodule(p))[1] for p in modules)


@closed_form("diablo")
def _diablo(model, config, modules):
    """DiaBlo: N diagonal blocks of (out/N) x (in/N) each, i.e. in * out / N per module."""
    total = 0
    for p in modules:
        fan_in, fan_out = _linear(model.get_submodule(p))
        total += config.num_blocks * (fan_out // config.num_blocks) * (fan_in // config.num_blocks)
    return total


@closed_form("paca")
def _paca(model, config, modules):
    """PaCA: an (out x k) block of trained columns per module."""
    return sum(config.k * _linear(model.get_submodule(p))[1] for p in modules)


@closed_form("neuroada")
def _neuroada(model, config, modules):
    """NeuroAda: k bypass values per output neuron."""
    return sum(config.k * _linear(model.get_submodule(p))[1] for p in modules)
