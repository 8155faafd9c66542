"""Helpers of the ``deltatune serve`` tests: saved random deltas, concurrent posts, offline references."""

from __future__ import annotations

import asyncio

import httpx
import torch

import deltatune as dt
from deltatune.serve import DeltaLibrary, load_base


def save_random_deltas(model, folder, configs: dict, seed: int = 0, scale: float = 0.3) -> None:
    """Attach each config, randomise its tensors (as if trained), save it under ``folder/<name>``, delete it."""
    generator = torch.Generator().manual_seed(seed)
    for name, config in configs.items():
        dt.attach(model, config, name=name)
        with torch.no_grad():
            for _, p in dt.delta_parameters(model, name):
                p.add_(scale * torch.randn(p.shape, generator=generator))
        labels = {"labels": ["negative", "positive"]} if name == "sentiment" else None
        dt.save(model, folder / name, name, metrics=labels)
        dt.delete(model, name)


def post_concurrently(url: str, path: str, payloads: list[dict]) -> list[httpx.Response]:
    """POST every payload at once (one connection each); the responses in payload order."""
    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await asyncio.gather(*(client.post(path, json=p) for p in payloads))

    return asyncio.run(main())


#: (model folder, deltas folder, delta) -> (reference model, tokenizer)
REFERENCE_MODELS: dict = {}


def reference_probabilities(folder, deltas_dir, delta: str | None, text: str) -> list[float]:
    """The offline API's probabilities for one text alone (cached per delta)."""
    key = (str(folder), str(deltas_dir), delta)
    if key not in REFERENCE_MODELS:
        model, tokenizer, _ = load_base(str(folder), DeltaLibrary(deltas_dir))
        if delta is not None:
            dt.load(model, deltas_dir / delta, delta)
        REFERENCE_MODELS[key] = (model, tokenizer)
    model, tokenizer = REFERENCE_MODELS[key]
    context = dt.base_only(model) if delta is None else dt.using(model, delta)
    with context, torch.no_grad():
        logits = model(**tokenizer([text], return_tensors="pt")).logits
    return torch.softmax(logits, -1)[0].tolist()


def assert_error(response: httpx.Response, status: int, kind: str) -> dict:
    """The JSON error of ``response``, after checking its status and type."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and error["message"]
    return error
