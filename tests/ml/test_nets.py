"""make_net's structure, and BatchNorm1d held to the oracles of bn-semantics.md §1."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from service.ml import nets
from service.ml.config import NORM_KINDS, ModelConfig, NormConfig
from service.ml.nets import (
    count_parameters,
    forward_flops,
    forward_profile,
    make_net,
    norm_slots,
    parameter_count,
)

BN_AFTER = ModelConfig()  # the article's model: Linear -> ReLU -> BN -> Linear
NO_BN = ModelConfig(norm=NormConfig(kind="none"))


def layer_types(net: nn.Module) -> list[type[nn.Module]]:
    return [type(m) for m in net.children()]


def bn_of(net: nn.Module, i: int = 1) -> nn.BatchNorm1d:
    bn = net.get_submodule(f"bn{i}")
    assert isinstance(bn, nn.BatchNorm1d)
    return bn


def test_article_model_with_bn_after_activation() -> None:
    net = make_net(BN_AFTER)
    assert layer_types(net) == [nn.Flatten, nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Linear]
    assert list(net.state_dict()) == [
        "fc1.weight",
        "fc1.bias",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "out.weight",
        "out.bias",
    ]
    # Keras' summary of the article's model: 102,026 trainable (+256 non-trainable moving stats).
    assert count_parameters(net) == 784 * 128 + 128 + 2 * 128 + 128 * 10 + 10 == 102_026


def test_bn_before_activation_and_no_bn() -> None:
    before = make_net(ModelConfig(norm=NormConfig(position="before_activation")))
    assert layer_types(before) == [nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    plain = make_net(NO_BN)
    # The norm slot is there without a norm too (an Identity), so probes compare layer by layer.
    assert layer_types(plain) == [nn.Flatten, nn.Linear, nn.ReLU, nn.Identity, nn.Linear]
    assert list(plain.state_dict()) == ["fc1.weight", "fc1.bias", "out.weight", "out.bias"]
    assert count_parameters(plain) == 101_770


def test_hidden_widths_activation_and_input_shape() -> None:
    cfg = ModelConfig(input_shape=(1, 8, 8), hidden=(32, 16), activation="tanh", num_classes=3)
    net = make_net(cfg)
    assert layer_types(net) == [
        nn.Flatten,
        *(nn.Linear, nn.Tanh, nn.BatchNorm1d),
        *(nn.Linear, nn.Tanh, nn.BatchNorm1d),
        nn.Linear,
    ]
    assert net(torch.rand(5, 1, 8, 8)).shape == (5, 3)
    assert isinstance(make_net(ModelConfig(activation="sigmoid")).get_submodule("act1"), nn.Sigmoid)
    assert bn_of(net, 2).num_features == 16


def test_bn_takes_its_settings_from_the_config() -> None:
    norm = NormConfig(eps=1e-5, momentum=None, affine=False, track_running_stats=False)
    bn = bn_of(make_net(ModelConfig(norm=norm)))
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == (1e-5, None, False, False)
    assert bn.weight is None
    assert bn.running_mean is None


def test_unknown_activation_is_refused() -> None:
    with pytest.raises(ValueError, match="activation"):
        make_net(ModelConfig(activation="swish"))  # type: ignore[arg-type]


def test_oracle1_train_output_is_the_formula_with_biased_variance() -> None:
    net = make_net(BN_AFTER).double()
    bn = bn_of(net)
    torch.manual_seed(1)
    with torch.no_grad():  # non-trivial gamma and beta, so the test also checks the affine part
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    x = torch.randn(64, 128, dtype=torch.float64) * 3 + 1
    bn.train()
    y = bn(x)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    expected = (x - mean) / torch.sqrt(var + BN_AFTER.norm.eps) * bn.weight + bn.bias
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)


def test_oracle2_running_stats_after_one_step() -> None:
    bn = bn_of(make_net(BN_AFTER))
    m = BN_AFTER.norm.momentum
    assert m is not None
    x = torch.randn(32, 128) * 2 + 3
    bn.train()
    bn(x)
    torch.testing.assert_close(bn.running_mean, m * x.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(bn.running_var, (1 - m) + m * x.var(0, unbiased=True), atol=1e-6, rtol=0)
    assert bn.num_batches_tracked is not None
    assert int(bn.num_batches_tracked) == 1


def test_oracle3_momentum_none_is_a_cumulative_average() -> None:
    bn = bn_of(make_net(ModelConfig(norm=NormConfig(momentum=None))))
    batches = [torch.randn(16, 128) * s + s for s in (0.5, 1.0, 4.0)]
    bn.train()
    for x in batches:
        bn(x)
    means = torch.stack([x.mean(0) for x in batches]).mean(0)
    variances = torch.stack([x.var(0, unbiased=True) for x in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, means, atol=1e-5, rtol=0)
    torch.testing.assert_close(bn.running_var, variances, atol=1e-5, rtol=0)


def trained_bn_net() -> nn.Sequential:
    """A BN net whose running buffers moved away from (0, 1), so eval mode is not an identity."""
    torch.manual_seed(0)
    net = make_net(ModelConfig(norm=NormConfig(momentum=0.5)))
    net.train()
    for _ in range(5):
        net(torch.rand(32, 1, 28, 28))
    return net


def test_oracle4_eval_uses_buffers_and_leaves_them_alone() -> None:
    net = trained_bn_net()
    bn = bn_of(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.eval()
    h = torch.rand(64, 128)
    y = bn(h)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert bn.running_mean is not None
    assert bn.running_var is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(y, (h - bn.running_mean) * scale + bn.bias, atol=1e-6, rtol=0)


def test_oracle4_eval_output_does_not_depend_on_the_batch() -> None:
    net = trained_bn_net().eval()
    x = torch.rand(64, 1, 28, 28)
    in_batch = net(x)
    for i in (0, 17, 63):
        torch.testing.assert_close(net(x[i : i + 1]), in_batch[i : i + 1], atol=1e-6, rtol=0)
    # The same check in train mode must fail: that is the difference the test guards.
    net.train()
    assert not torch.allclose(net(x[:2])[0], net(x)[0], atol=1e-6)


def test_training_on_one_sample_raises_but_eval_works() -> None:
    net = trained_bn_net()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        net(torch.rand(1, 1, 28, 28))
    net.eval()
    assert net(torch.rand(1, 1, 28, 28)).shape == (1, 10)


# ------------------------------------------------------------------ cnn, slots, dropout, old configs


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_cnn_blocks_for_grey_and_colour_images(shape: tuple[int, int, int]) -> None:
    cfg = ModelConfig(
        arch="cnn", input_shape=shape, channels=(8, 16), norm=NormConfig(position="before_activation")
    )
    net = make_net(cfg)
    names = list(net._modules)
    assert names == [
        "flatten", "image",
        "conv1", "bn1", "act1", "pool1",
        "conv2", "bn2", "act2", "pool2",
        "gap", "gap_flat", "out",
    ]  # fmt: skip
    assert isinstance(net.get_submodule("bn1"), nn.BatchNorm2d)
    assert net(torch.rand(3, *shape)).shape == (3, 10)
    assert net(torch.rand(3, math.prod(shape))).shape == (3, 10)  # flat input works, as for the mlp
    assert parameter_count(cfg) == count_parameters(net)


def test_pooling_stops_at_one_by_one_maps() -> None:
    net = make_net(ModelConfig(arch="cnn", input_shape=(1, 4, 4), channels=(2, 2, 2, 2)))
    assert [n for n in net._modules if n.startswith("pool")] == ["pool1", "pool2"]
    assert net(torch.rand(2, 1, 4, 4)).shape == (2, 10)


def test_cnn_on_a_vector_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"image input .*\(40,\)"):
        make_net(ModelConfig(arch="cnn", input_shape=(40,)))


@pytest.mark.parametrize("kind", ["none", "batch", "layer", "weight", "batch_layer"])
def test_every_block_has_a_named_norm_slot(kind: str) -> None:
    cfg = ModelConfig(hidden=(16, 8), norm=NormConfig(kind=kind, num_groups=4, bln_batch_size=4))  # type: ignore[arg-type]
    slots = norm_slots(make_net(cfg))
    assert [name for name, _ in slots] == ["bn1", "bn2"]
    assert isinstance(slots[0][1], nn.Identity) == (kind in ("none", "weight"))


def test_dropout_sits_before_or_after_the_norm_slot() -> None:
    before = make_net(ModelConfig(dropout=0.5, dropout_position="before_norm"))
    assert list(before._modules) == ["flatten", "fc1", "act1", "drop1", "bn1", "out"]
    after = make_net(ModelConfig(dropout=0.5, norm=NormConfig(position="before_activation")))
    assert list(after._modules) == ["flatten", "fc1", "bn1", "drop1", "act1", "out"]
    assert list(make_net(ModelConfig())._modules) == ["flatten", "fc1", "act1", "bn1", "out"]  # p = 0: none


def test_a_config_stored_before_the_new_fields_still_loads_and_round_trips() -> None:
    old = {
        "arch": "mlp",
        "input_shape": [1, 28, 28],
        "num_classes": 10,
        "hidden": [128],
        "activation": "relu",
        "norm": {
            "kind": "batch",
            "position": "after_activation",
            "eps": 0.001,
            "momentum": 0.01,
            "affine": True,
            "track_running_stats": True,
        },
    }
    cfg = ModelConfig.from_dict(old)
    assert cfg == ModelConfig()
    rich = ModelConfig(
        arch="cnn",
        channels=(4, 8),
        dropout=0.2,
        dropout_position="before_norm",
        init="glorot",
        init_scale=0.5,
        norm=NormConfig(kind="batch_renorm", center=True, scale=False, rmax=2.0, renorm_warmup_steps=7),
    )
    assert ModelConfig.from_dict(json.loads(json.dumps(rich.to_dict()))) == rich


def test_forward_flops_count_convolutions_by_their_feature_maps() -> None:
    mlp = ModelConfig(norm=NormConfig(kind="none"))
    # 2 per multiply-add of both Linears, plus a few per value of flatten, act and the identity slot.
    assert forward_flops(mlp) == 2 * (784 * 128 + 128 * 10) + 5 * (784 + 128 + 128)
    cnn = ModelConfig(arch="cnn", channels=(32,), norm=NormConfig(kind="none"))
    conv_flops = 2 * 9 * 1 * 32 * 28 * 28
    assert forward_flops(cnn) > conv_flops
    assert count_parameters(make_net(cnn)) < 1000  # few parameters, yet far more flops than the mlp
    assert forward_flops(cnn) > forward_flops(mlp)


def _counting_configs() -> list[ModelConfig]:
    """Every architecture with every norm it accepts (the profile must count them all)."""
    small = {
        "mlp": ModelConfig(hidden=(16, 16)),
        "cnn": ModelConfig(arch="cnn", channels=(8, 8)),
        "resnet": ModelConfig(arch="resnet", depth=8, width=8),
        "resmlp": ModelConfig(arch="resmlp", depth=6, width=16),
        "rnn": ModelConfig(arch="rnn", hidden_size=8, input_shape=(1, 6, 5)),
    }
    configs = []
    for base in small.values():
        for kind in NORM_KINDS:
            cfg = dataclasses.replace(base, norm=NormConfig(kind=kind, num_groups=4, virtual_batch_size=1))
            try:
                with torch.device("meta"):
                    make_net(cfg)
            except ValueError:
                continue  # a combination make_net refuses, as the API does
            configs.append(cfg)
    return configs


@pytest.mark.parametrize("cfg", _counting_configs(), ids=lambda c: f"{c.arch}-{c.norm.kind}")
def test_forward_profile_counts_the_calls_of_a_real_training_pass(cfg: ModelConfig) -> None:
    """The profile counts calls on zeroed weights: the count must be that of the network as
    initialised and trained, the path training takes (noisy BN's noise, batch renorm's clipping)."""
    torch.manual_seed(0)
    net, sample = make_net(cfg).train(), torch.rand(2, *cfg.input_shape)
    counter = nets._Dispatches()  # the profile's own counter, here around a real training pass
    with counter:
        net(sample)
    assert counter.count > 0
    before = torch.get_rng_state()
    assert forward_profile(cfg).calls == counter.count
    assert torch.equal(torch.get_rng_state(), before)  # a run's random stream is not drawn from


def test_a_large_network_is_counted_on_the_meta_device() -> None:
    # On the CPU its counting passes would take over a second and most of a gigabyte.
    channels = (512,) * 8
    cfg = ModelConfig(arch="cnn", channels=channels, input_shape=(1, 128, 128), norm=NormConfig(kind="none"))
    assert not nets.counts_on_cpu(cfg)
    expected, side, previous = 0, 128, 1
    for c in channels:  # 3×3 convolutions, each map halved after its block while it is at least 2×2
        expected += 2 * 9 * previous * c * side * side
        side, previous = (side // 2 if side >= 2 else side), c
    assert forward_profile(cfg).conv_flops == expected
    assert forward_profile(cfg).conv_layers == len(channels)


@pytest.mark.parametrize("cfg", _counting_configs(), ids=lambda c: f"{c.arch}-{c.norm.kind}")
def test_the_meta_device_counts_as_the_cpu_does(cfg: ModelConfig) -> None:
    """Training-mode paths that cannot run on the meta device (batch renorm and noisy BN read numbers
    from tensors) are counted in eval mode there: those differ in their calls."""
    assert nets.counts_on_cpu(cfg)
    on_cpu = nets._measured_profile(cfg, on_cpu=True)
    on_meta = nets._measured_profile(cfg, on_cpu=False)
    if cfg.norm.kind in ("batch_renorm", "noisy_batch"):
        assert dataclasses.replace(on_meta, calls=on_cpu.calls) == on_cpu
    else:
        assert on_meta == on_cpu
