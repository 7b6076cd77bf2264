"""Every ready-made experiment expands into valid runs, and its claims name configurations that
exist in its grid (exactly one each)."""

from __future__ import annotations

import pytest

from service.experiments import cost, presets
from service.experiments.grid import expand, grid_points
from service.experiments.report import RunResult, report
from service.experiments.schemas import ExperimentCreate, PresetCreate
from service.ml import training
from service.ml.config import ModelConfig, NormConfig


@pytest.mark.parametrize("preset", presets.PRESETS.values(), ids=lambda p: p.name)
def test_each_preset_expands_into_valid_runs_on_each_of_its_datasets(preset: presets.Preset) -> None:
    for dataset in preset.datasets:
        spec = presets.experiment_spec(preset, PresetCreate(), lambda name, wanted=dataset: name == wanted)
        planned = expand(spec)  # each point re-validated as a RunCreate
        assert len(planned) == len(grid_points(spec.grid)) * len(preset.seeds)
        assert {p.spec.dataset.name for p in planned} == {dataset}
        assert {p.seed for p in planned} == set(preset.seeds)
        assert 0 < cost.estimated_seconds(spec) < 15 * 60


@pytest.mark.parametrize("preset", presets.PRESETS.values(), ids=lambda p: p.name)
def test_each_claim_picks_one_configuration_per_term(preset: presets.Preset) -> None:
    spec = presets.experiment_spec(preset, PresetCreate(seeds=[0]), lambda _name: True)
    results = [RunResult(point, 0, "queued") for point in grid_points(spec.grid)]
    judged = report(
        experiment_id="e", spec=spec, preset=preset.name, results=results, target=0.5, claims=preset.claims
    ).claims
    assert len(judged) == len(preset.claims) > 0
    assert all(c.verdict == "inconclusive" for c in judged)  # nothing has run yet


def test_seed_keras_is_the_articles_experiment() -> None:
    spec = presets.experiment_spec(presets.SEED_KERAS, PresetCreate(), lambda name: name == "fashion-mnist")
    runs = expand(spec)
    assert {p.point["model.norm.kind"] for p in runs} == {"none", "batch"}
    for p in runs:
        s = p.spec
        assert s.dataset.name == "fashion-mnist"
        assert (s.dataset.limit, s.dataset.val_split) == (None, 0.2)
        assert (s.model.hidden, s.model.activation, s.model.norm.position) == (
            [128],
            "relu",
            "after_activation",
        )
        assert (s.train.epochs, s.train.batch_size, s.train.optimizer, s.train.lr) == (10, 32, "adam", 0.001)
        assert s.compat == "keras"
    mnist = presets.experiment_spec(presets.SEED_KERAS, PresetCreate(), lambda _name: True)
    assert mnist.base.dataset.name == "mnist"  # the article's dataset when it is installed


def test_overrides_replace_seeds_dataset_and_name() -> None:
    spec = presets.experiment_spec(
        presets.SMALL_BATCH, PresetCreate(seeds=[7], dataset="synthetic", name="mine"), lambda _name: True
    )
    assert (spec.seeds, spec.base.dataset.name, spec.name) == ([7], "synthetic", "mine")


def test_the_time_estimate_follows_the_training_path_and_the_processes() -> None:
    # Measured through make run's worker: the compiled fast path (MLPs with BN or no norm) costs about
    # a third of autograd's step (other norms); the runs spread over the training processes.
    base = {"dataset": {"name": "fashion-mnist"}, "train": {"epochs": 2}}

    def estimate(kind: str, processes: int = 1) -> int:
        spec = ExperimentCreate.model_validate(
            {"name": "e", "base": base, "grid": {"model.norm.kind": [kind]}, "seeds": [0, 1, 2, 3]}
        )
        return cost.estimated_seconds(spec, processes)

    assert training.trains_fast(ModelConfig(norm=NormConfig(kind="batch")))
    assert not training.trains_fast(ModelConfig(norm=NormConfig(kind="group", num_groups=16)))
    assert not training.trains_fast(ModelConfig(arch="cnn"))
    assert estimate("group") > 1.8 * estimate("batch")
    assert abs(estimate("batch", processes=2) - estimate("batch") / 2) <= 1
