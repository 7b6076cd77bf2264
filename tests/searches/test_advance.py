"""Advancing a search when several of its runs end at once: one process at a time holds the search's
lease, every event is seen (none is lost while another process holds it), each trial is told once,
and no more than `max_in_flight` trials train. Runs end here as a worker ends them (their epochs
and status written to the database) and the worker's hook is called from several threads at once;
the in-process API submits the search. On SQLite and on Postgres."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import optuna
import pytest
from fastapi.testclient import TestClient

from service.db import session_scope
from service.main import create_app
from service.models import EpochMetric, Run, RunStatus, SearchTrial
from service.searches.service import epoch_hook, on_run_event
from service.searches.storage import storage
from tests.conftest import Backend

SEARCH = {
    "name": "together",
    "base": {
        "dataset": {"name": "synthetic", "limit": 200},
        "model": {"hidden": [8]},
        "train": {"epochs": 1},
    },
    "space": {"train.lr": {"type": "float", "low": 1e-3, "high": 0.1, "log": True}},
    "trials": 4,
    "seeds": [0, 1, 2],
}


@pytest.fixture(params=["sqlite_backend", "postgres_backend"])
def api(request: pytest.FixtureRequest, use_backend: Callable[[Backend], None]) -> Iterator[TestClient]:
    use_backend(request.getfixturevalue(request.param))
    with TestClient(create_app()) as client:
        yield client


def finish_runs(
    accuracy_of: Callable[[int], float], loss_of: Callable[[int], float] = lambda _: 1.0
) -> list[str]:
    """End every running trial's runs as a worker would: one epoch each, then succeeded."""
    with session_scope() as session:
        trials = session.query(SearchTrial).filter(SearchTrial.state == "running").all()
        runs = session.query(Run).filter(Run.experiment_id.in_([t.experiment_id for t in trials])).all()
        for run in runs:
            seed = int(run.spec["train"]["seed"])
            metrics = {"val_loss": loss_of(seed), "val_accuracy": accuracy_of(seed)}
            session.add(
                EpochMetric(
                    run_id=run.id, epoch=1, train_loss=1.0, train_accuracy=0.5, seconds=0.1, **metrics
                )
            )
            run.status, run.epochs_done = RunStatus.succeeded.value, 1
        return [run.id for run in runs]


def test_runs_ending_together_tell_each_trial_once_and_keep_the_budget(api: TestClient) -> None:
    submitted = api.post("/api/v1/searches", json=SEARCH)
    assert submitted.status_code == 202, submitted.text
    search_id = submitted.json()["id"]
    for _ in range(2):  # two waves: trials 0-1, then the 2-3 their ends asked for
        ended = finish_runs(lambda seed: 0.5 + seed / 10)
        assert len(ended) == 6  # two trials in flight × three seeds
        with ThreadPoolExecutor(max_workers=6) as pool:
            for done in [pool.submit(on_run_event, run_id) for run_id in ended]:
                done.result()  # no "trial already finished": each trial was told once
    search = api.get(f"/api/v1/searches/{search_id}").json()
    assert search["status"] == "finished"
    assert search["trial_counts"] == {"running": 0, "complete": 4, "pruned": 0, "failed": 0}
    assert all(t["mean"] == pytest.approx(0.6) and t["std"] == pytest.approx(0.1) for t in search["trials"])
    study = optuna.load_study(study_name=search["study_name"], storage=storage())
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4

    # Deleting it takes its trials' experiments, their runs and its study along.
    assert api.delete(f"/api/v1/searches/{search_id}").status_code == 204
    assert api.get(f"/api/v1/searches/{search_id}").status_code == 404
    for trial in search["trials"]:
        assert api.get(f"/api/v1/experiments/{trial['experiment_id']}").status_code == 404
    with session_scope() as session:
        assert session.query(Run).count() == 0
    with pytest.raises(KeyError):
        optuna.load_study(study_name=search["study_name"], storage=storage())


def test_a_diverged_seed_fails_its_trial(api: TestClient) -> None:
    spec = SEARCH | {"trials": 1, "seeds": [0, 1], "objective": {"metric": "val_loss"}}
    search_id = api.post("/api/v1/searches", json=spec).json()["id"]
    for run_id in finish_runs(lambda _: 0.5, lambda seed: float("inf") if seed else 0.7):
        on_run_event(run_id)
    search = api.get(f"/api/v1/searches/{search_id}").json()
    assert search["status"] == "finished"
    assert search["best"] is None
    (trial,) = search["trials"]
    assert trial["state"] == "failed"
    assert trial["error"] == "a seed's val_loss is not finite (0.7, inf)"


def test_values_that_make_no_valid_run_fail_their_trial_and_the_search_goes_on(api: TestClient) -> None:
    # Each value is valid with the others' first values, but 4 groups cannot split 30 features.
    spec = SEARCH | {
        "base": SEARCH["base"] | {"model": {"hidden": [32], "norm": {"kind": "none", "num_groups": 4}}},
        "space": {
            "model.norm.kind": {"type": "categorical", "choices": ["none", "group"]},
            "model.hidden": {"type": "categorical", "choices": [[32], [30]]},
        },
        "sampler": {"kind": "grid", "seed": 0},
        "max_in_flight": 1,
        "seeds": [0],
    }
    submitted = api.post("/api/v1/searches", json=spec)
    assert submitted.status_code == 202, submitted.text
    for _ in range(4):
        for run_id in finish_runs(lambda _: 0.5):
            on_run_event(run_id)
    search = api.get(f"/api/v1/searches/{submitted.json()['id']}").json()
    assert search["status"] == "finished", search["trials"]
    assert search["trial_counts"] == {"running": 0, "complete": 3, "pruned": 0, "failed": 1}
    (failed,) = [t for t in search["trials"] if t["state"] == "failed"]
    assert failed["params"] == {"model.norm.kind": "group", "model.hidden": [30]}
    assert failed["experiment_id"] is None
    assert "must divide every model.hidden width" in failed["error"]


def test_only_a_search_trials_runs_call_the_search_hook_after_each_epoch(api: TestClient) -> None:
    assert api.post("/api/v1/searches", json=SEARCH).status_code == 202
    plain = api.post("/api/v1/runs", json=SEARCH["base"])
    assert plain.status_code == 202, plain.text
    with session_scope() as session:
        trial_runs = [r.id for r in session.query(Run).filter(Run.experiment_id.is_not(None))]
    assert len(trial_runs) == 6  # two trials in flight × three seeds
    assert all(epoch_hook(run_id) is on_run_event for run_id in trial_runs)
    assert epoch_hook(plain.json()["id"]) is None  # no lookup per epoch for a run outside any search
