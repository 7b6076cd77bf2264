"""Residual networks (docs/deep-lab.md, Architectures): He et al.'s CIFAR ResNet and the residual MLP,
checked against hand counts, and Fixup and SkipInit against what they promise at initialisation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from service.ml.checkpoints import load_checkpoint, save_checkpoint
from service.ml.config import ModelConfig, NormConfig
from service.ml.fastpath import MlpStep
from service.ml.fusion import fuse_bn
from service.ml.nets import count_parameters, forward_flops, make_net, norm_slots, parameter_count
from service.ml.resnets import ResidualBlock, ZeroPadShortcut, blocks

CIFAR, FASHION = (3, 32, 32), (1, 28, 28)
SMALL = (1, 12, 12)  # quick to run: 12 → 6 → 3 maps
NONE = NormConfig(kind="none")


def resnet(depth: int = 20, shape: tuple[int, ...] = SMALL, **fields: object) -> ModelConfig:
    fields.setdefault("norm", NormConfig(kind="batch"))
    return ModelConfig(arch="resnet", depth=depth, input_shape=shape, **fields)  # type: ignore[arg-type]


def resmlp(depth: int = 6, width: int = 32, **fields: object) -> ModelConfig:
    fields.setdefault("norm", NormConfig(kind="batch"))
    return ModelConfig(arch="resmlp", depth=depth, width=width, **fields)  # type: ignore[arg-type]


def weight_layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def hand_count_resnet(n: int, c: int, classes: int, *, bn: bool, conv_bias: bool = False) -> int:
    """He et al.'s CIFAR ResNet, option A: stem 3×3 conv, 3 stages of n blocks (2 convs each), fc."""
    convs = 9 * c * 16 + (16 if conv_bias else 0)
    norms = 2 * 16 if bn else 0
    c_in = 16
    for width in (16, 32, 64):
        for j in range(n):
            convs += 9 * (c_in if j == 0 else width) * width + 9 * width * width
            convs += 2 * width if conv_bias else 0
            norms += 2 * 2 * width if bn else 0
        c_in = width
    return convs + norms + 64 * classes + classes


@pytest.mark.parametrize(("depth", "published"), [(20, 0.27e6), (56, 0.85e6), (110, 1.7e6)])
def test_resnet_depths_count_6n_plus_2_weight_layers(depth: int, published: float) -> None:
    n = (depth - 2) // 6
    with torch.device("meta"):
        net = make_net(resnet(depth, CIFAR))
    assert len(weight_layers(net)) == depth  # stem + 2 per block + classifier
    assert len(blocks(net)) == 3 * n
    channels = [b.branch.conv1.out_channels for b in blocks(net)]  # type: ignore[union-attr]
    assert channels == [16] * n + [32] * n + [64] * n
    # The parameter counts of He et al.'s Table 6 (0.27M, 0.85M, 1.7M), to the unit by hand.
    count = parameter_count(resnet(depth, CIFAR))
    assert count == hand_count_resnet(n, 3, 10, bn=True)
    assert count == pytest.approx(published, rel=0.02)


def test_resnet20_is_269722_parameters_on_cifar() -> None:
    assert parameter_count(resnet(20, CIFAR)) == 269_722  # the well-known count of option-A ResNet-20


