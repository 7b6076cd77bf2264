"""`bnlab export mlflow` against a real API and worker, into an MLflow file store in a temporary
folder, read back with MLflow's own client. Tiny runs: two epochs of 300 Fashion-MNIST samples."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from safetensors.torch import load, load_file

from service.client.http import Client
from service.client.mlflow_export import ExportError, MlflowExporter, open_tracking_store
from tests.conftest import bnlab_free_environ, sqlite_backend_at
from tests.integration.stack import Stack, start_stack
from tests.integration.test_divergence_e2e import DIVERGES

pytestmark = pytest.mark.integration

BASE = {"dataset": {"name": "fashion-mnist", "limit": 300}, "model": {"hidden": [16]}, "train": {"epochs": 2}}
GRID = {"name": "mlflow-grid", "base": BASE, "grid": {"model.norm.kind": ["batch", "none"]}, "seeds": [0, 1]}
# bnlab's per-epoch field → the MLflow metric key, written out here rather than taken from the exporter.
METRIC_KEYS = {
    "train_loss": "train_loss",
    "train_accuracy": "train_accuracy",
    "val_loss": "val_loss",
    "val_accuracy": "val_accuracy",
    "seconds": "epoch_seconds",
    "train_seconds": "train_seconds",
    "train_samples": "train_samples",
}
# MLflow 3 refuses file stores unless asked for explicitly; a file store in a temporary folder is what
# this test wants (the environment variable MLflow documents for it).
FILE_STORE_ENV = {"MLFLOW_ALLOW_FILE_STORE": "true"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("mlflow")
    with start_stack(sqlite_backend_at(folder), folder / "logs") as running:
        yield running


@pytest.fixture(scope="module")
def experiment(stack: Stack) -> dict[str, Any]:
    response = stack.client.post("/api/v1/experiments", json=GRID)
    assert response.status_code == 202, response.text
    experiment_id = response.json()["id"]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        body: dict[str, Any] = stack.client.get(f"/api/v1/experiments/{experiment_id}").json()
        if body["finished"]:
            assert body["status_counts"]["succeeded"] == 4, stack.tail_logs()
            return body
        time.sleep(0.5)
    raise AssertionError(f"experiment {experiment_id} did not finish\n{stack.tail_logs()}")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    for key, value in FILE_STORE_ENV.items():
        monkeypatch.setenv(key, value)
    return (tmp_path / "mlruns").as_uri()


def export(
    stack: Stack, store: str, *args: str, allow_file_store: bool = True
) -> subprocess.CompletedProcess[str]:
    """`bnlab export mlflow` as a user runs it, in its own process."""
    env = bnlab_free_environ() | {"BNLAB_URL": stack.base_url}
    env.pop("MLFLOW_ALLOW_FILE_STORE", None)
    if allow_file_store:
        env |= FILE_STORE_ENV
    command = [sys.executable, "-m", "service.cli", "export", "mlflow", "--tracking-uri", store, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)


def mlflow_runs(store: str, experiment_name: str, kind: str) -> list[Run]:
    client = MlflowClient(tracking_uri=store)
    found = client.get_experiment_by_name(experiment_name)
    assert found is not None, f"no MLflow experiment {experiment_name!r}"
    return list(client.search_runs([found.experiment_id], f"tags.`bnlab.kind` = '{kind}'"))


def history(store: str, run: Run) -> dict[str, list[tuple[int, float]]]:
    """Every metric MLflow holds for the run, each step as often as it was logged."""
    client = MlflowClient(tracking_uri=store)
    keys = client.get_run(run.info.run_id).data.metrics
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in keys
    }


def bnlab_history(stack: Stack, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """What bnlab stored: the per-epoch figures and each normalisation slot's input statistics,
    without the null values (a diverged epoch's), which MLflow cannot hold."""
    epochs = stack.client.get(f"/api/v1/runs/{run_id}/metrics").json()["epochs"]
    figures = {
        key: [(row["epoch"], float(row[name])) for row in epochs if row[name] is not None]
        for name, key in METRIC_KEYS.items()
    }
    figures = {key: steps for key, steps in figures.items() if steps}
    layers: dict[str, list[tuple[int, float]]] = {}
    ended = {row["epoch"] for row in epochs} | {0}
    for epoch in stack.client.get(f"/api/v1/runs/{run_id}/layer-stats").json()["epochs"]:
        for slot in epoch["layers"]:
            for name in ("input_mean", "input_std"):
                if epoch["epoch"] in ended and slot[name] is not None:
                    layers.setdefault(f"layer_stats/{slot['layer']}/{name}", []).append(
                        (epoch["epoch"], slot[name])
                    )
    return figures | layers


def millis(timestamp: str) -> int:
    return int(datetime.fromisoformat(timestamp).replace(tzinfo=UTC).timestamp() * 1000)


def test_an_experiment_reads_back_from_mlflow_and_a_second_export_updates_it(
    stack: Stack, experiment: dict[str, Any], store: str, tmp_path: Path
) -> None:
    first = export(stack, store, "--experiment", experiment["id"])
    assert first.returncode == 0, first.stdout + first.stderr
    assert "4 runs exported" in first.stdout, first.stdout
    assert "(4 created, 0 updated)" in first.stdout

    (parent,) = mlflow_runs(store, "mlflow-grid", "experiment")
    children = mlflow_runs(store, "mlflow-grid", "run")
    assert sorted(run.data.tags["bnlab.run_id"] for run in children) == sorted(
        r["id"] for r in experiment["runs"]
    )
    listed = {run["id"]: run for run in experiment["runs"]}
    for child in children:
        check_child(stack, store, child, listed[child.data.tags["bnlab.run_id"]], experiment, parent)
    check_report(stack, store, parent, experiment["id"], tmp_path)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["grid.model.norm.kind"] == '["batch", "none"]'

    steps_before = {run.info.run_id: history(store, run) for run in children}
    second = export(stack, store, "--experiment", experiment["id"])
    assert second.returncode == 0, second.stdout + second.stderr
    assert "(0 created, 4 updated)" in second.stdout, second.stdout
    assert second.stdout.count("0 new metric values") == 4, second.stdout
    again = mlflow_runs(store, "mlflow-grid", "run")
    assert len(mlflow_runs(store, "mlflow-grid", "experiment")) == 1
    assert {run.info.run_id for run in again} == set(steps_before)
    assert {run.info.run_id: history(store, run) for run in again} == steps_before


def check_child(
    stack: Stack, store: str, child: Run, listed: dict[str, Any], experiment: dict[str, Any], parent: Run
) -> None:
    run = stack.run(listed["id"])
    tags, params = child.data.tags, child.data.params
    assert tags["bnlab.experiment_id"] == experiment["id"]
    assert tags["bnlab.experiment_name"] == "mlflow-grid"
    assert tags["bnlab.config"] == listed["config"]
    assert tags["bnlab.seed"] == str(listed["seed"]) == params["train.seed"]
    assert tags["bnlab.status"] == "succeeded"
    assert tags["bnlab.dataset"] == "fashion-mnist"
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.info.run_name == run["name"]
    assert (
        params["model.norm.kind"]
        == run["spec"]["model"]["norm"]["kind"]
        == listed["grid_point"]["model.norm.kind"]
    )
    assert float(params["train.lr"]) == run["spec"]["train"]["lr"]
    assert params["model.hidden"] == "[16]"
    assert params["dataset.limit"] == "300"
    assert child.info.status == "FINISHED"
    assert child.info.start_time == millis(run["started_at"])
    assert child.info.end_time == millis(run["finished_at"])
    exported = history(store, child)
    assert exported == bnlab_history(stack, run["id"])
    assert [step for step, _ in exported["val_loss"]] == [1, 2]
    assert [step for step, _ in exported["layer_stats/bn1/input_std"]] == [0, 1, 2]
    check_weights(stack, store, child, run["id"])


def check_weights(stack: Stack, store: str, child: Run, run_id: str) -> None:
    client = MlflowClient(tracking_uri=store)
    folder = Path(client.download_artifacts(child.info.run_id, "model/v1"))
    served = stack.client.get(f"/api/v1/runs/{run_id}/versions/1/weights.safetensors").content
    exported, expected = load_file(folder / "weights.safetensors"), load(served)
    assert exported
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[name], expected[name]) for name in expected)
    config = json.loads((folder / "config.json").read_text())
    assert config == stack.client.get(f"/api/v1/runs/{run_id}/versions/1/config.json").json()
    assert config["model_config"]


