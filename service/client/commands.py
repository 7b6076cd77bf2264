"""The user's `bnlab` commands: submit and follow runs, list, show, cancel, delete, rename, tag, predict.

They talk to a bnlab API over HTTP only (service.client.http), at BNLAB_URL with BNLAB_API_KEY, so they
work from any machine that can reach the API. Exit codes, for scripts: 0 done; 1 a run waited for
did not succeed; 2 bad usage (click); 3 the API refused the request; 4 the API could not be reached.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click
import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table

from service.client.http import DEFAULT_URL, FINISHED, ApiError, Client, Event, default_url

EXIT_RUN_FAILED = 1
EXIT_API_ERROR = 3
EXIT_UNREACHABLE = 4

P = ParamSpec("P")
R = TypeVar("R")

# Width when the output is a pipe or a file and COLUMNS is unset: rich would assume 80 columns and
# wrap a table's rows over several lines; scripts and logs read one line per row.
PIPE_WIDTH = 200


def _console(*, stderr: bool = False) -> Console:
    console = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPE_WIDTH
    return console


out = _console()
err = _console(stderr=True)


def _client() -> Client:
    ctx = click.get_current_context()
    return Client(ctx.meta["bnlab.url"], ctx.meta["bnlab.api_key"])


def api_command(function: Callable[P, R]) -> Callable[P, R]:
    """The options every user command takes, and its exit codes for API errors."""

    @click.option(
        "--url",
        default=default_url,
        show_default="BNLAB_URL, else http://BNLAB_HOST:BNLAB_PORT, else " + DEFAULT_URL,
        help="The bnlab API.",
    )
    @click.option("--api-key", envvar="BNLAB_API_KEY", default=None, help="API key (or BNLAB_API_KEY).")
    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        ctx = click.get_current_context()
        ctx.meta["bnlab.url"] = kwargs.pop("url")
        ctx.meta["bnlab.api_key"] = kwargs.pop("api_key")
        try:
            return function(*args, **kwargs)
        except ApiError as exc:
            err.print(f"bnlab: the API refused the request ({exc.status}): {exc.message}", markup=False)
            raise SystemExit(EXIT_API_ERROR) from exc
        except httpx.TransportError as exc:
            err.print(f"bnlab: cannot reach the API at {ctx.meta['bnlab.url']}: {exc}", markup=False)
            raise SystemExit(EXIT_UNREACHABLE) from exc

    return wrapper


def _print_json(value: Any) -> None:
    out.print_json(json.dumps(value))


def _read_specs(source: str) -> list[dict[str, Any]]:
    """One run spec (an object) or several (an array), from a file or `-` for stdin."""
    text = sys.stdin.read() if source == "-" else Path(source).read_text()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="SPEC") from exc
    specs = parsed if isinstance(parsed, list) else [parsed]
    if not specs or not all(isinstance(spec, dict) for spec in specs):
        raise click.BadParameter("a run spec (JSON object) or a list of them", param_hint="SPEC")
    return specs


# ---------------------------------------------------------------------------------------- progress

# Rich markup for a run's state in its progress row: red only where something went wrong.
STATUS_STYLES = {
    "failed": "[red]{}[/red]",
    "succeeded": "[green]{}[/green]",
    "cancelled": "[yellow]{}[/yellow]",
}


class RunProgress:
    """A progress bar per run (epoch, loss, accuracy, ETA) on a terminal; a line per event elsewhere,
    so that logs and pipes get readable text instead of redraws."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description:<24}"),
            # Neutral while running and when done; a run that fails says so in red in its status.
            BarColumn(bar_width=28, complete_style="cyan", finished_style="green", pulse_style="cyan"),
            TextColumn("epoch {task.completed:>3.0f}/{task.total:<3.0f}"),
            TextColumn("loss {task.fields[loss]:<7} val_loss {task.fields[val_loss]:<7}"),
            TextColumn("val_acc {task.fields[acc]:<6}"),
            TextColumn("{task.fields[status]:<9}"),
            TimeRemainingColumn(),
            console=console,
            disable=not self.live,
        )
        self.tasks: dict[str, TaskID] = {}
        self.names: dict[str, str] = {}

    def __enter__(self) -> RunProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def add(self, run: dict[str, Any]) -> None:
        name = run["name"] or run["id"][:8]
        self.names[run["id"]] = name
        fields = {"loss": "-", "val_loss": "-", "acc": "-", "status": run["status"]}
        self.tasks[run["id"]] = self.progress.add_task(name, total=run["summary"]["epochs_total"], **fields)

    def update(self, run_id: str, event: Event) -> None:
        data, task = event.data, self.tasks[run_id]
        if event.type == "epoch":
            # null (not finite) in the epoch a run diverged: shown as "-"
            values = {
                "loss": _num(data["train_loss"]),
                "val_loss": _num(data["val_loss"]),
                "acc": _num(data["val_accuracy"]),
            }
            self.progress.update(task, completed=data["epoch"])
            self.progress.update(task, loss=values["loss"], val_loss=values["val_loss"], acc=values["acc"])
            line = (
                f"epoch {data['epoch']}/{data['epochs_total']}  loss {values['loss']}  "
                f"val_loss {values['val_loss']}  val_acc {values['acc']}  ({data['seconds']:.1f} s)"
            )
        else:
            self.progress.update(task, status=STATUS_STYLES.get(data["status"], "{}").format(data["status"]))
            line = data["status"] + (f": {data['error']}" if data.get("error") else "")
        if not self.live:
            self.console.print(f"{self.names[run_id]} [{run_id[:8]}] {line}", markup=False)


