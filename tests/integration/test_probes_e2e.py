"""The epoch-end probes end to end through real processes (API, Celery worker, broker, database): a
deep-ish BN MLP trains on a Fashion-MNIST subset with every probe on; each probe's values come back
from GET /probes/{probe}, for the initial network (epoch 0) and after each epoch, and plot.

Runs on SQLite with the embedded folder broker and on Postgres with Redis, as test_end_to_end.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service.ml.config import PROBE_NAMES
from tests.integration.stack import Stack, stack_on

pytestmark = pytest.mark.integration

DEPTH = 16


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack_on(request.param, tmp_path_factory.mktemp(request.param)) as running:
        yield running


def test_a_deep_bn_mlps_probes_come_back_and_plot(stack: Stack) -> None:
    run_id = stack.submit(
        {
            "name": "deep-bn-probed",
            "dataset": {"name": "fashion-mnist", "limit": 1000, "val_split": 0.3},
            "model": {"hidden": [32] * DEPTH, "norm": {"kind": "batch", "position": "before_activation"}},
            "train": {"epochs": 2, "probes": dict.fromkeys(PROBE_NAMES, True)},
        }
    )
    run = stack.wait_for(run_id, {"succeeded", "failed"}, timeout=300)
    assert run["status"] == "succeeded", (run["error"], stack.tail_logs())

    gradients = stack.client.get(f"/api/v1/runs/{run_id}/probes/gradients").json()
    assert [e["epoch"] for e in gradients["epochs"]] == [0, 1, 2]
    initial = gradients["epochs"][0]["layers"]
    assert [entry["layer"] for entry in initial] == [*(f"fc{i}" for i in range(1, DEPTH + 1)), "out", "model"]
    assert all(entry["values"]["grad_norm"] > 0 for entry in initial[:-1])
    assert initial[-1]["values"]["growth_per_layer"] > 1  # Yang et al.: BN's gradients explode at init
    for probe in PROBE_NAMES:
        body = stack.client.get(f"/api/v1/runs/{run_id}/probes/{probe}").json()
        assert [e["epoch"] for e in body["epochs"]] == [0, 1, 2], probe
        plot = stack.client.get(f"/api/v1/runs/{run_id}/plot.png", params={"metric": probe})
        assert plot.status_code == 200, (probe, plot.text)
        assert plot.content.startswith(b"\x89PNG")
    csv = stack.client.get(f"/api/v1/runs/{run_id}/probes/gamma", params={"format": "csv"}).text
    assert csv.startswith("epoch,layer,name,value\n0,bn1,")
