"""Path-traversal variants against every route that takes an id: 404 or 422, never a file (check 16)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from service.main import create_app

# Encoded, double-encoded and backslash forms; a bare ".." segment is resolved by the HTTP client
# itself (RFC 3986 dot-segment removal) before the request leaves, so it cannot reach the server.
VARIANTS = [
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%252e%252e%252fetc%252fpasswd",
    "..%5C..%5Cwindows%5Cwin.ini",
    "....%2F%2F....%2F%2Fetc%2Fpasswd",
    "%2Fetc%2Fpasswd",
    "etc%2Fpasswd%00",
    "%23",
    "a" * 5000,
]


def routes_with_ids() -> list[tuple[str, str]]:
    paths = create_app().openapi()["paths"]
    return [
        (method.upper(), template)
        for template, operations in paths.items()
        if "{" in template
        for method in operations
    ]


@pytest.mark.parametrize(("method", "template"), routes_with_ids())
def test_traversal_variants_never_reach_a_file(client: TestClient, method: str, template: str) -> None:
    for variant in VARIANTS:
        path = re.sub(r"\{[^}]+\}", variant, template)
        response = client.request(method, path, json={})
        # 400 is how the Open Inference Protocol (/v2) reports bad input.
        assert response.status_code in (400, 404, 405, 409, 422), (
            path,
            response.status_code,
            response.text[:200],
        )
        assert "root:" not in response.text
