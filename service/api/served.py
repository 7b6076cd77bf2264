"""Loading served models for routes: blocking helpers (call them off the event loop) that map the
serving layer's errors to HTTP ones. No helper holds a database session while a model loads or runs."""

from __future__ import annotations

from fastapi import HTTPException, status

from service import crud, crud_models
from service.db import session_scope
from service.ml.checkpoints import CheckpointError
from service.models import RunStatus
from service.serving import LoadedModel, ModelNotFound, open_model


def require_succeeded_run(run_id: str) -> None:
    """404 for an unknown run, 409 for one that has not succeeded (it has no model)."""
    with session_scope() as session:
        run = crud.get_run(session=session, run_id=run_id)
        if run is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"run {run_id} not found")
        if run.status != RunStatus.succeeded:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                detail=f"run {run_id} is {run.status}; only a succeeded run has a model",
            )


def served_model(name: str, version: int | None) -> tuple[crud_models.ResolvedModel, LoadedModel]:
    """A run id or alias (and version) → its loaded model; 404 when there is none, 409 when its
    stored weights do not load."""
    try:
        return open_model(name, version)
    except (crud_models.NameNotFound, ModelNotFound) as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from exc
    except CheckpointError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"model {name} cannot be loaded: {exc}") from exc


def served_run_model(run_id: str, version: int | None) -> LoadedModel:
    require_succeeded_run(run_id)
    return served_model(run_id, version)[1]
