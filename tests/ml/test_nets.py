"""make_net's structure, and BatchNorm1d held to the oracles of bn-semantics.md §1."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.ml.config import ModelConfig, NormConfig
from service.ml.nets import count_parameters, make_net

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
    assert layer_types(plain) == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]
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
        make_net(ModelConfig(activation="gelu"))  # type: ignore[arg-type]


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
