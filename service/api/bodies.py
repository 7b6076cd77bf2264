"""Request bodies that routes parse themselves: off the event loop, and documented in OpenAPI; and
answers that routes serialize themselves.

The serving routes read the raw body and validate it in a worker thread (a 1,024-sample request is
megabytes of JSON), so FastAPI does not see a body parameter; `body_docs` puts the schema back into
the OpenAPI document. They answer with `json_response` (orjson, no second validation of the answer
against its model), the model named in `response_model=` for the documentation.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Response
from pydantic import BaseModel


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its nested `$defs` substituted in place (no document-level refs)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def body_docs(content: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """openapi_extra for a route whose body is `{media type: schema}`."""
    return {"requestBody": {"required": True, "content": {k: {"schema": v} for k, v in content.items()}}}


IMAGE_UPLOAD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"file": {"type": "string", "format": "binary", "description": "A PNG or JPEG image."}},
    "required": ["file"],
    # Only the file: other fields are refused (the form parser caps them), so say so.
    "additionalProperties": False,
}


def json_response(content: dict[str, Any], status_code: int = 200) -> Response:
    """`content` as JSON bytes: several times cheaper than a response model's validation and
    serialization for a few hundred floats. NaN and infinity become null, as pydantic writes them."""
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")
