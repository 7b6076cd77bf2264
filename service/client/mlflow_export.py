"""Write bnlab runs into an MLflow tracking store (`bnlab export mlflow`).

bnlab is read through its HTTP API only (service.client.http), like every user command; MLflow is
written with its own `MlflowClient`, so any tracking URI MLflow accepts works (a tracking server, a
database store, a file store). mlflow is imported only here and only when an export starts: the core
does not need the `mlflow` extra.

What one bnlab run becomes: an MLflow run tagged `bnlab.run_id`, with the run spec as parameters
(dotted keys: `model.norm.kind`, `train.lr`), one metric step per epoch (the epoch's figures and
its layer statistics), its status and times, and
each stored model version's weights (safetensors) with the config that rebuilds them under
`model/v<N>/`. An experiment's runs are the children of one parent run, which holds the experiment
spec as parameters and its report (`report/report.json`, `report/report.csv`, as the API serves them).

Exporting again updates in place: runs are found by their tag; parameters and model versions
already there are skipped; metric steps already logged are kept and only the new ones are logged
(bnlab never rewrites a finished epoch, so a kept step is still right); tags, status, end time and
the report are written again.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from service.client.http import ApiError, Client

if TYPE_CHECKING:
    from mlflow.entities import Metric, Run
    from mlflow.tracking import MlflowClient

INSTALL_HINT = "the MLflow export needs MLflow: install bnlab[mlflow] (pip install 'bnlab[mlflow]')"
DEFAULT_EXPERIMENT = "bnlab"

# bnlab's run states in MLflow's words (mlflow.entities.RunStatus).
STATUSES = {
    "queued": "SCHEDULED",
    "running": "RUNNING",
    "succeeded": "FINISHED",
    "failed": "FAILED",
    "cancelled": "KILLED",
}
# Per-epoch figures (GET /api/v1/runs/{id}/metrics) → MLflow metric keys; the step is the epoch.
# The layer statistics (internal covariate shift) come along as layer_stats/<slot>/input_mean|std.
METRICS = {
    "train_loss": "train_loss",
    "train_accuracy": "train_accuracy",
    "val_loss": "val_loss",
    "val_accuracy": "val_accuracy",
    "seconds": "epoch_seconds",
    "train_seconds": "train_seconds",
    "train_samples": "train_samples",
}
# MLflow's limits per log_batch call.
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
MAX_TAG_CHARS = 5000
# Ids are embedded in MLflow search filters: only the characters bnlab's ids use.
ID_PATTERN = re.compile(r"^[\w-]+$")


class ExportError(Exception):
    """The export cannot go on: MLflow is missing, refused a write, the store is unusable, or the
    export met something it did not expect."""


def open_tracking_store(tracking_uri: str) -> MlflowClient:
    """An MlflowClient on `tracking_uri`; a clear ExportError when MLflow is not installed."""
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise ExportError(INSTALL_HINT) from exc
    try:
        return MlflowClient(tracking_uri=tracking_uri)
    except MlflowException as exc:
        raise ExportError(f"MLflow cannot open the tracking store {tracking_uri}: {exc.message}") from exc


@contextmanager
def mlflow_errors(tracking_uri: str) -> Iterator[None]:
    """MLflow's refusals, and anything else unexpected, as ExportErrors that name the store (exit 5,
    not a traceback); the API's own errors keep their exit codes."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (ExportError, ApiError, httpx.TransportError):
        raise
    except MlflowException as exc:
        raise ExportError(f"MLflow at {tracking_uri} refused the export: {exc.message}") from exc
    except Exception as exc:  # a bug or an answer the exporter did not expect: say so, do not crash
        raise ExportError(
            f"the export to {tracking_uri} stopped on an unexpected error ({type(exc).__name__}: {exc}); "
            "what it wrote before stays, and exporting again resumes it"
        ) from exc


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested spec as MLflow parameters: dotted keys; strings as they are, anything else as JSON
    (lists stay one parameter: `model.hidden` = `[256, 256]`)."""
    if isinstance(value, dict) and value:
        flat: dict[str, str] = {}
        for key, inner in value.items():
            flat |= flatten(inner, f"{prefix}.{key}" if prefix else str(key))
        return flat
    return {prefix: value if isinstance(value, str) else json.dumps(value)}


def millis(timestamp: str | None) -> int | None:
    """An API timestamp (ISO 8601) in milliseconds since the epoch, as MLflow keeps times."""
    if timestamp is None:
        return None
    moment = datetime.fromisoformat(timestamp)
    if moment.tzinfo is None:  # bnlab stores UTC
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def checked_id(value: str) -> str:
    if not ID_PATTERN.match(value):
        raise ExportError(f"unexpected id {value!r} from the bnlab API")
    return value


@dataclass
class RunExported:
    """What one export did to one MLflow run, for the command's summary."""

    kind: str  # "run", or "experiment" for an experiment's parent run
    bnlab_id: str
    mlflow_id: str
    created: bool
    values_logged: int = 0
    artifacts: list[str] = field(default_factory=list)

    def line(self) -> str:
        action = "created" if self.created else "updated"
        steps = [f"{self.values_logged} new metric values"] if self.kind == "run" else []
        logged = ", ".join([*steps, *self.artifacts]) or "nothing new"
        return f"{self.kind} {self.bnlab_id} -> MLflow run {self.mlflow_id} ({action}): {logged}"


