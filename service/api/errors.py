"""Error responses in one shape, always valid JSON.

Every /api/v1 error is `{"detail": "<a sentence>", "errors": [...]}`: `detail` is what a person
reads (clients that print it as text keep working), `errors` the machine-readable list of field
errors (pydantic's location, message and type, plus a `suggestion` for a misspelt field name),
empty when the error is not about a field. /v2 keeps the Open Inference Protocol's `{"error": ...}`
(service/api/v2.py).
"""

from __future__ import annotations

import difflib
import math
import re
import types
from collections.abc import Iterable, Sequence
from typing import Any, Union, get_args, get_origin

from fastapi import HTTPException, Request, params, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException


class FieldError(BaseModel):
    """One field error of a malformed request, as request validation found it."""

    loc: list[str | int] = Field(description="Where: 'body', 'query' or 'path', then the field's path.")
    msg: str = Field(description="What is wrong with it.")
    type: str = Field(description="pydantic's error type, e.g. missing, extra_forbidden, greater_than.")
    suggestion: str | None = Field(
        None, description="For an unknown field (extra_forbidden): the known field it may have meant."
    )


class Message(BaseModel):
    """Every /api/v1 error body: a sentence saying what was wrong, and beside it the machine-readable
    list of field errors (empty when the error is not about fields of the request)."""

    detail: str = Field(description="What went wrong, as a sentence for people.")
    errors: list[FieldError] = Field(
        default_factory=list, description="The field errors request validation found; [] for other errors."
    )


# What any route can answer besides its own codes: auth, limits, an unknown id, overload.
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": Message, "description": "The body could not be parsed (not JSON, or bad multipart)"},
    401: {"model": Message, "description": "Missing or invalid API key"},
    403: {"model": Message, "description": "The key lacks the scope this route needs"},
    404: {"model": Message, "description": "No such resource"},
    413: {"model": Message, "description": "Request body over BNLAB_MAX_BODY_BYTES"},
    415: {"model": Message, "description": "A JSON body sent without a JSON content type"},
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


def error_body(detail: str, errors: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The one /api/v1 error shape (schemas.Message)."""
    return {"detail": detail, "errors": list(errors)}


# Sentences for the first few field errors; the list beside them has all of them.
SENTENCES_SHOWN = 3


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _json_safe(jsonable_encoder(exc.errors()))
    body_model = _body_annotation(request)
    for error in errors:
        suggestion = _suggest(error, body_model)
        if suggestion is not None:
            error["suggestion"] = suggestion
    return JSONResponse(
        error_body(describe_errors(errors), errors), status_code=status.HTTP_422_UNPROCESSABLE_CONTENT
    )


def describe_errors(errors: Sequence[dict[str, Any]]) -> str:
    """One sentence per field error (the first few), for people."""
    sentences = [_sentence(error) for error in errors[:SENTENCES_SHOWN]]
    hidden = len(errors) - SENTENCES_SHOWN
    if hidden > 0:
        sentences.append(f"and {hidden} more (see errors)")
    return "; ".join(sentences) or "the request is invalid"


def _where(loc: Sequence[Any]) -> str:
    if not loc:
        return "the request"
    source, path = str(loc[0]), ".".join(str(part) for part in loc[1:])
    if source == "body":
        return f"body field {path}" if path else "the body"
    return f"{source} parameter {path}" if path else source


def _sentence(error: dict[str, Any]) -> str:
    where = _where(error.get("loc", ()))
    if error.get("type") == "extra_forbidden":
        hint = f"; did you mean '{error['suggestion']}'?" if error.get("suggestion") else ""
        return f"{where} is not a known field{hint}"
    if error.get("type") == "json_invalid":
        return f"the body is not valid JSON ({(error.get('ctx') or {}).get('error', 'decode error')})"
    return f"{where}: {error.get('msg')}"


# ---------------------------------------------------------------------------------------- did you mean


def _body_annotation(request: Request) -> Any:
    """The route's declared JSON body type (a model, or a union of models), if it has one."""
    route = request.scope.get("route")
    field = route.body_field if isinstance(route, APIRoute) else None
    return None if field is None else field.field_info.annotation


def _suggest(error: dict[str, Any], annotation: Any) -> str | None:
    """For an unknown body field, the closest field the model has at that place."""
    loc: list[Any] = list(error.get("loc") or ())
    if error.get("type") != "extra_forbidden" or annotation is None or len(loc) < 2 or loc[0] != "body":
        return None
    models = _models_at(annotation, loc[1:-1])
    return closest_name(str(loc[-1]), sorted({field for model in models for field in model.model_fields}))


def closest_name(name: str, candidates: Iterable[str]) -> str | None:
    """A similar spelling, or the field a long name abbreviates (learning_rate → lr)."""
    options = [c for c in candidates if c != name]
    initials = "".join(part[0] for part in name.lower().split("_") if part)
    if len(initials) > 1 and initials in options:
        return initials
    close = difflib.get_close_matches(name.lower(), options, n=1, cutoff=0.6)
    return close[0] if close else None


def _models_at(annotation: Any, path: Sequence[Any]) -> list[type[BaseModel]]:
    """The models that can sit at `path` inside `annotation` (list indices and union tags skipped)."""
    models = _models_in(annotation)
    for part in path:
        if isinstance(part, int):
            continue
        tagged = [model for model in models if model.__name__ == part]
        if tagged:  # pydantic names the union member it tried: keep that one
            models = tagged
            continue
        models = [
            inner
            for model in models
            if part in model.model_fields
            for inner in _models_in(model.model_fields[part].annotation)
        ]
    return models


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) in (Union, types.UnionType) or get_args(annotation):
        return [model for arg in get_args(annotation) for model in _models_in(arg)]
    return []


