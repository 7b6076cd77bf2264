"""The predict route's two bodies, chosen by Content-Type:

- `application/json`: `{"inputs": [...]}`, N samples of pixel values in [0, 1];
- `multipart/form-data` with one file field `file`: a PNG or JPEG, converted by service.serving.images' rule.

Anything else is 415. The body is read on the event loop; parsing and decoding happen in the
inference threads, once the model (and so its input shape) is known.
"""

from __future__ import annotations

import torch
from fastapi import HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from service.serving import images, inference
from service.serving.schemas import ImageInfoPublic, PredictRequest
from service.serving.server import LoadedModel

# Room for the multipart envelope around the file (boundaries, part headers, a few small fields).
MULTIPART_OVERHEAD = 64 * 1024


class PredictBody:
    """A request body waiting for its model: call it with the loaded model to get the input tensor."""

    def __init__(
        self, *, json: bytes | None = None, image: bytes | None = None, invert: images.Invert = "auto"
    ):
        self._json, self._image, self._invert = json, image, invert
        self.image_info: ImageInfoPublic | None = None

    @property
    def json_bytes(self) -> int | None:
        """The JSON body's size; None for an image."""
        return None if self._json is None else len(self._json)

    def __call__(self, loaded: LoadedModel) -> torch.Tensor:
        if self._image is not None:
            return self._decode_image(self._image, loaded)
        try:
            request = PredictRequest.model_validate_json(self._json or b"")
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from exc
        try:
            booleans = inference.could_hold_booleans(self._json or b"")
            return inference.inputs_to_tensor(request.inputs, loaded.config, booleans_possible=booleans)
        except inference.InputError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc

    def _decode_image(self, data: bytes, loaded: LoadedModel) -> torch.Tensor:
        try:
            tensor, info = images.decode_image(data, tuple(loaded.config.input_shape), self._invert)
        except images.ImageTooLarge as exc:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=str(exc)) from exc
        except images.ImageError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from exc
        self.image_info = ImageInfoPublic(
            format=info.format, width=info.width, height=info.height, inverted=info.inverted
        )
        return tensor


def _too_large() -> HTTPException:
    return HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE, detail=f"images are limited to {images.MAX_IMAGE_BYTES} bytes"
    )


async def _read_upload(request: Request) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > images.MAX_IMAGE_BYTES + MULTIPART_OVERHEAD:
        raise _too_large()
    async with request.form(max_files=1, max_fields=8, max_part_size=MULTIPART_OVERHEAD) as form:
        unexpected = sorted(set(form.keys()) - {"file"})
        if unexpected:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                detail=f"unexpected form fields {unexpected}: "
                "send the image as a file field named 'file' and nothing else",
            )
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                detail="send the image as a file field named 'file' (curl -F file=@digit.png)",
            )
        data = await upload.read(images.MAX_IMAGE_BYTES + 1)
    if len(data) > images.MAX_IMAGE_BYTES:
        raise _too_large()
    return data


async def read_predict_body(request: Request, *, invert: images.Invert) -> PredictBody:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return PredictBody(image=await _read_upload(request), invert=invert)
    if media_type == "application/json" or media_type.endswith("+json"):
        return PredictBody(json=await request.body())
    raise HTTPException(
        status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        detail='send application/json ({"inputs": [...]}) '
        "or multipart/form-data with an image in the field 'file'",
    )
