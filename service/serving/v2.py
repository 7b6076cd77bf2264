"""/v2: the Open Inference Protocol (KServe V2; also spoken by Triton, TorchServe and MLServer).

A model's name is a run id or an alias (PUT /api/v1/models/{alias}); its versions are the run's
stored model versions (1 = trained weights, 2+ = recalibrations); without /versions/{v} the name
serves the alias's pinned version, else the newest. Each model has one input, `input`
([N, 784], [N, 28, 28] or [N, 1, 28, 28]; FP32 or FP64 pixel values in [0, 1], or UINT8 0–255;
`data` flat or nested row-major), and two outputs, `probabilities` (FP32 [N, 10]) and
`predictions` (INT64 [N]). `?fused=false` serves the unfused model. Every error is
`{"error": "..."}`: 400 for a bad request (body validation included), 404 for an unknown model.
Health answers 200 for true and 400 for false, as the protocol says.

Two of Triton's extensions: binary tensor data (inputs and outputs as raw bytes after the JSON
header; service.serving.binary) and statistics (per model version; service.serving.stats).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from itertools import chain
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from service import __version__
from service.api.bodies import body_docs, inline_schema, json_response
from service.api.health import database_reachable
from service.api.security import PUBLIC, READ
from service.db import session_scope
from service.serving import binary, inference, served
from service.serving import repository as model_repo
from service.serving.schemas import (
    V2Error,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2ModelStats,
    V2TensorMetadata,
)
from service.serving.served import served_model
from service.serving.server import Answer, LoadedModel, get_model_server
from service.serving.stats import STATISTICS, ModelKey, RequestTimes

INPUT = "input"
OUTPUTS = ("probabilities", "predictions")
PLATFORM = "pytorch"
EXTENSIONS = ["binary_tensor_data", "statistics"]


def describe_errors(errors: list[Any]) -> str:
    parts = []
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts) or "invalid request"


def v2_error(status_code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code, headers=headers)


class V2Route(APIRoute):
    """Errors on /v2 routes are `{"error": "..."}`; request validation errors are 400, not 422."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return v2_error(status.HTTP_400_BAD_REQUEST, describe_errors(list(exc.errors())))
            except HTTPException as exc:
                return v2_error(exc.status_code, str(exc.detail), dict(exc.headers or {}))

        return route


# Every error a /v2 route itself answers is {"error": ...}; these override the app-wide {"detail"}
# documentation (413 and 503 come from middleware in front of the routes and keep that form).
V2_ERRORS = {
    400: "Malformed request, or inputs that do not fit the model",
    401: "Missing or invalid API key",
    403: "The key lacks the scope this route needs",
    404: "No such model or version",
    409: "The stored model cannot be served, or an experiment alias has no succeeded run yet",
    429: "Rate limit reached; see Retry-After",
}


@asynccontextmanager
async def serving_lifespan(_app: Any) -> AsyncIterator[None]:
    # Reads BNLAB_SERVE_* (invalid values stop the API at start-up) and starts the batcher threads.
    get_model_server()
    yield


router = APIRouter(
    prefix="/v2",
    tags=["open inference protocol"],
    route_class=V2Route,
    lifespan=serving_lifespan,
    responses={code: {"model": V2Error, "description": text} for code, text in V2_ERRORS.items()},
)

ModelName = Annotated[
    str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="A run id or an alias.")
]
VersionPath = Annotated[int, Path(ge=1, le=1_000_000, description="A stored version of the run's model.")]
FusedQuery = Annotated[
    bool, Query(description="Serve the model with BN folded into its Linear layers; false: unfused.")
]


# ---------------------------------------------------------------------------------------- server


@router.get("", summary="Server metadata", openapi_extra=PUBLIC)
async def server_metadata() -> dict[str, Any]:
    return {"name": "bnlab", "version": __version__, "extensions": EXTENSIONS}


@router.get("/health/live", summary="The server is live", openapi_extra=PUBLIC)
async def live() -> dict[str, bool]:  # async: no thread hand-off for a probe
    return {"live": True}


