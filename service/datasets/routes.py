"""/api/v1/datasets: upload a dataset as .npz, list, inspect and delete uploads.

A run trains on an upload with `{"dataset": {"name": "uploaded", "id": "<id>"}}`. The upload is
checked by service.ml.uploads (arrays x and y only, no pickles, dtypes, shapes, finiteness, labels,
sizes) in a worker thread, and stored re-encoded in the database, so every worker sees it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request, Response, status
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.api.bodies import body_docs
from service.api.deps import LimitQuery, OffsetQuery, SessionDep, SettingsDep
from service.api.errors import Message
from service.api.security import TRAIN, PrincipalDep
from service.config import Settings
from service.datasets import repository as dataset_repo
from service.datasets.schemas import DatasetPublic, DatasetsPublic
from service.db import session_scope
from service.ml import uploads
from service.models import Dataset

router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"])

# Room for the multipart envelope around the file (boundaries, part headers, the name field).
MULTIPART_OVERHEAD = 64 * 1024
# Like a run's name: no slash or backslash, so no field can carry a path or a URL.
NAME_PATTERN = r"^[\w .,:;()+=@#%&!?'-]{1,200}$"

DatasetIdPath = Annotated[
    str, Path(pattern=r"^[0-9a-f]{32}$", description="Server-generated dataset id (32 hex).")
]

UPLOAD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "file": {
            "type": "string",
            "format": "binary",
            "description": "A .npz holding exactly the arrays x and y (numpy.savez or savez_compressed).",
        },
        "name": {
            "type": "string",
            "pattern": NAME_PATTERN,
            "description": "A label: letters, digits, spaces and .,:;()+=@#%&!?'- (no slashes).",
        },
    },
    "required": ["file", "name"],
    "additionalProperties": False,
}


def upload_router_limits(settings: Settings) -> dict[str, Any]:
    """include_router arguments: this router takes bodies up to BNLAB_MAX_DATASET_BYTES (plus the
    multipart envelope), whatever BNLAB_MAX_BODY_BYTES allows the other routes."""
    # Twice the envelope: a body just over the limit reaches the route, which says so in JSON.
    return {"router": router, "max_body_size": settings.max_dataset_bytes + 2 * MULTIPART_OVERHEAD}


def _too_large(max_bytes: int) -> HTTPException:
    return HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE,
        detail=f"datasets are limited to {max_bytes:,} bytes (BNLAB_MAX_DATASET_BYTES)",
    )


def _unprocessable(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail)


async def _read_form(request: Request, *, max_bytes: int) -> tuple[str, bytes]:
    """The form's `name` and `file` (nothing else), the file read up to the limit."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail="send multipart/form-data with the .npz in the field 'file' and a 'name' "
            "(curl -F file=@data.npz -F name=my-data)",
        )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes + MULTIPART_OVERHEAD:
        raise _too_large(max_bytes)
    async with request.form(max_files=1, max_fields=2, max_part_size=MULTIPART_OVERHEAD) as form:
        unexpected = sorted(set(form.keys()) - {"file", "name"})
        if unexpected:
            raise _unprocessable(f"unexpected form fields {unexpected}: send only 'file' and 'name'")
        upload, name = form.get("file"), form.get("name")
        if not isinstance(upload, UploadFile):
            raise _unprocessable("send the .npz as a file field named 'file' (curl -F file=@data.npz)")
        if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
            raise _unprocessable(
                "send a 'name' field of 1 to 200 letters, digits, spaces or .,:;()+=@#%&!?'- (no slashes)"
            )
        data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_large(max_bytes)
    return name, data


def _check_and_store(*, name: str, owner: str, data: bytes, max_bytes: int) -> DatasetPublic:
    """Off the event loop: decompressing and checking megabytes of arrays takes a while."""
    try:
        arrays = uploads.check_npz(data, max_bytes=max_bytes)
    except uploads.UploadTooLarge as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=str(exc)) from exc
    except uploads.UploadError as exc:
        raise _unprocessable(str(exc)) from exc
    with session_scope() as session:
        dataset = dataset_repo.create_dataset(session=session, name=name, owner=owner, arrays=arrays)
        return DatasetPublic.model_validate(dataset)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Upload a dataset: a .npz with arrays x (samples) and y (labels)",
    description="x: uint8 pixels or float32/float64 features, [N, F], [N, H, W] or [N, C, H, W]; "
    "y: integer labels 0..K-1 (2 ≤ K ≤ 1000, every class present), one per sample. Pickled (object) "
    'arrays are refused. Train on it with `{"dataset": {"name": "uploaded", "id": "<id>"}}`.',
    responses={
        413: {"model": Message, "description": "File or unpacked arrays over BNLAB_MAX_DATASET_BYTES"},
        415: {"model": Message},
        422: {"model": Message, "description": "Not an acceptable dataset; the message says why"},
    },
    openapi_extra=TRAIN | body_docs({"multipart/form-data": UPLOAD_SCHEMA}),
)
async def upload_dataset(
    request: Request, settings: SettingsDep, principal: PrincipalDep, response: Response
) -> DatasetPublic:
    max_bytes = settings.max_dataset_bytes
    name, data = await _read_form(request, max_bytes=max_bytes)
    stored = await run_in_threadpool(
        lambda: _check_and_store(name=name, owner=principal.name, data=data, max_bytes=max_bytes)
    )
    response.headers["Location"] = f"/api/v1/datasets/{stored.id}"
    return stored


@router.get("", summary="List uploaded datasets, newest first")
def list_datasets(
    session: SessionDep,
    limit: LimitQuery = 20,
    offset: OffsetQuery = 0,
) -> DatasetsPublic:
    rows, total = dataset_repo.list_datasets(session=session, limit=limit, offset=offset)
    items = [DatasetPublic.model_validate(row) for row in rows]
    return DatasetsPublic(items=items, total=total, limit=limit, offset=offset)


def _dataset_or_404(session: SessionDep, dataset_id: str) -> Dataset:
    dataset = dataset_repo.get_dataset(session=session, dataset_id=dataset_id)
    if dataset is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"dataset {dataset_id} not found")
    return dataset


@router.get("/{dataset_id}", summary="One uploaded dataset: shape, classes, size, digest")
def get_dataset(dataset_id: DatasetIdPath, session: SessionDep) -> DatasetPublic:
    return DatasetPublic.model_validate(_dataset_or_404(session, dataset_id))


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an uploaded dataset (409 while queued or running runs train on it)",
    responses={409: {"model": Message}},
)
def delete_dataset(dataset_id: DatasetIdPath, session: SessionDep) -> Response:
    dataset = _dataset_or_404(session, dataset_id)
    active = dataset_repo.active_runs_using(session=session, dataset_id=dataset_id)
    if active:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"dataset {dataset_id} is used by queued or running runs {active}; "
            "cancel them or wait for them to end",
        )
    dataset_repo.delete_dataset(session=session, dataset=dataset)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