@pytest.mark.parametrize(("shape", "maps"), [(CIFAR, [32, 16, 8]), (FASHION, [28, 14, 7])])
def test_stages_halve_the_map_and_the_shortcut_pads_zero_channels(
    shape: tuple[int, int, int], maps: list[int]
) -> None:
    net = make_net(resnet(14, shape)).eval()
    seen: list[int] = []
    for block in blocks(net):
        block.register_forward_hook(lambda _m, _a, out: seen.append(out.shape[-1]))
    with torch.no_grad():
        net(torch.rand(2, *shape))
    assert seen == [maps[0]] * 2 + [maps[1]] * 2 + [maps[2]] * 2
    shortcut = blocks(net)[2].shortcut
    assert isinstance(shortcut, ZeroPadShortcut)
    x = torch.randn(2, 16, 8, 8)
    y = shortcut(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert not y[:, 16:].any()
    assert count_parameters(shortcut) == 0


def test_projection_shortcuts_add_a_1x1_conv_and_norm_per_stage() -> None:
    option_a = parameter_count(resnet(20, CIFAR))
    option_b = parameter_count(resnet(20, CIFAR, shortcut="projection"))
    assert option_b - option_a == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_without_norm_the_convs_take_biases() -> None:
    assert parameter_count(resnet(20, CIFAR, norm=NONE)) == hand_count_resnet(
        3, 3, 10, bn=False, conv_bias=True
    )


def test_pre_activation_blocks_end_with_a_norm_and_act_before_pooling() -> None:
    net = make_net(resnet(20, CIFAR, block="pre_activation"))
    names = [name for name, _ in net.named_children()]
    assert names[:3] == ["flatten", "image", "conv0"]  # no norm or act on the stem: block 1 starts with them
    assert names[-5:] == ["bn_out", "act_out", "gap", "gap_flat", "out"]
    branch = [name for name, _ in blocks(net)[0].branch.named_children()]
    assert branch == ["bn1", "act1", "conv1", "bn2", "act2", "conv2"]
    assert isinstance(blocks(net)[0].after, nn.Identity)
    # Same parameters as v1: the stem's norm moved to the end.
    assert parameter_count(resnet(20, CIFAR, block="pre_activation")) == parameter_count(resnet(20, CIFAR))
    slots = [name for name, _ in norm_slots(net)]
    assert len(slots) == 2 * 9 + 1
    assert slots[:2] == ["block1.branch.bn1", "block1.branch.bn2"]
    assert slots[-1] == "bn_out"


def test_post_activation_block_is_the_formula() -> None:
    torch.manual_seed(0)
    net = make_net(resnet(8, (2, 6, 6), norm=NONE)).eval()
    block = blocks(net)[0]
    conv1, conv2 = block.branch.conv1, block.branch.conv2
    x = torch.randn(3, 16, 6, 6)
    with torch.no_grad():
        expected = torch.relu(conv2(torch.relu(conv1(x))) + x)
        assert torch.allclose(block(x), expected)


def test_resmlp_counts_and_shapes() -> None:
    cfg = resmlp(depth=10, width=32)
    net = make_net(cfg)
    assert len(weight_layers(net)) == 10
    assert len(blocks(net)) == 4
    assert all(isinstance(b.shortcut, nn.Identity) for b in blocks(net))
    linears = 784 * 32 + 4 * 2 * 32 * 32 + 32 * 10 + 10  # no Linear bias: BN's β shifts
    norms = 2 * 32 * (1 + 2 * 4)
    assert count_parameters(net) == linears + norms
    assert net(torch.rand(5, 1, 28, 28)).shape == (5, 10)
    assert len(norm_slots(net)) == 1 + 2 * 4
    # A resmlp takes any input shape, vectors included.
    assert make_net(dataclasses.replace(cfg, input_shape=(40,)))(torch.rand(2, 40)).shape == (2, 10)


@pytest.mark.parametrize("block", ["post_activation", "pre_activation"])
@pytest.mark.parametrize("arch", ["resnet", "resmlp"])
def test_fixup_starts_every_block_as_its_shortcut_and_the_output_at_zero(arch: str, block: str) -> None:
    torch.manual_seed(1)
    cfg = resnet(20, CIFAR, norm=NONE) if arch == "resnet" else resmlp(norm=NONE)
    cfg = dataclasses.replace(cfg, residual_init="fixup", block=block)  # type: ignore[arg-type]
    net = make_net(cfg).eval()
    x = torch.rand(4, *cfg.input_shape)
    with torch.no_grad():
        assert not net(x).any()  # the classifier starts at zero
        h = net[:3](x) if arch == "resnet" else net[:2](x)
        h = torch.relu(h) if block == "post_activation" else h  # a v1 block's input follows a ReLU
        for module in blocks(net):
            out = module(h)
            assert torch.equal(out, module.shortcut(h)), "a Fixup block starts as its shortcut"
            if isinstance(module.shortcut, nn.Identity):
                assert torch.equal(out, h)
            h = out


def test_fixup_scales_the_first_branch_layer_by_l_to_the_minus_half() -> None:
    torch.manual_seed(0)
    cfg = resnet(110, CIFAR, norm=NONE, residual_init="fixup")
    net = make_net(cfg)
    residual = blocks(net)
    assert len(residual) == 54
    deep = residual[-1].branch
    fan_out = 64 * 9
    expected_std = math.sqrt(2 / fan_out) * 54**-0.5  # He-normal (fan_out) × L^(−1/(2m−2)), m = 2
    assert deep.conv1.weight.std().item() == pytest.approx(expected_std, rel=0.03)
    assert not deep.conv2.weight.any()
    assert not net.out.weight.any()
    assert not net.out.bias.any()
    names = [name for name, _ in deep.named_children()]
    assert names == ["bias1a", "conv1", "bn1", "bias1b", "act1", "bias2a", "conv2", "bn2", "scale", "bias2b"]
    assert deep.conv1.bias is None  # scalar biases instead
    # Scalars: 5 per block (4 biases, 1 multiplier), one before the stem's act, one before the fc.
    convs = hand_count_resnet(18, 3, 10, bn=False)
    assert count_parameters(net) == convs + 5 * 54 + 2


def test_fixup_trains_its_zero_layers_at_the_first_step() -> None:
    torch.manual_seed(0)
    net = make_net(resnet(14, FASHION, norm=NONE, residual_init="fixup"))
    loss = nn.functional.cross_entropy(net(torch.rand(8, 1, 28, 28)), torch.arange(8) % 10)
    loss.backward()
    assert net.out.weight.grad is not None
    assert net.out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("block", ["post_activation", "pre_activation"])
def test_skipinit_alpha_starts_at_zero_so_every_block_is_its_shortcut(block: str) -> None:
    torch.manual_seed(2)
    cfg = resnet(20, FASHION, norm=NONE, residual_init="skipinit", block=block)
    net = make_net(cfg).eval()
    residual = blocks(net)
    assert all(b.alpha is not None and b.alpha.item() == 0.0 for b in residual)
    assert count_parameters(net) == parameter_count(dataclasses.replace(cfg, residual_init="default")) + 9
    h = torch.relu(torch.randn(3, 16, 28, 28))
    with torch.no_grad():
        for module in residual:
            out = module(h)
            assert torch.equal(out, module.shortcut(h))
            h = out
    # α learns: its gradient at init is the branch's output against the loss, not zero.
    net.train()
    loss = nn.functional.cross_entropy(net(torch.rand(4, 1, 28, 28)), torch.arange(4))
    loss.backward()
    assert all(b.alpha is not None and b.alpha.grad is not None for b in residual)
    assert (
        sum(abs(b.alpha.grad.item()) for b in residual if b.alpha is not None and b.alpha.grad is not None)
        > 0
    )


def test_the_default_init_without_norm_grows_with_depth_where_fixup_does_not() -> None:
    """Why the trainable inits exist: without BN, each default block adds its branch's variance."""
    torch.manual_seed(0)
    x = torch.rand(16, *SMALL)
    with torch.no_grad():
        plain = make_net(resnet(56, norm=NONE)).eval()
        fixup = make_net(resnet(56, norm=NONE, residual_init="fixup")).eval()
        before_head = {}
        for name, net in (("plain", plain), ("fixup", fixup)):
            features = net[:-1](x) if name == "plain" else net[:-2](x)
            before_head[name] = features.std().item()
    assert before_head["plain"] > 2 * before_head["fixup"]


NORMS = [
    "batch",
    "layer",
    "group",
    "instance",
    "batch_renorm",
    "ghost",
    "weight",
    "batch_layer",
    "noisy_batch",
    "ws",
    "none",
]


@pytest.mark.parametrize("block", ["post_activation", "pre_activation"])
@pytest.mark.parametrize("kind", NORMS)
def test_eval_batch_of_one_equals_the_same_sample_in_a_batch_of_64(kind: str, block: str) -> None:
    torch.manual_seed(3)
    norm = NormConfig(kind=kind, num_groups=8, virtual_batch_size=8, bln_batch_size=16)  # type: ignore[arg-type]
    for cfg in (resnet(8, norm=norm, block=block), resmlp(norm=norm, block=block)):
        if kind == "instance" and cfg.arch == "resmlp":
            continue
        net = make_net(cfg)
        net.train()
        with torch.no_grad():
            for _ in range(3):
                net(torch.rand(16, *cfg.input_shape))
        net.eval()
        batch = torch.rand(64, *cfg.input_shape)
        with torch.no_grad():
            alone, together = net(batch[5:6]), net(batch)[5:6]
        assert torch.allclose(alone, together, atol=1e-5), (kind, cfg.arch)


def trained_a_little(cfg: ModelConfig) -> nn.Sequential:
    torch.manual_seed(4)
    net = make_net(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for _ in range(3):
            net(torch.rand(32, *cfg.input_shape))
    return net.eval()


@pytest.mark.parametrize(
    "cfg",
    [
        resnet(14),
        resnet(14, shortcut="projection"),
        resnet(8, norm=NormConfig(kind="ghost", virtual_batch_size=8)),
        resnet(8, norm=NormConfig(kind="weight")),
        resnet(8, norm=NONE, residual_init="fixup"),
        resnet(8, norm=NONE, residual_init="skipinit"),
        resmlp(),
        resmlp(norm=NormConfig(kind="batch_renorm")),
    ],
    ids=["v1", "projection", "ghost", "weight", "fixup", "skipinit", "resmlp", "resmlp-renorm"],
)
def test_post_activation_blocks_fuse_within_1e_5(cfg: ModelConfig) -> None:
    net = trained_a_little(cfg)
    fused, report = fuse_bn(net)
    assert report.fused, report.reason
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert not any(parametrize.is_parametrized(m) for m in fused.modules())
    x = torch.rand(64, *cfg.input_shape)
    with torch.no_grad():
        expected, got = net(x), fused(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    if cfg.norm.kind == "batch":
        bn_layers = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
        assert len(report.folded) == bn_layers
        assert ("block1.branch.bn1", "block1.branch.conv1") in report.folded or cfg.arch == "resmlp"


@pytest.mark.parametrize("arch", ["resnet", "resmlp"])
def test_pre_activation_blocks_with_bn_stay_unfused_and_say_why(arch: str) -> None:
    cfg = resnet(8, block="pre_activation") if arch == "resnet" else resmlp(block="pre_activation")
    net = trained_a_little(cfg)
    fused, report = fuse_bn(net)
    assert fused is net
    assert not report.fused
    assert report.reason is not None
    assert report.reason.startswith("block1.branch.bn1 has no Linear or Conv")
    assert "pre-activation" in report.reason


def test_a_per_input_norm_inside_a_block_leaves_the_model_unfused() -> None:
    net = trained_a_little(resnet(8, norm=NormConfig(kind="layer")))
    _, report = fuse_bn(net)
    assert not report.fused
    assert report.reason is not None
    assert "bn0 (GroupNorm)" in report.reason


def test_forward_flops_count_the_convs_inside_blocks() -> None:
    cfg = resnet(20, CIFAR)
    conv_flops = 2 * 9 * (3 * 16 * 32 * 32)  # the stem
    c_in, size = 16, 32
    for stage, width in enumerate((16, 32, 64)):
        size = size // 2 if stage else size
        conv_flops += 2 * 9 * (c_in * width + 5 * width * width) * size * size
        c_in = width
    conv_flops += 2 * 64 * 10
    total = forward_flops(cfg)
    assert conv_flops == pytest.approx(2 * 40.6e6, rel=0.01)  # He et al.: ≈ 41M multiply-adds
    assert conv_flops < total < 1.1 * conv_flops
    assert forward_flops(resnet(110, CIFAR)) > 5 * forward_flops(cfg)


def test_weight_norm_reparametrises_every_conv_but_the_classifier() -> None:
    net = make_net(resnet(8, shortcut="projection", norm=NormConfig(kind="weight")))
    layers = weight_layers(net)
    assert [parametrize.is_parametrized(m) for m in layers] == [True] * (len(layers) - 1) + [False]


@pytest.mark.parametrize(
    "cfg",
    [resnet(8, block="pre_activation", shortcut="projection"), resmlp(norm=NONE, residual_init="fixup")],
)
def test_a_checkpoint_rebuilds_the_residual_network(cfg: ModelConfig) -> None:
    net = trained_a_little(cfg)
    data = save_checkpoint(net, cfg)
    loaded, stored = load_checkpoint(data)
    assert stored == cfg
    x = torch.rand(4, *cfg.input_shape)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), net(x))


def test_a_stored_config_from_before_the_residual_fields_builds_the_same_mlp() -> None:
    old = ModelConfig().to_dict()
    for name in ("depth", "width", "block", "shortcut", "residual_init"):
        del old[name]
    assert ModelConfig.from_dict(old) == ModelConfig()


def test_a_100_layer_mlp_builds_and_trains_through_the_fast_path() -> None:
    cfg = ModelConfig(hidden=(128,) * 100, norm=NormConfig(kind="batch"))
    with torch.device("meta"):
        net = make_net(cfg)
    assert len(weight_layers(net)) == 101
    assert len(norm_slots(net)) == 100
    assert count_parameters(net) == 784 * 128 + 128 + 99 * (128 * 128 + 128) + 100 * 2 * 128 + 128 * 10 + 10
    assert MlpStep.for_model(net) is not None
    assert MlpStep.for_model(make_net(resmlp())) is None  # residual blocks train through autograd


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"arch": "resnet", "depth": 21}, r"6n \+ 2"),
        ({"arch": "resmlp", "depth": 7}, r"2·blocks \+ 2"),
        ({"arch": "resnet", "input_shape": (784,)}, "image input"),
        ({"arch": "resnet", "dropout": 0.1}, "dropout"),
        ({"arch": "mlp", "residual_init": "fixup"}, "residual blocks"),
        ({"arch": "resnet", "block": "sideways"}, "block"),
    ],
)
def test_make_net_refuses_what_a_residual_network_cannot_be(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_net(ModelConfig(**fields))  # type: ignore[arg-type]


def test_frn_is_refused_in_residual_blocks() -> None:
    with pytest.raises(ValueError, match="frn ends in its own activation"):
        make_net(resnet(8, norm=NormConfig(kind="frn")))


def test_ws_standardises_every_conv_but_the_classifier_and_convs_keep_their_biases() -> None:
    net = make_net(resnet(8, shortcut="projection", norm=NormConfig(kind="ws")))
    layers = weight_layers(net)
    assert [parametrize.is_parametrized(m) for m in layers] == [True] * (len(layers) - 1) + [False]
    assert all(m.bias is not None for m in layers)  # no norm shifts after them


def test_instance_norm_needs_maps_larger_than_one_by_one() -> None:
    with pytest.raises(ValueError, match="larger than 1×1"):
        make_net(resnet(8, (1, 2, 2), norm=NormConfig(kind="instance")))


def test_every_block_is_a_residual_block_named_in_order() -> None:
    net = make_net(resnet(14))
    names = [name for name, m in net.named_children() if isinstance(m, ResidualBlock)]
    assert names == [f"block{i}" for i in range(1, 7)]