@router.get("/health/ready", summary="The server is ready (its database is reachable)", openapi_extra=PUBLIC)
def ready(response: Response) -> dict[str, bool]:
    ok = database_reachable()
    if not ok:
        response.status_code = status.HTTP_400_BAD_REQUEST
    return {"ready": ok}


# ---------------------------------------------------------------------------------------- statistics
# Declared before the model routes: /models/stats is the statistics, not a model named "stats".


def _resolve(name: str, version: int | None) -> model_repo.ResolvedModel:
    try:
        with session_scope(read_only=True) as session:  # a lookup: no write lock on SQLite
            return model_repo.resolve_model(session=session, name=name, version=version)
    except model_repo.NameNotFound as exc:
        raise served.http_error(name, exc) from exc


def _stats(name: str, run_id: str, versions: list[int]) -> V2ModelStats:
    return V2ModelStats(model_stats=[STATISTICS.model_stat(name, (run_id, v)) for v in versions])


@router.get("/models/stats", summary="Statistics of every model this process has served", openapi_extra=READ)
def all_model_stats() -> V2ModelStats:
    keys = STATISTICS.recorded_keys()
    return V2ModelStats(model_stats=[STATISTICS.model_stat(run_id, (run_id, v)) for run_id, v in keys])


@router.get("/models/{name}/stats", summary="Statistics of every version of a model", openapi_extra=READ)
def model_stats(name: ModelName) -> V2ModelStats:
    resolved = _resolve(name, None)
    return _stats(name, resolved.run_id, resolved.versions)


@router.get(
    "/models/{name}/versions/{version}/stats", summary="Statistics of a model version", openapi_extra=READ
)
def model_version_stats(name: ModelName, version: VersionPath) -> V2ModelStats:
    resolved = _resolve(name, version)
    return _stats(name, resolved.run_id, [version])


# ---------------------------------------------------------------------------------------- models


def _metadata(name: str, version: int | None) -> V2ModelMetadata:
    resolved, loaded = served_model(name, version)
    shape = list(loaded.config.input_shape)
    fusion = loaded.fusion
    return V2ModelMetadata(
        name=name,
        versions=[str(v) for v in resolved.versions],
        platform=PLATFORM,
        inputs=[V2TensorMetadata(name=INPUT, datatype="FP32", shape=[-1, *shape])],
        outputs=[
            V2TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, loaded.config.num_classes]),
            V2TensorMetadata(name="predictions", datatype="INT64", shape=[-1]),
        ],
        parameters={
            "run_id": resolved.run_id,
            "version": str(resolved.version),
            "input_datatypes": list(inference.V2_DATATYPES),
            "input_shapes": [[-1, *s] for s in inference.accepted_sample_shapes(loaded.config)],
            "fused": fusion.fused,
            "folded": [{"batch_norm": bn, "into": linear} for bn, linear in fusion.folded],
            "not_fused_because": fusion.reason,
        },
    )


@router.get("/models/{name}", summary="Model metadata", openapi_extra=READ)
def model_metadata(name: ModelName) -> V2ModelMetadata:
    return _metadata(name, None)


@router.get("/models/{name}/versions/{version}", summary="Model version metadata", openapi_extra=READ)
def model_version_metadata(name: ModelName, version: VersionPath) -> V2ModelMetadata:
    return _metadata(name, version)


def _model_ready(name: str, version: int | None, response: Response) -> dict[str, Any]:
    try:
        served_model(name, version)  # loading warms the model: ready means the next infer needs no load
    except HTTPException as exc:
        if exc.status_code == status.HTTP_404_NOT_FOUND and not _name_exists(name):
            raise
        response.status_code = status.HTTP_400_BAD_REQUEST
        return {"name": name, "ready": False}
    return {"name": name, "ready": True}


def _name_exists(name: str) -> bool:
    with session_scope(read_only=True) as session:
        try:
            model_repo.resolve_model(session=session, name=name, version=None)
        except model_repo.VersionNotFound:
            return True
        except model_repo.NameNotFound:
            return False
        return True


