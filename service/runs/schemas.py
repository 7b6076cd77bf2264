"""Request and response models. One schema family per resource; every field is described so the
OpenAPI page at /docs documents the API by itself."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from service.ml.config import DEFAULT_PROBES, EVAL_BN_KINDS, PROBE_NAMES, NormKind, ProbeName
from service.ml.datasets import BUILTIN_SHAPES
from service.ml.finite import finite_or_none
from service.ml.trainable import norm_parameter_count
from service.runs.spec import ADAM_EPS, model_config, shape_problem

# A job is a declarative spec, never code: unknown fields are refused and floats must be finite.
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


def _not_a_boolean(value: Any) -> Any:
    # Lax parsing would read `true` as 1; a number field takes numbers only (299.0 stays an int).
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


NotBool = BeforeValidator(_not_a_boolean)


def _finite_or_null(value: Any) -> Any:
    # NaN and infinity are not JSON: a diverged epoch's values answer null (rows Postgres stored as
    # NaN before they were written as NULL included). Anything but a float is left to the validator.
    return finite_or_none(value) if isinstance(value, float) else value


# A measured value (a loss, an accuracy, an activation statistic): null where it was not finite.
Measured = Annotated[float | None, BeforeValidator(_finite_or_null)]

MAX_PARAMETERS = 20_000_000
MAX_PREDICT_SAMPLES = 1024

BuiltinDatasetName = Literal["fashion-mnist", "mnist", "synthetic", "cifar10", "mnist1d"]
DatasetName = Literal[BuiltinDatasetName, "uploaded"]
DatasetId = Annotated[
    str, Field(pattern=r"^[0-9a-f]{32}$", description="Server-generated dataset id (32 hex).")
]
Width = Annotated[int, NotBool, Field(ge=1, le=4096)]
# Hidden layers of an mlp, and weight layers of a resnet or resmlp (docs/deep-lab.md).
MAX_DEPTH = 128


class NormSpec(BaseModel):
    """One normalisation layer per hidden block. Accepts PyTorch's names (eps, momentum, affine) or
    Keras' (epsilon, keras_momentum, center, scale); the echo always shows PyTorch's, converted."""

    model_config = STRICT

    kind: NormKind = Field(
        "batch",
        description="none, batch (BatchNorm), layer (LayerNorm; GroupNorm(1, C) on conv maps), group "
        "(GroupNorm, `num_groups`), instance (InstanceNorm2d, cnn only), batch_renorm (`rmax`, `dmax` and "
        "the renorm_* warm-up), ghost (BN per `virtual_batch_size` samples), weight (weight normalisation "
        "of each hidden Linear/Conv), batch_layer (Batch Layer Normalization, Ziaee & Çano 2022), "
        "frn (Filter Response Normalization with its TLU, which replaces the activation: relu, "
        "before_activation; Singh & Krishnan 2020), ws (scaled weight standardization of each hidden "
        "Linear/Conv with the NF-ResNet gain, no norm layer; Brock et al. 2021a), noisy_batch (BN followed "
        "by noise whose mean and scale change every training step, `noise_mean`, `noise_std`; Santurkar "
        "et al. 2018). arch rnn takes none, batch (recurrent BN, statistics per time step), layer and "
        "batch_layer, inside the cell. "
        "Formulas: docs/normalizers.md.",
    )
    position: Literal["after_activation", "before_activation"] | None = Field(
        None,
        description="after_activation: Linear → act → norm (the article's Keras code); "
        "before_activation: Linear/Conv → norm → act (the article's equation 6, and the usual "
        "Conv–Norm–Act block). Default (null): after_activation for an mlp, before_activation for a "
        "cnn and for kind frn (its TLU is the activation); the echo shows the one used.",
    )
    eps: Annotated[float, NotBool] = Field(
        1e-3,
        gt=0,
        le=1,
        description="Added to the variance; Keras' default 1e-3 (PyTorch's is 1e-5). frn: the initial "
        "value of its learned ε.",
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
    noise_mean: Annotated[float, NotBool] = Field(
        0.5,
        ge=0,
        le=10,
        description="noisy_batch: each step, each channel's noise mean is drawn from U(−noise_mean, "
        "noise_mean).",
    )
    noise_std: Annotated[float, NotBool] = Field(
        1.0,
        ge=0,
        le=10,
        description="noisy_batch: each step, each channel's noise standard deviation is drawn from "
        "U(0, noise_std).",
    )
    example_weight: Annotated[float, NotBool] = Field(
        0.0,
        ge=0,
        lt=1,
        description="Inference example weighing (Summers & Dinneen 2020), for the kinds that are BN at "
        "eval (batch, batch_renorm, ghost, noisy_batch) with running statistics: at eval each example is "
        "normalised with statistics that mix its own, weight α, and the population's, 1 − α. 0: plain BN. "
        "A model with α > 0 is served unfused.",
    )
    max_steps: Annotated[int | None, NotBool] = Field(
        None,
        ge=1,
        le=1024,
        description="arch rnn with kind batch or batch_layer: the time steps that keep their own statistics "
        "(Cooijmans et al. 2016); later steps use the last one's running statistics at eval. Null: the "
        "sequence's length (28 for 28×28 images read row by row).",
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
        if self.kind == "noisy_batch" and self.noise_mean == 0 and self.noise_std == 0:
            raise ValueError(
                "kind noisy_batch with noise_mean 0 and noise_std 0 adds no noise: use kind batch"
            )
        if self.example_weight > 0:
            if self.kind not in EVAL_BN_KINDS:
                kinds = ", ".join(sorted(EVAL_BN_KINDS))
                raise ValueError(
                    f"example_weight applies to the kinds that are BN at eval ({kinds}), not {self.kind!r}"
                )
            if not self.track_running_stats:
                raise ValueError(
                    "example_weight mixes the example into the running statistics: it needs "
                    "track_running_stats true"
                )
        return self


Channels = Annotated[int, NotBool, Field(ge=1, le=512)]


class ModelSpec(BaseModel):
    model_config = STRICT

    arch: Literal["mlp", "cnn", "resnet", "resmlp", "rnn"] = Field(
        "mlp",
        description="mlp: Flatten → [Linear → act → norm] × len(hidden) → Linear. cnn: [Conv 3×3 → norm → "
        "act, 2×2 max-pool while the map is ≥ 2×2] × len(channels) → global average pool → Linear; needs "
        "image data (C, H, W). Each uses only its own widths (hidden or channels). resnet: He et al.'s "
        "CIFAR ResNet (3 stages of `width`, 2·`width`, 4·`width` channels, depth = 6n + 2), needs image "
        "data. resmlp: a Linear stem, (depth − 2)/2 residual blocks of two Linear layers at `width`, and "
        "the classifier. rnn: `layers` stacked LSTM or GRU layers (`cell`, `hidden_size`) over the sample "
        "read as a sequence (an image row by row, a vector [L] as L steps of 1, [T, F] as it is), the norm "
        "inside the cell, and a Linear on the last step's hidden state.",
    )
    hidden: list[Width] = Field(
        [128], min_length=1, max_length=MAX_DEPTH, description="mlp: hidden layer widths."
    )
    depth: Annotated[int | None, NotBool] = Field(
        None,
        ge=1,
        le=MAX_DEPTH,
        description="mlp: hidden layers, with `width` a shorthand for hidden = [width] × depth (the echo "
        "shows both). resnet: weight layers, 6n + 2 (20, 56, 110; default 20). resmlp: weight layers, "
        "2·blocks + 2 (default 8). Null for a cnn.",
    )
    width: Annotated[int | None, NotBool] = Field(
        None,
        ge=1,
        le=4096,
        description="mlp: the width of every hidden layer (with `depth`; null in the echo when the widths "
        "differ). resnet: the first stage's channels (default 16: 16/32/64), at most 128. resmlp: the "
        "hidden width (default 128).",
    )
    block: Literal["post_activation", "pre_activation"] | None = Field(
        None,
        description="resnet, resmlp: post_activation (He et al. 2016, v1: conv → norm → act → conv → norm, "
        "add, act) or pre_activation (He et al. 2016b, v2: norm → act → conv → norm → act → conv, add). "
        "Default post_activation; null for mlp and cnn. The norm's place is the block's: "
        "model.norm.position is before_activation.",
    )
    shortcut: Literal["zero_pad", "projection"] | None = Field(
        None,
        description="resnet, where a stage halves the map and doubles the channels: zero_pad (He et al.'s "
        "option A, subsample and append zero channels, no parameters; the default) or projection "
        "(option B, 1×1 conv with stride 2 and a norm). Null for the other archs.",
    )
    init: Literal["default", "fixup", "skipinit"] = Field(
        "default",
        description="resnet, resmlp without normalisation (norm kind none): fixup (Zhang et al. 2019: "
        "scalar biases and multiplier, branch scaled by L^(−1/2), last branch layer and classifier zero) or "
        "skipinit (De & Smith 2020: each branch times a learnable α = 0); default: the layers' own init.",
    )
    cell: Literal["lstm", "gru"] | None = Field(
        None, description="rnn: the recurrent cell, lstm (the default) or gru. Null for the other archs."
    )
    hidden_size: Annotated[int | None, NotBool] = Field(
        None,
        ge=1,
        le=1024,
        description="rnn: the hidden state's size (default 128). Null for the other archs.",
    )
    layers: Annotated[int | None, NotBool] = Field(
        None, ge=1, le=8, description="rnn: stacked recurrent layers (default 1). Null for the other archs."
    )
    channels: list[Channels] = Field(
        [32, 64], min_length=1, max_length=8, description="cnn: output channels of each conv block."
    )
    activation: Literal["relu", "sigmoid", "tanh", "gelu"] = Field(
        "relu", description="Hidden activation (an rnn's cells have their own σ and tanh: leave the default)."
    )
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
        self._resolve_depth_and_width()
        if self.arch == "rnn":
            return self  # _resolve_rnn checked its norm
        residual = self.arch in ("resnet", "resmlp")
        if residual and self.norm.position == "after_activation":
            raise ValueError(
                "model.norm.position after_activation does not apply to residual blocks: their norm comes "
                "before the activation, in the order model.block gives (post_activation or pre_activation)"
            )
        if residual and self.norm.kind == "frn":
            raise ValueError(
                "norm kind frn ends in its own activation (the TLU), which the norm a residual block "
                "applies before its addition must not have: use frn with arch 'mlp' or 'cnn'"
            )
        if self.norm.kind == "frn":
            self._check_frn()
        if self.norm.position is None:  # the article's Keras MLP; the standard Conv–Norm–Act block
            self.norm.position = "after_activation" if self.arch == "mlp" else "before_activation"
        widths, field = self._widths()
        vector = self.arch in ("mlp", "resmlp")
        groups = self.norm.num_groups
        if self.norm.kind == "group":
            # On an mlp a group of one feature has no variance: GroupNorm refuses it.
            bad = [w for w in widths if w % groups or (vector and w // groups < 2)]
            if bad:
                raise ValueError(
                    f"model.norm.num_groups {groups} must divide every model.{field} width (an mlp needs "
                    f"groups of at least 2 features); it does not for {bad}"
                )
        if self.norm.kind == "instance" and vector:
            raise ValueError(
                "norm kind instance needs spatial dimensions: use it with arch 'cnn' or 'resnet'"
            )
        return self

    def _widths(self) -> tuple[list[int], str]:
        if self.arch == "mlp":
            return self.hidden, "hidden"
        if self.arch == "cnn":
            return self.channels, "channels"
        assert self.width is not None
        if self.arch == "resnet":
            return [self.width, 2 * self.width, 4 * self.width], "width (× 1, 2, 4)"
        return [self.width], "width"

    def _resolve_depth_and_width(self) -> None:
        """Fill in depth, width, block, shortcut for the arch, and refuse those that do not apply."""
        recurrent = [f for f in ("cell", "hidden_size", "layers") if getattr(self, f) is not None]
        if recurrent and self.arch != "rnn":
            raise ValueError(f"model.{recurrent[0]} applies to arch 'rnn', not {self.arch!r}")
        if self.norm.max_steps is not None and self.arch != "rnn":
            raise ValueError("model.norm.max_steps applies to arch 'rnn' (statistics per time step)")
        if self.arch == "mlp":
            self._resolve_mlp_shorthand()
        elif self.arch == "rnn":
            self._resolve_rnn()
        elif self.arch == "cnn":
            given = [f for f in ("depth", "width", "block", "shortcut") if getattr(self, f) is not None]
            if given:
                raise ValueError(f"model.{given[0]} does not apply to arch 'cnn' (it uses model.channels)")
        else:
            self._resolve_residual()
        if self.init != "default" and self.arch not in ("resnet", "resmlp"):
            raise ValueError(f"model.init {self.init} needs residual blocks: arch 'resnet' or 'resmlp'")
        if self.init != "default" and self.norm.kind != "none":
            raise ValueError(
                f"model.init {self.init} is the trainable init that replaces normalisation: use it with "
                f"model.norm.kind none, not {self.norm.kind!r}"
            )

    def _resolve_rnn(self) -> None:
        given = [f for f in ("depth", "width", "block", "shortcut") if getattr(self, f) is not None]
        if given:
            raise ValueError(
                f"model.{given[0]} does not apply to arch 'rnn' (it uses model.cell, model.hidden_size and "
                "model.layers)"
            )
        if self.activation != "relu":  # the default, which an echo repeats; an rnn ignores it
            raise ValueError(
                f"model.activation {self.activation!r} does not apply to arch 'rnn': its cells have their "
                "own σ and tanh"
            )
        if self.dropout > 0:
            raise ValueError("model.dropout applies to arch 'mlp' and 'cnn', not to an rnn's cells")
        kinds = ("none", "batch", "layer", "batch_layer")
        if self.norm.kind not in kinds:
            raise ValueError(
                f"model.norm.kind {self.norm.kind!r} has no recurrent form: an rnn's cell takes none, batch "
                "(recurrent BN, Cooijmans et al. 2016), layer or batch_layer"
            )
        if self.norm.position == "after_activation":
            raise ValueError(
                "model.norm.position after_activation does not apply to an rnn: its norms act on the weight "
                "products and the cell state, before the gates' σ and tanh"
            )
        if self.norm.example_weight > 0 or self.norm.sync:
            field = "example_weight" if self.norm.example_weight > 0 else "sync"
            raise ValueError(f"model.norm.{field} applies to BatchNorm layers, not to an rnn's recurrent BN")
        self.norm.position = "before_activation"
        self.cell = self.cell or "lstm"
        self.hidden_size = self.hidden_size or 128
        self.layers = self.layers or 1

    def _resolve_mlp_shorthand(self) -> None:
        for field in ("block", "shortcut"):
            if getattr(self, field) is not None:
                raise ValueError(f"model.{field} applies to arch 'resnet' or 'resmlp', not 'mlp'")
        if "hidden" in self.model_fields_set:  # depth and width, if given, must describe it
            if (self.depth is not None and self.depth != len(self.hidden)) or (
                self.width is not None and set(self.hidden) != {self.width}
            ):
                raise ValueError(
                    f"model.hidden ({len(self.hidden)} layers) conflicts with model.depth {self.depth} × "
                    f"model.width {self.width}: give hidden, or depth and width"
                )
        elif self.depth is not None or self.width is not None:  # the shorthand; width defaults to 128
            width = self.width if self.width is not None else self.hidden[0]
            self.hidden = [width] * (self.depth if self.depth is not None else len(self.hidden))
        self.depth = len(self.hidden)
        self.width = self.hidden[0] if len(set(self.hidden)) == 1 else None

    def _resolve_residual(self) -> None:
        resnet = self.arch == "resnet"
        self.depth = self.depth if self.depth is not None else (20 if resnet else 8)
        self.width = self.width if self.width is not None else (16 if resnet else 128)
        self.block = self.block or "post_activation"
        if self.dropout > 0:
            raise ValueError("model.dropout applies to arch 'mlp' and 'cnn', not to residual blocks")
        if resnet:
            if self.depth < 8 or (self.depth - 2) % 6:
                raise ValueError(
                    f"model.depth {self.depth}: a resnet has 6n + 2 layers (8, 14, 20, …, 56, …, 110, …, 122)"
                )
            if self.width > 128:
                raise ValueError(f"model.width {self.width}: a resnet's first stage has at most 128 channels")
            self.shortcut = self.shortcut or "zero_pad"
            return
        if self.depth < 4 or self.depth % 2:
            raise ValueError(f"model.depth {self.depth}: a resmlp has 2·blocks + 2 layers (4, 6, 8, …, 128)")
        if self.shortcut is not None:
            raise ValueError("model.shortcut applies to arch 'resnet' (a resmlp's blocks keep their width)")

    def _check_frn(self) -> None:
        # FRN ends in its TLU max(y, τ), a learned-threshold ReLU that is the block's activation.
        if self.activation != "relu":
            raise ValueError(
                f"norm kind frn replaces the activation with its TLU max(y, τ), a ReLU with a learned "
                f"threshold: model.activation must be 'relu', not {self.activation!r}"
            )
        if self.norm.position == "after_activation":
            raise ValueError(
                "norm kind frn normalises the Linear/Conv output and its TLU is the activation "
                "(Linear/Conv → FRN → TLU): model.norm.position must be before_activation (or null)"
            )
        self.norm.position = "before_activation"


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


class ScheduleSpec(BaseModel):
    model_config = STRICT

    kind: Literal["none", "step", "cosine"] = Field(
        "none",
        description="Learning rate per epoch: none = constant; step = lr·gamma^⌊(epoch−1)/step_size⌋; "
        "cosine = lr·(1 + cos(π·(epoch−1)/epochs))/2.",
    )
    step_size: Annotated[int, NotBool] = Field(10, ge=1, le=1000, description="step: epochs per decay.")
    gamma: Annotated[float, NotBool] = Field(0.1, gt=0, le=1, description="step: factor per decay.")


StrictBool = Annotated[bool, Field(strict=True)]


class ProbesSpec(BaseModel):
    """Which epoch-end probes to record (docs/probes.md: formulas, citations, measured costs). Each is
    measured at initialisation (epoch 0) and after every epoch on the fixed probe batch; the slot
    inputs' mean and std (GET /layer-stats) are always recorded. On by default: the cheap ones."""

    model_config = STRICT

    gradients: StrictBool = Field(
        "gradients" in DEFAULT_PROBES,
        description="‖∂L/∂W‖ and ‖W‖ per Linear/Conv layer (train mode), and the fitted growth of the "
        "gradient norm per layer towards the input (Yang et al. 2019). One forward/backward of the batch.",
    )
    smoothness: StrictBool = Field(
        "smoothness" in DEFAULT_PROBES,
        description="Loss range, gradient change and effective β-smoothness along −∇L for steps of "
        "0.05–0.4 × lr (Santurkar et al. 2018 §3.2). Six forward/backward passes of the batch.",
    )
    percentiles: StrictBool = Field(
        "percentiles" in DEFAULT_PROBES,
        description="15th/50th/85th percentiles of each norm slot's input (the BN paper's Fig. 1). One "
        "forward pass of the batch.",
    )
    gamma: StrictBool = Field(
        "gamma" in DEFAULT_PROBES,
        description="Fraction of each norm layer's γ with |γ| < 0.01, and mean |γ| (Frankle et al. 2021). "
        "Reads the parameters: no pass.",
    )
    statistics_gap: StrictBool = Field(
        "statistics_gap" in DEFAULT_PROBES,
        description="Running (EMA) statistics against the exact ones over the first 8,192 training "
        "samples, and train- vs eval-mode accuracy on the probe batch (Wu & Johnson 2021). An eval pass "
        "over those samples.",
    )

    def enabled(self) -> tuple[ProbeName, ...]:
        return tuple(name for name in PROBE_NAMES if getattr(self, name))


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
    probes: ProbesSpec = Field(
        default_factory=ProbesSpec, description="The epoch-end probes to record (GET /probes/{probe})."
    )
    agc: Annotated[float | None, NotBool] = Field(
        None,
        gt=0,
        le=100,
        description="Adaptive gradient clipping (Brock et al. 2021b): after each backward pass, every output "
        "unit's gradient G_i of every parameter but the output layer's is rescaled so that "
        "‖G_i‖/max(‖W_i‖, 1e-3) <= this λ (the paper: 0.01 to 0.16); null: off. Trains through autograd.",
    )
    frozen_bn_epochs: Annotated[int, NotBool] = Field(
        0,
        ge=0,
        le=1000,
        description="FrozenBN for the last N epochs (Wu & Johnson 2021): in those epochs the BatchNorm "
        "layers normalise with their running statistics in training too and leave them untouched (BN in "
        "eval mode while the rest trains). At most `epochs`; needs a BatchNorm kind (batch, batch_renorm, "
        "ghost, noisy_batch) with track_running_stats. 0: off. Trains through autograd.",
    )
    trainable: Literal["all", "norm_only", "random_subset"] = Field(
        "all",
        description="Which parameters train (Frankle et al. 2021): all; norm_only: only the normalisation "
        "layers' γ and β and the output layer, the rest keeps its random initial values (needs a norm kind "
        "with affine parameters); random_subset: as many scalars as norm_only, chosen at random among all "
        "parameters from the seed, trained through a gradient mask (needs weight_decay 0). Trains through "
        "autograd.",
    )
    batch_order: Literal["shuffled", "class_sorted", "k_classes"] = Field(
        "shuffled",
        description="The epoch's sample order. shuffled: uniform. class_sorted: sorted by label (the order "
        "of the classes and of the samples within each shuffled per epoch), cut into batches: one class per "
        "batch except where a class ends. k_classes: each batch drawn from `batch_classes` classes (more "
        "only at the end of an epoch, where the samples left no longer fill a batch from k classes).",
    )
    batch_classes: Annotated[int | None, NotBool] = Field(
        None,
        ge=1,
        le=1000,
        description="k for batch_order k_classes (required there, at most batch_size); null otherwise.",
    )


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

    @model_validator(mode="after")
    def _check_budget(self) -> Self:
        shape = BUILTIN_SHAPES.get(self.dataset.name)
        if shape is None:
            return self  # an upload: the API checks the spec against the upload's stored shape
        # Built on the data's real shape: a cnn on vector data, or maps too small for a norm, is a 422.
        problem = shape_problem(self, shape, max_parameters=MAX_PARAMETERS)
        if problem is not None:
            raise ValueError(problem)
        # A batch larger than the training split is allowed: each epoch is then one smaller batch,
        # as in Keras (limit >= 10 with val_split <= 0.5 always leaves at least 5 samples).
        return self

    @model_validator(mode="after")
    def _resolve_and_cross_check(self) -> Self:
        if self.train.adam_eps is None:
            self.train.adam_eps = ADAM_EPS[self.compat]  # the echo shows what ran
        norm = self.model.norm
        self._check_processes()
        self._check_switches()
        if norm.kind == "ghost" and self.train.batch_size % norm.virtual_batch_size:
            raise ValueError(
                f"model.norm.virtual_batch_size {norm.virtual_batch_size} must divide train.batch_size "
                f"{self.train.batch_size}"
            )
        return self

    def _check_switches(self) -> None:
        norm, train = self.model.norm, self.train
        if train.frozen_bn_epochs > train.epochs:
            raise ValueError(
                f"train.frozen_bn_epochs {train.frozen_bn_epochs} exceeds train.epochs {train.epochs}"
            )
        if train.frozen_bn_epochs and self.model.arch == "rnn":
            raise ValueError(
                "train.frozen_bn_epochs freezes BatchNorm layers; an rnn's recurrent BN keeps statistics per "
                "time step and is not frozen: use 0"
            )
        if train.frozen_bn_epochs and (norm.kind not in EVAL_BN_KINDS or not norm.track_running_stats):
            raise ValueError(
                f"train.frozen_bn_epochs freezes BatchNorm's running statistics: it needs norm kind batch, "
                f"batch_renorm, ghost or noisy_batch with track_running_stats, not {norm.kind!r}"
                + ("" if norm.track_running_stats else " without running statistics")
            )

        if (train.batch_order == "k_classes") != (train.batch_classes is not None):
            raise ValueError(
                "train.batch_classes is the k of train.batch_order 'k_classes': give it with that order "
                f"and only then (batch_order {train.batch_order!r}, batch_classes {train.batch_classes})"
            )
        if train.batch_classes is not None and train.batch_classes > train.batch_size:
            raise ValueError(
                f"train.batch_classes {train.batch_classes} exceeds train.batch_size {train.batch_size}"
            )
        shape = BUILTIN_SHAPES.get(self.dataset.name)
        if train.batch_classes is not None and shape is not None and train.batch_classes > shape.num_classes:
            raise ValueError(
                f"train.batch_classes {train.batch_classes} exceeds the {shape.num_classes} classes of "
                f"dataset {self.dataset.name!r}"
            )
        if train.trainable == "norm_only" and self._norm_parameters() == 0:
            raise ValueError(
                f"train.trainable 'norm_only' trains the normalisation layers' γ and β: norm kind "
                f"{norm.kind!r}{'' if norm.affine else ' with affine false'} has no affine parameters"
            )
        if train.trainable == "random_subset" and train.weight_decay > 0:
            raise ValueError(
                "train.trainable 'random_subset' masks gradients: train.weight_decay must be 0 (torch's "
                "coupled weight decay would move the masked parameters)"
            )

    def _norm_parameters(self) -> int | None:
        """Scalars of the network's norm layers; None when it cannot be built on the default shape (an
        upload's network is checked against its data at submission)."""
        try:
            return norm_parameter_count(model_config(self))
        except ValueError:
            return None

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


RunStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class RunSummary(BaseModel):
    epochs_done: int = Field(description="Epochs finished so far.")
    epochs_total: int = Field(description="Epochs asked for.")
    train_loss: Measured = Field(
        None, description="Training loss of the last finished epoch (null: none yet, or not finite)."
    )
    train_accuracy: Measured = Field(
        None, description="Training accuracy of the last finished epoch (null: none yet, or not finite)."
    )
    val_loss: Measured = Field(
        None, description="Validation loss of the last finished epoch (null: none yet, or not finite)."
    )
    val_accuracy: Measured = Field(
        None, description="Validation accuracy of the last finished epoch (null: none yet, or not finite)."
    )


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
    experiment_id: str | None = Field(None, description="The experiment that created the run, if any.")


class RunsPublic(BaseModel):
    items: list[RunPublic]
    total: int = Field(description="Runs matching the filter.")
    limit: int
    offset: int


class EpochMetricPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    epoch: int = Field(description="1-based epoch number.")
    train_loss: Measured = Field(description="Mean training loss (null: not finite, the run diverged).")
    train_accuracy: Measured
    val_loss: Measured = Field(
        description="Validation loss in eval mode (running statistics; null: not finite)."
    )
    val_accuracy: Measured
    seconds: float = Field(description="Wall time of the epoch, validation included.")
    train_seconds: float | None = Field(
        None,
        description="Wall time of the epoch's training steps alone, validation excluded (null: stored "
        "before bnlab recorded it).",
    )
    train_samples: int | None = Field(
        None, description="Training samples the epoch went through (samples/s = train_samples / seconds)."
    )


