"""`bnlab search`: start an Optuna search from a JSON spec, show it, follow it until it ends, cancel
it. HTTP only, like every client command (service.client.http)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from service.client.commands import EXIT_RUN_FAILED, _client, _print_json, _read_specs, api_command, err, out
from service.client.http import Client

PLOTS = ("history", "parallel", "slice")


@click.group()
def search() -> None:
    """Hyperparameter searches (Optuna), each trial trained over seeds."""


def _get(client: Client, search_id: str) -> dict[str, Any]:
    body: dict[str, Any] = client.request("GET", f"/api/v1/searches/{search_id}")
    return body


def _num(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


@search.command("start")
@click.argument("spec", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--follow", is_flag=True, help="Follow it until it ends; exit 1 unless it finishes.")
@api_command
def start(spec: str, follow: bool) -> None:
    """Start a search from SPEC (a JSON file, `-` for stdin)."""
    specs = _read_specs(spec)
    if len(specs) != 1:
        raise click.BadParameter("one search spec (a JSON object)", param_hint="SPEC")
    with _client() as client:
        created: dict[str, Any] = client.request("POST", "/api/v1/searches", json=specs[0])
        out.print(
            f"search {created['id']} {created['name']}: {created['spec']['trials']} trials × "
            f"{len(created['spec']['seeds'])} seeds, study {created['study_name']}",
            markup=False,
        )
        if follow:
            _follow(client, created["id"], interval=2.0)


@search.command("show")
@click.argument("search_id")
@click.option("--json", "as_json", is_flag=True, help="The API's JSON answer.")
@click.option("--plot", type=click.Choice(PLOTS), help="Also save one of the search's plots.")
@click.option(
    "--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), help="Where (PNG or SVG)."
)
@api_command
def show(search_id: str, as_json: bool, plot: str | None, out_path: Path | None) -> None:
    """A search: its status, every trial's mean ± std over seeds, the best trial, importances."""
    if (plot is None) != (out_path is None):
        raise click.UsageError("--plot and --out go together")
    with _client() as client:
        body = _get(client, search_id)
        if plot and out_path:
            fmt = "svg" if out_path.suffix.lower() == ".svg" else "png"
            response = client.http.get(f"/api/v1/searches/{body['id']}/plots/{plot}.{fmt}")
            if response.status_code != 200:
                raise click.ClickException(response.json().get("detail", response.text))
            out_path.write_bytes(response.content)
            err.print(f"{plot} plot saved to {out_path}", markup=False)
    if as_json:
        _print_json(body)
        return
    _print_search(body)


def _print_search(body: dict[str, Any]) -> None:
    objective = body["spec"]["objective"]
    out.print(
        f"search {body['id']} {body['name']}: {body['status']}; objective {objective['aggregate']} of "
        f"{objective['metric']} ({objective['direction']})",
        markup=False,
    )
    table = Table("#", "state", "params", "value", "mean ± std", "per seed", box=None)
    for trial in body["trials"]:
        seeds = " ".join("-" if v is None else f"{v:.4f}" for v in trial["values"])
        table.add_row(
            str(trial["number"]), trial["state"], _params(trial["params"]), _num(trial["value"]),
            _num(trial["mean"], trial["std"]), seeds,
        )  # fmt: skip
    out.print(table)
    best = body["best"]
    if best:
        out.print(
            f"best: trial {best['number']} {_params(best['params'])} value {_num(best['value'])}",
            markup=False,
        )
    if body.get("importances"):
        ranked = ", ".join(f"{k} {v:.2f}" for k, v in body["importances"].items())
        out.print(f"importances ({body['importance_method']}): {ranked}", markup=False)


def _follow(client: Client, search_id: str, *, interval: float) -> None:
    seen: dict[int, str] = {}
    while True:
        body = _get(client, search_id)
        for trial in body["trials"]:
            if seen.get(trial["number"]) != trial["state"]:
                seen[trial["number"]] = trial["state"]
                value = f" value {_num(trial['value'])}" if trial["state"] == "complete" else ""
                out.print(
                    f"trial {trial['number']} {trial['state']}: {_params(trial['params'])}{value}",
                    markup=False,
                )
        if body["status"] != "running":
            _print_search(body)
            if body["status"] != "finished":
                raise SystemExit(EXIT_RUN_FAILED)
            return
        time.sleep(interval)


@search.command("follow")
@click.argument("search_id")
@click.option("--interval", type=click.FloatRange(0.2, 60), default=2.0, show_default=True, help="Seconds.")
@api_command
def follow(search_id: str, interval: float) -> None:
    """Print each trial as it changes state until the search ends; exit 1 unless it finishes."""
    with _client() as client:
        _follow(client, search_id, interval=interval)


@search.command("list")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@api_command
def list_searches(limit: int) -> None:
    """List searches, newest first."""
    with _client() as client:
        page: dict[str, Any] = client.request("GET", "/api/v1/searches", params={"limit": limit})
    table = Table("id", "name", "status", "trials", "best", "created", box=None)
    for item in page["items"]:
        best = item["best"]
        done = sum(n for state, n in item["trial_counts"].items() if state != "running")
        table.add_row(
            item["id"], item["name"], item["status"], f"{done}/{item['spec']['trials']}",
            _num(best["value"]) if best else "-", item["created_at"][:19].replace("T", " "),
        )  # fmt: skip
    out.print(table)


@search.command("cancel")
@click.argument("search_id")
@api_command
def cancel(search_id: str) -> None:
    """Stop a search: no new trials, its unfinished runs cancelled."""
    with _client() as client:
        body: dict[str, Any] = client.request("POST", f"/api/v1/searches/{search_id}/cancel")
    out.print(f"search {body['id']}: {body['status']}", markup=False)