@dataclass(frozen=True)
class Membership:
    """A run's place in its bnlab experiment, and the MLflow parent run that stands for it."""

    experiment: dict[str, Any]
    config: str
    seed: int
    parent_id: str


class MlflowExporter:
    def __init__(self, bnlab: Client, store: MlflowClient, tracking_uri: str, name: str | None) -> None:
        self.bnlab, self.store, self.tracking_uri, self.name = bnlab, store, tracking_uri, name

    # -- entry points

    def export_experiment(self, experiment_id: str) -> list[RunExported]:
        """The experiment as a parent run with its report, and each of its runs as a child."""
        with mlflow_errors(self.tracking_uri):
            experiment = self.bnlab.get_experiment(experiment_id)
            mlflow_experiment = self.mlflow_experiment(experiment["name"])
            parent = self.export_parent(mlflow_experiment, experiment)
            children = [
                self.export_one(mlflow_experiment, run["id"], self.membership(experiment, run, parent))
                for run in experiment["runs"]
            ]
        return [parent, *children]

    def export_run(self, run_id: str) -> list[RunExported]:
        """One run; a run of an experiment goes under the experiment's parent run, as above."""
        with mlflow_errors(self.tracking_uri):
            run = self.bnlab.get_run(run_id)
            experiment = self.bnlab.get_experiment(run["experiment_id"]) if run["experiment_id"] else None
            if experiment is None:
                return [self.export_one(self.mlflow_experiment(None), run["id"], None)]
            listed = [item for item in experiment["runs"] if item["id"] == run["id"]]
            if len(listed) != 1:  # checked before anything is written
                raise ExportError(
                    f"run {run['id']} names experiment {experiment['id']} as its own, but the experiment "
                    f"lists it {len(listed)} times (expected once): the bnlab API's answers disagree"
                )
            mlflow_experiment = self.mlflow_experiment(experiment["name"])
            parent = self.export_parent(mlflow_experiment, experiment)
            child = self.export_one(
                mlflow_experiment, run["id"], self.membership(experiment, listed[0], parent)
            )
        return [parent, child]

    # -- the MLflow experiment and the runs in it

    def mlflow_experiment(self, bnlab_name: str | None) -> str:
        """The id of the MLflow experiment to write to (created when missing)."""
        name = self.name or bnlab_name or DEFAULT_EXPERIMENT
        found = self.store.get_experiment_by_name(name)
        if found is None:
            return self.store.create_experiment(name)
        if found.lifecycle_stage == "deleted":
            raise ExportError(
                f"the MLflow experiment {name!r} is deleted: restore it, or pick another with "
                "--mlflow-experiment"
            )
        return str(found.experiment_id)

    def find_run(self, mlflow_experiment: str, tags: dict[str, str]) -> Run | None:
        """The run already exported with these tags, if any (deleted MLflow runs are not reused)."""
        conditions = [f"tags.`{key}` = '{checked_id(value)}'" for key, value in tags.items()]
        found = self.store.search_runs([mlflow_experiment], " and ".join(conditions), max_results=1)
        return found[0] if found else None

    def open_run(
        self, mlflow_experiment: str, key: dict[str, str], name: str, start: int | None
    ) -> tuple[Run, bool]:
        """The run found by `key`, or a new one; and whether it is new."""
        found = self.find_run(mlflow_experiment, key)
        if found is not None:
            if found.info.run_name != name:
                self.store.update_run(found.info.run_id, name=name)
            return found, False
        return self.store.create_run(mlflow_experiment, start_time=start, tags=key, run_name=name), True

    # -- an experiment's parent run

    def export_parent(self, mlflow_experiment: str, experiment: dict[str, Any]) -> RunExported:
        key = {"bnlab.kind": "experiment", "bnlab.experiment_id": experiment["id"]}
        start = millis(experiment["created_at"])
        run, created = self.open_run(mlflow_experiment, key, experiment["name"], start)
        run_id = run.info.run_id
        self.log_params(run, flatten(experiment["spec"]))
        tags = {"bnlab.experiment_name": experiment["name"], "bnlab.tags": ",".join(experiment["tags"])}
        if experiment["preset"]:
            tags["bnlab.preset"] = experiment["preset"]
        self.log_tags(run_id, tags, experiment["notes"])
        # The status before the uploads: an export that stops part way leaves bnlab's status, not
        # the RUNNING of a run MLflow just created.
        status = experiment_status(experiment)
        self.set_status(
            run_id, status, end=self.experiment_end(experiment) if experiment["finished"] else None
        )
        report = self.log_report(run_id, experiment["id"])
        return RunExported("experiment", experiment["id"], run_id, created, artifacts=[report])

    def experiment_end(self, experiment: dict[str, Any]) -> int | None:
        """When the experiment's last run ended."""
        ends = [millis(self.bnlab.get_run(run["id"])["finished_at"]) for run in experiment["runs"]]
        return max((end for end in ends if end is not None), default=None)

    def membership(self, experiment: dict[str, Any], run: dict[str, Any], parent: RunExported) -> Membership:
        return Membership(experiment, run["config"], run["seed"], parent.mlflow_id)

    def log_report(self, run_id: str, experiment_id: str) -> str:
        with tempfile.TemporaryDirectory(prefix="bnlab-mlflow-") as folder:
            for fmt in ("json", "csv"):
                (Path(folder) / f"report.{fmt}").write_bytes(self.bnlab.get_report_file(experiment_id, fmt))
            self.store.log_artifacts(run_id, folder, "report")
        return "report"

    # -- one bnlab run

    def export_one(self, mlflow_experiment: str, run_id: str, member: Membership | None) -> RunExported:
        run = self.bnlab.get_run(run_id)
        key = {"bnlab.run_id": run["id"]}
        start = millis(run["started_at"] or run["created_at"])
        mlflow_run, created = self.open_run(mlflow_experiment, key, run["name"] or run["id"], start)
        mlflow_id = mlflow_run.info.run_id
        self.log_params(mlflow_run, flatten(run["spec"]))
        self.log_tags(mlflow_id, run_tags(run, member), run["notes"])
        # The status before the metrics and weights: an export that stops part way leaves bnlab's
        # status, not the RUNNING of a run MLflow just created (MLflow logs to an ended run alike).
        self.set_status(mlflow_id, run["status"], end=millis(run["finished_at"]))
        exported = RunExported("run", run["id"], mlflow_id, created)
        exported.values_logged = self.log_epochs(mlflow_run, run)
        exported.artifacts = self.log_models(mlflow_id, run["id"])
        return exported

    def log_params(self, run: Run, params: dict[str, str]) -> None:
        # MLflow parameters cannot change once logged; a bnlab spec does not change either, so the
        # ones already there are skipped.
        new = [(key, value) for key, value in params.items() if key not in run.data.params]
        from mlflow.entities import Param

        for start in range(0, len(new), PARAMS_PER_BATCH):
            batch = [Param(key, value) for key, value in new[start : start + PARAMS_PER_BATCH]]
            self.store.log_batch(run.info.run_id, params=batch)

    def log_tags(self, run_id: str, tags: dict[str, str], notes: str | None) -> None:
        from mlflow.entities import RunTag

        if notes:
            tags = tags | {"mlflow.note.content": notes}
        batch = [RunTag(key, value[:MAX_TAG_CHARS]) for key, value in tags.items()]
        self.store.log_batch(run_id, tags=batch)

    def log_epochs(self, mlflow_run: Run, run: dict[str, Any]) -> int:
        """Log the per-epoch figures and layer statistics not logged yet; how many values were new."""
        ends = epoch_ends(self.bnlab.get_metrics(run["id"]), millis(run["started_at"]))
        logged = self.logged_steps(mlflow_run)
        metrics = [
            metric
            for metric in [*epoch_metrics(ends), *layer_metrics(self.bnlab.get_layer_stats(run["id"]), ends)]
            if metric.step not in logged.get(metric.key, set())
        ]
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            self.store.log_batch(mlflow_run.info.run_id, metrics=metrics[start : start + METRICS_PER_BATCH])
        return len(metrics)

    def logged_steps(self, mlflow_run: Run) -> dict[str, set[int]]:
        """The steps already logged, per metric key the run has (none for a new run)."""
        return {
            key: {metric.step for metric in self.store.get_metric_history(mlflow_run.info.run_id, key)}
            for key in mlflow_run.data.metrics
        }

    def log_models(self, mlflow_id: str, run_id: str) -> list[str]:
        """Each stored model version not exported yet: `model/v<N>/` with weights.safetensors and
        config.json (the model config that rebuilds the network, as the API serves it)."""
        present = {info.path for info in self.store.list_artifacts(mlflow_id, "model")}
        logged = []
        for version in self.bnlab.list_versions(run_id):
            path = f"model/v{version['version']}"
            if path in present:
                continue
            with tempfile.TemporaryDirectory(prefix="bnlab-mlflow-") as folder:
                weights = self.bnlab.get_weights(run_id, version["version"])
                (Path(folder) / "weights.safetensors").write_bytes(weights)
                (Path(folder) / "config.json").write_bytes(
                    self.bnlab.get_model_config(run_id, version["version"])
                )
                self.store.log_artifacts(mlflow_id, folder, path)
            logged.append(path)
        return logged

    def set_status(self, mlflow_id: str, bnlab_status: str, end: int | None) -> None:
        status = STATUSES[bnlab_status]
        if status in {"FINISHED", "FAILED", "KILLED"}:
            self.store.set_terminated(mlflow_id, status, end_time=end)
        else:
            self.store.update_run(mlflow_id, status=status)