def check_report(stack: Stack, store: str, parent: Run, experiment_id: str, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=store)
    folder = Path(client.download_artifacts(parent.info.run_id, "report", str(tmp_path)))
    served = stack.client.get(f"/api/v1/experiments/{experiment_id}/report").json()
    assert json.loads((folder / "report.json").read_text()) == served
    assert len(served["configurations"]) == 2
    csv = stack.client.get(f"/api/v1/experiments/{experiment_id}/report.csv").content
    assert (folder / "report.csv").read_bytes() == csv


def test_a_run_exported_while_running_gets_only_its_new_epochs_later(stack: Stack, store: str) -> None:
    # Long enough to be still running after the export, which imports MLflow (seconds): 200 epochs of
    # 300 samples once ended first on a fast machine, and the cancel came too late.
    spec = BASE | {
        "name": "mlflow-long",
        "dataset": {"name": "fashion-mnist", "limit": 3000},
        "train": {"epochs": 1000},
    }
    run_id = stack.submit(spec)
    deadline = time.monotonic() + 120
    while stack.run(run_id)["summary"]["epochs_done"] < 1:
        assert time.monotonic() < deadline, stack.tail_logs()
        time.sleep(0.2)
    first = export(stack, store, "--run", run_id)
    assert first.returncode == 0, first.stdout + first.stderr
    (running,) = mlflow_runs(store, "bnlab", "run")
    assert running.info.status == "RUNNING"
    assert running.data.tags["bnlab.status"] == "running"
    assert len(history(store, running)["val_loss"]) >= 1

    stack.client.post(f"/api/v1/runs/{run_id}/cancel")
    stack.wait_for(run_id, {"cancelled"})
    second = export(stack, store, "--run", run_id, "--mlflow-experiment", "bnlab")
    assert second.returncode == 0, second.stdout + second.stderr
    (cancelled,) = mlflow_runs(store, "bnlab", "run")
    assert cancelled.info.run_id == running.info.run_id
    assert cancelled.info.status == "KILLED"
    assert cancelled.data.tags["bnlab.status"] == "cancelled"
    assert "bnlab.experiment_id" not in cancelled.data.tags
    # Every stored epoch once: the steps of the first export were not logged again.
    assert history(store, cancelled) == bnlab_history(stack, run_id)


