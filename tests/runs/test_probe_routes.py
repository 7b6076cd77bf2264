"""GET /api/v1/runs/{id}/probes/{probe} (JSON and CSV), plot.png|svg?metric=<probe>, and the spec's
train.probes switches. The values are written as the runner would (repository.record_epoch's rows);
tests/ml/test_probe_oracles.py checks what the probes measure, tests/integration/test_probes_e2e.py
trains for real."""

from __future__ import annotations

import math

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.db import session_scope
from service.ml.config import PROBE_NAMES
from service.models import ProbeRecord
from service.runs.schemas import RunCreate
from service.runs.spec import train_config

SPEC = {"name": "probed", "dataset": {"name": "synthetic", "limit": 200}, "train": {"epochs": 2}}
LAYERS = ["fc1", "fc2", "fc10", "out"]  # natural order: fc10 after fc2


def _values(probe: str, epoch: int) -> list[tuple[str, str, float]]:
    if probe == "gradients":
        rows = [(layer, "grad_norm", 2.0 ** (len(LAYERS) - d)) for d, layer in enumerate(LAYERS, 1)]
        rows += [(layer, "weight_norm", 1.0 + epoch) for layer in LAYERS]
        rows += [(layer, "depth", float(d)) for d, layer in enumerate(LAYERS, 1)]
        return [*rows, ("model", "log_slope", -math.log(2)), ("model", "growth_per_layer", math.nan)]
    if probe == "smoothness":
        names = ("loss", "loss_min", "loss_max", "grad_norm", "grad_change_max", "beta", "lr")
        return [("model", n, 1.0 + i + epoch) for i, n in enumerate(names)]
    if probe == "percentiles":
        return [(f"bn{i}", f"p{q}", q / 100 + i) for i in (1, 2, 10) for q in (15, 50, 85)]
    if probe == "gamma":
        return [(f"bn{i}", n, 0.5) for i in (1, 2) for n in ("near_zero_fraction", "abs_mean")]
    names = ("mean_gap", "var_gap", "mean_gap_max", "var_gap_max")
    rows = [(f"bn{i}", n, 0.1 * i) for i in (1, 2) for n in names]
    return [*rows, ("model", "train_accuracy", 0.5), ("model", "eval_accuracy", 0.25)]


def _submit_with_probes(client: TestClient, probes: tuple[str, ...] = PROBE_NAMES) -> str:
    run_id: str = client.post("/api/v1/runs", json=SPEC).json()["id"]
    with session_scope() as session:
        for probe in probes:
            for epoch in (0, 1):
                for layer, name, value in _values(probe, epoch):
                    finite = value if math.isfinite(value) else None
                    session.add(
                        ProbeRecord(
                            run_id=run_id, probe=probe, epoch=epoch, layer=layer, name=name, value=finite
                        )
                    )
    return run_id


def test_a_probe_comes_back_by_epoch_and_layer_in_network_order(client: TestClient) -> None:
    run_id = _submit_with_probes(client)
    body = client.get(f"/api/v1/runs/{run_id}/probes/gradients").json()
    assert body["probe"] == "gradients"
    assert body["probe_samples"] == 256
    assert [e["epoch"] for e in body["epochs"]] == [0, 1]
    first = body["epochs"][0]["layers"]
    assert [entry["layer"] for entry in first] == [*LAYERS, "model"]
    assert first[0]["values"] == {"grad_norm": 8.0, "weight_norm": 1.0, "depth": 1.0}
    assert first[-1]["values"]["growth_per_layer"] is None  # NaN is stored as null
    slots = client.get(f"/api/v1/runs/{run_id}/probes/percentiles").json()["epochs"][1]["layers"]
    assert [entry["layer"] for entry in slots] == ["bn1", "bn2", "bn10"]
    assert slots[0]["values"] == pytest.approx({"p15": 1.15, "p50": 1.5, "p85": 1.85})


def test_a_probe_as_csv(client: TestClient) -> None:
    run_id = _submit_with_probes(client, ("smoothness",))
    response = client.get(f"/api/v1/runs/{run_id}/probes/smoothness?format=csv")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    lines = response.text.strip().split("\n")
    assert lines[0] == "epoch,layer,name,value"
    assert len(lines) == 1 + 2 * 7
    assert "0,model,beta,6.0" in lines


def test_a_probe_never_recorded_is_empty_and_an_unknown_one_422(client: TestClient) -> None:
    run_id = _submit_with_probes(client, ())
    assert client.get(f"/api/v1/runs/{run_id}/probes/gamma").json()["epochs"] == []
    assert client.get(f"/api/v1/runs/{run_id}/probes/curvature").status_code == 422
    assert client.get("/api/v1/runs/0123456789abcdef0123456789abcdef/probes/gamma").status_code == 404


@pytest.mark.parametrize("probe", PROBE_NAMES)
def test_every_probe_plots_as_png_and_svg(client: TestClient, probe: str) -> None:
    run_id = _submit_with_probes(client, (probe,))
    png = client.get(f"/api/v1/runs/{run_id}/plot.png?metric={probe}")
    assert png.status_code == 200
    assert png.content.startswith(b"\x89PNG")
    svg = client.get(f"/api/v1/runs/{run_id}/plot.svg?metric={probe}")
    assert svg.status_code == 200
    assert 'id="curve-' in svg.text


def test_the_gradient_plot_draws_each_epoch_and_its_fitted_growth(client: TestClient) -> None:
    run_id = _submit_with_probes(client, ("gradients",))
    svg = client.get(f"/api/v1/runs/{run_id}/plot.svg?metric=gradients").text
    for epoch in (0, 1):
        assert f'id="curve-grad-{epoch}"' in svg
        assert f'id="curve-fit-{epoch}"' in svg
    assert "×2 per layer" in svg


def test_plotting_a_probe_that_was_not_recorded_is_409_saying_so(client: TestClient) -> None:
    run_id = _submit_with_probes(client, ())
    response = client.get(f"/api/v1/runs/{run_id}/plot.png?metric=smoothness")
    assert response.status_code == 409
    assert "train.probes.smoothness" in response.text


def test_the_spec_switches_probes_and_refuses_non_booleans_and_unknown_names(client: TestClient) -> None:
    spec = {**SPEC, "train": {"epochs": 1, "probes": {"smoothness": True, "gamma": False}}}
    echoed = client.post("/api/v1/runs", json=spec).json()["spec"]["train"]["probes"]
    assert echoed == {
        "gradients": True,
        "smoothness": True,
        "percentiles": True,
        "gamma": False,
        "statistics_gap": False,
    }
    assert train_config(RunCreate.model_validate(spec)).probes == ("gradients", "smoothness", "percentiles")
    for bad in ({"gradients": 1}, {"curvature": True}, {"gamma": "yes"}):
        response = client.post("/api/v1/runs", json={**SPEC, "train": {"probes": bad}})
        assert response.status_code == 422, bad


def test_deleting_a_run_deletes_its_probe_values(client: TestClient) -> None:
    run_id = _submit_with_probes(client)
    assert client.delete(f"/api/v1/runs/{run_id}").status_code == 204
    with session_scope() as session:
        assert session.scalars(select(ProbeRecord).where(ProbeRecord.run_id == run_id)).first() is None
