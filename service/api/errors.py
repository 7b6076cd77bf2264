"""Error responses that are always valid JSON."""

from __future__ import annotations

import math
import re
from typing import Any

from fastapi import Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException


# What any route can answer besides its own codes: auth, limits, an unknown id, overload.
class Message(BaseModel):
    """Every error body: a sentence saying what was wrong, or, for a malformed request, the list of
    field errors (location, message, type) that request validation found."""

    detail: str | list[dict[str, Any]]


COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": Message, "description": "The body could not be parsed (not JSON, or bad multipart)"},
    401: {"model": Message, "description": "Missing or invalid API key"},
    403: {"model": Message, "description": "The key lacks the scope this route needs"},
    404: {"model": Message, "description": "No such resource"},
    413: {"model": Message, "description": "Request body over BNLAB_MAX_BODY_BYTES"},
    422: {"model": Message, "description": "The request is malformed or its values are out of bounds"},
    429: {"model": Message, "description": "Rate limit or active-run cap reached; see Retry-After"},
    503: {"model": Message, "description": "Overloaded, or the broker is unreachable; see Retry-After"},
}


def _json_safe(value: Any) -> Any:
    """NaN and infinity are not JSON: echoing a rejected `NaN` back as-is would turn a 422 into a 500."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


async def validation_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail = _json_safe(jsonable_encoder(exc.errors()))
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def _allowed_methods(app: Any, path: str) -> list[str]:
    methods: set[str] = set()
    for template, operations in app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """FastAPI's own handler, except that a 405 lists every method the path serves: Starlette names
    only those of the first route that matched the path (GET and POST are separate routes)."""
    assert isinstance(exc, StarletteHTTPException)
    response = await http_exception_handler(request, exc)
    if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
        allowed = _allowed_methods(request.app, request.url.path)
        if allowed:
            response.headers["Allow"] = ", ".join(allowed)
    return response
