"""The plot routes' shared HTTP surface: the image format path parameter and its documented answers."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path

from service.api.errors import Message

PlotFormat = Annotated[Literal["png", "svg"], Path(description="png or svg.")]

IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}, "image/svg+xml": {}}, "description": "The plot"},
    409: {"model": Message, "description": "Nothing to draw yet (no finished epoch)"},
}
