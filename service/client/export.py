"""`bnlab export`: bnlab's runs in other tools' stores. `bnlab export mlflow` writes runs and
experiments into an MLflow tracking store (service.client.mlflow_export), reading bnlab over HTTP."""

from __future__ import annotations

import click

from service.client.commands import _client, api_command, err, out
from service.client.mlflow_export import ExportError, MlflowExporter, open_tracking_store

# The MLflow side failed: MLflow is not installed, or the tracking store refused or is unreachable.
EXIT_MLFLOW = 5


@click.group()
def export() -> None:
    """Write bnlab runs into other tools' stores."""


@export.command("mlflow")
@click.option("--experiment", "experiment_id", help="Export this experiment: a parent run and its runs.")
@click.option("--run", "run_id", help="Export this run (under its experiment's parent run, if any).")
@click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    required=True,
    help="The MLflow store: a tracking server (http://...), a database (sqlite:///...) or a file store "
    "(file:///...). Default: MLFLOW_TRACKING_URI.",
)
@click.option(
    "--mlflow-experiment",
    "mlflow_name",
    help="The MLflow experiment to write to (created if missing). Default: the bnlab experiment's "
    'name, or "bnlab" for a run outside experiments.',
)
@api_command
def export_mlflow(
    experiment_id: str | None, run_id: str | None, tracking_uri: str, mlflow_name: str | None
) -> None:
    """Export a run or an experiment to MLflow: spec as parameters, per-epoch metrics, tags, status,
    times, the report and the weights (safetensors + config). Exporting again updates the same MLflow
    runs (found by their bnlab.run_id tag) and logs only the epochs not there yet. Exit 5 when MLflow
    is missing or the store refuses."""
    if (experiment_id is None) == (run_id is None):
        raise click.UsageError("give either --experiment ID or --run ID")
    try:
        store = open_tracking_store(tracking_uri)
        with _client() as client:
            exporter = MlflowExporter(client, store, tracking_uri, mlflow_name)
            if experiment_id is not None:
                exported = exporter.export_experiment(experiment_id)
            else:
                exported = exporter.export_run(run_id or "")
    except ExportError as exc:
        err.print(f"bnlab: {exc}", markup=False)
        raise SystemExit(EXIT_MLFLOW) from exc
    for item in exported:
        out.print(item.line(), markup=False)
    runs = [item for item in exported if item.kind == "run"]
    created = sum(item.created for item in runs)
    count = f"{len(runs)} run" + ("" if len(runs) == 1 else "s")
    summary = f"{count} exported to {tracking_uri} ({created} created, {len(runs) - created} updated)"
    out.print(summary, markup=False)
