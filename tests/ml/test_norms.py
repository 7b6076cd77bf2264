"""Every normaliser held to bn-semantics.md: oracles 5, 6, 8 and 10, and each §3 kind's defining
equation (renorm's r/d clipping and warm-up, ghost = BN per chunk, weight norm, Batch Layer Norm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from service.ml.config import ModelConfig, NormConfig
from service.ml.nets import make_net
from service.ml.norms import BatchLayerNorm, BatchRenorm, GhostBatchNorm, end_epoch, ghost_chunks, make_norm

C = 6


def tensor(module: nn.Module, name: str) -> torch.Tensor:
    """A parameter or buffer by name (make_norm returns a plain nn.Module to the type checker)."""
    value = dict([*module.named_parameters(), *module.named_buffers()])[name]
    assert isinstance(value, torch.Tensor)
    return value


def renorm(**changes: object) -> BatchRenorm:
    cfg = NormConfig(kind="batch_renorm", **changes)  # type: ignore[arg-type]
    module = make_norm(cfg, C, spatial=False)
    assert isinstance(module, BatchRenorm)
    return module


def test_oracle5_one_value_per_channel_raises_but_a_2x2_map_trains() -> None:
    bn2d = make_norm(NormConfig(), C, spatial=True, positions=4)
    assert isinstance(bn2d, nn.BatchNorm2d)
    assert bn2d(torch.randn(1, C, 2, 2)).shape == (1, C, 2, 2)
    ghost = make_norm(NormConfig(kind="ghost"), C, spatial=True)
    for module, x in (
        (bn2d, torch.randn(1, C, 1, 1)),
        (renorm(), torch.randn(1, C)),
        (ghost, torch.randn(1, C, 1, 1)),
    ):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            module(x)


def test_oracle6_without_running_stats_eval_uses_batch_statistics() -> None:
    bn = make_norm(NormConfig(affine=False, track_running_stats=False), C, spatial=False).eval()
    x = torch.randn(16, C, dtype=torch.float64) * 3 + 2
    bn.double()
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-3)
    torch.testing.assert_close(bn(x), expected, atol=1e-12, rtol=0)


def test_oracle8_keras_momentum_conversion_tracks_means_exactly_and_variances_by_the_bessel_term() -> None:
    keras_momentum = 0.99
    m = 1 - keras_momentum
    bn = make_norm(NormConfig(momentum=m, eps=1e-3), C, spatial=False).double().train()
    rng = np.random.default_rng(0)
    moving_mean, moving_var = np.zeros(C), np.ones(C)
    n = 8
    expected_gap = np.zeros(C)
    for step in range(5):
        x = rng.normal(step, 1 + step, size=(n, C))
        bn(torch.from_numpy(x))
        # Keras' BatchNormalization update: moving = moving·momentum + batch·(1 − momentum), biased var.
        moving_mean = moving_mean * keras_momentum + x.mean(0) * (1 - keras_momentum)
        moving_var = moving_var * keras_momentum + x.var(0) * (1 - keras_momentum)
        # Each step adds m·σ²_B/(n−1) to the gap, which then decays like the buffers themselves.
        expected_gap = expected_gap * (1 - m) + m * x.var(0) / (n - 1)
    running_mean, running_var = tensor(bn, "running_mean").numpy(), tensor(bn, "running_var").numpy()
    np.testing.assert_allclose(running_mean, moving_mean, atol=1e-12, rtol=0)
    np.testing.assert_allclose(running_var - moving_var, expected_gap, atol=1e-12, rtol=0)
    assert (expected_gap > 0).all()  # the two conventions really do differ


def test_oracle10_group_norm_extremes_are_layer_and_instance_norm() -> None:
    x = torch.randn(4, C, 5, 5, dtype=torch.float64) * 2 + 1
    layer = make_norm(NormConfig(kind="layer", affine=False), C, spatial=True, positions=25).double()
    assert isinstance(layer, nn.GroupNorm)
    assert layer.num_groups == 1
    reference = nn.LayerNorm([C, 5, 5], eps=1e-3, elementwise_affine=False).double()
    torch.testing.assert_close(layer(x), reference(x), atol=1e-12, rtol=0)
    group_c = NormConfig(kind="group", num_groups=C, affine=False)
    per_channel = make_norm(group_c, C, spatial=True, positions=25).double()
    instance = make_norm(
        NormConfig(kind="instance", affine=False, track_running_stats=False), C, spatial=True, positions=25
    ).double()
    torch.testing.assert_close(per_channel(x), instance(x), atol=1e-12, rtol=0)


def test_mlp_layer_and_group_norm_normalise_each_sample() -> None:
    x = torch.randn(3, 8, dtype=torch.float64) * 5 + 3
    group = make_norm(NormConfig(kind="group", num_groups=2, affine=False), 8, spatial=False).double()
    halves = x.reshape(3, 2, 4)
    expected = (halves - halves.mean(2, keepdim=True)) / torch.sqrt(
        halves.var(2, unbiased=False, keepdim=True) + 1e-3
    )
    torch.testing.assert_close(group(x), expected.reshape(3, 8), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="does not divide"):
        make_norm(NormConfig(kind="group", num_groups=3), 8, spatial=False)
    with pytest.raises(ValueError, match="spatial"):
        make_norm(NormConfig(kind="instance"), 8, spatial=False)


def test_keras_center_without_scale_learns_only_beta() -> None:
    module = make_norm(NormConfig(center=True, scale=False), C, spatial=False)
    assert module.weight is None
    assert isinstance(module.bias, nn.Parameter)
    x = torch.randn(10, C)
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-3) + module.bias
    torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- batch renorm


def test_renorm_warmup_schedule_follows_the_paper() -> None:
    module = renorm()  # defaults: plain BN for 5k steps, rmax 3 at 40k, dmax 5 at 25k
    assert module.limits(0) == (1.0, 0.0)
    assert module.limits(5000) == (1.0, 0.0)
    assert module.limits(22500) == pytest.approx((1 + 2 * 17500 / 35000, 5 * 17500 / 20000))
    assert module.limits(25000) == pytest.approx((1 + 2 * 20000 / 35000, 5.0))
    assert module.limits(40000) == (3.0, 5.0)
    assert module.limits(10**6) == (3.0, 5.0)
    short = renorm(renorm_warmup_steps=10, renorm_rmax_steps=20, renorm_dmax_steps=30, rmax=2.0, dmax=1.0)
    assert short.limits(15) == pytest.approx((1.5, 0.25))


def test_renorm_during_warmup_is_batch_norm_with_the_same_running_statistics() -> None:
    torch.manual_seed(0)
    module, bn = renorm(momentum=0.2), make_norm(NormConfig(momentum=0.2), C, spatial=False)
    for _ in range(4):
        x = torch.randn(12, C) * 2 + 1
        torch.testing.assert_close(module(x), bn(x), atol=1e-5, rtol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(module, name), getattr(bn, name), atol=1e-6, rtol=0)


def test_renorm_clips_r_and_d_at_the_step_in_its_buffer_and_passes_no_gradient_through_them() -> None:
    module = renorm(rmax=1.5, dmax=0.5, renorm_warmup_steps=0, renorm_rmax_steps=0, renorm_dmax_steps=0)
    module.double()
    assert module.running_mean is not None
    assert module.running_var is not None
    module.running_mean.fill_(0.3)
    module.running_var.fill_(4.0)
    x = (torch.randn(16, C, dtype=torch.float64) * torch.linspace(0.5, 6, C) + 2).requires_grad_()
    y = module(x)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    sigma_b, sigma = torch.sqrt(var + 1e-3), torch.sqrt(torch.tensor(4.0 + 1e-3, dtype=torch.float64))
    r = (sigma_b.detach() / sigma).clamp(1 / 1.5, 1.5)
    d = ((mean.detach() - 0.3) / sigma).clamp(-0.5, 0.5)
    expected = (x - mean) / sigma_b * r + d
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)
    assert (r == 1.5).any()
    assert (r == 1 / 1.5).any()
    assert (d.abs() == 0.5).any()
    weights = torch.randn_like(y)
    (grad,) = torch.autograd.grad((y * weights).sum(), x)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(grad, expected_grad, atol=1e-10, rtol=0)
    # With gradient through r (not detached), the gradient differs: the detach is what is tested.
    x2 = x.detach().requires_grad_()
    sb = torch.sqrt(x2.var(0, unbiased=False) + 1e-3)
    through = (x2 - x2.mean(0)) / sb * (sb / sigma) + (x2.mean(0) - 0.3) / sigma
    (grad_through,) = torch.autograd.grad((through * weights).sum(), x2)
    assert not torch.allclose(grad_through, grad, atol=1e-6)


def test_renorm_schedule_resumes_from_the_state_dict() -> None:
    module = renorm(renorm_warmup_steps=1, renorm_rmax_steps=3, renorm_dmax_steps=3)
    module(torch.randn(8, C))
    module(torch.randn(8, C))
    restored = renorm(renorm_warmup_steps=1, renorm_rmax_steps=3, renorm_dmax_steps=3)
    restored.load_state_dict(module.state_dict())
    assert restored.num_batches_tracked is not None
    assert int(restored.num_batches_tracked) == 2
    assert restored.limits(int(restored.num_batches_tracked)) == pytest.approx((1 + 2 / 2, 5 / 2))


# ------------------------------------------------------------------------------------- ghost BN


@pytest.mark.parametrize("spatial", [False, True])
def test_ghost_is_batch_norm_per_chunk_with_shared_running_statistics(spatial: bool) -> None:
    cfg = NormConfig(kind="ghost", virtual_batch_size=4, momentum=0.3)
    ghost = make_norm(cfg, C, spatial=spatial, positions=9)
    assert isinstance(ghost, GhostBatchNorm)
    bn = make_norm(NormConfig(momentum=0.3), C, spatial=spatial, positions=9)
    with torch.no_grad():
        for module in (ghost, bn):
            tensor(module, "weight").copy_(torch.linspace(0.5, 2, C))
            tensor(module, "bias").copy_(torch.linspace(-1, 1, C))
    x = torch.randn(12, C, 3, 3) * 2 + 1 if spatial else torch.randn(12, C) * 2 + 1
    expected = torch.cat([bn(chunk) for chunk in x.tensor_split(3)])
    torch.testing.assert_close(ghost(x), expected, atol=1e-6, rtol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ghost, name), getattr(bn, name), atol=1e-6, rtol=0)
    assert not torch.allclose(ghost(x), make_norm(NormConfig(momentum=0.3), C, spatial=spatial)(x), atol=1e-3)


def test_ghost_chunks_rule() -> None:
    assert [ghost_chunks(n, 4) for n in (16, 12, 10, 5, 3, 2)] == [4, 3, 3, 2, 1, 1]
    # A final partial batch of 5 with virtual size 4 is two chunks of 3 and 2, never one of 1.
    assert [len(c) for c in torch.zeros(5).tensor_split(ghost_chunks(5, 4))] == [3, 2]


# ------------------------------------------------------------------------------------- weight norm


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_weight_norm_is_g_times_v_over_its_norm_per_output_unit(arch: str) -> None:
    cfg = ModelConfig(arch=arch, hidden=(16,), channels=(4,), norm=NormConfig(kind="weight"))  # type: ignore[arg-type]
    torch.manual_seed(3)
    net = make_net(cfg)
    torch.manual_seed(3)
    plain = make_net(ModelConfig(arch=arch, hidden=(16,), channels=(4,), norm=NormConfig(kind="none")))  # type: ignore[arg-type]
    layer_name = "fc1" if arch == "mlp" else "conv1"
    layer = net.get_submodule(layer_name)
    g = tensor(layer, "parametrizations.weight.original0")
    v = tensor(layer, "parametrizations.weight.original1")
    with torch.no_grad():
        g.mul_(torch.linspace(0.5, 2, g.shape[0]).reshape(g.shape))
    norms = v.flatten(1).norm(dim=1).reshape(g.shape)
    torch.testing.assert_close(layer.weight, g * v / norms, atol=1e-6, rtol=0)
    # At initialisation g = ‖v‖: the network starts from the weights PyTorch drew.
    torch.testing.assert_close(v, tensor(plain.get_submodule(layer_name), "weight"), atol=0, rtol=0)
    assert isinstance(net.get_submodule("bn1"), nn.Identity)


# ------------------------------------------------------------------------------------- batch-layer norm


def bln(track: bool = True, batch_size: int = 8) -> BatchLayerNorm:
    cfg = NormConfig(kind="batch_layer", bln_batch_size=batch_size, track_running_stats=track)
    module = make_norm(cfg, C, spatial=False)
    assert isinstance(module, BatchLayerNorm)
    return module.double()


def bln_formula(
    x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, batch: int, module: BatchLayerNorm
) -> torch.Tensor:
    eps = 1e-3
    x_b = (x - mean) / torch.sqrt(var + eps)
    x_f = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + eps)
    mixed = (x_f * (1 / batch - 1e-4) + x_b * (1 - 1 / batch - 1e-4)) / np.sqrt(C)
    result: torch.Tensor = tensor(module, "weight") * mixed + tensor(module, "bias")
    return result


def test_bln_training_output_is_the_authors_formula() -> None:
    module = bln().train()
    with torch.no_grad():
        assert module.weight is not None
        assert module.bias is not None
        module.weight.copy_(torch.linspace(0.5, 2, C))
        module.bias.copy_(torch.linspace(-1, 1, C))
    x = torch.randn(8, C, dtype=torch.float64) * 3 + 1
    expected = bln_formula(x, x.mean(0), x.var(0, unbiased=False), 8, module)
    torch.testing.assert_close(module(x), expected, atol=1e-12, rtol=0)


def test_bln_population_statistics_are_per_epoch_averages_with_bessel() -> None:
    module = bln().train()
    epoch1 = [torch.randn(8, C, dtype=torch.float64) * s + s for s in (1.0, 2.0, 3.0)]
    for x in epoch1:
        module(x)
    assert module.running_var is not None
    torch.testing.assert_close(module.running_var, torch.ones(C, dtype=torch.float64))  # not before end_epoch
    end_epoch(module)
    torch.testing.assert_close(module.running_mean, torch.stack([x.mean(0) for x in epoch1]).mean(0))
    torch.testing.assert_close(
        module.running_var, torch.stack([x.var(0, unbiased=True) for x in epoch1]).mean(0)
    )
    epoch2 = [torch.randn(8, C, dtype=torch.float64) - 4 for _ in range(2)]
    for x in epoch2:
        module(x)
    end_epoch(module)  # the new epoch's averages alone: epoch 1 was forgotten
    torch.testing.assert_close(module.running_mean, torch.stack([x.mean(0) for x in epoch2]).mean(0))
    module.eval()
    x = torch.randn(5, C, dtype=torch.float64)
    expected = bln_formula(x, module.running_mean, module.running_var, 8, module)
    torch.testing.assert_close(module(x), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(module(x[:1]), expected[:1], atol=1e-12, rtol=0)  # B stays the training size


def test_bln_without_running_stats_uses_the_batch_in_eval() -> None:
    module = bln(track=False).eval()
    x = torch.randn(6, C, dtype=torch.float64)
    expected = bln_formula(x, x.mean(0), x.var(0, unbiased=False), 8, module)
    torch.testing.assert_close(module(x), expected, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="bln_batch_size"):
        make_norm(NormConfig(kind="batch_layer"), C, spatial=False)
