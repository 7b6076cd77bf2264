"""A run's stored models: the versions, and downloads of weights, config and ONNX.

Version 1 is the trained weights; every recalibration adds one. `latest` names the newest.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Response, status
from sqlalchemy.orm import Session

from service.api.deps import RunDep, RunId, SessionDep
from service.api.errors import Message
from service.models import ModelArtifact, Run, RunStatus
from service.serving import repository as model_repo
from service.serving.export import cached_export
from service.serving.schemas import ModelVersionPublic, ModelVersionsPublic, RecalibrationPublic
from service.serving.served import served_run_model

router = APIRouter(prefix="/api/v1/runs", tags=["models"])

VersionRef = Annotated[
    str, Path(pattern=r"^([1-9][0-9]{0,5}|latest)$", description="A version number, or `latest`.")
]
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Message, "description": "No such run or version"},
    409: {"model": Message, "description": "The run has not succeeded: it has no model"},
}


def require_succeeded(run: Run) -> None:
    if run.status != RunStatus.succeeded:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail=f"run {run.id} is {run.status}; only a succeeded run has a model"
        )


def resolve_version(*, session: Session, run: Run, version: str | int | None) -> int:
    """A stored version of the run's model: `latest`/None is the newest; 404 for one it lacks."""
    number = None if version in (None, "latest") else int(version)
    try:
        return model_repo.resolve_model(session=session, name=run.id, version=number).version
    except model_repo.NameNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from exc


def stored_artifact(session: Session, run: Run, version: str) -> ModelArtifact:
    require_succeeded(run)
    number = resolve_version(session=session, run=run, version=version)
    artifact = model_repo.get_artifact(session=session, run_id=run.id, version=number)
    if artifact is None:  # removed between the two reads
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"run {run.id} has no model version {number}")
    return artifact


def _download_headers(filename: str, sha256: str | None = None) -> dict[str, str]:
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
    if sha256:
        headers["ETag"] = f'"{sha256}"'
    return headers


@router.get("/{run_id}/versions", summary="The run's stored model versions")
def list_versions(run: RunDep, session: SessionDep) -> ModelVersionsPublic:
    recalibrations = model_repo.get_recalibrations(session=session, run_id=run.id)
    items = []
    for artifact in model_repo.list_artifacts(session=session, run_id=run.id):
        recalibration = recalibrations.get(artifact.version)
        items.append(
            ModelVersionPublic(
                version=artifact.version,
                sha256=artifact.sha256,
                size_bytes=artifact.size_bytes,
                created_at=artifact.created_at,
                recalibration=RecalibrationPublic.model_validate(recalibration) if recalibration else None,
            )
        )
    return ModelVersionsPublic(run_id=run.id, items=items)


@router.get(
    "/{run_id}/versions/{version}/weights.safetensors",
    summary="Download the weights (safetensors; the config is in its metadata too)",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, **NOT_FOUND},
)
def download_weights(run: RunDep, version: VersionRef, session: SessionDep) -> Response:
    artifact = stored_artifact(session, run, version)
    filename = f"{run.id}-v{artifact.version}.safetensors"
    return Response(
        artifact.weights,
        media_type="application/octet-stream",
        headers=_download_headers(filename, artifact.sha256),
    )


@router.get(
    "/{run_id}/versions/{version}/config.json",
    summary="Download the model config that rebuilds the network (service.ml.config.ModelConfig)",
    response_class=Response,
    responses={200: {"content": {"application/json": {}}}, **NOT_FOUND},
)
def download_config(run: RunDep, version: VersionRef, session: SessionDep) -> Response:
    artifact = stored_artifact(session, run, version)
    body = {
        "run_id": run.id,
        "version": artifact.version,
        "sha256": artifact.sha256,
        "model_config": artifact.model_config,
    }
    filename = f"{run.id}-v{artifact.version}.config.json"
    return Response(
        json.dumps(body, indent=2), media_type="application/json", headers=_download_headers(filename)
    )


@router.get(
    "/{run_id}/versions/{version}/model.onnx",
    summary="Download the eval-mode model as ONNX "
    "(input `input`, output `logits`; fused unless ?fused=false)",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, **NOT_FOUND},
)
def download_onnx(
    run_id: RunId,
    version: VersionRef,
    fused: Annotated[bool, Query(description="Fold BN into the Linear layers first.")] = True,
) -> Response:
    loaded = served_run_model(run_id, None if version == "latest" else int(version))
    variant = fused and loaded.fusion.fused
    key = (run_id, loaded.version, loaded.sha256, variant)
    data = cached_export(key, loaded.module(variant), loaded.config.input_shape)
    filename = f"{run_id}-v{loaded.version}-{'fused' if variant else 'unfused'}.onnx"
    headers = _download_headers(filename) | {"X-Bnlab-Fused": str(variant).lower()}
    return Response(data, media_type="application/octet-stream", headers=headers)
