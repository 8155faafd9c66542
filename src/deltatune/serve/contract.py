"""The OpenAPI schema states the limits this server enforces, with this server's values.

The request models (``schemas.py``) hold the fixed rules; what depends on the server (its
``--max-inputs`` and ``--max-tokens``, the base's id among the model names) is written into
the schema here, once, when it is first asked for. The server checks the same limits itself
(400 / 413 with the limit named), so what the schema promises and what is enforced agree.
"""

from __future__ import annotations

import re

from fastapi import FastAPI

from .library import BASE, NAME_RULE
from .schemas import MAX_TEXT


def model_pattern(base_id: str) -> str:
    """The names ``model`` may take: a delta name (``base`` among them) or the base's id."""
    return f"^(?:{NAME_RULE}|{re.escape(base_id)}|{BASE})$"


def state_limits(app: FastAPI, settings, base_id: str) -> None:
    """Make ``app.openapi()`` state ``settings``' limits and the model names of this server."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            _patch(original(), settings, model_pattern(base_id))
        return app.openapi_schema

    app.openapi = openapi


def _patch(schema: dict, settings, pattern: str) -> None:
    models = schema.get("components", {}).get("schemas", {})
    for name, texts in (("ClassifyRequest", "inputs"), ("CompletionRequest", "prompt")):
        if name in models:
            _texts(models[name]["properties"][texts], settings.max_inputs, nonempty=name == "CompletionRequest")
    for name in ("CompletionRequest", "ChatRequest"):
        if name not in models:
            continue
        properties = models[name]["properties"]
        properties["model"]["pattern"] = pattern
        for field in ("max_tokens", "max_completion_tokens"):
            for option in properties[field].get("anyOf", [properties[field]]):
                if option.get("type") == "integer":
                    option["maximum"] = settings.max_tokens
    for method in schema.get("paths", {}).get("/v1/models/{model}", {}).values():
        for parameter in method.get("parameters", []):
            if parameter["name"] == "model":
                parameter["schema"]["pattern"] = pattern


def _texts(field: dict, limit: int, nonempty: bool) -> None:
    """A list of texts (a string is one): at least one, at most ``limit``; prompts not empty."""
    text = {"type": "string", "maxLength": MAX_TEXT, **({"minLength": 1} if nonempty else {})}
    for option in field.get("anyOf", [field]):
        if option.get("type") == "array":
            option.update(minItems=1, maxItems=limit, items=dict(text))
        elif option.get("type") == "string":
            option.update(text)
