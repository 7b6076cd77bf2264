"""Residual networks for `nets.make_net`: He et al.'s CIFAR ResNet and a residual MLP, with the two
trainable inits that let them train without normalisation (docs/deep-lab.md, Architectures).

- `resnet` (He et al. 2016, §4.2): a 3×3 conv stem of `width` channels, then 3 stages of n residual
  blocks at `width`, 2·`width`, 4·`width` channels (16/32/64 by default), the first block of stages 2
  and 3 halving the map with stride 2, then global average pooling and a Linear: depth = 6n + 2
  weight layers (ResNet-20/56/110 for n = 3/9/18). Shortcuts are identities, and where a stage
  starts either option A (`zero_pad`: subsample by 2, append zero channels; no parameters) or
  option B (`projection`: 1×1 conv with stride 2, then a norm slot).
- `resmlp`: a Linear stem to `width` features, (depth − 2)/2 residual blocks of two Linear layers at
  that width (identity shortcuts), and the Linear classifier: depth = 2·blocks + 2.

Blocks are post-activation (v1: x → act(norm(W₂·act(norm(W₁·x)))+x)) or pre-activation (He et al.
2016b, v2: x + W₂·act(norm(W₁·act(norm(x)))), with a final norm and act after the last block).

A block keeps its branch as a named `nn.Sequential` (`conv1`, `bn1`, `act1`, ...), so fusion folds the
branch's norms into its convs as it does a whole cnn's, and probes find `blockK.branch.bn1`.

- Fixup (Zhang et al. 2019, as the authors' fixup_resnet_cifar.py): a learnable scalar bias before
  every conv/Linear and activation of a branch, a scalar multiplier at its end, the branch's first
  layer He-normal (fan_out) scaled by L^(−1/(2m−2)) = L^(−1/2) (L blocks, m = 2 layers per branch),
  its last layer and the classifier zero: every block starts as its shortcut.
- SkipInit (De & Smith 2020): a learnable scalar α = 0 multiplying each branch: x + α·f(x).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from service.ml.config import ModelConfig
from service.ml.norms import make_norm

Block = list[tuple[str, nn.Module]]
# Norm kinds whose slot is an Identity (weight and ws reparametrise the layers instead).
IDENTITY_SLOTS = ("none", "weight", "ws")
# Fixup's m: weight layers per residual branch.
BRANCH_LAYERS = 2


class ScalarBias(nn.Module):
    """Fixup's scalar bias: x + b, one learnable b (0 at init) for the whole tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class ScalarScale(nn.Module):
    """Fixup's scalar multiplier at the end of a branch: s·x, s learnable (1 at init)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class ZeroPadShortcut(nn.Module):
    """He et al.'s option A: every `stride`-th position, then `extra` zero channels appended."""

    def __init__(self, stride: int, extra: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class ResidualBlock(nn.Module):
    """after(α·branch(x) + shortcut(x)); α only with SkipInit, after an activation in v1 (else Identity).
    `shared_bias`: a Fixup v1 block whose shortcut subsamples takes x + bias1a, as the authors' code."""

    def __init__(
        self,
        branch: nn.Sequential,
        shortcut: nn.Module,
        after: nn.Module,
        *,
        skipinit: bool,
        shared_bias: bool = False,
    ) -> None:
        super().__init__()
        self.branch, self.shortcut, self.after = branch, shortcut, after
        self.shared_bias = shared_bias
        self.alpha: nn.Parameter | None
        if skipinit:
            self.alpha = nn.Parameter(torch.zeros(1))
        else:
            self.register_parameter("alpha", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.branch(x)
        if self.alpha is not None:
            h = h * self.alpha
        if self.shared_bias:
            x = self.branch.get_submodule("bias1a")(x)
        out: torch.Tensor = self.after(h + self.shortcut(x))
        return out


# (in, out, stride) -> a weight layer; `positions` the values per channel of a map (1 for features).
LayerFactory = Callable[[int, int, int], nn.Module]


class _Builder:
    def __init__(self, cfg: ModelConfig, activation: type[nn.Module], *, spatial: bool) -> None:
        self.cfg, self.activation, self.spatial = cfg, activation, spatial
        self.fixup = cfg.residual_init == "fixup"
        self.v1 = cfg.block == "post_activation"
        # A layer needs its own bias only where no norm after it shifts (Fixup brings scalar ones).
        shifts = cfg.norm.kind not in IDENTITY_SLOTS and cfg.norm.learns_beta
        self.bias = not shifts and not self.fixup

    def layer(self, c_in: int, c_out: int, stride: int = 1, kernel: int = 3) -> nn.Module:
        if self.spatial:
            return nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=self.bias)
        return nn.Linear(c_in, c_out, bias=self.bias)

    def norm(self, width: int, positions: int) -> nn.Module:
        return make_norm(self.cfg.norm, width, spatial=self.spatial, positions=positions)

    def stem(self, c_in: int, width: int, positions: int, name: str) -> Block:
        layers: Block = [(f"{name}0", self.layer(c_in, width))]
        if self.v1:  # v2 starts its first block with norm → act
            layers += [("bn0", self.norm(width, positions))]
            layers += [("bias0", ScalarBias())] if self.fixup else []
            layers += [("act0", self.activation())]
        return layers

    def block(self, c_in: int, c_out: int, stride: int, positions: tuple[int, int]) -> ResidualBlock:
        """positions: values per channel of the block's input map and of its output map."""
        name = "conv" if self.spatial else "fc"
        first, second = self.layer(c_in, c_out, stride), self.layer(c_out, c_out)
        bias: Callable[[str], Block] = (lambda n: [(n, ScalarBias())]) if self.fixup else (lambda n: [])
        act1, act2 = ("act1", self.activation()), ("act2", self.activation())
        if self.v1:
            bn1, bn2 = ("bn1", self.norm(c_out, positions[1])), ("bn2", self.norm(c_out, positions[1]))
            layers = [*bias("bias1a"), (f"{name}1", first), bn1, *bias("bias1b"), act1]
            layers += [*bias("bias2a"), (f"{name}2", second), bn2]
            layers += [("scale", ScalarScale()), ("bias2b", ScalarBias())] if self.fixup else []
            after: nn.Module = self.activation()
        else:
            bn1, bn2 = ("bn1", self.norm(c_in, positions[0])), ("bn2", self.norm(c_out, positions[1]))
            layers = [bn1, *bias("bias1a"), act1, *bias("bias1b"), (f"{name}1", first)]
            layers += [bn2, *bias("bias2a"), act2, *bias("bias2b"), (f"{name}2", second)]
            layers += [("scale", ScalarScale())] if self.fixup else []
            after = nn.Identity()
        shortcut = self.shortcut(c_in, c_out, stride, positions[1])
        return ResidualBlock(
            nn.Sequential(OrderedDict(layers)),
            shortcut,
            after,
            skipinit=self.cfg.residual_init == "skipinit",
            shared_bias=self.fixup and self.v1 and not isinstance(shortcut, nn.Identity),
        )

    def shortcut(self, c_in: int, c_out: int, stride: int, positions: int) -> nn.Module:
        if stride == 1 and c_in == c_out:
            return nn.Identity()
        if self.cfg.shortcut == "zero_pad":
            return ZeroPadShortcut(stride, c_out - c_in)
        conv = nn.Conv2d(c_in, c_out, 1, stride, bias=self.bias)
        return nn.Sequential(OrderedDict([("conv", conv), ("bn", self.norm(c_out, positions))]))

    def head(self, width: int, positions: int, num_classes: int) -> Block:
        layers: Block = []
        if not self.v1:  # v2's last block ends in an addition: normalise and activate once more
            layers += [("bn_out", self.norm(width, positions)), ("act_out", self.activation())]
        if self.spatial:
            layers += [("gap", nn.AdaptiveAvgPool2d(1)), ("gap_flat", nn.Flatten())]
        layers += [("bias_out", ScalarBias())] if self.fixup else []
        return [*layers, ("out", nn.Linear(width, num_classes))]


def resnet(cfg: ModelConfig, activation: type[nn.Module]) -> Block:
    """He et al.'s CIFAR ResNet of depth 6n + 2 on a (C, H, W) input."""
    c, h, w = cfg.input_shape
    build = _Builder(cfg, activation, spatial=True)
    n = (cfg.depth - 2) // 6
    layers: Block = [("flatten", nn.Flatten()), ("image", nn.Unflatten(1, (c, h, w)))]
    layers += build.stem(c, cfg.width, h * w, "conv")
    c_in, i = cfg.width, 0
    for stage in range(3):
        c_out = cfg.width * 2**stage
        for j in range(n):
            stride = 2 if stage > 0 and j == 0 else 1
            before = h * w
            h, w = (h - 1) // stride + 1, (w - 1) // stride + 1  # a 3×3 conv, padding 1
            i += 1
            layers.append((f"block{i}", build.block(c_in, c_out, stride, (before, h * w))))
            c_in = c_out
    return [*layers, *build.head(c_in, h * w, cfg.num_classes)]


def resmlp(cfg: ModelConfig, activation: type[nn.Module]) -> Block:
    """A residual MLP of depth 2·blocks + 2 at one width."""
    build = _Builder(cfg, activation, spatial=False)
    layers: Block = [("flatten", nn.Flatten())]
    layers += build.stem(math.prod(cfg.input_shape), cfg.width, 1, "fc")
    for i in range(1, (cfg.depth - 2) // 2 + 1):
        layers.append((f"block{i}", build.block(cfg.width, cfg.width, 1, (1, 1))))
    return [*layers, *build.head(cfg.width, 1, cfg.num_classes)]


def check(cfg: ModelConfig) -> None:
    if cfg.arch == "resnet":
        if cfg.depth < 8 or (cfg.depth - 2) % 6:
            raise ValueError(f"a resnet's depth is 6n + 2 (8, 14, 20, ..., 56, ..., 110), not {cfg.depth}")
        if len(cfg.input_shape) != 3:
            raise ValueError(f"arch 'resnet' needs an image input (C, H, W), not {tuple(cfg.input_shape)}")
    elif cfg.depth < 4 or cfg.depth % 2:
        raise ValueError(f"a resmlp's depth is 2·blocks + 2 (4, 6, 8, ...), not {cfg.depth}")
    if cfg.width < 1 or cfg.dropout > 0:
        raise ValueError("a residual network needs width >= 1 and takes no dropout")
    if cfg.norm.kind == "frn":
        raise ValueError(
            "norm kind frn ends in its own activation (the TLU), which a residual block's norm before the "
            "addition must not have: use it with arch 'mlp' or 'cnn'"
        )
    if cfg.block not in ("post_activation", "pre_activation") or cfg.shortcut not in (
        "zero_pad",
        "projection",
    ):
        raise ValueError(f"unknown block {cfg.block!r} or shortcut {cfg.shortcut!r}")


def blocks(net: nn.Module) -> list[ResidualBlock]:
    return [module for module in net.modules() if isinstance(module, ResidualBlock)]


def initialise(net: nn.Module, cfg: ModelConfig) -> None:
    """Fixup's init (SkipInit's α = 0 is set as its blocks are built; the default init does nothing).
    Nothing is drawn on the meta device, which holds no values (networks are built there to be
    counted), and whose first normal_ in a process takes a second."""
    if cfg.residual_init != "fixup" or any(p.is_meta for p in net.parameters()):
        return
    residual = blocks(net)
    scale = len(residual) ** (-1 / (2 * BRANCH_LAYERS - 2))
    with torch.no_grad():
        for block in residual:
            first, last = [m for m in block.branch if isinstance(m, nn.Linear | nn.Conv2d)]
            nn.init.kaiming_normal_(first.weight, mode="fan_out", nonlinearity="relu")
            first.weight.mul_(scale)
            nn.init.zeros_(last.weight)
        head = net.get_submodule("out")
        assert isinstance(head, nn.Linear)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)


# Fixup's learning rate for its scalars, as a fraction of the run's: the authors' cifar_train.py and
# imagenet_train.py give `base_lr/10.` to the parameters whose names hold "bias" or "scale", in
# their own param groups that follow the same schedule as the rest.
FIXUP_SCALAR_LR_FACTOR = 0.1


def fixup_scalar_parameters(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters a Fixup network trains at FIXUP_SCALAR_LR_FACTOR × the learning rate, by the
    authors' rule (name holds "bias" or "scale"): every scalar bias and multiplier, and the
    classifier's bias (the rule takes `fc.bias` too; Fixup layers have no other bias). Empty for a
    network without Fixup's scalars."""
    if not any(isinstance(m, ScalarBias | ScalarScale) for m in net.modules()):
        return []
    return [(name, p) for name, p in net.named_parameters() if "bias" in name or "scale" in name]
