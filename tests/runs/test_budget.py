"""Time limits follow what a run will cost: its steps, its network's flops, and its processes."""

from __future__ import annotations

from typing import Any

from service.experiments import cost
from service.ml.datasets import BUILTIN_SHAPES
from service.runs.budget import STARTUP_ALLOWANCE_S, time_limit_s
from service.runs.schemas import RunCreate
from service.runs.spec import model_config

CAP = 7 * 86400


def limit(spec: dict[str, Any], cap_s: int = CAP) -> int:
    run = RunCreate.model_validate(spec)
    shape = BUILTIN_SHAPES[run.dataset.name]
    return time_limit_s(run, cap_s=cap_s, model=model_config(run, shape), train_samples=60_000)


def test_more_epochs_and_bigger_networks_get_more_time() -> None:
    article = limit({})
    assert STARTUP_ALLOWANCE_S < article < limit({"train": {"epochs": 20}})
    assert article < limit({"model": {"hidden": [1024, 1024]}})
    # A convolution's cost scales with its feature maps, not its few parameters.
    assert limit({"model": {"arch": "cnn", "channels": [32, 64]}}) > 5 * article


def test_data_parallel_runs_get_their_measured_slowdown() -> None:
    one = limit({"train": {"batch_size": 64}})
    two = limit({"train": {"batch_size": 64, "processes": 2}, "model": {"norm": {"sync": True}}})
    assert two - STARTUP_ALLOWANCE_S > 10 * (one - STARTUP_ALLOWANCE_S)


def test_the_cap_wins() -> None:
    assert limit({"train": {"epochs": 1000}}, cap_s=600) == 600


def test_the_hard_limit_stays_above_the_cost_models_estimate() -> None:
    """A run the cost model prices at an hour must not be killed at half an hour: deep and recurrent
    networks cost per layer call (an rnn's at every time step), which the flops alone miss."""
    specs = [
        {},
        {"model": {"arch": "cnn", "channels": [32, 64]}, "train": {"batch_size": 64}},
        {"model": {"arch": "resnet", "depth": 20}, "train": {"epochs": 2}},
        {"model": {"hidden": [64] * 100}, "train": {"batch_size": 16}},
        {"model": {"arch": "rnn", "layers": 8, "hidden_size": 16}, "train": {"batch_size": 16, "epochs": 5}},
        {
            "model": {"arch": "rnn", "hidden_size": 128, "norm": {"kind": "batch"}},
            "train": {"batch_size": 64},
        },
    ]
    for spec in specs:
        estimate = cost.run_seconds(RunCreate.model_validate(spec))
        assert limit(spec) > estimate, (spec, limit(spec), estimate)
