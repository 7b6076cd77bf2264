"""The FastAPI application."""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from service import __version__
from service.api import aliases, bn_tools, health, run_models, runs, v2
from service.api.errors import validation_error_handler
from service.api.limits import ConcurrencyLimitMiddleware, new_rate_limiter, rate_limit
from service.api.security import authorize
from service.config import get_settings


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        title="bnlab",
        version=__version__,
        description="Train and serve neural networks with and without batch normalization.",
        # Every route: authenticate, check its scope, then the per-key rate limit.
        dependencies=[Depends(authorize), Depends(rate_limit)],
    )
    app.state.rate_limiter = new_rate_limiter()
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=settings.max_body_bytes)
    app.add_middleware(ConcurrencyLimitMiddleware, max_in_flight=settings.max_concurrent_requests)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.include_router(health.router)
    app.include_router(runs.router)
    app.include_router(run_models.router)
    app.include_router(bn_tools.router)
    app.include_router(aliases.router)
    app.include_router(v2.router)
    return app
