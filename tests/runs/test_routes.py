"""The HTTP API in-process, on a migrated SQLite database and the embedded folder broker.

No worker runs here: these tests check validation, persistence and the queue message itself.
The end-to-end tests in tests/integration run real worker processes.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from service.config import get_settings
from service.db import session_scope
from service.main import create_app
from service.models import Run
from tests.conftest import Backend

SMALL_SPEC = {
    "name": "tiny",
    "dataset": {"name": "synthetic", "limit": 200},
    "train": {"epochs": 1},
}


def queued_messages() -> list[Path]:
    return sorted((get_settings().broker_folder / "queue").glob("*.msg"))


def test_submit_returns_202_location_and_queued_run(client: TestClient) -> None:
    response = client.post("/api/v1/runs", json=SMALL_SPEC)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued"
    assert response.headers["location"] == f"/api/v1/runs/{body['id']}"
    assert client.get(response.headers["location"]).json()["id"] == body["id"]


def test_submit_enqueues_exactly_one_json_message_naming_the_run(client: TestClient) -> None:
    run_id = client.post("/api/v1/runs", json=SMALL_SPEC).json()["id"]
    messages = queued_messages()
    assert len(messages) == 1
    envelope = json.loads(messages[0].read_text())
    assert envelope["content-type"] == "application/json"
    assert envelope["headers"]["task"] == "bnlab.train_run"
    assert run_id in envelope["body"] or run_id in json.dumps(envelope)


def test_omitted_fields_default_to_the_articles_keras_experiment(client: TestClient) -> None:
    spec = client.post("/api/v1/runs", json={}).json()["spec"]
    assert spec["dataset"] == {"name": "fashion-mnist", "id": None, "val_split": 0.2, "limit": None}
    assert spec["model"]["hidden"] == [128]
    assert spec["model"]["activation"] == "relu"
    assert spec["model"]["norm"] == {
        "kind": "batch",
        "position": "after_activation",
        "eps": 0.001,
        "momentum": 0.01,
        "affine": True,
        "track_running_stats": True,
        "keras_momentum": None,
        "epsilon": None,
        "center": None,
        "scale": None,
        "num_groups": 32,
        "virtual_batch_size": 16,
        "rmax": 3.0,
        "dmax": 5.0,
        "renorm_warmup_steps": 5000,
        "renorm_rmax_steps": 40000,
        "renorm_dmax_steps": 25000,
        "noise_mean": 0.5,
        "noise_std": 1.0,
        "example_weight": 0.0,
        "max_steps": None,
        "sync": False,
    }
    assert spec["train"] == {
        "epochs": 10,
        "batch_size": 32,
        "optimizer": "adam",
        "lr": 0.001,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "adam_eps": 1e-8,
        "schedule": {"kind": "none", "step_size": 10, "gamma": 0.1},
        "seed": 0,
        "processes": 1,
        "probes": {
            "gradients": True,
            "smoothness": False,
            "percentiles": True,
            "gamma": True,
            "statistics_gap": False,
        },
        "agc": None,
        "frozen_bn_epochs": 0,
        "trainable": "all",
        "batch_order": "shuffled",
        "batch_classes": None,
    }
    assert spec["compat"] == "pytorch"


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"colour": "blue"}, "colour"),
        ({"model": {"norm": {"kind": "batch", "sparkle": 1}}}, "sparkle"),
        ({"train": {"epochs": 1_000_000_000}}, "epochs"),
        ({"train": {"batch_size": 0}}, "batch_size"),
        ({"train": {"batch_size": 1}}, "batch_size"),
        ({"train": {"lr": -1}}, "lr"),
        ({"model": {"norm": {"kind": "whitening"}}}, "kind"),
        ({"model": {"hidden": [4096] * 16}}, "parameters"),
        ({"dataset": {"name": "../../etc/passwd"}}, "name"),
        ({"model": {"norm": {"momentum": 1.5}}}, "momentum"),
        ({"train": {"seed": False}}, "boolean"),
        ({"model": {"hidden": [True]}}, "boolean"),
        ({"model": {"norm": {"affine": 0}}}, "affine"),
        ({"name": "http://127.0.0.1:9/steal"}, "name"),
        ({"name": "../../etc/passwd"}, "name"),
        ({"name": "C:\\Windows\\system32"}, "name"),
        ({"dataset": {"name": "file:///etc/passwd"}}, "name"),
    ],
)
def test_invalid_specs_are_422_with_a_message_and_nothing_is_enqueued(
    client: TestClient, spec: dict[str, object], fragment: str
) -> None:
    response = client.post("/api/v1/runs", json=spec)
    assert response.status_code == 422
    assert fragment in response.text
    assert queued_messages() == []
    assert client.get("/api/v1/runs").json()["total"] == 0


def test_non_finite_learning_rate_is_rejected(client: TestClient) -> None:
    response = client.post(
        "/api/v1/runs", content=b'{"train": {"lr": NaN}}', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert queued_messages() == []


def test_missing_dataset_is_422_saying_where_to_put_the_files(client: TestClient) -> None:
    response = client.post("/api/v1/runs", json={"dataset": {"name": "mnist"}})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "train-images-idx3-ubyte" in detail
    assert str(get_settings().data_dir / "mnist") in detail
    assert queued_messages() == []


def test_list_filters_by_status_newest_first_with_pagination(client: TestClient) -> None:
    ids = []
    for _ in range(3):
        ids.append(client.post("/api/v1/runs", json=SMALL_SPEC).json()["id"])
        time.sleep(0.01)
    client.post(f"/api/v1/runs/{ids[0]}/cancel")
    page = client.get("/api/v1/runs", params={"limit": 2}).json()
    assert page["total"] == 3
    assert [run["id"] for run in page["items"]] == [ids[2], ids[1]]
    second = client.get("/api/v1/runs", params={"limit": 2, "offset": 2}).json()
    assert [run["id"] for run in second["items"]] == [ids[0]]
    cancelled = client.get("/api/v1/runs", params={"status": "cancelled"}).json()
    assert [run["id"] for run in cancelled["items"]] == [ids[0]]
    assert client.get("/api/v1/runs", params={"status": "sleeping"}).status_code == 422


def test_cancel_queued_run_then_conflict(client: TestClient) -> None:
    run_id = client.post("/api/v1/runs", json=SMALL_SPEC).json()["id"]
    cancelled = client.post(f"/api/v1/runs/{run_id}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    again = client.post(f"/api/v1/runs/{run_id}/cancel")
    assert again.status_code == 409
    assert "already ended" in again.json()["detail"]


def test_unknown_and_malformed_ids(client: TestClient) -> None:
    assert client.get(f"/api/v1/runs/{'0' * 32}").status_code == 404
    assert client.get(f"/api/v1/runs/{'0' * 32}/metrics").status_code == 404
    assert client.get("/api/v1/runs/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)
    assert client.get("/api/v1/runs/not-an-id").status_code == 422


def test_metrics_empty_and_summary_before_training(client: TestClient) -> None:
    run_id = client.post("/api/v1/runs", json=SMALL_SPEC).json()["id"]
    assert client.get(f"/api/v1/runs/{run_id}/metrics").json() == {"epochs": []}
    summary = client.get(f"/api/v1/runs/{run_id}").json()["summary"]
    assert summary == {
        "epochs_done": 0,
        "epochs_total": 1,
        "train_loss": None,
        "train_accuracy": None,
        "val_loss": None,
        "val_accuracy": None,
    }


def test_predict_before_success_is_409(client: TestClient) -> None:
    run_id = client.post("/api/v1/runs", json=SMALL_SPEC).json()["id"]
    response = client.post(f"/api/v1/runs/{run_id}/predict", json={"inputs": [[0.0] * 784]})
    assert response.status_code == 409
    assert "queued" in response.json()["detail"]


def test_health(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "ok"}
    assert client.get("/health/ready").json() == {"status": "ok", "database": "ok", "broker": "ok"}


def test_openapi_documents_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ["/api/v1/runs", "/api/v1/runs/{run_id}", "/api/v1/runs/{run_id}/metrics",
                 "/api/v1/runs/{run_id}/cancel", "/api/v1/runs/{run_id}/predict"]:  # fmt: skip
        assert path in paths
    assert client.get("/docs").status_code == 200


def test_broker_down_answers_503_fast_and_keeps_the_run_queued(
    tmp_path: Path, use_backend: Callable[[Backend], None]
) -> None:
    # Port 9 on loopback has no listener: the connection is refused at once.
    use_backend(
        Backend(
            "sqlite", {"BNLAB_DATA_DIR": str(tmp_path / "d"), "BNLAB_BROKER_URL": "redis://127.0.0.1:9/0"}
        )
    )
    with TestClient(create_app()) as down:
        started = time.monotonic()
        response = down.post("/api/v1/runs", json=SMALL_SPEC)
        elapsed = time.monotonic() - started
        assert response.status_code == 503
        assert elapsed < 2.5
        run_path = response.headers["location"]
        assert down.get(run_path).json()["status"] == "queued"
        assert down.get("/health/ready").status_code == 503


def test_method_not_allowed_lists_every_method_of_the_path(client: TestClient) -> None:
    response = client.request("OPTIONS", "/api/v1/runs")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
    assert client.put(f"/api/v1/runs/{'0' * 32}").headers["allow"] == "DELETE, GET, PATCH"


def test_a_body_that_is_not_json_is_a_documented_400(client: TestClient) -> None:
    response = client.post("/api/v1/runs", content=b"\xff\xfe{", headers={"content-type": "application/json"})
    assert response.status_code in (400, 422)
    paths = client.get("/openapi.json").json()["paths"]
    assert str(response.status_code) in paths["/api/v1/runs"]["post"]["responses"]


def test_an_unwritable_embedded_broker_answers_503_and_keeps_the_run_queued(client: TestClient) -> None:
    # The broker's folder replaced by a file once the API has published to it: writing a message
    # fails (a kombu ChannelError, not a connection error).
    assert client.post("/api/v1/runs", json=SMALL_SPEC).status_code == 202
    queue = get_settings().broker_folder / "queue"
    shutil.rmtree(queue)
    queue.write_text("not a folder")
    response = client.post("/api/v1/runs", json=SMALL_SPEC)
    assert response.status_code == 503, response.text
    assert "broker" in response.json()["detail"].lower(), response.json()
    assert client.get(response.headers["location"]).json()["status"] == "queued"


def _rename_run(old: str, new: str) -> None:
    with session_scope() as session:
        session.execute(update(Run).where(Run.id == old).values(id=new))


def test_a_unique_id_prefix_finds_the_run_and_an_ambiguous_one_names_its_matches(client: TestClient) -> None:
    ids = [client.post("/api/v1/runs", json=SMALL_SPEC).json()["id"] for _ in range(3)]
    twins = ["abcdef" + "0" * 25 + "1", "abcdef" + "0" * 25 + "2"]
    _rename_run(ids[0], twins[0])
    _rename_run(ids[1], twins[1])
    unique = ids[2]

    found = client.get(f"/api/v1/runs/{unique[:8]}")
    assert found.status_code == 200, found.text
    assert found.json()["id"] == unique
    assert client.get(f"/api/v1/runs/{unique[:6]}/metrics").status_code == 200

    ambiguous = client.get("/api/v1/runs/abcdef")
    assert ambiguous.status_code == 409
    assert twins[0] in ambiguous.json()["detail"]
    assert twins[1] in ambiguous.json()["detail"]
    assert client.get(f"/api/v1/runs/{twins[1]}").json()["id"] == twins[1]  # the whole id always works

    assert client.get("/api/v1/runs/abcde").status_code == 422  # under 6 characters
    unknown = next(p for p in ("fedcba", "012345", "987654") if not any(i.startswith(p) for i in ids))
    assert client.get(f"/api/v1/runs/{unknown}").status_code == 404


def test_an_experiment_id_prefix_finds_the_experiment(client: TestClient) -> None:
    base = {"dataset": SMALL_SPEC["dataset"], "train": SMALL_SPEC["train"]}
    spec = {"name": "prefixes", "base": base, "grid": {"train.lr": [0.001, 0.01]}, "seeds": [0]}
    experiment_id = client.post("/api/v1/experiments", json=spec).json()["id"]
    found = client.get(f"/api/v1/experiments/{experiment_id[:7]}")
    assert found.status_code == 200, found.text
    assert found.json()["id"] == experiment_id
    runs = client.get("/api/v1/runs", params={"experiment_id": experiment_id[:6]}).json()
    assert runs["total"] == 2