def _follow_all(client: Client, run_ids: list[str]) -> Iterator[tuple[str, Event]]:
    """Every run's events as they come, each run's stream read in its own thread."""
    events: queue.Queue[tuple[str, Event | BaseException | None]] = queue.Queue()

    def follow(run_id: str) -> None:
        try:
            for event in client.run_events(run_id):
                events.put((run_id, event))
            events.put((run_id, None))
        except BaseException as exc:  # handed to the main thread, which reports it
            events.put((run_id, exc))

    for run_id in run_ids:
        threading.Thread(target=follow, args=(run_id,), daemon=True, name=f"follow-{run_id[:8]}").start()
    remaining = len(run_ids)
    while remaining:
        run_id, item = events.get()
        if item is None:
            remaining -= 1
        elif isinstance(item, BaseException):
            raise item
        else:
            yield run_id, item


def wait_for_runs(client: Client, runs: list[dict[str, Any]]) -> dict[str, str]:
    """Follow runs to their end with a progress display; their final statuses by id."""
    final = {run["id"]: run["status"] for run in runs}
    with RunProgress(out) as progress:
        for run in runs:
            progress.add(run)
        for run_id, event in _follow_all(client, [run["id"] for run in runs]):
            progress.update(run_id, event)
            if event.type == "status":
                final[run_id] = event.data["status"]
    return final


def _exit_for(final: dict[str, str]) -> None:
    failed = {run_id: status for run_id, status in final.items() if status != "succeeded"}
    for run_id, status in failed.items():
        err.print(f"bnlab: run {run_id} ended {status}", markup=False)
    if failed:
        raise SystemExit(EXIT_RUN_FAILED)


# ---------------------------------------------------------------------------------------- commands


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--wait", is_flag=True, help="Follow the runs live until they end; exit 1 unless all succeed.")
@api_command
def submit(spec: str, wait: bool) -> None:
    """Submit a run spec (a JSON object), or several (a JSON array), from SPEC (`-` for stdin)."""
    with _client() as client:
        runs = [client.submit_run(one) for one in _read_specs(spec)]
        for run in runs:
            out.print(f"submitted {run['id']} {run['name'] or ''}".rstrip(), markup=False)
        if wait:
            _exit_for(wait_for_runs(client, runs))


@click.command("runs")
@click.option("--status", type=click.Choice(["queued", "running", *sorted(FINISHED)]), help="Only these.")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="The API's JSON answer.")
@api_command
def list_runs(status: str | None, limit: int, as_json: bool) -> None:
    """List runs, newest first."""
    with _client() as client:
        page = client.list_runs(status=status, limit=limit)
    if as_json:
        _print_json(page)
        return
    table = Table("id", "name", "status", "epochs", "val_loss", "val_acc", "created", box=None)
    for run in page["items"]:
        s = run["summary"]
        table.add_row(
            run["id"], run["name"] or "", run["status"], f"{s['epochs_done']}/{s['epochs_total']}",
            _num(s["val_loss"]), _num(s["val_accuracy"]), run["created_at"][:19].replace("T", " "),
        )  # fmt: skip
    out.print(table)
    out.print(f"{len(page['items'])} of {page['total']} runs", style="dim")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@click.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="The run and its metrics as JSON.")
