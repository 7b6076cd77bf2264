"""Serving's request and response models: predictions, aliases, model versions, recalibration,
BN statistics, and the Open Inference Protocol (KServe V2) shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)

from service.runs.schemas import MAX_PREDICT_SAMPLES, STRICT


class PredictRequest(BaseModel):
    model_config = STRICT

    inputs: list[Any] = Field(
        min_length=1,
        max_length=MAX_PREDICT_SAMPLES,
        description="N samples, each 784 numbers or 28×28 (or 1×28×28) nested lists, pixel values in [0, 1].",
    )


class PredictResponse(BaseModel):
    predictions: list[int] = Field(description="Most probable class per sample.")
    probabilities: list[list[float]] = Field(description="Softmax probabilities per sample and class.")


RunId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$", description="Server-generated run id (32 hex).")]
Version = Annotated[int, Field(ge=1, le=1_000_000, description="Model version: 1 is the trained weights.")]
# What picks an experiment alias's run (its last epoch): accuracies the highest, losses the lowest.
AliasMetric = Literal["val_accuracy", "val_loss", "train_accuracy", "train_loss"]


class ImageInfoPublic(BaseModel):
    format: str = Field(description="PNG or JPEG.")
    width: int = Field(description="Width of the uploaded image, in pixels.")
    height: int = Field(description="Height of the uploaded image, in pixels.")
    inverted: bool = Field(description="Whether the image was inverted to light-on-dark.")


class ServedPredictResponse(PredictResponse):
    model_version: int = Field(description="The version of the run's model that answered.")
    fused: bool = Field(description="Whether BN was folded into the Linear layers for this answer.")
    mode: Literal["eval", "train"] = Field(
        description="eval: BN running statistics; train: this request's batch statistics."
    )
    image: ImageInfoPublic | None = Field(None, description="The decoded upload, for image input.")
    labels: list[str] | None = Field(
        None, description="The class name of each prediction, for runs on a built-in dataset."
    )
    class_names: list[str] | None = Field(
        None, description="The name of every class index, for runs on a built-in dataset."
    )


class AliasToRun(BaseModel):
    """An alias naming a run, optionally one version of its model."""

    model_config = STRICT

    run_id: RunId = Field(description="The run to serve.")
    version: Version | None = Field(None, description="Pin one version; null follows the newest.")


class AliasToExperiment(BaseModel):
    """An alias naming the best succeeded run (with a model) of an experiment, resolved each time the
    alias is used, so it follows new results; it serves that run's newest version."""

    model_config = STRICT

    experiment_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")] = Field(
        description="The experiment whose best run to serve, by `metric` of the run's last epoch."
    )
    metric: AliasMetric = Field("val_accuracy", description="Accuracies pick the highest, losses the lowest.")


# The body of PUT /api/v1/models/{alias}: exactly one of the two forms (both forbid extra fields,
# so the JSON Schema's anyOf says what the server accepts).
AliasPut = Annotated[
    AliasToRun | AliasToExperiment,
    Field(description="Either {run_id[, version]} or {experiment_id[, metric]}."),
]


class AliasPublic(BaseModel):
    name: str = Field(description="The alias.")
    run_id: str | None = Field(
        description="The run it serves now: the named run, or the experiment's current best (null when "
        "no run qualifies yet)."
    )
    version: int | None = Field(description="The pinned version, or null to follow the newest.")
    serves_version: int | None = Field(description="The version the alias serves now; null before training.")
    experiment_id: str | None = Field(description="For an experiment alias: the experiment.")
    metric: AliasMetric | None = Field(description="For an experiment alias: the metric that picks the run.")
    metric_value: float | None = Field(
        description="For an experiment alias: the chosen run's last-epoch value of the metric."
    )
    created_at: datetime = Field(description="When the alias was created.")
    updated_at: datetime = Field(description="When it was last re-pointed.")


class AliasesPublic(BaseModel):
    items: list[AliasPublic]


class RecalibrationPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    version: int = Field(description="The version these statistics were stored as.")
    base_version: int = Field(description="The version whose weights were kept (frozen).")
    estimator: Literal["population", "mean_of_batches"]
    num_batches: int
    batch_size: int
    samples: int = Field(description="Training samples the statistics were computed over.")
    val_loss_before: float
    val_accuracy_before: float
    val_loss_after: float
    val_accuracy_after: float
    seconds: float = Field(description="Wall time: recalibration and both validation passes.")
    created_at: datetime


