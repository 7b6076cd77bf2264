"""Served models for routes: the serving layer's errors mapped to HTTP ones.

The blocking helpers must run off the event loop; none holds a database session while a model
loads or runs.
"""

from __future__ import annotations

from fastapi import HTTPException, status
from starlette.concurrency import run_in_threadpool

from service.db import session_scope
from service.ml.checkpoints import CheckpointError
from service.ml.datasets import CLASS_NAMES
from service.models import RunStatus
from service.runs import repository as run_repo
from service.serving import repository as model_repo
from service.serving.server import Answer, LoadedModel, ModelNotFound, Prepare, get_model_server, open_model

# A run's class names never change (its spec is fixed): read once per process, then from memory.
_class_names: dict[str, list[str] | None] = {}


def class_names(run_id: str) -> list[str] | None:
    """The names of the run's classes, for a built-in dataset; None otherwise. Blocking on first use."""
    if run_id not in _class_names:
        with session_scope() as session:
            spec = run_repo.get_run_spec(session=session, run_id=run_id)
        dataset = spec.get("dataset") if spec else None
        name = dataset.get("name") if isinstance(dataset, dict) else None
        _class_names[run_id] = list(CLASS_NAMES[name]) if name in CLASS_NAMES else None
    return _class_names[run_id]


async def class_names_of(run_id: str) -> list[str] | None:
    """class_names without a thread hop once known (the predict route's hot path)."""
    if run_id in _class_names:
        return _class_names[run_id]
    return await run_in_threadpool(class_names, run_id)


def require_succeeded_run(run_id: str) -> None:
    """404 for an unknown run, 409 for one that has not succeeded (it has no model)."""
    with session_scope() as session:
        run = run_repo.get_run(session=session, run_id=run_id)
        if run is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"run {run_id} not found")
        if run.status != RunStatus.succeeded:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                detail=f"only a succeeded run has a model, and {model_repo.no_model_reason(run)}",
            )


def http_error(name: str, exc: Exception) -> HTTPException:
    """The serving layer's lookup and load errors as HTTP ones: 409 for a model that exists but
    cannot answer (weights that do not load, an experiment alias with no model yet), else 404."""
    if isinstance(exc, CheckpointError):  # stored weights that do not load: the model is not servable
        return HTTPException(status.HTTP_409_CONFLICT, detail=f"model {name} cannot be loaded: {exc}")
    if isinstance(exc, model_repo.NoQualifyingRun):  # the alias exists; its experiment has no model yet
        return HTTPException(status.HTTP_409_CONFLICT, detail=str(exc))
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc))


def served_model(name: str, version: int | None) -> tuple[model_repo.ResolvedModel, LoadedModel]:
    """Blocking: a run id or alias (and version) → its loaded model; 404 when there is none, 409
    when its stored weights do not load."""
    try:
        return open_model(name, version)
    except (model_repo.NameNotFound, ModelNotFound, CheckpointError) as exc:
        raise http_error(name, exc) from exc


def served_run_model(run_id: str, version: int | None) -> LoadedModel:
    """Blocking: like served_model, for a run id, with 409 for a run that has not succeeded."""
    require_succeeded_run(run_id)
    return served_model(run_id, version)[1]


async def infer(
    name: str,
    version: int | None,
    *,
    fused: bool,
    prepare: Prepare,
    body_bytes: int | None,
    is_run_id: bool = False,
) -> Answer:
    """Answer one request through the model server (micro-batched when on), errors as HTTP ones.
    `body_bytes`: the JSON body's size (None for an image). With `is_run_id`, a run without a model
    is explained (404 unknown run, 409 not succeeded)."""
    server = get_model_server()
    try:
        return await server.infer(name, version, fused=fused, prepare=prepare, body_bytes=body_bytes)
    except (model_repo.NameNotFound, ModelNotFound, CheckpointError) as exc:
        if is_run_id and isinstance(exc, model_repo.NameNotFound):
            await run_in_threadpool(require_succeeded_run, name)
        raise http_error(name, exc) from exc
