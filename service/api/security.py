"""Authentication and authorization for every route, applied once as an app-wide dependency.

It is async on purpose: it runs on every request and never blocks (a stat of the keys file, a
hash), so it should not cost a thread hand-off.

A route's required scope is `openapi_extra={"x-bnlab-scope": ...}` when it declares one, else read
for GET/HEAD and train for anything that changes state. Health probes declare "public".
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth import LOCAL, KeyStore, Principal
from service.config import get_settings

SCOPE_KEY = "x-bnlab-scope"
PUBLIC = {SCOPE_KEY: "public"}
READ = {SCOPE_KEY: "read"}
TRAIN = {SCOPE_KEY: "train"}
ADMIN = {SCOPE_KEY: "admin"}

bearer = HTTPBearer(auto_error=False, description="An API key from `bnlab keys create`.")


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


async def authorize(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    scope = required_scope(request)
    keys_file = get_settings().api_keys_file
    if scope == "public" or keys_file is None:
        principal = LOCAL
    elif credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized("missing credentials: send 'Authorization: Bearer <key>'")
    else:
        found = key_store(keys_file).authenticate(credentials.credentials)
        if found is None:
            raise _unauthorized("invalid API key")
        principal = found
    if scope != "public" and not principal.allows(scope):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"this key lacks the '{scope}' scope")
    request.state.principal = principal
    return principal


def mark_public_operations(schema: dict[str, Any]) -> dict[str, Any]:
    """Public operations need no key: say so in the OpenAPI document (an empty `security`)."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if operation.get(SCOPE_KEY) == "public":
                operation["security"] = []
                for code in ("401", "403"):
                    operation.get("responses", {}).pop(code, None)
    return schema


def current_principal(request: Request) -> Principal:
    principal: Principal = getattr(request.state, "principal", LOCAL)
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]