class ModelVersionPublic(BaseModel):
    version: int
    sha256: str
    size_bytes: int
    created_at: datetime
    recalibration: RecalibrationPublic | None = Field(description="How the version was made, if not trained.")


class ModelVersionsPublic(BaseModel):
    run_id: str
    items: list[ModelVersionPublic]


class RecalibrateRequest(BaseModel):
    model_config = STRICT

    estimator: Literal["population", "mean_of_batches"] = Field(
        "population",
        description="population: mean and variance over all samples (fvcore's PreciseBN); "
        "mean_of_batches: mean of per-batch means and unbiased variances (torch's swa_utils.update_bn).",
    )
    num_batches: int = Field(100, ge=1, le=2000, description="Training batches to compute statistics over.")
    batch_size: int | None = Field(None, ge=2, le=1024, description="Samples per batch; null: the run's.")
    base_version: Version | None = Field(None, description="Whose weights to keep; null: the newest version.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds which training samples are drawn.")


class SummaryPublic(BaseModel):
    min: float
    max: float
    mean: float
    std: float
    histogram_edges: list[float] = Field(description="bins + 1 edges, equal widths from min to max.")
    histogram_counts: list[int]


class BNLayerPublic(BaseModel):
    name: str
    num_features: int
    eps: float
    momentum: float | None = Field(description="PyTorch convention; null = cumulative average.")
    affine: bool
    track_running_stats: bool
    num_batches_tracked: int | None
    running_mean: SummaryPublic | None
    running_var: SummaryPublic | None
    weight: SummaryPublic | None = Field(description="γ, when affine.")
    bias: SummaryPublic | None = Field(description="β, when affine.")


class BNStatsPublic(BaseModel):
    run_id: str
    version: int
    layers: list[BNLayerPublic]


# Open Inference Protocol (KServe V2) shapes: ../shared/reference/peers.md.


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for the batch dimension.")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]
    parameters: dict[str, Any] = Field(description="bnlab's extras: run id, version served, fusion.")


class V2InferInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64)
    shape: list[Annotated[int, Field(ge=0, le=1_000_000)]] = Field(min_length=1, max_length=8)
    datatype: str = Field(max_length=16, description="FP32, FP64 or UINT8.")
    data: list[Any] | None = Field(
        None, description="Row-major values, flat or nested; absent for binary data (binary_data_size)."
    )
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_size: the input's bytes after the JSON header (binary tensor data)."
    )


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64)
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, max_length=256)
    parameters: dict[str, Any] | None = None
    inputs: list[V2InferInput] = Field(min_length=1, max_length=1, description="One input tensor: `input`.")
    outputs: list[V2RequestedOutput] | None = Field(None, max_length=2)


class V2InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float] | list[int]


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    outputs: list[V2InferOutput]


class V2Error(BaseModel):
    error: str


# The statistics extension (Triton's docs/protocol/extension_statistics.md).


class V2DurationStat(BaseModel):
    count: int = Field(description="How many times the step ran.")
    ns: int = Field(description="Its cumulative duration, in nanoseconds.")


class V2InferenceStats(BaseModel):
    success: V2DurationStat = Field(description="Answered requests: from arrival to answer.")
    fail: V2DurationStat = Field(description="Requests that failed once their model was known.")
    queue: V2DurationStat = Field(description="Waiting for an inference thread (and the model's load).")
    compute_input: V2DurationStat = Field(description="Parsing and converting the request's input.")
    compute_infer: V2DurationStat = Field(description="The forward pass that answered the request.")
    compute_output: V2DurationStat = Field(description="Writing the answer.")
    cache_hit: V2DurationStat = Field(description="Always zero: answers are not cached.")


class V2BatchStat(BaseModel):
    batch_size: int = Field(description="Samples in the forward pass (micro-batched requests together).")
    compute_input: V2DurationStat
    compute_infer: V2DurationStat
    compute_output: V2DurationStat


class V2ModelStat(BaseModel):
    name: str
    version: str
    last_inference: int = Field(description="Milliseconds since the epoch; 0 before the first inference.")
    inference_count: int = Field(description="Samples answered (a request of N samples counts N).")
    execution_count: int = Field(description="Forward passes (one may answer several requests).")
    inference_stats: V2InferenceStats
    batch_stats: list[V2BatchStat]


class V2ModelStats(BaseModel):
    model_stats: list[V2ModelStat]