@api_command
def show(run_id: str, as_json: bool) -> None:
    """A run: status, spec, error and its per-epoch metrics."""
    with _client() as client:
        run = client.get_run(run_id)
        epochs = client.get_metrics(run_id)
    if as_json:
        _print_json(run | {"epochs": epochs})
        return
    out.print(f"run {run['id']} {run['name'] or ''}\nstatus  {run['status']}", markup=False)
    if run["error"]:
        out.print(f"error   {run['error']}", markup=False)
    out.print(f"spec    {json.dumps(run['spec'])}", markup=False)
    table = Table("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", box=None)
    for row in epochs:
        table.add_row(
            str(row["epoch"]), _num(row["train_loss"]), _num(row["train_accuracy"]),
            _num(row["val_loss"]), _num(row["val_accuracy"]), f"{row['seconds']:.2f}",
        )  # fmt: skip
    out.print(table)


@click.command()
@click.argument("run_id")
@api_command
def cancel(run_id: str) -> None:
    """Cancel a run: a queued one never starts, a running one stops at its next step."""
    with _client() as client:
        run = client.cancel_run(run_id)
    state = "cancelled" if run["status"] == "cancelled" else f"{run['status']}, stopping at its next step"
    out.print(f"run {run['id']}: {state}", markup=False)


@click.command()
@click.argument("run_ids", nargs=-1, required=True)
@api_command
def rm(run_ids: tuple[str, ...]) -> None:
    """Delete runs with their metrics, checkpoints and models (a running one stops at its next step)."""
    with _client() as client:
        for run_id in run_ids:
            client.delete_run(run_id)
            out.print(f"deleted run {run_id}", markup=False)


@click.command()
@click.argument("run_id")
@click.argument("name")
@api_command
def rename(run_id: str, name: str) -> None:
    """Give a run a new name."""
    with _client() as client:
        run = client.update_run(run_id, {"name": name})
    out.print(f"run {run['id']}: {run['name']}", markup=False)


@click.command()
@click.argument("run_id")
@click.argument("tags", nargs=-1, required=True)
@click.option("--remove", is_flag=True, help="Remove these tags instead of adding them.")
@api_command
def tag(run_id: str, tags: tuple[str, ...], remove: bool) -> None:
    """Add tags to a run (or --remove them); the others stay."""
    with _client() as client:
        current = client.get_run(run_id)["tags"]
        wanted = (
            [t for t in current if t not in tags]
            if remove
            else [*current, *(t for t in tags if t not in current)]
        )
        run = client.update_run(run_id, {"tags": wanted})
    out.print(f"run {run['id']}: tags {' '.join(run['tags']) or '(none)'}", markup=False)


@click.command()
@click.argument("run_id")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="The API's JSON answer.")
@api_command
def predict(run_id: str, image: Path, as_json: bool) -> None:
    """Predict the class of a PNG or JPEG image with a succeeded run's model."""
    with _client() as client:
        answer = client.predict_image(run_id, image)
    if as_json:
        _print_json(answer)
        return
    probabilities, names = answer["probabilities"][0], answer.get("class_names")
    top = sorted(range(len(probabilities)), key=lambda c: -probabilities[c])[:3]

    def label(c: int) -> str:
        return f"{c} ({names[c]})" if names else str(c)

    out.print(f"prediction {label(answer['predictions'][0])}", markup=False)
    out.print("top 3      " + "  ".join(f"{label(c)}: {probabilities[c]:.3f}" for c in top), markup=False)


# ---------------------------------------------------------------------------------------- experiments


@click.group()
def experiment() -> None:
    """Create and list experiments (grids of runs over one base spec)."""


def _parse_seeds(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(part) for part in value.split(",")]
    except ValueError as exc:
        raise click.BadParameter("comma-separated integers, e.g. 0,1,2") from exc


