"""Typed configuration of a model and of a training run, as the ML core sees it.

The service validates the user's JSON spec (service/schemas.py) and converts it to these frozen
dataclasses. `ModelConfig.to_dict()` is what a checkpoint stores next to its weights, so that
`ModelConfig.from_dict()` + `make_net()` rebuild exactly the network that was trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

NormKind = Literal["none", "batch"]
NormPosition = Literal["after_activation", "before_activation"]
Activation = Literal["relu", "sigmoid", "tanh"]
OptimizerName = Literal["adam", "sgd"]
# pixels: uint8 images, trained as x / 255; features: float inputs used as they are.
InputKind = Literal["pixels", "features"]


@dataclass(frozen=True)
class NormConfig:
    kind: NormKind = "batch"
    # after_activation: Linear -> act -> BN, as the article's Keras code (Dense(128, relu), then BN).
    # before_activation: Linear -> BN -> act, the article's equation 6, a = f(gamma * x_hat + beta).
    position: NormPosition = "after_activation"
    eps: float = 1e-3
    # PyTorch convention: weight of the new batch. None = cumulative average (1 / num_batches_tracked).
    momentum: float | None = 0.01
    affine: bool = True
    track_running_stats: bool = True


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["mlp"] = "mlp"
    input_shape: tuple[int, ...] = (1, 28, 28)
    num_classes: int = 10
    # How serving reads inputs as training did: pixels take values in [0, 1] (or UINT8 0..255),
    # features (MNIST-1D, float uploads) any finite numbers. Older configs lack it: pixels.
    input_kind: InputKind = "pixels"
    hidden: tuple[int, ...] = (128,)
    activation: Activation = "relu"
    norm: NormConfig = field(default_factory=NormConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        fields = dict(data)
        fields["input_shape"] = tuple(fields["input_shape"])
        fields["hidden"] = tuple(fields["hidden"])
        fields["norm"] = NormConfig(**fields["norm"])
        return cls(**fields)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    optimizer: OptimizerName = "adam"
    lr: float = 1e-3
    seed: int = 0