@router.get("/models/{name}/ready", summary="Model readiness (200 ready, 400 not yet)", openapi_extra=READ)
def model_ready(name: ModelName, response: Response) -> dict[str, Any]:
    return _model_ready(name, None, response)


@router.get(
    "/models/{name}/versions/{version}/ready",
    summary="Model version readiness (200 ready, 400 not yet)",
    openapi_extra=READ,
)
def model_version_ready(name: ModelName, version: VersionPath, response: Response) -> dict[str, Any]:
    return _model_ready(name, version, response)


# ---------------------------------------------------------------------------------------- infer


def _bad_request(message: str) -> HTTPException:
    return HTTPException(status.HTTP_400_BAD_REQUEST, detail=message)


class _InferBody:
    """An infer request's body (JSON, or a JSON header and binary tensors after it), parsed and
    checked in an inference thread once the model is known; it keeps its times for the statistics."""

    def __init__(self, body: bytes, header_length: int | None) -> None:
        self.body = body
        self.header_length = header_length  # of the JSON header, when binary data may follow it
        self.request: V2InferRequest | None = None
        self.outputs: tuple[str, ...] = OUTPUTS
        self.binary_outputs: frozenset[str] = frozenset()
        self.model: ModelKey | None = None  # (run, version), once known
        self.submitted = time.perf_counter_ns()
        self.queue_ns = self.input_ns = 0

    def __call__(self, loaded: LoadedModel) -> torch.Tensor:
        started = time.perf_counter_ns()
        self.model = (loaded.run_id, loaded.version)
        self.queue_ns = started - self.submitted
        try:
            return self._prepare(loaded)
        finally:
            self.input_ns = time.perf_counter_ns() - started

    def _parse(self) -> tuple[V2InferRequest, bytes, memoryview]:
        """The JSON header parsed, its bytes, and the bytes after it."""
        length = self.header_length
        json_part = self.body if length is None else self.body[:length]  # the JSON path copies nothing
        tail = memoryview(self.body)[len(json_part) :]
        try:
            return V2InferRequest.model_validate_json(json_part), json_part, tail
        except ValidationError as exc:
            message = describe_errors(list(exc.errors(include_url=False)))
            if self.header_length is None and "trailing characters" in message:
                message += f" (binary tensor data needs the {binary.HEADER_LENGTH} header)"
            raise _bad_request(message) from exc

    def _prepare(self, loaded: LoadedModel) -> torch.Tensor:
        request, json_part, tail = self._parse()
        self.request = request
        tensor = request.inputs[0]
        if tensor.name != INPUT:
            raise _bad_request(f"unknown input {tensor.name!r}; this model's input is {INPUT!r}")
        if request.outputs:
            self.outputs = tuple(o.name for o in request.outputs)
        unknown = [o for o in self.outputs if o not in OUTPUTS]
        if unknown:
            raise _bad_request(
                f"unknown output {unknown[0]!r}; this model's outputs are {', '.join(OUTPUTS)}"
            )
        try:
            self.binary_outputs = binary.binary_outputs(request, self.outputs)
            (raw,) = binary.input_bytes(request, tail)
        except binary.BinaryError as exc:
            raise _bad_request(str(exc)) from exc
        try:
            if raw is None:
                assert tensor.data is not None  # input_bytes saw to it: data or binary data, one of them
                data: list[Any] | np.ndarray = tensor.data
                booleans_possible = inference.could_hold_booleans(json_part)
            else:
                data, booleans_possible = binary.decode(tensor.datatype, tensor.shape, raw), False
            return inference.v2_tensor_to_input(
                tensor.datatype, tensor.shape, data, loaded.config, booleans_possible=booleans_possible
            )
        except (binary.BinaryError, inference.InputError) as exc:
            raise _bad_request(f"input {INPUT!r}: {exc}") from exc


