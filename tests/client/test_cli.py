"""The user's `bnlab` commands against a real API and worker (processes started as a user would), on
SQLite and the embedded broker. Tiny synthetic runs: two epochs of a few hundred samples."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service.client.http import Client
from tests.conftest import bnlab_free_environ, sqlite_backend_at
from tests.integration.stack import Stack, free_port, start_stack

pytestmark = pytest.mark.integration

TINY = {"dataset": {"name": "synthetic", "limit": 300}, "model": {"hidden": [16]}, "train": {"epochs": 2}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("cli")
    with start_stack(sqlite_backend_at(folder), folder / "logs") as running:
        yield running


def bnlab(
    stack: Stack, *args: str, url: str | None = None, timeout: float = 120, columns: str | None = "160"
) -> subprocess.CompletedProcess[str]:
    env = bnlab_free_environ() | {"BNLAB_URL": url or stack.base_url}
    env.pop("COLUMNS", None)
    if columns is not None:
        env["COLUMNS"] = columns
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def spec_file(tmp_path: Path, spec: Any, name: str = "spec.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(spec))
    return str(path)


def test_submit_wait_follows_each_run_to_its_end(stack: Stack, tmp_path: Path) -> None:
    specs = [TINY | {"name": "cli-bn", "model": {"hidden": [16], "norm": {"kind": "batch"}}},
             TINY | {"name": "cli-no-bn", "model": {"hidden": [16], "norm": {"kind": "none"}}}]  # fmt: skip
    result = bnlab(stack, "submit", spec_file(tmp_path, specs), "--wait")
    assert result.returncode == 0, result.stdout + result.stderr + stack.tail_logs()
    lines = result.stdout.splitlines()
    ids = [line.split()[1] for line in lines if line.startswith("submitted ")]
    assert len(ids) == 2
    for run_id, name in zip(ids, ("cli-bn", "cli-no-bn"), strict=True):
        mine = [line for line in lines if line.startswith(f"{name} [{run_id[:8]}]")]
        assert [line.split("]", 1)[1].split()[:2] for line in mine if "epoch" in line] == [
            ["epoch", "1/2"],
            ["epoch", "2/2"],
        ]
        assert mine[-1].endswith("succeeded")
        # The figures printed are the ones the API stored.
        last = stack.client.get(f"/api/v1/runs/{run_id}/metrics").json()["epochs"][-1]
        assert f"val_loss {last['val_loss']:.4f}" in mine[-2]


def test_runs_show_and_predict_agree_with_the_api(stack: Stack, tmp_path: Path) -> None:
    run_id = stack.submit(TINY | {"name": "cli-predict"})
    stack.wait_for(run_id, {"succeeded"})
    listed = json.loads(bnlab(stack, "runs", "--json", "--limit", "100").stdout)
    assert run_id in [run["id"] for run in listed["items"]]
    shown = bnlab(stack, "show", run_id, "--json")
    assert shown.returncode == 0
    assert (
        json.loads(shown.stdout)["epochs"]
        == stack.client.get(f"/api/v1/runs/{run_id}/metrics").json()["epochs"]
    )
    assert "cli-predict" in bnlab(stack, "runs").stdout
    # Piped, with no COLUMNS: one line per run, not rich's 80-column wrap (this row is ~100 wide).
    (row,) = [line for line in bnlab(stack, "runs", columns=None).stdout.splitlines() if run_id in line]
    assert all(cell in row for cell in ("cli-predict", "succeeded", "2/2")), row
    assert len(row.rstrip()) > 80, row

    image = tmp_path / "digit.png"
    Image.new("L", (28, 28), 0).save(image)
    with image.open("rb") as file:
        expected = stack.client.post(
            f"/api/v1/runs/{run_id}/predict", files={"file": ("d.png", file, "image/png")}
        )
    answer = bnlab(stack, "predict", run_id, str(image), "--json")
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["predictions"] == expected.json()["predictions"]
    assert bnlab(stack, "predict", run_id, str(image)).stdout.startswith(
        f"prediction {expected.json()['predictions'][0]}"
    )


def test_a_waited_run_that_is_cancelled_exits_1(stack: Stack, tmp_path: Path) -> None:
    # Long enough to be still running when the cancel comes from a second CLI process (200 epochs of
    # 300 samples take about a second and a half on a fast machine).
    long = {"dataset": {"name": "synthetic", "limit": 3000}, "train": {"epochs": 1000}}
    spec = spec_file(tmp_path, TINY | long | {"name": "cli-cancel"})
    env = bnlab_free_environ() | {"BNLAB_URL": stack.base_url}
    waiting = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "submit", spec, "--wait"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert waiting.stdout is not None
        run_id = waiting.stdout.readline().split()[1]
        stack.wait_for(run_id, {"running"})
        cancelled = bnlab(stack, "cancel", run_id)
        assert cancelled.returncode == 0
        assert cancelled.stdout.startswith(f"run {run_id}:")
        out, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 1, out + err
    assert f"run {run_id} ended cancelled" in err


def test_exit_codes_for_refused_and_unreachable_requests(stack: Stack, tmp_path: Path) -> None:
    missing = bnlab(stack, "show", "0" * 32)
    assert missing.returncode == 3
    assert f"run {'0' * 32} not found" in missing.stderr
    invalid = bnlab(stack, "submit", spec_file(tmp_path, {"train": {"epochs": 0}}))
    assert invalid.returncode == 3
    assert "train.epochs" in invalid.stderr
    nobody = bnlab(stack, "runs", url=f"http://127.0.0.1:{free_port()}")
    assert nobody.returncode == 4
    assert "cannot reach the API" in nobody.stderr
    assert bnlab(stack, "submit", "--wait").returncode == 2  # usage: SPEC missing


def test_polling_gives_the_same_events_as_the_stream(stack: Stack) -> None:
    run_id = stack.submit(TINY | {"name": "cli-poll"})
    stack.wait_for(run_id, {"succeeded"})
    with Client(stack.base_url) as client:
        streamed = [(e.type, e.data) for e in client.run_events(run_id)]
        polled = [(e.type, e.data) for e in client._poll_run(run_id, None)]
        resumed = [(e.type, e.data) for e in client._poll_run(run_id, "1:")]
    assert polled == streamed
    assert [t for t, _ in streamed] == ["epoch", "epoch", "status"]
    assert resumed == streamed[1:]


def test_experiment_create_wait_and_report_with_its_plot(stack: Stack, tmp_path: Path) -> None:
    spec = {"name": "cli-grid", "base": TINY, "grid": {"model.norm.kind": ["none", "batch"]}, "seeds": [0]}
    created = bnlab(stack, "experiment", "create", spec_file(tmp_path, spec), "--wait")
    assert created.returncode == 0, created.stdout + created.stderr
    experiment_id = created.stdout.split()[1]
    assert created.stdout.count("succeeded") == 2
    plot = tmp_path / "grid.png"
    report = bnlab(stack, "report", experiment_id, "--plot", str(plot))
    assert report.returncode == 0, report.stderr
    assert "norm=none" in report.stdout
    assert "norm=batch" in report.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(plot.read_bytes())).size[0] > 100
    assert experiment_id in bnlab(stack, "experiment", "list").stdout


def test_worker_logs_are_json_lines_that_carry_the_run_id(stack: Stack) -> None:
    run_id = stack.submit(TINY | {"name": "cli-logs"})
    stack.wait_for(run_id, {"succeeded"})
    time.sleep(0.5)  # the worker's last line for the run is written just after the status
    lines = [
        json.loads(line)
        for line in (stack.logs / "worker.log").read_text().splitlines()
        if line.startswith("{")
    ]
    mine = [line for line in lines if line.get("run_id") == run_id]
    assert any(line["message"] == f"run {run_id} succeeded" for line in mine), mine
    api_lines = [
        json.loads(line) for line in (stack.logs / "api.log").read_text().splitlines() if line.startswith("{")
    ]
    assert any(line["logger"] == "bnlab.access" and len(line["request_id"]) == 32 for line in api_lines)


def test_predict_names_the_class_and_ids_may_be_short(stack: Stack, tmp_path: Path) -> None:
    spec = TINY | {"name": "cli-fashion", "dataset": {"name": "fashion-mnist", "limit": 300}}
    run_id = stack.submit(spec)
    stack.wait_for(run_id, {"succeeded"})
    image = tmp_path / "blank.png"
    Image.new("L", (28, 28), 0).save(image)
    answer = json.loads(bnlab(stack, "predict", run_id[:8], str(image), "--json").stdout)
    names = answer["class_names"]
    assert names[9] == "Ankle boot"
    assert answer["labels"] == [names[answer["predictions"][0]]]
    printed = bnlab(stack, "predict", run_id[:8], str(image)).stdout.splitlines()[0]
    assert printed == f"prediction {answer['predictions'][0]} ({answer['labels'][0]})"
    shown = bnlab(stack, "show", run_id[:6], "--json")
    assert shown.returncode == 0, shown.stderr


def test_without_bnlab_url_the_cli_asks_bnlab_host_and_port(stack: Stack) -> None:
    port = stack.base_url.rsplit(":", 1)[1]
    env = bnlab_free_environ() | {"BNLAB_HOST": "0.0.0.0", "BNLAB_PORT": port}  # no BNLAB_URL
    listed = subprocess.run(
        [sys.executable, "-m", "service.cli", "runs", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert "items" in json.loads(listed.stdout)


def test_rename_tag_and_rm_a_run_and_an_experiment(stack: Stack, tmp_path: Path) -> None:
    run_id = stack.submit(TINY | {"name": "x" * 200})
    stack.wait_for(run_id, {"succeeded"})
    assert bnlab(stack, "rename", run_id, "cli-kept").stdout.strip() == f"run {run_id}: cli-kept"
    assert bnlab(stack, "tag", run_id, "article", "bn").stdout.strip() == f"run {run_id}: tags article bn"
    assert bnlab(stack, "tag", run_id, "bn", "--remove").stdout.strip() == f"run {run_id}: tags article"
    assert stack.run(run_id) | {"name": "cli-kept", "tags": ["article"]} == stack.run(run_id)
    stack.client.put("/api/v1/models/cli-alias", json={"run_id": run_id})
    refused = bnlab(stack, "rm", run_id)
    assert refused.returncode == 3
    assert "(409): run" in refused.stderr
    assert "served by the alias cli-alias" in refused.stderr
    stack.client.delete("/api/v1/models/cli-alias")
    assert bnlab(stack, "rm", run_id).stdout.strip() == f"deleted run {run_id}"
    assert stack.client.get(f"/api/v1/runs/{run_id}").status_code == 404
    grid = {"name": "cli-grid", "base": TINY, "grid": {"model.norm.kind": ["batch", "none"]}, "seeds": [0]}
    created = stack.client.post("/api/v1/experiments", json=grid).json()
    renamed = bnlab(stack, "experiment", "rename", created["id"], "cli grid, renamed")
    assert renamed.stdout.strip() == f"experiment {created['id']}: cli grid, renamed"
    assert bnlab(stack, "experiment", "rm", created["id"]).returncode == 0
    for run in created["runs"]:
        assert stack.client.get(f"/api/v1/runs/{run['id']}").status_code == 404
