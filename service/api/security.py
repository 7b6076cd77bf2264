"""Authentication and authorization for every route (called by the app-wide gate, api/admission.py).

It runs on every request and never blocks (a stat of the keys file, a hash), so it runs on the event
loop. The key is read from the Authorization header here rather than through FastAPI's HTTPBearer
dependency, which cost every request more than the route itself; the OpenAPI document declares the
scheme (document_security).

A route's required scope is `openapi_extra={"x-bnlab-scope": ...}` when it declares one, else read
for GET/HEAD and train for anything that changes state. Health probes declare "public".
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.routing import APIRoute

from service.auth import LOCAL, KeyStore, Principal
from service.config import get_settings

SCOPE_KEY = "x-bnlab-scope"
PUBLIC = {SCOPE_KEY: "public"}
READ = {SCOPE_KEY: "read"}
TRAIN = {SCOPE_KEY: "train"}
ADMIN = {SCOPE_KEY: "admin"}

# The OpenAPI security scheme (what FastAPI's HTTPBearer declares), by the name it gives it.
BEARER_SCHEME = {
    "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "An API key from `bnlab keys create`."}
}


@lru_cache
def key_store(path: Path) -> KeyStore:
    return KeyStore(path)


def required_scope(request: Request) -> str:
    route = request.scope.get("route")
    declared = (route.openapi_extra or {}).get(SCOPE_KEY) if isinstance(route, APIRoute) else None
    if declared:
        return str(declared)
    return "read" if request.method in ("GET", "HEAD") else "train"


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=message, headers={"WWW-Authenticate": 'Bearer realm="bnlab"'}
    )


def bearer_key(request: Request) -> str | None:
    """The key of an `Authorization: Bearer <key>` header (the scheme in any case), else None."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


def authorize(request: Request, scope: str) -> Principal:
    """The caller, allowed `scope` (401 without a valid key, 403 without the scope); remembered on
    the request for the route (current_principal)."""
    keys_file = get_settings().api_keys_file
    if scope == "public" or keys_file is None:
        principal = LOCAL
    elif (key := bearer_key(request)) is None:
        raise _unauthorized("missing credentials: send 'Authorization: Bearer <key>'")
    else:
        found = key_store(keys_file).authenticate(key)
        if found is None:
            raise _unauthorized("invalid API key")
        principal = found
    if scope != "public" and not principal.allows(scope):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"this key lacks the '{scope}' scope")
    request.state.principal = principal
    return principal


def document_security(schema: dict[str, Any]) -> dict[str, Any]:
    """The bearer scheme in the OpenAPI document, required by every operation but the public ones
    (an empty `security`, and no 401 or 403 among their answers)."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(BEARER_SCHEME)
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            public = operation.get(SCOPE_KEY) == "public"
            operation["security"] = [] if public else [{name: []} for name in BEARER_SCHEME]
            if public:
                for code in ("401", "403"):
                    operation.get("responses", {}).pop(code, None)
    return schema


def current_principal(request: Request) -> Principal:
    principal: Principal = getattr(request.state, "principal", LOCAL)
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]
