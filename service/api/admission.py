"""The gate every route passes, as one app-wide dependency: the caller's key and its scope, then the
key's rate limit, then the body's content type.

One dependency, not one per check: FastAPI works out every dependency of every request anew (its
signature, its cache key, its sub-dependencies), and the three checks with HTTPBearer's
sub-dependency cost a liveness probe ~65 µs of its ~170 µs in the API process (measured in process,
without the network); this one costs ~20 µs.
"""

from __future__ import annotations

from fastapi import Request

from service.api.errors import require_json_content_type
from service.api.limits import enforce_rate_limit
from service.api.security import authorize, required_scope


async def admit(request: Request) -> None:
    """401 or 403 (key, scope), 429 (rate limit), 415 (content type), in that order."""
    scope = required_scope(request)
    principal = authorize(request, scope)
    if scope != "public":  # the probes need no key, and a rate limit would let a flood fail them
        enforce_rate_limit(request, principal)
    await require_json_content_type(request)
