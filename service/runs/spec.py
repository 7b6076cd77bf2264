"""A run spec turned into what service.ml trains: its network's config, its training config, and
whether that network fits its data and the parameter budget.

This is the one place a spec becomes a `ModelConfig`: validation (a built-in's shape, at parse
time), the API (an upload's stored shape, at submit time), the runner (the data as loaded) and the
cost model all ask here, so the network that is checked is the network that trains.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from service.ml import nets, recurrent
from service.ml.config import RESIDUAL_ARCHS, ModelConfig, NormConfig, TrainConfig
from service.ml.datasets import BUILTIN_SHAPES, DataShape

if TYPE_CHECKING:
    from service.runs.schemas import RunCreate

# Adam's epsilon per compat (bn-semantics.md §2: Keras' default is 1e-7, PyTorch's 1e-8).
ADAM_EPS = {"pytorch": 1e-8, "keras": 1e-7}
# The shape a spec is described on when no data is named (the article's 28×28 images, 10 classes).
DEFAULT_SHAPE = BUILTIN_SHAPES["fashion-mnist"]


def model_config(spec: RunCreate, shape: DataShape = DEFAULT_SHAPE) -> ModelConfig:
    """The spec's network for data of this shape, recording how its inputs are scaled."""
    model = spec.model
    # sync is a training switch (TrainConfig.sync_batch_norm): the network is the same.
    fields = model.norm.model_dump(exclude={"keras_momentum", "epsilon", "sync"})
    # Batch Layer Normalization's formula uses the training batch size B.
    bln_batch_size = spec.train.batch_size if model.norm.kind == "batch_layer" else None
    return ModelConfig(
        arch=model.arch,
        input_shape=tuple(shape.input_shape),
        num_classes=shape.num_classes,
        input_kind=shape.input_kind,
        hidden=tuple(model.hidden),
        activation=model.activation,
        norm=NormConfig(**fields, bln_batch_size=bln_batch_size),
        channels=tuple(model.channels),
        dropout=model.dropout,
        dropout_position=model.dropout_position,
        init="glorot" if spec.compat == "keras" else "pytorch",
        init_scale=model.init_scale,
        **_residual_fields(spec),
        **_recurrent_fields(spec),
    )


def _residual_fields(spec: RunCreate) -> dict[str, Any]:
    """A resnet's or resmlp's depth, width, block, shortcut and init (ModelSpec resolved them)."""
    model = spec.model
    if model.arch not in RESIDUAL_ARCHS:
        return {}
    fields = {"depth": model.depth, "width": model.width, "block": model.block, "residual_init": model.init}
    return fields | ({"shortcut": model.shortcut} if model.shortcut is not None else {})


def _recurrent_fields(spec: RunCreate) -> dict[str, Any]:
    """An rnn's cell, hidden size and layers (ModelSpec resolved them)."""
    model = spec.model
    if model.arch != "rnn":
        return {}
    return {"cell": model.cell, "hidden_size": model.hidden_size, "layers": model.layers}


def train_config(spec: RunCreate) -> TrainConfig:
    train = spec.train
    fields = train.model_dump(exclude={"schedule", "adam_eps", "probes", "batch_classes"})
    if train.batch_classes is not None:  # null unless batch_order is k_classes: the config's default then
        fields["batch_classes"] = train.batch_classes
    schedule = train.schedule
    adam_eps = ADAM_EPS[spec.compat] if train.adam_eps is None else train.adam_eps
    return TrainConfig(
        **fields,
        adam_eps=adam_eps,
        sync_batch_norm=spec.model.norm.sync,
        schedule=schedule.kind,
        step_size=schedule.step_size,
        gamma=schedule.gamma,
        probes=train.probes.enabled(),
    )


def shape_problem(spec: RunCreate, shape: DataShape, *, max_parameters: int) -> str | None:
    """Why the spec's network cannot train on data of this shape within the parameter budget, or None."""
    if spec.model.arch == "rnn":
        try:
            recurrent.sequence_shape(tuple(shape.input_shape))
        except ValueError as exc:
            return f"dataset {spec.dataset.name!r}: {exc}"
    if spec.model.arch in ("cnn", "resnet") and len(shape.input_shape) != 3:
        return (
            f"arch {spec.model.arch!r} needs image data [C, H, W]; dataset {spec.dataset.name!r} has "
            f"samples of shape {list(shape.input_shape)}: use arch 'mlp' or 'resmlp'"
        )
    try:
        parameters = nets.parameter_count(model_config(spec, shape))
    except ValueError as exc:  # e.g. instance norm once the maps of a deep cnn are 1×1 on small images
        return f"the model cannot be built for {spec.dataset.name} data {list(shape.input_shape)}: {exc}"
    if parameters > max_parameters:
        inputs = math.prod(shape.input_shape)
        return (
            f"model has {parameters:,} parameters on {spec.dataset.name} ({inputs:,} inputs, "
            f"{shape.num_classes} classes); the limit is {max_parameters:,} parameters (the service's "
            "parameter budget)"
        )
    return None
