"""Request and response models. One schema family per resource; every field is described so the
OpenAPI page at /docs documents the API by itself."""

from __future__ import annotations

import copy
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    model_validator,
)

from service.ml import nets
from service.ml.config import ModelConfig, NormConfig, NormKind, TrainConfig
from service.ml.datasets import BUILTIN_SHAPES

# A job is a declarative spec, never code: unknown fields are refused and floats must be finite.
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


def _not_a_boolean(value: Any) -> Any:
    # Lax parsing would read `true` as 1; a number field takes numbers only (299.0 stays an int).
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


NotBool = BeforeValidator(_not_a_boolean)

MAX_PARAMETERS = 20_000_000
MAX_PREDICT_SAMPLES = 1024

BuiltinDatasetName = Literal["fashion-mnist", "mnist", "synthetic", "cifar10", "mnist1d"]
DatasetName = Literal[BuiltinDatasetName, "uploaded"]
DatasetId = Annotated[
    str, Field(pattern=r"^[0-9a-f]{32}$", description="Server-generated dataset id (32 hex).")
]
Width = Annotated[int, NotBool, Field(ge=1, le=4096)]


class NormSpec(BaseModel):
    """One normalisation layer per hidden block. Accepts PyTorch's names (eps, momentum, affine) or
    Keras' (epsilon, keras_momentum, center, scale); the echo always shows PyTorch's, converted."""

    model_config = STRICT

    kind: NormKind = Field(
        "batch",
        description="none, batch (BatchNorm), layer (LayerNorm; GroupNorm(1, C) on conv maps), group "
        "(GroupNorm, `num_groups`), instance (InstanceNorm2d, cnn only), batch_renorm (`rmax`, `dmax` and "
        "the renorm_* warm-up), ghost (BN per `virtual_batch_size` samples), weight (weight normalisation "
        "of each hidden Linear/Conv), batch_layer (Batch Layer Normalization, Ziaee & Çano 2022).",
    )
    position: Literal["after_activation", "before_activation"] | None = Field(
        None,
        description="after_activation: Linear → act → norm (the article's Keras code); "
        "before_activation: Linear/Conv → norm → act (the article's equation 6, and the usual "
        "Conv–Norm–Act block). Default (null): after_activation for an mlp, before_activation for a "
        "cnn; the echo shows the one used.",
    )
    eps: Annotated[float, NotBool] = Field(
        1e-3, gt=0, le=1, description="Added to the variance; Keras' default 1e-3 (PyTorch's is 1e-5)."
    )
    momentum: Annotated[float | None, NotBool] = Field(
        0.01,
        ge=0,
        le=1,
        description="PyTorch convention: weight of the new batch in the running statistics (Keras' 0.99 is "
        "0.01 here). null = cumulative average.",
    )
    affine: bool = Field(True, strict=True, description="Learn γ and β.")
    track_running_stats: bool = Field(
        True,
        strict=True,
        description="Keep running statistics for eval mode (batch, batch_renorm (required), ghost, instance, "
        "batch_layer); without them eval normalises with the batch's own statistics.",
    )
    keras_momentum: Annotated[float | None, NotBool] = Field(
        None,
        ge=0,
        le=1,
        description="Keras convention (0.99 style, the weight of the old value): momentum = "
        "1 − keras_momentum, converted exactly in decimal; null in the echo, which shows `momentum`.",
    )
    epsilon: Annotated[float | None, NotBool] = Field(
        None, gt=0, le=1, description="Keras' name of `eps`; null in the echo, which shows `eps`."
    )
    center: bool | None = Field(
        None,
        strict=True,
        description="Keras: learn β. The echo shows center and scale only when they differ (then affine is "
        "true); otherwise null, with `affine` saying both.",
    )
    scale: bool | None = Field(None, strict=True, description="Keras: learn γ (see `center`).")
    num_groups: Annotated[int, NotBool] = Field(
        32, ge=1, le=4096, description="group: groups of channels (must divide every width); GN paper's 32."
    )
    virtual_batch_size: Annotated[int, NotBool] = Field(
        16, ge=2, le=8192, description="ghost: samples per virtual batch; must divide train.batch_size."
    )
    rmax: Annotated[float, NotBool] = Field(
        3.0, ge=1, le=1000, description="batch_renorm: final clip of r = σ_B/σ to [1/rmax, rmax] (paper 3)."
    )
    dmax: Annotated[float, NotBool] = Field(
        5.0, ge=0, le=1000, description="batch_renorm: final clip of d = (μ_B − μ)/σ to ±dmax (paper 5)."
    )
    renorm_warmup_steps: Annotated[int, NotBool] = Field(
        5000, ge=0, le=10**8, description="batch_renorm: training steps of plain BN (rmax 1, dmax 0) first."
    )
    renorm_rmax_steps: Annotated[int, NotBool] = Field(
        40000, ge=0, le=10**8, description="batch_renorm: step rmax is reached at (linear from the warm-up)."
    )
    renorm_dmax_steps: Annotated[int, NotBool] = Field(
        25000, ge=0, le=10**8, description="batch_renorm: step dmax is reached at (linear from the warm-up)."
    )
    sync: bool = Field(
        False,
        strict=True,
        description="batch only, with train.processes >= 2: normalise with the statistics of the global "
        "batch, all-reduced across the processes (Keras' `synchronized`), instead of each process's shard. "
        "Training only: the stored network is plain BatchNorm.",
    )

    @model_validator(mode="after")
    def _one_convention(self) -> Self:
        # Keras' names are converted into PyTorch's; a value given under both names must agree.
        given = self.model_fields_set
        if self.epsilon is not None:
            if "eps" in given and self.eps != self.epsilon:
                raise ValueError(f"eps {self.eps} and epsilon {self.epsilon} conflict: give one of them")
            self.eps, self.epsilon = self.epsilon, None
        if self.keras_momentum is not None:
            converted = float(Decimal(1) - Decimal(repr(self.keras_momentum)))
            if "momentum" in given and self.momentum != converted:
                raise ValueError(
                    f"momentum {self.momentum} and keras_momentum {self.keras_momentum} conflict (PyTorch's "
                    f"momentum is 1 − Keras' momentum = {converted}): give one of them"
                )
            self.momentum, self.keras_momentum = converted, None
        self._resolve_center_scale("affine" in given)
        return self

    def _resolve_center_scale(self, affine_given: bool) -> None:
        center = self.affine if self.center is None else self.center
        scale = self.affine if self.scale is None else self.scale
        if affine_given and self.affine != (center or scale):
            raise ValueError(
                f"affine {str(self.affine).lower()} conflicts with center {str(center).lower()} / scale "
                f"{str(scale).lower()}: give affine, or center and scale"
            )
        if center == scale:
            self.affine, self.center, self.scale = center, None, None
        else:
            self.affine, self.center, self.scale = True, center, scale

    @model_validator(mode="after")
    def _kind_settings(self) -> Self:
        if self.kind == "batch_renorm":
            if not self.track_running_stats:
                raise ValueError("kind batch_renorm needs track_running_stats true (r and d use them)")
            warmup = self.renorm_warmup_steps
            if warmup > self.renorm_rmax_steps or warmup > self.renorm_dmax_steps:
                raise ValueError(
                    f"renorm_warmup_steps {warmup} must not exceed renorm_rmax_steps "
                    f"{self.renorm_rmax_steps} or renorm_dmax_steps {self.renorm_dmax_steps}"
                )
        if self.kind == "instance" and self.track_running_stats and self.momentum is None:
            raise ValueError("kind instance with track_running_stats needs a momentum (not null)")
        return self


