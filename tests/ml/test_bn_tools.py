"""BN tools held to bn-semantics.md: PreciseBN estimators (§5, oracle 9), batch-statistics inference
(§1, oracles 1 and 4), and the buffer summaries."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from service.ml.bn_tools import bn_stats, predict_proba_batch_stats, recalibrate
from service.ml.config import ModelConfig, NormConfig
from service.ml.nets import make_net

BEFORE = ModelConfig(hidden=(16, 8), norm=NormConfig(position="before_activation"))
AFTER = ModelConfig(hidden=(16, 8), norm=NormConfig(position="after_activation"))


def net_for(cfg: ModelConfig) -> nn.Sequential:
    torch.manual_seed(0)
    net = make_net(cfg)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(8, 1, 28, 28))
    return net.eval()


def shifted_batches(n_batches: int, batch_size: int) -> list[torch.Tensor]:
    """Batches whose means differ (as when data arrive ordered), so the two estimators must differ."""
    g = torch.Generator().manual_seed(1)
    return [
        torch.rand(batch_size, 1, 28, 28, generator=g) * 0.5 + 0.4 * (i % 3) / 2 for i in range(n_batches)
    ]


def buffers(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("cfg", [BEFORE, AFTER], ids=["before_activation", "after_activation"])
def test_mean_of_batches_matches_torch_swa_update_bn(cfg: ModelConfig) -> None:
    net = net_for(cfg)
    batches = shifted_batches(12, 5)
    result = recalibrate(net, batches, "mean_of_batches")
    reference = net_for(cfg)
    update_bn(batches, reference)  # type: ignore[arg-type]  # any iterable of tensors works
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert result.batches == 12
    assert result.samples == 60


def test_population_is_mean_and_variance_over_all_samples() -> None:
    net = net_for(BEFORE)
    batches = shifted_batches(10, 3)
    result = recalibrate(net, batches, "population")
    with torch.no_grad():
        inputs_of_bn1 = net.get_submodule("fc1")(torch.cat(batches).flatten(1)).double()
    bn1 = result.model.get_submodule("bn1")
    assert isinstance(bn1, nn.BatchNorm1d)
    assert bn1.running_var is not None
    assert bn1.running_mean is not None
    torch.testing.assert_close(bn1.running_mean, inputs_of_bn1.mean(0).float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        bn1.running_var, inputs_of_bn1.var(0, unbiased=False).float(), atol=1e-6, rtol=1e-5
    )
    assert int(bn1.num_batches_tracked) == 10  # type: ignore[arg-type]


def test_the_two_estimators_differ_measurably_at_batch_size_3() -> None:
    net = net_for(BEFORE)
    batches = shifted_batches(10, 3)
    population = recalibrate(net, batches, "population").model.get_submodule("bn1")
    of_batches = recalibrate(net, batches, "mean_of_batches").model.get_submodule("bn1")
    assert isinstance(population, nn.BatchNorm1d)
    assert isinstance(of_batches, nn.BatchNorm1d)
    assert population.running_var is not None
    assert of_batches.running_var is not None
    relative = (population.running_var - of_batches.running_var).abs() / of_batches.running_var
    assert relative.mean() > 0.05
    # Means agree: equal batch sizes weigh the batches equally in both estimators.
    torch.testing.assert_close(population.running_mean, of_batches.running_mean)


def test_recalibration_freezes_weights_and_leaves_the_original_untouched() -> None:
    net = net_for(AFTER)
    before = buffers(net)
    result = recalibrate(net, shifted_batches(4, 8), "population")
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    changed = {k for k, v in result.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {
        f"bn{i}.{b}" for i in (1, 2) for b in ("running_mean", "running_var", "num_batches_tracked")
    }
    assert not result.model.training


def test_recalibration_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate(net_for(ModelConfig(norm=NormConfig(kind="none"))), shifted_batches(2, 4), "population")
    no_stats = net_for(ModelConfig(norm=NormConfig(track_running_stats=False)))
    with pytest.raises(ValueError, match="track_running_stats"):
        recalibrate(no_stats, shifted_batches(2, 4), "population")
    with pytest.raises(ValueError, match="at least 2 samples"):
        recalibrate(net_for(BEFORE), [torch.rand(1, 1, 28, 28)], "population")
    with pytest.raises(ValueError, match="estimator"):
        recalibrate(net_for(BEFORE), shifted_batches(2, 4), "ema")  # type: ignore[arg-type]


def test_batch_statistics_inference_follows_the_train_mode_formula_and_moves_nothing() -> None:
    cfg = ModelConfig(hidden=(16,), norm=NormConfig(position="before_activation"))
    net = net_for(cfg)
    before = buffers(net)
    x = torch.rand(6, 1, 28, 28)
    got = predict_proba_batch_stats(net, x)
    fc1, bn1, out = (net.get_submodule(n) for n in ("fc1", "bn1", "out"))
    assert isinstance(bn1, nn.BatchNorm1d)
    with torch.no_grad():
        h = fc1(x.flatten(1))
        normalised = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn1.eps) * bn1.weight + bn1.bias
        expected = out(torch.relu(normalised)).softmax(1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not net.training
    # A sample's answer depends on its batch-mates with batch statistics, not with running statistics.
    assert not torch.allclose(predict_proba_batch_stats(net, x[:2])[0], got[0])
    with torch.inference_mode():
        torch.testing.assert_close(net(x[:2]).softmax(1)[0], net(x).softmax(1)[0])
    with pytest.raises(ValueError, match="at least 2 samples"):
        predict_proba_batch_stats(net, x[:1])


def test_bn_stats_summaries() -> None:
    net = net_for(AFTER)
    layers = bn_stats(net, bins=10)
    assert [layer.name for layer in layers] == ["bn1", "bn2"]
    bn1 = net.get_submodule("bn1")
    assert isinstance(bn1, nn.BatchNorm1d)
    assert bn1.running_var is not None
    first = layers[0]
    assert (first.num_features, first.eps, first.momentum, first.num_batches_tracked) == (16, 1e-3, 0.01, 3)
    assert first.running_var is not None
    assert first.weight is not None
    assert first.running_var.min == pytest.approx(bn1.running_var.min().item())
    assert first.running_var.max == pytest.approx(bn1.running_var.max().item())
    assert first.running_var.mean == pytest.approx(bn1.running_var.mean().item(), rel=1e-6)
    assert sum(first.running_var.histogram_counts) == 16
    assert len(first.running_var.histogram_edges) == 11
    assert first.weight.min == first.weight.max == 1.0  # γ at its initial value: a one-value histogram
    assert sum(first.weight.histogram_counts) == 16
    assert bn_stats(net_for(ModelConfig(norm=NormConfig(kind="none")))) == []
    no_stats = bn_stats(net_for(ModelConfig(norm=NormConfig(track_running_stats=False, affine=False))))
    assert no_stats[0].running_mean is None
    assert no_stats[0].num_batches_tracked is None
    assert no_stats[0].weight is None


def test_recalibration_of_batchnorm2d_is_per_channel_over_batch_and_positions() -> None:
    cfg = ModelConfig(arch="cnn", channels=(4,), norm=NormConfig(position="before_activation"))
    net = net_for(cfg)
    batches = shifted_batches(4, 6)
    result = recalibrate(net, batches, "population")
    conv = net.get_submodule("conv1")
    with torch.no_grad():
        inputs = torch.cat([conv(x) for x in batches]).double()  # what bn1 saw: conv1's output
    bn = result.model.get_submodule("bn1")
    assert isinstance(bn, nn.BatchNorm2d)
    torch.testing.assert_close(bn.running_mean.double(), inputs.mean((0, 2, 3)), atol=1e-5, rtol=0)  # type: ignore[union-attr]
    torch.testing.assert_close(
        bn.running_var.double(), inputs.var((0, 2, 3), unbiased=False), atol=1e-5, rtol=0
    )  # type: ignore[union-attr]


def test_norms_without_running_statistics_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="batch, batch_renorm and ghost"):
        recalibrate(
            net_for(ModelConfig(hidden=(8,), norm=NormConfig(kind="layer"))),
            shifted_batches(2, 4),
            "population",
        )


def test_batch_statistics_inference_leaves_dropout_off() -> None:
    net = net_for(ModelConfig(hidden=(16,), dropout=0.5))
    x = torch.rand(8, 1, 28, 28)
    torch.testing.assert_close(predict_proba_batch_stats(net, x), predict_proba_batch_stats(net, x))