def run_tags(run: dict[str, Any], member: Membership | None) -> dict[str, str]:
    spec = run["spec"]
    tags = {
        "bnlab.kind": "run",
        "bnlab.status": run["status"],
        "bnlab.seed": str(spec["train"]["seed"]),
        "bnlab.dataset": spec["dataset"]["name"],
        "bnlab.tags": ",".join(run["tags"]),
    }
    if run["error"]:
        tags["bnlab.error"] = run["error"]
    if member is not None:
        tags |= {
            "bnlab.experiment_id": member.experiment["id"],
            "bnlab.experiment_name": member.experiment["name"],
            "bnlab.config": member.config,
            "bnlab.seed": str(member.seed),
            "mlflow.parentRunId": member.parent_id,
        }
    return tags


def epoch_ends(epochs: Sequence[dict[str, Any]], started: int | None) -> list[tuple[dict[str, Any], int]]:
    """Each epoch's row with the time it ended: the run's start plus the epochs' wall time so far, so
    that MLflow's time axes show the run as it went."""
    ends, elapsed_ms = [], 0.0
    for row in epochs:
        elapsed_ms += row["seconds"] * 1000
        ends.append((row, (started or 0) + int(elapsed_ms)))
    return ends


def epoch_metrics(ends: Sequence[tuple[dict[str, Any], int]]) -> Iterator[Metric]:
    """Each epoch's figures at step = epoch."""
    from mlflow.entities import Metric

    for row, timestamp in ends:
        for name, key in METRICS.items():
            if row.get(name) is not None:
                yield Metric(key, float(row[name]), timestamp, row["epoch"])


