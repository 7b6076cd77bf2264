"""/api/v1/models: aliases, stable names for models (`fashion-bn`) usable wherever a run id is.

PUT names a run, optionally one version of its model (otherwise the alias follows the newest, so
a recalibration is served as soon as it is stored), or an experiment and a metric: the alias then
serves the experiment's best succeeded run by that metric, resolved each time it is used, so it
follows the experiment as runs finish (409 while none has succeeded).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Response, status
from sqlalchemy.orm import Session

from service.api.deps import SessionDep
from service.api.errors import Message
from service.experiments import repository as experiment_repo
from service.models import ModelAlias
from service.runs import repository as run_repo
from service.serving import repository as model_repo
from service.serving.schemas import AliasesPublic, AliasPublic, AliasPut, AliasToExperiment

router = APIRouter(prefix="/api/v1/models", tags=["models"])

# Names an alias cannot take: `/v2/models/stats` is Triton's statistics of every model, declared
# before `/v2/models/{name}`, so a model named `stats` could never be reached there.
RESERVED_ALIASES = {"stats": "it is reserved for Triton's statistics route, GET /v2/models/stats"}

AliasPath = Annotated[
    str,
    Path(
        pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$",
        description="A letter, then up to 63 letters, digits, '_', '.' or '-'; never a 32-hex run id.",
    ),
]


def alias_public(*, session: Session, alias: ModelAlias) -> AliasPublic:
    run_id, value = alias.run_id, None
    if alias.experiment_id is not None:
        best = model_repo.experiment_best(session=session, alias=alias)
        run_id, value = best if best else (None, None)
    versions = model_repo.artifact_versions(session=session, run_id=run_id) if run_id else []
    serves = alias.version if alias.version is not None else max(versions, default=None)
    return AliasPublic.model_validate(
        {
            "name": alias.name,
            "run_id": run_id,
            "version": alias.version,
            "serves_version": serves if serves in versions else None,
            "experiment_id": alias.experiment_id,
            "metric": alias.metric,
            "metric_value": value,
            "created_at": alias.created_at,
            "updated_at": alias.updated_at,
        }
    )


def _alias_or_404(session: Session, name: str) -> ModelAlias:
    alias = model_repo.get_alias(session=session, name=name)
    if alias is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"alias {name} not found")
    return alias


@router.put(
    "/{alias}",
    summary="Create or re-point an alias (201 when created, 200 when re-pointed)",
    responses={
        201: {"model": AliasPublic},
        400: {"model": Message, "description": "The body is not JSON"},
        404: {"model": Message, "description": "No such run, version or experiment"},
        409: {"model": Message, "description": "The run has no model, or the experiment ended without one"},
    },
)
def put_alias(alias: AliasPath, body: AliasPut, session: SessionDep, response: Response) -> AliasPublic:
    if model_repo.RUN_ID.match(alias):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, detail="an alias cannot look like a run id (32 hex digits)"
        )
    if alias in RESERVED_ALIASES:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"an alias cannot be named {alias!r}: {RESERVED_ALIASES[alias]}",
        )
    if isinstance(body, AliasToExperiment):
        _require_experiment_model(session, body)
        run_id, version, experiment_id, metric = None, None, body.experiment_id, body.metric
    else:
        _require_run_version(session, body.run_id, body.version)
        run_id, version, experiment_id, metric = body.run_id, body.version, None, None
    row, created = model_repo.put_alias(
        session=session,
        name=alias,
        run_id=run_id,
        version=version,
        experiment_id=experiment_id,
        metric=metric,
    )
    if created:
        response.status_code = status.HTTP_201_CREATED
    response.headers["Location"] = f"/api/v1/models/{alias}"
    return alias_public(session=session, alias=row)


def _require_run_version(session: Session, run_id: str, version: int | None) -> None:
    """404 for an unknown run or version; 409 for a run without a model, saying why: an alias to it
    would answer nothing but errors."""
    run = run_repo.get_run(session=session, run_id=run_id)
    if run is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"run {run_id} not found")
    versions = model_repo.artifact_versions(session=session, run_id=run_id)
    if not versions:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"an alias needs a run with a model, and {model_repo.no_model_reason(run)}",
        )
    if version is not None and version not in versions:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"run {run_id} has no model version {version} (it has {versions})",
        )


def _require_experiment_model(session: Session, body: AliasToExperiment) -> None:
    """404 for an unknown experiment; 409 for one that has ended with no run it could serve. One
    still training is accepted: the alias serves its best run as soon as one succeeds."""
    if experiment_repo.get_experiment(session=session, experiment_id=body.experiment_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"experiment {body.experiment_id} not found")
    ended = model_repo.experiment_has_ended(session=session, experiment_id=body.experiment_id)
    if (
        ended
        and experiment_repo.best_run(session=session, experiment_id=body.experiment_id, metric=body.metric)
        is None
    ):
        reason = model_repo.no_qualifying_run_reason(session=session, experiment_id=body.experiment_id)
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"an alias needs a run with a model, and of experiment {body.experiment_id} {reason}",
        )


@router.get("", summary="List aliases")
def list_aliases(session: SessionDep) -> AliasesPublic:
    return AliasesPublic(
        items=[alias_public(session=session, alias=a) for a in model_repo.list_aliases(session=session)]
    )


@router.get("/{alias}", summary="One alias and the version it serves", responses={404: {"model": Message}})
def get_alias(alias: AliasPath, session: SessionDep) -> AliasPublic:
    return alias_public(session=session, alias=_alias_or_404(session, alias))


@router.delete(
    "/{alias}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an alias (the run and its models stay)",
    responses={404: {"model": Message}},
)
def delete_alias(alias: AliasPath, session: SessionDep) -> None:
    model_repo.delete_alias(session=session, alias=_alias_or_404(session, alias))
