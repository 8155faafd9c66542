"""The HTTP API: routes, admin authentication and JSON errors for every failure.

``create_app(engine, settings)`` builds a FastAPI app serving one base and its deltas:
``/v1/classify``, the OpenAI routes (``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``: ``openai.py``), ``/v1/deltas`` (list, and admin load / unload with a
bearer token), ``/healthz`` and ``/metrics`` (Prometheus). The OpenAPI schema states every
error status a route answers with, and the error body's shape.
"""

from __future__ import annotations

import contextlib
import hmac
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..errors import ConfigError
from .batcher import CLASSIFY, Batcher
from .contract import state_limits
from .engine import CLASSIFICATION, Engine, Work
from .errors import ApiError, as_api_error, error_responses
from .library import AUTO, BASE
from .metrics import CONTENT_TYPE, Metrics
from .openai import openai_router
from .schemas import NAME_PATTERN, ClassifyRequest


@dataclass
class Settings:
    """How the server batches, limits and protects requests.

    Attributes:
        admin_token: bearer token of the admin endpoints; ``None`` turns them off (404).
        max_batch: most rows per model batch.
        max_wait_ms: how long a batch waits for more requests.
        queue_size: most waiting requests before 503.
        timeout_s: most seconds per request before 504.
        max_inputs: most texts or prompts in one request (413 beyond).
        max_tokens: largest ``max_tokens`` a completion may ask for.
    """

    admin_token: str | None = None
    max_batch: int = 32
    max_wait_ms: float = 5.0
    queue_size: int = 256
    timeout_s: float = 30.0
    max_inputs: int = 64
    max_tokens: int = 256

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_wait_ms", "queue_size", "timeout_s", "max_inputs", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"serve setting {name} must be a positive number, got {value!r}")


def _error_response(error: ApiError, request: Request) -> JSONResponse:
    request.state.error_type = error.kind
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _field(location: tuple) -> str:
    parts = [str(p) for p in location if p != "body"]
    return ".".join(parts) or "body"


def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = error.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        first = next(p for p in problems if p.get("type") == "json_invalid")
        message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))}); send JSON"
        return _error_response(ApiError(422, "invalid_json", message), request)
    described = "; ".join(f"field {_field(tuple(p.get('loc', ())))!r}: {p.get('msg')}" for p in problems[:5])
    fields = [_field(tuple(p.get("loc", ()))) for p in problems]
    return _error_response(ApiError(422, "invalid_request", described, fields=fields), request)


def _rows(texts: list[str], what: str, limit: int) -> list[str]:
    rows = list(texts)
    if not rows:
        raise ApiError(400, "empty_input", f"{what} is empty; send at least one text")
    if len(rows) > limit:
        raise ApiError(413, "too_many_inputs", f"{what} holds {len(rows)} texts; at most {limit} per request, "
                       f"split it into several requests", limit=limit)
    return rows


def create_app(engine: Engine, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``'s base and deltas with ``settings``."""
    settings = settings or Settings()
    metrics = Metrics()
    batcher = Batcher(engine, metrics, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                      queue_size=settings.queue_size, timeout_s=settings.timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="deltatune serve", lifespan=lifespan)
    app.state.engine, app.state.batcher, app.state.metrics, app.state.settings = engine, batcher, metrics, settings

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        error = getattr(request.state, "error_type", None) if response.status_code >= 400 else None
        metrics.request(endpoint, response.status_code, time.perf_counter() - started,
                        error or (f"http_{response.status_code}" if response.status_code >= 400 else None))
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return _error_response(error, request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        headers = dict(error.headers or {})
        if error.status_code == 405:  # every method of the path, not only those of the first route matched
            headers["Allow"] = ", ".join(_allowed(app, request))
        return _error_response(ApiError(error.status_code, kind, str(error.detail), headers=headers), request)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        return _error_response(as_api_error(error), request)

    def delta_of(name: str | None) -> str | None:
        if name is None or name == BASE:
            return None
        if name == AUTO:  # the library's router chooses (see Engine.auto_deltas)
            return AUTO
        engine.library.folder(name)  # 400 for a bad name, 404 for an unknown one
        return name

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "model": engine.model_name, "task": engine.task,
                "loaded_deltas": len(engine.loaded()), "queue_depth": batcher.depth()}

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"}})
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(len(engine.loaded()), batcher.depth()), media_type=CONTENT_TYPE)

    @app.get("/v1/deltas")
    async def list_deltas() -> dict:
        loaded = engine.loaded()
        available = engine.library.available()
        deltas = [{**engine.library.describe(name), "loaded": name in loaded} for name in available]
        return {"base": engine.describe(), "loaded": loaded, "available": available, "deltas": deltas}

    serving = error_responses(400, 404, 409, 413, 422, 503, 504)
    app.include_router(openai_router(engine, batcher, settings, serving))

    @app.post("/v1/classify", responses=serving, include_in_schema=engine.task == CLASSIFICATION)
    async def classify(body: ClassifyRequest) -> dict:
        texts = _rows(body.inputs, "inputs", settings.max_inputs)
        delta = delta_of(body.delta)
        work = Work(delta, texts)
        results = await batcher.run(CLASSIFY, work)
        return {"object": "classification", "model": engine.model_name, "delta": work.delta, "results": results}

    if settings.admin_token:
        admin = Depends(_admin_check(settings.admin_token))

        managing = error_responses(400, 401, 403, 404, 409, 422)

        @app.post("/v1/deltas/{name}", dependencies=[admin], responses=managing)
        async def load_delta(name: Annotated[str, Path(pattern=NAME_PATTERN)]) -> dict:
            engine.library.folder(name)
            return await batcher.call(lambda: engine.load(name))

        @app.delete("/v1/deltas/{name}", dependencies=[admin], responses=managing)
        async def unload_delta(name: Annotated[str, Path(pattern=NAME_PATTERN)]) -> dict:
            return await batcher.call(lambda: engine.unload(name))

    state_limits(app, settings, engine.model_name)
    return app


def _allowed(app: FastAPI, request: Request) -> list[str]:
    """The methods some route of the app takes at the request's path."""
    methods: set[str] = set()
    for route in app.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def _admin_check(token: str):
    expected = token.encode()

    async def check(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "unauthorized", "admin endpoint: send 'Authorization: Bearer <admin token>'",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), expected):
            raise ApiError(403, "forbidden", "the admin token is wrong")

    return check