def _response(name: str, body: _InferBody, answer: Answer) -> Response:
    if not answer.finite:
        raise HTTPException(status.HTTP_409_CONFLICT, detail="the model produced non-finite outputs")
    if body.binary_outputs:
        return _binary_response(name, body, answer)
    n, classes = answer.probabilities.shape
    data: dict[str, dict[str, Any]] = {
        "probabilities": {
            "shape": [n, classes],
            "datatype": "FP32",
            "data": list(chain.from_iterable(answer.rows)),
        },
        "predictions": {"shape": [n], "datatype": "INT64", "data": answer.predictions},
    }
    return json_response(  # V2InferResponse
        {
            "model_name": name,
            "model_version": str(answer.resolved.version),
            "id": body.request.id if body.request else None,
            "parameters": {"fused": answer.fused, "run_id": answer.resolved.run_id},
            "outputs": [{"name": output, **data[output]} for output in body.outputs],
        }
    )


def _binary_response(name: str, body: _InferBody, answer: Answer) -> Response:
    """The answer as a JSON header with the binary outputs' bytes after it."""
    probabilities = answer.probabilities
    tensors = {"probabilities": probabilities.numpy(), "predictions": probabilities.argmax(dim=1).numpy()}
    datatypes = {"probabilities": "FP32", "predictions": "INT64"}
    outputs = []
    for output in body.outputs:
        tensor = tensors[output]
        described: dict[str, Any] = {
            "name": output,
            "shape": list(tensor.shape),
            "datatype": datatypes[output],
        }
        if output not in body.binary_outputs:
            described["data"] = tensor.reshape(-1).tolist()
        outputs.append(described)
    header = {
        "model_name": name,
        "model_version": str(answer.resolved.version),
        "id": body.request.id if body.request else None,
        "parameters": {"fused": answer.fused, "run_id": answer.resolved.run_id},
        "outputs": outputs,
    }
    return binary.response(header, {o: tensors[o] for o in body.binary_outputs})


async def _infer(request: Request, name: str, version: int | None, fused: bool) -> Response:
    arrived = time.perf_counter_ns()
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise _bad_request("compressed request bodies are not supported; send the body uncompressed")
    content = await request.body()
    try:
        header_length = binary.header_length(request.headers.get(binary.HEADER_LENGTH), len(content))
    except binary.BinaryError as exc:
        raise _bad_request(str(exc)) from exc
    body = _InferBody(content, header_length)
    try:
        answer = await served.infer(name, version, fused=fused, prepare=body, body_bytes=len(content))
        answered = time.perf_counter_ns()
        response = _response(name, body, answer)
    except Exception:
        if body.model is not None:  # the model was known: a failed inference of that model
            STATISTICS.record_failure(body.model, time.perf_counter_ns() - arrived)
        raise
    done = time.perf_counter_ns()
    times = RequestTimes(done - arrived, body.queue_ns, body.input_ns, done - answered)
    key = (answer.resolved.run_id, answer.resolved.version)
    STATISTICS.record_success(key, len(answer.probabilities), times, answer.execution)
    return response


BINARY_BODY = {
    "type": "string",
    "format": "binary",
    "description": "The JSON request (its length in Inference-Header-Content-Length), then the binary "
    "inputs' bytes (each input's parameters.binary_data_size), little-endian, row-major.",
}
INFER_DOCS = READ | body_docs(
    {"application/json": inline_schema(V2InferRequest), "application/octet-stream": BINARY_BODY}
)
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The outputs; with binary outputs asked for, the JSON answer (its length in "
        "Inference-Header-Content-Length) followed by their bytes (parameters.binary_data_size each).",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post(
    "/models/{name}/infer",
    summary="Inference",
    openapi_extra=INFER_DOCS,
    response_model=V2InferResponse,
    responses=INFER_RESPONSES,
)
async def infer(request: Request, name: ModelName, fused: FusedQuery = True) -> Response:
    return await _infer(request, name, None, fused)


@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Inference on one version",
    openapi_extra=INFER_DOCS,
    response_model=V2InferResponse,
    responses=INFER_RESPONSES,
)
async def infer_version(
    request: Request, name: ModelName, version: VersionPath, fused: FusedQuery = True
) -> Response:
    return await _infer(request, name, version, fused)
