"""The FastAPI application."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from service import __version__
from service.api import health, runs
from service.api.errors import validation_error_handler


def create_app() -> FastAPI:
    app = FastAPI(
        title="bnlab",
        version=__version__,
        description="Train and serve neural networks with and without batch normalization.",
    )
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.include_router(health.router)
    app.include_router(runs.router)
    return app
