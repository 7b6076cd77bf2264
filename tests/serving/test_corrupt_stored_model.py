"""Malformed safetensors where the API meets them, in a stored model: a clear 4xx, and the API
stays up (reliability check 14). No route accepts uploaded weights."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from fastapi.testclient import TestClient

from service.db import session_scope
from service.main import create_app
from service.ml.checkpoints import save_checkpoint, sha256_hex
from service.ml.nets import make_net
from service.models import Run, RunStatus
from service.runs import repository as run_repo
from service.runs.schemas import RunCreate
from service.runs.spec import model_config
from tests.conftest import Backend


def good_weights() -> bytes:
    spec = RunCreate()
    return save_checkpoint(make_net(model_config(spec)), model_config(spec))


SPEC = RunCreate.model_validate({"dataset": {"name": "synthetic"}})


def stored_run(spec: RunCreate, weights: bytes) -> str:
    """A succeeded run whose stored model is `weights`, as they are (checked only when served)."""
    with session_scope() as session:
        run = run_repo.create_run(session=session, spec=spec)
        session.flush()
        session.get(Run, run.id).status = RunStatus.succeeded.value  # type: ignore[union-attr]
        run_repo.save_artifact(
            session=session, run_id=run.id, weights=weights,
            model_config=model_config(spec).to_dict(), sha256=sha256_hex(weights),
        )  # fmt: skip
        return run.id


def forge_nan(data: bytes) -> bytes:
    # Flip the last float32 of the file to NaN: a well-formed file with a non-finite weight.
    return data[:-4] + torch.tensor([float("nan")]).numpy().tobytes()


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d[: len(d) // 2],
        lambda d: (2**62).to_bytes(8, "little") + d[8:],
        forge_nan,
        lambda d: b"\x80\x04K\x01." + d,  # a pickle prefix: never unpickled
    ],
    ids=["truncated", "huge-header", "nan-weight", "pickle-prefix"],
)
def test_a_corrupt_stored_model_is_409_and_the_api_stays_up(
    sqlite_backend: Backend, use_backend: Callable[[Backend], None], mangle: Callable[[bytes], bytes]
) -> None:
    use_backend(sqlite_backend)
    weights = mangle(good_weights())
    run_id = stored_run(SPEC, weights)
    with TestClient(create_app()) as client:
        response = client.post(f"/api/v1/runs/{run_id}/predict", json={"inputs": [[0.5] * 784]})
        assert response.status_code == 409, response.text
        assert "cannot be loaded" in response.json()["detail"]
        v2 = client.post(
            f"/v2/models/{run_id}/infer",
            json={"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0.5] * 784}]},
        )
        assert 400 <= v2.status_code < 500, v2.text
        assert client.get("/health/live").status_code == 200


def test_a_model_whose_outputs_overflow_is_409_on_v2(
    sqlite_backend: Backend, use_backend: Callable[[Backend], None]
) -> None:
    use_backend(sqlite_backend)
    net = make_net(model_config(SPEC))
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.fill_(3e38)  # finite weights, infinite logits: softmax gives NaN
    weights = save_checkpoint(net, model_config(SPEC))
    run_id = stored_run(SPEC, weights)
    body = {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0.5] * 784}]}
    with TestClient(create_app()) as client:
        v2 = client.post(f"/v2/models/{run_id}/infer", json=body)
        assert v2.status_code == 409, v2.text
        assert v2.json()["error"] == "the model produced non-finite outputs"