def layer_metrics(
    layer_stats: Sequence[dict[str, Any]], ends: Sequence[tuple[dict[str, Any], int]]
) -> Iterator[Metric]:
    """Each normalisation slot's input mean and std (GET /runs/{id}/layer-stats) as
    `layer_stats/<slot>/input_mean` and `.../input_std`, step = epoch (0: at initialisation). Only the
    epochs that have ended are logged, so a step is never logged before its epoch's figures; a null
    value (a diverged network's non-finite statistic) is left out, as epoch_metrics does."""
    from mlflow.entities import Metric

    timestamps = {row["epoch"]: timestamp for row, timestamp in ends}
    if ends:
        timestamps[0] = ends[0][1] - int(ends[0][0]["seconds"] * 1000)
    for epoch in layer_stats:
        if epoch["epoch"] not in timestamps:
            continue
        for slot in epoch["layers"]:
            for name in ("input_mean", "input_std"):
                if slot.get(name) is None:
                    continue
                key = f"layer_stats/{slot['layer']}/{name}"
                yield Metric(key, float(slot[name]), timestamps[epoch["epoch"]], epoch["epoch"])


def experiment_status(experiment: dict[str, Any]) -> str:
    """The parent run's status: running until every run ended; then failed if one failed,
    cancelled if one was, else succeeded."""
    counts = experiment["status_counts"]
    if not experiment["finished"]:
        return "running"
    for status in ("failed", "cancelled"):
        if counts.get(status):
            return status
    return "succeeded"