@experiment.command("create")
@click.argument("spec", required=False, type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--preset", help="Start a ready-made experiment (GET /api/v1/presets) instead of SPEC.")
@click.option("--seeds", callback=_parse_seeds, help="With --preset: seeds to run, e.g. 0,1,2.")
@click.option("--dataset", help="With --preset: the dataset to use instead of the preset's.")
@click.option("--wait", is_flag=True, help="Follow every run live; exit 1 unless all succeed.")
@api_command
def create_experiment(
    spec: str | None, preset: str | None, seeds: list[int] | None, dataset: str | None, wait: bool
) -> None:
    """Create an experiment from SPEC (a JSON file, `-` for stdin) or from --preset."""
    if (spec is None) == (preset is None):
        raise click.UsageError("give either SPEC or --preset")
    with _client() as client:
        if preset is not None:
            overrides = {k: v for k, v in {"seeds": seeds, "dataset": dataset}.items() if v is not None}
            created = client.start_preset(preset, overrides)
        else:
            specs = _read_specs(spec or "-")
            if len(specs) != 1:
                raise click.BadParameter("one experiment spec (a JSON object)", param_hint="SPEC")
            created = client.create_experiment(specs[0])
        out.print(f"experiment {created['id']} {created['name']}: {len(created['runs'])} runs", markup=False)
        if wait:
            _exit_for(wait_for_experiment(client, created))


def wait_for_experiment(client: Client, experiment: dict[str, Any]) -> dict[str, str]:
    final = {run["id"]: run["status"] for run in experiment["runs"]}
    with RunProgress(out) as progress:
        for run in experiment["runs"]:
            summary = {"epochs_total": run["epochs_total"]}
            progress.add({"id": run["id"], "name": run["name"], "status": run["status"], "summary": summary})
        for event in client.experiment_events(experiment["id"]):
            if event.type == "end":
                break
            progress.update(event.data["run_id"], event)
            if event.type == "status":
                final[event.data["run_id"]] = event.data["status"]
    return final


@experiment.command("list")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@api_command
def list_experiments(limit: int) -> None:
    """List experiments, newest first."""
    with _client() as client:
        page = client.list_experiments(limit=limit)
    table = Table("id", "name", "preset", "runs", "finished", "created", box=None)
    for item in page["items"]:
        counts = item["status_counts"]
        done = sum(counts.get(s, 0) for s in FINISHED)
        table.add_row(
            item["id"], item["name"], item["preset"] or "", f"{done}/{len(item['runs'])}",
            "yes" if item["finished"] else "no", item["created_at"][:19].replace("T", " "),
        )  # fmt: skip
    out.print(table)


@experiment.command("rm")
@click.argument("experiment_ids", nargs=-1, required=True)
@api_command
def remove_experiments(experiment_ids: tuple[str, ...]) -> None:
    """Delete experiments with all their runs and what they stored."""
    with _client() as client:
        for experiment_id in experiment_ids:
            client.delete_experiment(experiment_id)
            out.print(f"deleted experiment {experiment_id}", markup=False)


@experiment.command("rename")
@click.argument("experiment_id")
@click.argument("name")
@api_command
def rename_experiment(experiment_id: str, name: str) -> None:
    """Give an experiment a new name (its runs keep theirs)."""
    with _client() as client:
        renamed = client.update_experiment(experiment_id, {"name": name})
    out.print(f"experiment {renamed['id']}: {renamed['name']}", markup=False)


@click.command()
@click.argument("experiment_id")
@click.option("--plot", type=click.Path(dir_okay=False, writable=True, path_type=Path), help="Save a PNG.")
@click.option("--metric", type=click.Choice(["loss", "accuracy"]), default="loss", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="The API's JSON report.")
@api_command
def report(experiment_id: str, plot: Path | None, metric: str, as_json: bool) -> None:
    """An experiment's report: per configuration, mean ± std over seeds; winners; claim verdicts."""
    with _client() as client:
        body = client.get_report(experiment_id)
        image = client.get_plot(experiment_id, metric) if plot else None
    if as_json:
        _print_json(body)
    else:
        _print_report(body)
    if plot is not None and image is not None:
        plot.write_bytes(image)
        err.print(f"plot ({metric}) saved to {plot}", markup=False)


def _stat(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    std = stat.get("std")
    return f"{stat['mean']:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _print_report(body: dict[str, Any]) -> None:
    state = "finished" if body["finished"] else "still running: figures will change"
    out.print(f"experiment {body['experiment_id']} {body['name']} ({state})", markup=False)
    table = Table(
        "configuration", "ok/runs", "final val_loss", "final val_acc", "best val_loss",
        f"epochs to {body['target']:g}", box=None,
    )  # fmt: skip
    for config in body["configurations"]:
        reach = config["epochs_to_target"]
        mean = "-" if reach["mean"] is None else f"{reach['mean']:.1f}"
        table.add_row(
            config["config"], f"{config['succeeded']}/{config['runs']}",
            _stat(config["final"].get("val_loss")), _stat(config["final"].get("val_accuracy")),
            _stat(config["best"].get("val_loss")), f"{mean} ({reach['reached']} reached)",
        )  # fmt: skip
    out.print(table)
    for winner in body["winners"]:
        out.print(f"best {winner['metric']} ({winner['better']}): {winner['config']}", markup=False)
    for claim in body["claims"]:
        out.print(f"claim: {claim['claim']} -> {claim['verdict']} ({claim['evidence']})", markup=False)


def register_client_commands(group: click.Group) -> None:
    for command in (submit, list_runs, show, cancel, rm, rename, tag, predict, experiment, report):
        group.add_command(command)