class RunMetricsPublic(BaseModel):
    epochs: list[EpochMetricPublic]


class SlotStatisticPublic(BaseModel):
    layer: str = Field(description="The normalisation slot by module name (bn1, …), identity if no norm.")
    input_mean: Measured = Field(
        description="Mean of the slot's input, before normalising, on the probe batch (null: not finite)."
    )
    input_std: Measured = Field(description="Standard deviation of the same values.")


class EpochSlotStatisticsPublic(BaseModel):
    epoch: int = Field(description="0 = the freshly initialised network; k = after epoch k.")
    layers: list[SlotStatisticPublic] = Field(description="One entry per slot, input to output.")


class RunLayerStatsPublic(BaseModel):
    """Internal covariate shift, measured: how each normalisation slot's input moves as training goes."""

    probe_samples: int = Field(description="Size of the fixed probe batch (the first validation samples).")
    epochs: list[EpochSlotStatisticsPublic]


class ProbeLayerPublic(BaseModel):
    layer: str = Field(description='A module name (fc1, bn3, …), or "model" for the whole network.')
    values: dict[str, float | None] = Field(
        description="What the probe measured there, by name (null: no finite answer)."
    )


class ProbeEpochPublic(BaseModel):
    epoch: int = Field(description="0 = the freshly initialised network; k = after epoch k.")
    layers: list[ProbeLayerPublic] = Field(description='Input to output, then "model".')


class RunProbePublic(BaseModel):
    """One epoch-end probe of a run (docs/probes.md), as recorded on the fixed probe batch."""

    probe: ProbeName
    probe_samples: int = Field(description="Size of the fixed probe batch (the first validation samples).")
    epochs: list[ProbeEpochPublic]
