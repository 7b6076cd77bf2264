"""/api/v1/presets: ready-made experiments, each testing one claim; POST starts one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Path, Response, status
from pydantic import ValidationError

from service.api.deps import SessionDep, SettingsDep
from service.api.errors import Message
from service.api.security import PrincipalDep
from service.config import Settings
from service.experiments import cost, grid, presets
from service.experiments.schemas import ExperimentPublic, PresetCreate, PresetPublic, PresetsPublic
from service.experiments.service import create_experiment
from service.ml import datasets

router = APIRouter(prefix="/api/v1/presets", tags=["experiments"])

PresetPath = Annotated[str, Path(pattern=r"^[a-z][a-z0-9-]{0,63}$", description="A preset's name.")]


def _installed(settings: Settings) -> presets.DatasetCheck:
    search_dirs = [settings.data_dir, datasets.SYSTEM_DATASET_DIR]

    def available(name: str) -> bool:
        return name not in datasets.FILE_DATASETS or datasets.find_dataset_dir(name, search_dirs) is not None

    return available


def _preset_or_404(name: str) -> presets.Preset:
    preset = presets.PRESETS.get(name)
    if preset is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"no preset named {name}; the presets are {', '.join(presets.PRESETS)}",
        )
    return preset


@router.get("", summary="The ready-made experiments: claim, grid, run count and estimated time")
def list_presets(settings: SettingsDep) -> PresetsPublic:
    available = _installed(settings)
    items = []
    for preset in presets.PRESETS.values():
        spec = presets.experiment_spec(preset, PresetCreate(), available)
        runs = len(grid.expand(spec))
        items.append(
            PresetPublic(
                name=preset.name,
                claim=preset.claim,
                dataset=spec.base.dataset.name,
                grid=spec.grid,
                seeds=spec.seeds,
                runs=runs,
                estimated_seconds=cost.estimated_seconds(spec, settings.training_processes),
            )
        )
    return PresetsPublic(items=items)


@router.post(
    "/{name}",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Start a ready-made experiment (optionally with other seeds, dataset or name)",
    responses={422: {"model": Message}, 429: {"model": Message}, 503: {"model": Message}},
)
def start_preset(
    name: PresetPath,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    response: Response,
    overrides: Annotated[PresetCreate | None, Body()] = None,
) -> ExperimentPublic:
    preset = _preset_or_404(name)
    try:
        spec = presets.experiment_spec(preset, overrides or PresetCreate(), _installed(settings))
    except ValidationError as exc:  # an override the preset's networks cannot take (e.g. its shape)
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"preset {preset.name} cannot run with these overrides: {exc.errors()[0]['msg']}",
        ) from exc
    return create_experiment(
        session=session,
        settings=settings,
        owner=principal.name,
        spec=spec,
        preset=preset.name,
        response=response,
    )
