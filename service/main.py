"""The FastAPI application."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from service import __version__
from service.api import health, metrics, web
from service.api.admission import admit
from service.api.busy import BUSY_ERRORS, database_busy_handler
from service.api.errors import (
    COMMON_RESPONSES,
    document_json_bodies,
    http_error_handler,
    validation_error_handler,
)
from service.api.limits import ConcurrencyLimitMiddleware, new_rate_limiter
from service.api.security import document_security
from service.cards import routes as card_routes
from service.config import get_settings
from service.datasets.routes import upload_router_limits
from service.experiments import preset_routes
from service.experiments import routes as experiment_routes
from service.ml.nets import warm_up_meta_device
from service.runs import events
from service.runs import plot_routes as run_plot_routes
from service.runs import routes as run_routes
from service.searches import routes as search_routes
from service.serving import alias_routes, bn_routes, model_routes, v2


def create_app() -> FastAPI:
    settings = get_settings()
    warm_up_meta_device()  # or the first submitted run's response waits a second for it
    app = FastAPI(
        title="bnlab",
        version=__version__,
        description="Train and serve neural networks with and without batch normalization.",
        # Every route: authenticate, check its scope, the per-key rate limit, then the content type.
        dependencies=[Depends(admit)],
        responses=COMMON_RESPONSES,
        docs_url=None,  # web.install serves /docs from vendored files; ReDoc would load from a CDN
        redoc_url=None,
    )
    app.state.rate_limiter = new_rate_limiter()
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=settings.max_body_bytes)
    app.add_middleware(
        ConcurrencyLimitMiddleware,
        max_in_flight=settings.max_concurrent_requests,
        max_queued=settings.max_queued_requests,
        max_queue_wait_s=settings.max_queue_wait_s,
        max_streams=settings.max_event_streams,
    )
    # Outermost: a request id, a log line and metrics for every answer, 413 and 503 included.
    app.add_middleware(metrics.RequestTelemetryMiddleware)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    for busy in BUSY_ERRORS:  # 503 with Retry-After, not 500, when the database is too busy
        app.add_exception_handler(busy, database_busy_handler)
    # The serving routes first: a request is matched against each route in turn, and every router
    # before /v2 cost its inference requests ~10 µs of path matching (routes do not overlap).
    app.include_router(health.router)
    app.include_router(v2.router)
    app.include_router(run_routes.router)
    app.include_router(model_routes.router)
    app.include_router(run_plot_routes.router)
    app.include_router(experiment_routes.router)
    app.include_router(preset_routes.router)
    app.include_router(search_routes.router)
    app.include_router(search_routes.preset_router)
    app.include_router(card_routes.router)
    app.include_router(card_routes.replications_router)
    app.include_router(bn_routes.router)
    app.include_router(alias_routes.router)
    app.include_router(**upload_router_limits(settings))  # /api/v1/datasets: its own body limit
    app.include_router(events.router)
    app.include_router(metrics.router)
    web.install(app)
    _document_security_and_bodies(app)
    return app


def _document_security_and_bodies(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_json_bodies(document_security(generate()))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise it