def test_a_run_of_an_experiment_goes_under_its_parent_in_a_named_mlflow_experiment(
    stack: Stack, experiment: dict[str, Any], store: str
) -> None:
    run_id = experiment["runs"][0]["id"]
    result = export(stack, store, "--run", run_id[:8], "--mlflow-experiment", "chosen")
    assert result.returncode == 0, result.stdout + result.stderr
    (parent,) = mlflow_runs(store, "chosen", "experiment")
    (child,) = mlflow_runs(store, "chosen", "run")
    assert child.data.tags["bnlab.run_id"] == run_id
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert MlflowClient(tracking_uri=store).get_experiment_by_name("mlflow-grid") is None


def test_a_missing_run_is_a_clear_error(stack: Stack, store: str) -> None:
    missing = export(stack, store, "--run", "0" * 32)
    assert missing.returncode == 3, missing.stdout + missing.stderr
    assert f"run {'0' * 32} not found" in missing.stderr
    no_experiment = export(stack, store, "--experiment", "f" * 32)
    assert no_experiment.returncode == 3, no_experiment.stdout + no_experiment.stderr
    assert "f" * 32 in no_experiment.stderr
    assert export(stack, store).returncode == 2  # neither --run nor --experiment
    client = MlflowClient(tracking_uri=store)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_refused_store_is_exit_5_with_mlflow_s_reason(
    stack: Stack, experiment: dict[str, Any], store: str
) -> None:
    # Without MLFLOW_ALLOW_FILE_STORE, MLflow 3 refuses a file store and says how to opt in.
    refused = export(stack, store, "--experiment", experiment["id"], allow_file_store=False)
    assert refused.returncode == 5, refused.stdout + refused.stderr
    assert "MLFLOW_ALLOW_FILE_STORE" in refused.stderr


