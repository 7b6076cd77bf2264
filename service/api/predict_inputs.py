"""The predict route's two bodies, chosen by Content-Type, each parsed off the event loop:

- `application/json`: `{"inputs": [...]}`, N samples of pixel values in [0, 1];
- `multipart/form-data` with one file field `file`: a PNG or JPEG, converted by service.images' rule.

Anything else is 415. Both end as float32 [N, *input_shape] plus the loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from fastapi import HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service import images, inference
from service.api.served import served_run_model
from service.schemas import ImageInfoPublic, PredictRequest
from service.serving import LoadedModel

# Room for the multipart envelope around the file (boundaries, part headers, a few small fields).
MULTIPART_OVERHEAD = 64 * 1024


@dataclass(frozen=True)
class PredictInputs:
    loaded: LoadedModel
    inputs: torch.Tensor
    image: ImageInfoPublic | None = None


def _from_json(body: bytes, run_id: str, version: int | None) -> PredictInputs:
    try:
        request = PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from exc
    loaded = served_run_model(run_id, version)
    try:
        return PredictInputs(loaded, inference.inputs_to_tensor(request.inputs, loaded.config))
    except inference.InputError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc


def _from_image(data: bytes, run_id: str, version: int | None, invert: images.Invert) -> PredictInputs:
    loaded = served_run_model(run_id, version)
    try:
        tensor, info = images.decode_image(data, tuple(loaded.config.input_shape), invert)
    except images.ImageTooLarge as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=str(exc)) from exc
    except images.ImageError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
    image = ImageInfoPublic(format=info.format, width=info.width, height=info.height, inverted=info.inverted)
    return PredictInputs(loaded, tensor, image)


async def _read_upload(request: Request) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > images.MAX_IMAGE_BYTES + MULTIPART_OVERHEAD:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE, detail=f"images are limited to {images.MAX_IMAGE_BYTES} bytes"
        )
    async with request.form(max_files=1, max_fields=8, max_part_size=MULTIPART_OVERHEAD) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                detail="send the image as a file field named 'file' (curl -F file=@digit.png)",
            )
        data = await upload.read(images.MAX_IMAGE_BYTES + 1)
    if len(data) > images.MAX_IMAGE_BYTES:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE, detail=f"images are limited to {images.MAX_IMAGE_BYTES} bytes"
        )
    return data


async def read_predict_inputs(
    request: Request, *, run_id: str, version: int | None, invert: images.Invert
) -> PredictInputs:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        data = await _read_upload(request)
        return await run_in_threadpool(_from_image, data, run_id, version, invert)
    if media_type == "application/json" or media_type.endswith("+json"):
        return await run_in_threadpool(_from_json, await request.body(), run_id, version)
    raise HTTPException(
        status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        detail='send application/json ({"inputs": [...]}) '
        "or multipart/form-data with an image in the field 'file'",
    )
