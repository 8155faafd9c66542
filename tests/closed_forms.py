"""Closed-form trainable-parameter counts of the methods added after the founding six, one
function per method, computed by hand from the adapted modules' shapes (see closed_form.py)."""

from __future__ import annotations

from closed_form import _linear, closed_form  # noqa: F401


def _kinds_of(model, modules):
    """(role or 'linear', in, out) of each adapted linear module, the role read by deltatune.core.roles."""
    from deltatune.core.roles import ROLES, find_roles

    found = find_roles(model)
    role_of = {}
    for role in ROLES:
        for path in found.roles.get(role, ()):
            role_of.setdefault(path, role)
    return {p: (role_of.get(p, "linear"), *_linear(model.get_submodule(p))) for p in modules if p}


@closed_form("tiedlora")
def _tiedlora(model, config, modules):
    """A (r x in) and B (out x r) once per kind (role and shape), u (r) and v (out) per module."""
    kinds = _kinds_of(model, modules)
    shared = sum(("A" in config.trainable) * config.r * fan_in + ("B" in config.trainable) * fan_out * config.r
                 for _, fan_in, fan_out in set(kinds.values()))
    own = sum(("u" in config.trainable) * config.r + ("v" in config.trainable) * fan_out
              for _, _, fan_out in kinds.values())
    return shared + own
