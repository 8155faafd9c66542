"""Checks shared by the method test files (tests/test_method_<name>.py)."""

from __future__ import annotations

import torch

import deltatune as dt


def randomise(model, name: str, seed: int = 3, scale: float = 0.3) -> None:
    """Move every tensor of delta ``name`` by ``scale`` N(0, 1), seeded, away from its start."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in dt.delta_parameters(model, name):
            p.add_(scale * torch.randn(p.shape, generator=generator))


def assert_rows_equal_alone(case, model, rows: list, inputs: dict, tol: float = 1e-5) -> None:
    """One mixed batch routed by ``rows`` (delta names, ``None`` for the base) gives, row by
    row, what that row gives run alone with only its delta active."""
    with torch.no_grad(), dt.route(model, rows):
        mixed = case.output(model, inputs)
    with torch.no_grad():
        for i, name in enumerate(rows):
            with dt.using(model, (name,) if name else ()):
                alone = case.output(model, {k: v[i:i + 1] for k, v in inputs.items()})[0]
            torch.testing.assert_close(mixed[i], alone, rtol=tol, atol=tol)