def test_without_mlflow_the_core_runs_and_export_says_what_to_install(stack: Stack, store: str) -> None:
    # mlflow made unimportable, as when the extra is not installed.
    script = (
        "import sys; sys.modules['mlflow'] = None\n"
        "import service.main, service.cli\n"
        "assert 'mlflow' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
        "service.cli.main(sys.argv[1:])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "export", "mlflow", "--run", "x", "--tracking-uri", store,
         "--url", stack.base_url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 5, result.stdout + result.stderr
    assert "install bnlab[mlflow]" in result.stderr


@pytest.fixture(scope="module")
def diverged_run(stack: Stack) -> str:
    run_id = stack.submit({"name": "mlflow-diverges", **DIVERGES})
    assert stack.wait_for(run_id, {"succeeded", "failed"})["status"] == "failed", stack.tail_logs()
    return run_id


def test_a_diverged_run_exports_without_its_null_values_and_ends_failed(
    stack: Stack, diverged_run: str, store: str
) -> None:
    result = export(stack, store, "--run", diverged_run)
    assert result.returncode == 0, result.stdout + result.stderr
    (exported,) = mlflow_runs(store, "bnlab", "run")
    assert exported.info.status == "FAILED"
    assert exported.data.tags["bnlab.error"].startswith("diverged: ")
    logged = history(store, exported)
    assert logged == bnlab_history(stack, diverged_run)
    assert "train_loss" not in logged  # epoch 1's loss is null: not logged
    assert logged["epoch_seconds"][0][0] == 1
    # The initial network's statistics (step 0) are numbers and are there.
    assert any(steps[0][0] == 0 for key, steps in logged.items() if key.startswith("layer_stats/"))


class LayerStatsFail(Client):
    """The bnlab client, with one answer turned into something the exporter cannot read."""

    def get_layer_stats(self, run_id: str) -> list[dict[str, Any]]:
        return [{"epoch": 1, "layers": [{"layer": "x", "input_mean": "not a number", "input_std": 1.0}]}]


class UnlistedRun(Client):
    """The bnlab client, with the experiment's answer missing its runs (an API that disagrees)."""

    def get_experiment(self, experiment_id: str) -> dict[str, Any]:
        return super().get_experiment(experiment_id) | {"runs": []}


def test_an_unexpected_failure_is_an_export_error_and_leaves_bnlab_s_status(
    stack: Stack, diverged_run: str, store: str
) -> None:
    bnlab = LayerStatsFail(stack.base_url)
    exporter = MlflowExporter(bnlab, open_tracking_store(store), store, None)
    with pytest.raises(ExportError, match=r"unexpected error \(ValueError: could not convert"):
        exporter.export_run(diverged_run)
    bnlab.close()
    (exported,) = mlflow_runs(store, "bnlab", "run")
    assert exported.info.status == "FAILED"  # bnlab's status, not the RUNNING of a new MLflow run


def test_a_run_its_experiment_does_not_list_is_a_clear_export_error(
    stack: Stack, experiment: dict[str, Any], store: str
) -> None:
    run_id = experiment["runs"][0]["id"]
    bnlab = UnlistedRun(stack.base_url)
    exporter = MlflowExporter(bnlab, open_tracking_store(store), store, None)
    with pytest.raises(ExportError, match=f"run {run_id} names experiment {experiment['id']} as its own"):
        exporter.export_run(run_id)
    bnlab.close()
    assert MlflowClient(tracking_uri=store).get_experiment_by_name("mlflow-grid") is None  # nothing written