Channels = Annotated[int, NotBool, Field(ge=1, le=512)]


class ModelSpec(BaseModel):
    model_config = STRICT

    arch: Literal["mlp", "cnn"] = Field(
        "mlp",
        description="mlp: Flatten → [Linear → act → norm] × len(hidden) → Linear. cnn: [Conv 3×3 → norm → "
        "act, 2×2 max-pool while the map is ≥ 2×2] × len(channels) → global average pool → Linear; needs "
        "image data (C, H, W). Each uses only its own widths (hidden or channels).",
    )
    hidden: list[Width] = Field([128], min_length=1, max_length=16, description="mlp: hidden layer widths.")
    channels: list[Channels] = Field(
        [32, 64], min_length=1, max_length=8, description="cnn: output channels of each conv block."
    )
    activation: Literal["relu", "sigmoid", "tanh", "gelu"] = Field("relu", description="Hidden activation.")
    dropout: Annotated[float, NotBool] = Field(
        0.0, ge=0, le=0.9, description="Dropout probability in every hidden block (0: no dropout layer)."
    )
    dropout_position: Literal["before_norm", "after_norm"] = Field(
        "after_norm", description="Dropout right before or right after each block's norm slot."
    )
    init_scale: Annotated[float, NotBool] = Field(
        1.0, gt=0, le=100, description="Multiplies every initial Linear/Conv weight (after the init)."
    )
    norm: NormSpec = Field(default_factory=NormSpec, description="Normalization of the hidden layers.")

    @model_validator(mode="after")
    def _norm_fits_widths(self) -> Self:
        if self.norm.position is None:  # the article's Keras MLP; the standard Conv–Norm–Act block
            self.norm.position = "after_activation" if self.arch == "mlp" else "before_activation"
        widths = self.hidden if self.arch == "mlp" else self.channels
        groups = self.norm.num_groups
        if self.norm.kind == "group":
            # On an mlp a group of one feature has no variance: GroupNorm refuses it.
            bad = [w for w in widths if w % groups or (self.arch == "mlp" and w // groups < 2)]
            if bad:
                field = "hidden" if self.arch == "mlp" else "channels"
                raise ValueError(
                    f"model.norm.num_groups {groups} must divide every model.{field} width (an mlp needs "
                    f"groups of at least 2 features); it does not for {bad}"
                )
        if self.norm.kind == "instance" and self.arch == "mlp":
            raise ValueError("norm kind instance needs spatial dimensions: use it with arch 'cnn'")
        return self


class DatasetSpec(BaseModel):
    model_config = STRICT

    name: DatasetName = Field(
        "fashion-mnist",
        description="fashion-mnist and mnist read IDX files, cifar10 its binary version, from "
        "BNLAB_DATA_DIR/<name>/ or /usr/share/datasets/<name>/ (or a download, when the server allows it); "
        "synthetic and mnist1d (Greydanus 2020: 4000 train samples of 40 floats) are generated and need no "
        "files; uploaded is a dataset from POST /api/v1/datasets, named by `id`.",
    )
    id: DatasetId | None = Field(
        None, description="With name 'uploaded' (and only then): the id POST /api/v1/datasets returned."
    )
    val_split: Annotated[float, NotBool] = Field(
        0.2,
        gt=0,
        le=0.5,
        description="The last fraction of the training set held out, as Keras' validation_split.",
    )
    limit: Annotated[int | None, NotBool] = Field(
        None,
        ge=10,
        le=1_000_000,
        description="Use only the first N training samples; for synthetic, how many to generate "
        "(default 10000).",
    )

    @model_validator(mode="after")
    def _id_names_an_upload(self) -> Self:
        if self.name == "uploaded" and self.id is None:
            raise ValueError(
                "dataset.id is required with name 'uploaded' (the id POST /api/v1/datasets returned)"
            )
        if self.name != "uploaded" and self.id is not None:
            raise ValueError(f"dataset.id is only for name 'uploaded', not for the built-in {self.name!r}")
        return self


class DatasetPublic(BaseModel):
    """An uploaded dataset, as stored (its arrays are not part of the answer)."""

    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description='Server-generated id: train on it with {"name": "uploaded", "id": ...}.')
    name: str = Field(description="The label given at upload.")
    sample_shape: list[int] = Field(description="One sample as the network sees it: [C, H, W] or [F].")
    num_classes: int = Field(description="K: the labels are 0..K-1, every class present.")
    num_samples: int = Field(description="Samples (the training split; val_split holds out its end).")
    dtype: Literal["uint8", "float32"] = Field(
        description="uint8: pixels, divided by 255 for training and served from [0, 1]; "
        "float32: features, used as they are."
    )
    sha256: str = Field(description="SHA-256 of the stored arrays (the server's safetensors encoding).")
    size_bytes: int = Field(description="Size of the stored arrays.")
    created_at: datetime = Field(description="When it was uploaded.")


class DatasetsPublic(BaseModel):
    items: list[DatasetPublic] = Field(description="Uploaded datasets, newest first.")
    total: int = Field(description="Uploaded datasets in all.")
    limit: int = Field(description="Page size asked for.")
    offset: int = Field(description="Datasets skipped.")


class ScheduleSpec(BaseModel):
    model_config = STRICT

    kind: Literal["none", "step", "cosine"] = Field(
        "none",
        description="Learning rate per epoch: none = constant; step = lr·gamma^⌊(epoch−1)/step_size⌋; "
        "cosine = lr·(1 + cos(π·(epoch−1)/epochs))/2.",
    )
    step_size: Annotated[int, NotBool] = Field(10, ge=1, le=1000, description="step: epochs per decay.")
    gamma: Annotated[float, NotBool] = Field(0.1, gt=0, le=1, description="step: factor per decay.")


class TrainSpec(BaseModel):
    model_config = STRICT

    epochs: Annotated[int, NotBool] = Field(10, ge=1, le=1000, description="Passes over the training split.")
    batch_size: Annotated[int, NotBool] = Field(
        32, ge=2, le=8192, description="Samples per step; BN needs at least 2."
    )
    optimizer: Literal["adam", "sgd"] = Field("adam", description="Adam, or SGD with `momentum`.")
    lr: Annotated[float, NotBool] = Field(1e-3, gt=0, le=10, description="Learning rate (epoch 1).")
    momentum: Annotated[float, NotBool] = Field(0.9, ge=0, lt=1, description="SGD's momentum.")
    weight_decay: Annotated[float, NotBool] = Field(
        0.0, ge=0, le=1, description="L2 coefficient added to every gradient (torch's coupled weight_decay)."
    )
    adam_eps: Annotated[float | None, NotBool] = Field(
        None,
        gt=0,
        le=1,
        description="Adam's epsilon; null: by `compat` (pytorch 1e-8, keras 1e-7). The echo shows the value "
        "used.",
    )
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Learning-rate schedule.")
    seed: Annotated[int, NotBool] = Field(
        0, ge=0, le=2**31 - 1, description="Seeds initialisation and data order."
    )
    processes: Annotated[int, NotBool] = Field(
        1,
        ge=1,
        le=4,
        description="Data-parallel processes (DDP: over gloo on the CPU, over NCCL with one GPU each on "
        "CUDA) that train one run: each takes a shard of every batch, at least 2 samples "
        "(batch_size >= 2·processes); 1 = one process.",
    )


# Adam's epsilon per compat (bn-semantics.md §2).
ADAM_EPS = {"pytorch": 1e-8, "keras": 1e-7}


class RunCreate(BaseModel):
    """A training job. Omitted fields default to the article's Keras experiment."""

    model_config = STRICT

    name: str | None = Field(
        None,
        max_length=200,
        # Letters, digits, spaces and punctuation, but no slash or backslash: no field of a job
        # spec can carry a path or a URL.
        pattern=r"^[\w .,:;()+=@#%&!?'-]*$",
        description="Optional label: letters, digits, spaces and .,:;()+=@#%&!?'- (no slashes).",
    )
    compat: Literal["pytorch", "keras"] = Field(
        "pytorch",
        description="pytorch: PyTorch's Linear/Conv init, Adam eps 1e-8. keras: Glorot-uniform kernels with "
        "zero biases and Adam eps 1e-7, as the article's Keras code. Either way BN's eps and momentum are "
        "the fields' (defaults: Keras' 1e-3 and 0.99, i.e. 0.01 here).",
    )
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)

    def parameter_count(self, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> int:
        """Trainable parameters of the network on data of this shape (built on the meta device)."""
        config = self.model_config_for_ml(input_shape=input_shape, num_classes=num_classes)
        return nets.parameter_count(config)

    @model_validator(mode="after")
    def _check_budget(self) -> Self:
        shape = BUILTIN_SHAPES.get(self.dataset.name)
        if shape is None:
            return self  # an upload: the API checks the spec against the upload's stored shape
        # Built on the data's real shape: a cnn on vector data, or maps too small for a norm, is a 422.
        parameters = self.parameter_count(shape.input_shape, shape.num_classes)
        if parameters > MAX_PARAMETERS:
            raise ValueError(f"model has {parameters:,} parameters; the limit is {MAX_PARAMETERS:,}")
        # A batch larger than the training split is allowed: each epoch is then one smaller batch,
        # as in Keras (limit >= 10 with val_split <= 0.5 always leaves at least 5 samples).
        return self

    @model_validator(mode="after")
    def _resolve_and_cross_check(self) -> Self:
        if self.train.adam_eps is None:
            self.train.adam_eps = ADAM_EPS[self.compat]  # the echo shows what ran
        norm = self.model.norm
        self._check_processes()
        if norm.kind == "ghost" and self.train.batch_size % norm.virtual_batch_size:
            raise ValueError(
                f"model.norm.virtual_batch_size {norm.virtual_batch_size} must divide train.batch_size "
                f"{self.train.batch_size}"
            )
        return self

    def _check_processes(self) -> None:
        norm, train = self.model.norm, self.train
        if norm.sync and norm.kind != "batch":
            raise ValueError(f"model.norm.sync applies to norm kind 'batch', not {norm.kind!r}")
        if norm.sync and train.processes < 2:
            raise ValueError(
                "model.norm.sync synchronises BN statistics across processes: it needs train.processes >= 2"
            )
        if train.batch_size < 2 * train.processes:
            raise ValueError(
                f"train.batch_size {train.batch_size} leaves fewer than 2 samples per process "
                f"(train.processes {train.processes})"
            )

    def model_config_for_ml(
        self, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10
    ) -> ModelConfig:
        spec = self.model
        # sync is a training switch (TrainConfig.sync_batch_norm): the network is the same.
        fields = spec.norm.model_dump(exclude={"keras_momentum", "epsilon", "sync"})
        # Batch Layer Normalization's formula uses the training batch size B.
        bln_batch_size = self.train.batch_size if spec.norm.kind == "batch_layer" else None
        return ModelConfig(
            arch=spec.arch,
            input_shape=tuple(input_shape),
            num_classes=num_classes,
            hidden=tuple(spec.hidden),
            activation=spec.activation,
            norm=NormConfig(**fields, bln_batch_size=bln_batch_size),
            channels=tuple(spec.channels),
            dropout=spec.dropout,
            dropout_position=spec.dropout_position,
            init="glorot" if self.compat == "keras" else "pytorch",
            init_scale=spec.init_scale,
        )

    def train_config_for_ml(self) -> TrainConfig:
        train = self.train
        fields = train.model_dump(exclude={"schedule", "adam_eps"})
        schedule = train.schedule
        adam_eps = ADAM_EPS[self.compat] if train.adam_eps is None else train.adam_eps
        return TrainConfig(
            **fields,
            adam_eps=adam_eps,
            sync_batch_norm=self.model.norm.sync,
            schedule=schedule.kind,
            step_size=schedule.step_size,
            gamma=schedule.gamma,
        )


RunStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class RunSummary(BaseModel):
    epochs_done: int = Field(description="Epochs finished so far.")
    epochs_total: int = Field(description="Epochs asked for.")
    train_loss: float | None = Field(None, description="Training loss of the last finished epoch.")
    train_accuracy: float | None = Field(None, description="Training accuracy of the last finished epoch.")
    val_loss: float | None = Field(None, description="Validation loss of the last finished epoch.")
    val_accuracy: float | None = Field(None, description="Validation accuracy of the last finished epoch.")


# Names, tags and notes a user may change later (PATCH): the same characters as at submission.
LABEL_PATTERN = r"^[\w .,:;()+=@#%&!?'-]*$"
Tag = Annotated[
    str,
    Field(
        min_length=1,
        max_length=40,
        pattern=r"^[\w.:+=@#-]+$",
        description="Letters, digits and . : + = @ # - _ (no spaces).",
    ),
]
Tags = Annotated[list[Tag], Field(max_length=20, description="Up to 20 tags; replaces the current ones.")]
Notes = Annotated[str, Field(max_length=10_000, description="Free text, up to 10 000 characters.")]


class RunPatch(BaseModel):
    """What PATCH /api/v1/runs/{id} may change; the fields left out stay as they are."""

    model_config = STRICT

    name: str | None = Field(
        None, max_length=200, pattern=LABEL_PATTERN, description="New label; null removes it."
    )
    tags: Tags | None = None
    notes: Notes | None = Field(None, description="Free text; null removes it.")


class RunPublic(BaseModel):
    id: str = Field(description="Server-generated run id.")
    name: str | None = Field(description="The label given at submission, or by PATCH since.")
    tags: list[str] = Field(default_factory=list, description="Tags set by PATCH.")
    notes: str | None = Field(None, description="Notes set by PATCH.")
    status: RunStatusName = Field(description="queued → running → succeeded | failed | cancelled.")
    spec: RunCreate = Field(description="The normalised spec: every default filled in, as it ran.")
    error: str | None = Field(description="Why the run failed, when it did.")
    cancel_requested: bool = Field(
        description="A cancel was asked for; a running job stops at the next step."
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    summary: RunSummary


class RunsPublic(BaseModel):
    items: list[RunPublic]
    total: int = Field(description="Runs matching the filter.")
    limit: int
    offset: int


class EpochMetricPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    epoch: int = Field(description="1-based epoch number.")
    train_loss: float
    train_accuracy: float
    val_loss: float = Field(description="Validation loss in eval mode (running statistics).")
    val_accuracy: float
    seconds: float = Field(description="Wall time of the epoch, validation included.")
    train_samples: int | None = Field(
        None, description="Training samples the epoch went through (samples/s = train_samples / seconds)."
    )


class RunMetricsPublic(BaseModel):
    epochs: list[EpochMetricPublic]


class SlotStatisticPublic(BaseModel):
    layer: str = Field(description="The normalisation slot by module name (bn1, …), identity if no norm.")
    input_mean: float = Field(description="Mean of the slot's input, before normalising, on the probe batch.")
    input_std: float = Field(description="Standard deviation of the same values.")


class EpochSlotStatisticsPublic(BaseModel):
    epoch: int = Field(description="0 = the freshly initialised network; k = after epoch k.")
    layers: list[SlotStatisticPublic] = Field(description="One entry per slot, input to output.")


class RunLayerStatsPublic(BaseModel):
    """Internal covariate shift, measured: how each normalisation slot's input moves as training goes."""

    probe_samples: int = Field(description="Size of the fixed probe batch (the first validation samples).")
    epochs: list[EpochSlotStatisticsPublic]


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


class FieldError(BaseModel):
    """One field error of a malformed request, as request validation found it."""

    loc: list[str | int] = Field(description="Where: 'body', 'query' or 'path', then the field's path.")
    msg: str = Field(description="What is wrong with it.")
    type: str = Field(description="pydantic's error type, e.g. missing, extra_forbidden, greater_than.")
    suggestion: str | None = Field(
        None, description="For an unknown field (extra_forbidden): the known field it may have meant."
    )


class Message(BaseModel):
    """Every /api/v1 error body: a sentence saying what was wrong, and beside it the machine-readable
    list of field errors (empty when the error is not about fields of the request)."""

    detail: str = Field(description="What went wrong, as a sentence for people.")
    errors: list[FieldError] = Field(
        default_factory=list, description="The field errors request validation found; [] for other errors."
    )


# ---------------------------------------------------------------------------------------- serving

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
    data: list[Any] = Field(description="Row-major values, flat or nested.")
    parameters: dict[str, Any] | None = None


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


# ---------------------------------------------------------------------------------------- experiments

MAX_EXPERIMENT_RUNS = 64
# A dotted path into the run spec, e.g. `model.norm.kind` or `train.lr`; `train.seed` is set by
# `seeds` and `name` is derived, so neither can be a grid axis.
GridPath = Annotated[
    str, Field(pattern=r"^(dataset|model|train|compat)(\.[a-z_]{1,40}){0,4}$", max_length=120)
]
# A JSON scalar, or a list of integers (e.g. `model.hidden`); the point's spec decides if it fits.
GridValue = bool | int | float | Annotated[str, Field(max_length=64)] | list[Annotated[int, NotBool]] | None


class ExperimentCreate(BaseModel):
    """A grid of runs: the base spec with each grid point applied, once per seed."""

    model_config = STRICT

    name: str = Field(
        min_length=1,
        max_length=120,
        pattern=r"^[\w .,:;()+=@#%&!?'-]*$",
        description="Label; each run is named '<name>: <grid point> seed=<seed>'. Same characters as "
        "a run name.",
    )
    base: RunCreate = Field(
        default_factory=RunCreate,
        description="The run spec every run starts from (as POST /api/v1/runs); the grid overrides it.",
    )
    grid: dict[GridPath, Annotated[list[GridValue], Field(min_length=1, max_length=16)]] = Field(
        default_factory=dict,
        max_length=6,
        description='Dotted spec paths and the values to try, e.g. {"model.norm.kind": ["none", '
        '"batch"], "train.lr": [0.001, 0.01]}: one configuration per combination.',
    )
    seeds: list[Annotated[int, NotBool, Field(ge=0, le=2**31 - 1)]] = Field(
        [0, 1, 2],
        min_length=1,
        max_length=16,
        description="train.seed of each configuration's runs: for a given seed every configuration sees "
        "the same initialisation seed and data order.",
    )
    target: Annotated[float, NotBool] = Field(
        0.85, gt=0, le=1, description="Validation accuracy the report's epochs-to-target counts up to."
    )
    # The base as the client wrote it. Grid points apply to this, not to the normalised `base`:
    # normalising fills fields that depend on others (adam_eps on compat, momentum from
    # keras_momentum), and a point changing `compat` or `keras_momentum` must re-derive them.
    _submitted_base: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_submitted_base(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        experiment = handler(data)
        submitted = data.get("base") if isinstance(data, dict) else None
        experiment._submitted_base = (
            copy.deepcopy(submitted)
            if isinstance(submitted, dict)
            else experiment.base.model_dump(mode="json", exclude_unset=True)
        )
        return experiment

    def submitted_base(self) -> dict[str, Any]:
        """A fresh copy of the base spec as submitted (only what the client set)."""
        return copy.deepcopy(self._submitted_base)

    @model_validator(mode="after")
    def _distinct(self) -> Self:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct")
        if "train.seed" in self.grid:
            raise ValueError("train.seed cannot be a grid axis: list the seeds in `seeds`")
        for path, values in self.grid.items():
            if len({repr(v) for v in values}) != len(values):
                raise ValueError(f"grid values of {path} must be distinct")
        return self


class ExperimentRunPublic(BaseModel):
    id: str = Field(description="The run's id (GET /api/v1/runs/{id}).")
    name: str | None = Field(description="The derived run name.")
    status: RunStatusName = Field(description="The run's state.")
    grid_point: dict[str, Any] = Field(description="The grid values this run trains (dotted path → value).")
    config: str = Field(description="The configuration's label, e.g. 'norm=batch lr=0.01'.")
    seed: int = Field(description="train.seed of this run.")
    epochs_done: int = Field(description="Epochs finished so far.")
    epochs_total: int = Field(description="Epochs asked for.")
    val_loss: float | None = Field(description="Validation loss of the last finished epoch.")
    val_accuracy: float | None = Field(description="Validation accuracy of the last finished epoch.")


class ExperimentPatch(BaseModel):
    """What PATCH /api/v1/experiments/{id} may change; the fields left out stay as they are. Its
    runs keep the names they were given."""

    model_config = STRICT

    # `str` with no value by default: an experiment always has a name, so null is refused (422) and
    # the schema says so; leaving the field out keeps the current one (the default is never stored:
    # the route applies only the fields sent). Hence the ignore: None is no `str`.
    name: str = Field(None, min_length=1, max_length=120, pattern=LABEL_PATTERN, description="New label.")  # type: ignore[assignment]
    tags: Tags | None = None
    notes: Notes | None = Field(None, description="Free text; null removes it.")


class ExperimentPublic(BaseModel):
    id: str = Field(description="Server-generated experiment id.")
    name: str = Field(description="The experiment's label.")
    tags: list[str] = Field(default_factory=list, description="Tags set by PATCH.")
    notes: str | None = Field(None, description="Notes set by PATCH.")
    preset: str | None = Field(description="The ready-made experiment it came from, if any.")
    spec: ExperimentCreate = Field(description="The normalised experiment spec.")
    status_counts: dict[RunStatusName, int] = Field(description="How many of its runs are in each state.")
    finished: bool = Field(description="Every run has ended (succeeded, failed or cancelled).")
    created_at: datetime = Field(description="When it was submitted.")
    runs: list[ExperimentRunPublic] = Field(description="Its runs, by configuration then seed.")


class ExperimentsPublic(BaseModel):
    items: list[ExperimentPublic] = Field(description="Experiments, newest first.")
    total: int = Field(description="Experiments in all.")
    limit: int = Field(description="Page size asked for.")
    offset: int = Field(description="Experiments skipped.")


class ExperimentReportStat(BaseModel):
    mean: float | None = Field(
        description="Mean over the finished seeds; null when none, or a value is not finite."
    )
    std: float | None = Field(
        description="Sample standard deviation (ddof=1) over the seeds; null with fewer than 2."
    )
    n: int = Field(description="Seeds it is computed over.")
    values: list[float | None] = Field(description="Per seed, in seed order; null for a non-finite value.")


class ExperimentReportEpochs(BaseModel):
    target: float = Field(description="The validation accuracy to reach.")
    per_seed: dict[str, int | None] = Field(
        description="Seed → first epoch whose val_accuracy ≥ target; null when never reached."
    )
    reached: int = Field(description="Seeds that reached it.")
    mean: float | None = Field(description="Mean epoch over the seeds that reached it; null when none did.")


class ExperimentReportConfig(BaseModel):
    config: str = Field(description="The configuration's label.")
    grid_point: dict[str, Any] = Field(description="Its grid values (dotted path → value).")
    runs: int = Field(description="Its runs (one per seed).")
    succeeded: int = Field(description="Runs that succeeded: the statistics are over these.")
    unfinished: int = Field(description="Runs still queued or running.")
    failed: int = Field(description="Runs that failed or were cancelled.")
    final: dict[str, ExperimentReportStat] = Field(
        description="Last-epoch val_accuracy, val_loss, train_accuracy, train_loss over the seeds."
    )
    best: dict[str, ExperimentReportStat] = Field(
        description="Best epoch per seed (max accuracy, min loss), then mean ± std over the seeds."
    )
    epochs_to_target: ExperimentReportEpochs = Field(description="Epochs to reach the target accuracy.")


class ExperimentReportWinner(BaseModel):
    metric: str = Field(description="e.g. final.val_accuracy, best.val_loss, epochs_to_target.")
    better: Literal["higher", "lower"] = Field(description="Which direction wins.")
    config: str = Field(description="The winning configuration.")
    mean: float = Field(description="Its mean.")
    runner_up: str | None = Field(description="The second best configuration, if any.")
    runner_up_mean: float | None = Field(description="Its mean.")


class ExperimentReportClaim(BaseModel):
    claim: str = Field(description="The sentence under test.")
    verdict: Literal["supported", "not supported", "inconclusive"] = Field(
        description="By the rule in `verdict_rule` of the report."
    )
    evidence: str = Field(description="The numbers behind the verdict.")
    difference: float | None = Field(description="The contrast: positive means the claim's direction.")
    noise: float | None = Field(description="Two standard errors of the contrast, from the seed spread.")


class ExperimentReportPublic(BaseModel):
    experiment_id: str = Field(description="The experiment.")
    name: str = Field(description="Its label.")
    preset: str | None = Field(description="The ready-made experiment, if any.")
    target: float = Field(description="Validation accuracy used for epochs-to-target.")
    finished: bool = Field(description="Every run has ended: the figures will not change.")
    configurations: list[ExperimentReportConfig] = Field(description="Per configuration, in grid order.")
    winners: list[ExperimentReportWinner] = Field(description="The best configuration per metric.")
    claims: list[ExperimentReportClaim] = Field(description="For presets: each claim and its verdict.")
    verdict_rule: str = Field(description="How claims are judged.")


class PresetPublic(BaseModel):
    name: str = Field(description="Use with POST /api/v1/presets/{name}.")
    claim: str = Field(description="What the experiment tests.")
    dataset: str = Field(description="The dataset it trains on, as posted now (installed datasets decide).")
    grid: dict[str, list[Any]] = Field(description="Its grid.")
    seeds: list[int] = Field(description="Default seeds.")
    runs: int = Field(description="Runs it creates with the default seeds.")
    estimated_seconds: int = Field(
        description="Rough wall time with the worker's training processes (BNLAB_WORKER_CONCURRENCY as the"
        " API sees it), from a per-step cost model measured on a 2-core CPU."
    )


class PresetsPublic(BaseModel):
    items: list[PresetPublic] = Field(description="Every ready-made experiment.")


class PresetCreate(BaseModel):
    """Optional overrides for a ready-made experiment."""

    model_config = STRICT

    seeds: list[Annotated[int, NotBool, Field(ge=0, le=2**31 - 1)]] | None = Field(
        None, min_length=1, max_length=16, description="Seeds to run instead of the preset's."
    )
    dataset: BuiltinDatasetName | None = Field(
        None, description="A built-in dataset instead of the preset's (uploads need their own experiment)."
    )
    name: str | None = Field(
        None,
        min_length=1,
        max_length=120,
        pattern=r"^[\w .,:;()+=@#%&!?'-]*$",
        description="Experiment label.",
    )
