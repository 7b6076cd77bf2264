"""A search end to end through real processes (API, Celery worker, broker, database), on SQLite with
the embedded broker and on Postgres with Redis: 4 trials × 2 seeds of a small MLP on a Fashion-MNIST
subset train for real, the best trial is recomputed here from its runs' stored metrics, the study
opens with optuna.load_study and in optuna-dashboard from other processes, and its plots come back.
On SQLite also: the median pruner prunes a trial whose seeds' mean falls behind, and cancelling a
search leaves no run queued."""

from __future__ import annotations

import io
import json
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import Backend, bnlab_free_environ, postgres_backend_at, sqlite_backend_at
from tests.integration.stack import Stack, free_port, start_stack

pytestmark = pytest.mark.integration

BASE = {
    "dataset": {"name": "fashion-mnist", "limit": 300},
    "model": {"hidden": [32]},
    "train": {"epochs": 1, "batch_size": 32},
}
SEARCH = {
    "name": "lr x norm",
    "base": BASE,
    "space": {
        "train.lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
        "model.norm.kind": {"type": "categorical", "choices": ["none", "batch"]},
    },
    "trials": 4,
    "seeds": [0, 1],
    "sampler": {"kind": "tpe", "seed": 0},
}


class SearchStack:
    def __init__(self, stack: Stack, backend: Backend) -> None:
        self.stack, self.client = stack, stack.client
        self.env = bnlab_free_environ() | backend.env

    def database_url(self) -> str:
        code = "from service.config import get_settings; print(get_settings().sqlalchemy_url)"
        out = subprocess.run(
            [sys.executable, "-c", code], env=self.env, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()

    def cli(self, *args: str) -> str:
        """`bnlab ARGS --url <the API>`; its output (it must exit 0)."""
        command = [sys.executable, "-m", "service.cli", *args, "--url", self.stack.base_url]
        done = subprocess.run(
            command, env=self.env | {"COLUMNS": "200"}, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def wait(self, search_id: str, statuses: set[str], timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body: dict[str, Any] = self.client.get(f"/api/v1/searches/{search_id}").json()
            if body["status"] in statuses:
                return body
            time.sleep(0.5)
        raise AssertionError(f"search {search_id} still running after {timeout}s\n{self.stack.tail_logs()}")

    def runs_of(self, trial: dict[str, Any]) -> list[dict[str, Any]]:
        experiment = self.client.get(f"/api/v1/experiments/{trial['experiment_id']}").json()
        return sorted(experiment["runs"], key=lambda r: r["seed"])


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def searches(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SearchStack]:
    folder = tmp_path_factory.mktemp(f"searches-{request.param}")
    if request.param == "sqlite":
        backend = sqlite_backend_at(folder)
        with start_stack(backend, folder / "logs") as stack:
            yield SearchStack(stack, backend)
    else:
        with postgres_backend_at(folder) as backend, start_stack(backend, folder / "logs") as stack:
            yield SearchStack(stack, backend)


def test_a_search_trains_its_trials_and_its_best_trial_matches_the_runs(searches: SearchStack) -> None:
    submitted = searches.client.post("/api/v1/searches", json=SEARCH)
    assert submitted.status_code == 202, submitted.text
    assert submitted.headers["location"] == f"/api/v1/searches/{submitted.json()['id']}"
    search = searches.wait(submitted.json()["id"], {"finished"})
    assert search["trial_counts"] == {"running": 0, "complete": 4, "pruned": 0, "failed": 0}, search

    for trial in search["trials"]:
        runs = searches.runs_of(trial)
        assert [r["seed"] for r in runs] == [0, 1]
        assert all(r["status"] == "succeeded" for r in runs)
        finals = [
            searches.client.get(f"/api/v1/runs/{r['id']}/metrics").json()["epochs"][-1]["val_accuracy"]
            for r in runs
        ]
        assert trial["values"] == finals
        assert trial["mean"] == pytest.approx(statistics.fmean(finals), rel=1e-12)
        assert trial["std"] == pytest.approx(statistics.stdev(finals), rel=1e-9)
        assert trial["value"] == trial["mean"]  # the default aggregate: the mean over seeds
        spec = searches.client.get(f"/api/v1/runs/{runs[0]['id']}").json()["spec"]
        assert spec["train"]["lr"] == trial["params"]["train.lr"]
        assert spec["model"]["norm"]["kind"] == trial["params"]["model.norm.kind"]
    best = max(search["trials"], key=lambda t: t["value"])
    assert search["best"] == best
    assert set(search["importances"]) == {"train.lr", "model.norm.kind"}
    assert search["importance_method"] == "fanova"
    assert sum(search["importances"].values()) == pytest.approx(1.0)

    # Another process opens the study in bnlab's database, as a user's notebook would.
    url = searches.database_url()
    code = (
        "import json, sys, optuna; s = optuna.load_study(study_name=sys.argv[1], storage=sys.argv[2]); "
        "print(json.dumps({'n': len(s.trials), 'value': s.best_value, 'params': s.best_params}))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code, search["study_name"], url], capture_output=True, text=True, check=True
    )
    study = json.loads(loaded.stdout)
    assert study == {"n": 4, "value": best["value"], "params": best["params"]}

    for kind, fmt in (("history", "png"), ("parallel", "svg"), ("slice", "png")):
        plot = searches.client.get(f"/api/v1/searches/{search['id']}/plots/{kind}.{fmt}")
        assert plot.status_code == 200, plot.text
        if fmt == "png":
            assert Image.open(io.BytesIO(plot.content)).size == (1000, 550)
        else:
            assert plot.content.lstrip().startswith(b"<?xml")
    assert_dashboard_lists(url, search["study_name"], trials=4)
    shown = searches.cli("search", "show", search["id"][:8])
    assert f"best: trial {best['number']}" in shown


def assert_dashboard_lists(url: str, study_name: str, trials: int) -> None:
    """optuna-dashboard, pointed at bnlab's database, lists the study (stopped by its PID)."""
    port = free_port()
    dashboard = Path(sys.executable).parent / "optuna-dashboard"
    process = subprocess.Popen(
        [str(dashboard), url, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline, studies = time.monotonic() + 60, None
        while time.monotonic() < deadline and studies is None:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/studies", timeout=5)
                studies = answer.json()["study_summaries"]
            except httpx.TransportError:
                time.sleep(0.3)
        assert studies is not None, "optuna-dashboard did not answer"
        listed = {s["study_name"]: s["study_id"] for s in studies}
        assert study_name in listed
        study = httpx.get(f"http://127.0.0.1:{port}/api/studies/{listed[study_name]}", timeout=30).json()
        assert [t["state"] for t in study["trials"]] == ["Complete"] * trials
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.parametrize("searches", ["sqlite"], indirect=True)
def test_the_median_pruner_prunes_a_trial_whose_seeds_fall_behind(
    searches: SearchStack, tmp_path: Path
) -> None:
    # A good learning rate first, then one too small to learn anything in an epoch: after its
    # seeds' first epoch the second trial is below the median of the first, and is pruned.
    spec = {
        "name": "prune",
        # Six epochs of 1,200 images: seed 1 of the pruned trial has epochs left when the pruner's
        # cancel reaches it (with two short epochs it could end first).
        "base": BASE
        | {"dataset": {"name": "fashion-mnist", "limit": 1200}, "train": {"epochs": 6, "batch_size": 32}},
        "space": {"train.lr": {"type": "categorical", "choices": [0.01, 1e-7]}},
        "trials": 2,
        "seeds": [0, 1],
        "max_in_flight": 1,
        "start_with": [{"train.lr": 0.01}, {"train.lr": 1e-7}],
        "pruner": {"kind": "median", "startup_trials": 1},
    }
    # Through the CLI, as a user would: start it, follow it to its end.
    spec_file = tmp_path / "search.json"
    spec_file.write_text(json.dumps(spec))
    started = searches.cli("search", "start", str(spec_file))
    search_id = started.split()[1]
    followed = searches.cli("search", "follow", search_id, "--interval", "0.5")
    assert "trial 1 pruned: train.lr=1e-07" in followed
    search = searches.client.get(f"/api/v1/searches/{search_id}").json()
    first, second = search["trials"]
    assert (first["state"], second["state"]) == ("complete", "pruned"), search
    assert second["params"] == {"train.lr": 1e-7}
    runs = searches.runs_of(second)
    # Seed 0 trained every epoch before seed 1 began (one training process); pruned after seed 1's
    # first epoch, seed 1 stopped within the next one.
    assert runs[0]["epochs_done"] == 6
    assert runs[1]["status"] == "cancelled"
    assert runs[1]["epochs_done"] in (1, 2)
    assert search["best"]["number"] == first["number"]


@pytest.mark.parametrize("searches", ["sqlite"], indirect=True)
def test_cancelling_a_search_leaves_no_run_queued(searches: SearchStack) -> None:
    # Runs long enough that no trial ends between the submit and the cancel (3 epochs of 300 samples
    # once did: that trial was complete, not cancelled).
    long = {"dataset": {"name": "fashion-mnist", "limit": 3000}, "train": {"epochs": 3}}
    spec = SEARCH | {"name": "cancel", "trials": 6, "base": BASE | long}
    submitted = searches.client.post("/api/v1/searches", json=spec)
    assert submitted.status_code == 202, submitted.text
    assert submitted.json()["trial_counts"]["running"] == 2  # max_in_flight
    cancelled = searches.client.post(f"/api/v1/searches/{submitted.json()['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert all(
        t["state"] == "failed" and t["error"] == "cancelled by the user" for t in cancelled.json()["trials"]
    )
    runs = [r for t in cancelled.json()["trials"] for r in searches.runs_of(t)]
    assert len(runs) == 4
    assert not [r for r in runs if r["status"] == "queued"]
    for run in runs:
        searches.stack.wait_for(run["id"], {"cancelled", "succeeded"})
    time.sleep(1)  # the worker's run-end hooks have run: still no new trial
    after = searches.client.get(f"/api/v1/searches/{submitted.json()['id']}").json()
    assert len(after["trials"]) == 2
    assert after["status"] == "cancelled"
