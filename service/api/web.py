"""The dashboard: static HTML, JS and CSS from service/web, served by the API itself.

The page and its assets are public (they hold no data); every figure on it comes from the API with
the key the user typed into the page, sent as a Bearer token, so the data stays behind the keys.
A strict Content-Security-Policy allows only this origin's scripts, styles and connections.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.security import PUBLIC

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
# Swagger UI's files, vendored from npm (service/web/vendor/swagger-ui/VERSION): FastAPI's default
# /docs loads them from a CDN and is a blank page offline.
SWAGGER_UI = "/static/vendor/swagger-ui"
# blob: and data: images: the drawn digit's preview; no inline script or style anywhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeaders:
    """Adds the dashboard's security headers to every response of the wrapped app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def dashboard() -> FileResponse:
    headers = {key.decode(): value.decode() for key, value in SECURITY_HEADERS}
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=headers)


def api_docs() -> HTMLResponse:
    """Swagger UI over /openapi.json, from this server's own copy of its files."""
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="bnlab API",
        swagger_js_url=f"{SWAGGER_UI}/swagger-ui-bundle.js",
        swagger_css_url=f"{SWAGGER_UI}/swagger-ui.css",
        swagger_favicon_url=f"{SWAGGER_UI}/favicon-32x32.png",
    )


def install(app: FastAPI) -> None:
    """`/` serves the page, `/docs` the API reference, `/static/…` their assets. None of them is part
    of the API's OpenAPI document. (Create the app with docs_url=None: this /docs replaces FastAPI's.)"""
    app.add_api_route("/", dashboard, methods=["GET"], include_in_schema=False, openapi_extra=PUBLIC)
    app.add_api_route("/docs", api_docs, methods=["GET"], include_in_schema=False, openapi_extra=PUBLIC)
    app.mount("/static", SecurityHeaders(StaticFiles(directory=WEB_DIR)), name="static")