# ---------------------------------------------------------------------------------------- content type


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";")[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


async def require_json_content_type(request: Request) -> None:
    """415 for a /api/v1 route that takes a JSON body when the request says it is something else
    (or says nothing): FastAPI would otherwise validate the raw bytes and answer a puzzling 422.
    Routes that read their own bodies (predict, uploads) have no JSON body field and check theirs."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or route.body_field is None or _is_form(route):
        return
    field = route.body_field
    if not request.url.path.startswith("/api/v1/"):
        return
    if _is_json(request.headers.get("content-type", "")):
        return
    if not field.field_info.is_required() and not await request.body():
        return  # an optional body left out (POST /api/v1/presets/{name})
    raise HTTPException(
        status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        detail="send the body as JSON with the header 'content-type: application/json'",
    )


def _is_form(route: APIRoute) -> bool:
    return route.body_field is not None and isinstance(route.body_field.field_info, params.Form)


def document_json_bodies(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare the 415 on the /api/v1 operations whose body is JSON (the only ones that answer it)."""
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            content = operation.get("requestBody", {}).get("content", {})
            if path.startswith("/api/v1/") and "application/json" in content and len(content) == 1:
                operation.setdefault("responses", {}).setdefault("415", _response_415())
    return schema


def _response_415() -> dict[str, Any]:
    return {
        "description": COMMON_RESPONSES[415]["description"],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Message"}}},
    }


def _allowed_methods(app: Any, path: str) -> list[str]:
    methods: set[str] = set()
    for template, operations in app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """Errors in the one shape; a 405 lists every method the path serves: Starlette names only
    those of the first route that matched the path (GET and POST are separate routes)."""
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code in (status.HTTP_204_NO_CONTENT, status.HTTP_304_NOT_MODIFIED):
        return Response(status_code=exc.status_code, headers=headers)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    response: Response = JSONResponse(error_body(detail), status_code=exc.status_code, headers=headers)
    if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
        allowed = _allowed_methods(request.app, request.url.path)
        if allowed:
            response.headers["Allow"] = ", ".join(allowed)
    return response
