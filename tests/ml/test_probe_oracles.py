"""The epoch-end probes of issue 21.3, each on a network whose answer is known, and the promise they
all keep: probing changes nothing about training."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.ml import bn_tools, distributed
from service.ml.config import PROBE_NAMES, ModelConfig, NormConfig, TrainConfig
from service.ml.datasets import make_synthetic, train_val_split
from service.ml.nets import make_net, norm_slots
from service.ml.probes import (
    GAMMA_NEAR_ZERO,
    MODEL,
    EpochProbes,
    ProbeValue,
    fit_log_growth,
    probe_gamma,
    probe_gradients,
    probe_percentiles,
    probe_smoothness,
    probe_statistics_gap,
)
from service.ml.training import train
from tests.ml.test_training import Recorder


def as_dict(values: tuple[ProbeValue, ...]) -> dict[tuple[str, str], float]:
    return {(v.layer, v.name): v.value for v in values}


def bn_mlp(hidden: tuple[int, ...] = (16, 8), seed: int = 0, **norm: object) -> nn.Sequential:
    torch.manual_seed(seed)
    return make_net(ModelConfig(hidden=hidden, norm=NormConfig(kind="batch", **norm)))  # type: ignore[arg-type]


def images(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


# --- gradients -------------------------------------------------------------------------------------


def test_gradient_norms_of_a_hand_computed_two_layer_linear_net() -> None:
    # logits = W2 W1 x with W1 = W2 = I: dL/dW2 = (p − e_y) (W1 x)ᵀ and dL/dW1 = W2ᵀ (p − e_y) xᵀ, both
    # of norm ‖p − e_y‖·‖x‖ for p = softmax(x).
    net = nn.Sequential(OrderedDict(fc1=nn.Linear(2, 2, bias=False), out=nn.Linear(2, 2, bias=False)))
    with torch.no_grad():
        net.fc1.weight.copy_(torch.eye(2))
        net.out.weight.copy_(torch.eye(2))
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([0])
    p = torch.softmax(x[0], dim=0)
    expected = math.hypot(p[0].item() - 1, p[1].item()) * math.sqrt(5)

    got = as_dict(probe_gradients(net, x, y, epoch=0))

    assert got["fc1", "grad_norm"] == pytest.approx(expected, rel=1e-6)
    assert got["out", "grad_norm"] == pytest.approx(expected, rel=1e-6)
    assert got["fc1", "weight_norm"] == pytest.approx(math.sqrt(2))
    assert (got["fc1", "depth"], got["out", "depth"]) == (1.0, 2.0)
    assert got[MODEL, "loss"] == pytest.approx(-math.log(p[0].item()), rel=1e-6)
    assert got[MODEL, "log_slope"] == pytest.approx(0.0, abs=1e-9)
    assert got[MODEL, "growth_per_layer"] == pytest.approx(1.0)


def test_the_fitted_growth_of_a_geometric_series_is_its_ratio() -> None:
    slope, growth = fit_log_growth([8.0, 4.0, 2.0, 1.0])  # halving towards the output
    assert slope == pytest.approx(-math.log(2))
    assert growth == pytest.approx(2.0)
    assert all(math.isnan(v) for v in fit_log_growth([3.0]))


def test_a_deep_bn_mlp_explodes_gradients_at_initialisation_and_a_plain_one_does_not() -> None:
    # Yang et al. (2019): at initialisation, gradients of a deep BN network grow geometrically towards
    # the input; the plain ReLU network under PyTorch's default init instead vanishes towards it.
    x, y = images(128)
    growth = {}
    for kind in ("batch", "none"):
        torch.manual_seed(0)
        net = make_net(
            ModelConfig(hidden=(64,) * 24, norm=NormConfig(kind=kind, position="before_activation"))
        )
        growth[kind] = as_dict(probe_gradients(net, x, y, epoch=0))[MODEL, "growth_per_layer"]
    assert growth["batch"] > 1.02
    assert growth["none"] < 1.0


# --- smoothness ------------------------------------------------------------------------------------


def regression(w: list[float]) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    # L(w) = mean over 2 samples of (xᵀw − y)²: ∇L = Xᵀ(Xw − y), Hessian H = XᵀX = diag(9, 1).
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([w]))
    return model, torch.tensor([[3.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0], [1.0]])


def test_a_quadratics_beta_is_its_hessians_norm_along_a_top_eigenvector() -> None:
    # At w = (0, 1) the residual is (−1, 0): g = (−3, 0), an eigenvector of H with eigenvalue 9, so
    # ‖∇L(w − ηg) − g‖ / ‖ηg‖ = ‖Hg‖/‖g‖ = 9 = ‖H‖₂ for every step, and L(w − ηg) = (1 − 9η)²/2.
    model, x, y = regression([0.0, 1.0])
    lr = 0.1
    got = as_dict(probe_smoothness(model, x, y, lr, epoch=0, loss_fn=F.mse_loss))
    assert got[MODEL, "beta"] == pytest.approx(9.0, rel=1e-5)
    assert got[MODEL, "grad_norm"] == pytest.approx(3.0)
    assert got[MODEL, "grad_change_max"] == pytest.approx(9 * 0.4 * lr * 3.0, rel=1e-5)
    assert got[MODEL, "loss_max"] == pytest.approx(0.5)
    assert got[MODEL, "loss_min"] == pytest.approx((1 - 9 * 0.4 * lr) ** 2 / 2, rel=1e-5)
    assert model.weight.tolist() == [[0.0, 1.0]]  # stepped, then put back exactly


def test_a_quadratics_beta_is_below_its_hessians_norm_off_the_eigenvectors() -> None:
    # At w = (0, 0): g = −(3, 1), ‖Hg‖/‖g‖ = ‖(27, 1)‖/‖(3, 1)‖ < 9.
    model, x, y = regression([0.0, 0.0])
    got = as_dict(probe_smoothness(model, x, y, 0.1, epoch=0, loss_fn=F.mse_loss))
    assert got[MODEL, "beta"] == pytest.approx(math.hypot(27, 1) / math.hypot(3, 1), rel=1e-5)


# --- percentiles -----------------------------------------------------------------------------------


def identity_slot() -> nn.Sequential:
    return nn.Sequential(OrderedDict(flatten=nn.Flatten(), bn1=nn.Identity()))


def test_percentiles_of_an_evenly_spaced_input_are_exact() -> None:
    net = identity_slot()
    x = torch.arange(101, dtype=torch.float32).reshape(1, 101)  # 0, 1, …, 100
    got = as_dict(probe_percentiles(net, norm_slots(net), x, epoch=0))
    assert got == pytest.approx({("bn1", "p15"): 15.0, ("bn1", "p50"): 50.0, ("bn1", "p85"): 85.0}, abs=1e-9)


@pytest.mark.parametrize("shape", [(7, 3), (256, 128), (16, 8, 5, 5), (1, 2)])
def test_percentiles_are_torch_quantiles_linear_interpolation_exactly(shape: tuple[int, ...]) -> None:
    # Selected, not sorted: the same numbers as torch.quantile over every value, in float64.
    net = identity_slot()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 5 + 2
    got = as_dict(probe_percentiles(net, norm_slots(net), x, epoch=0))
    want = torch.quantile(x.reshape(-1).double(), torch.tensor([0.15, 0.5, 0.85], dtype=torch.float64))
    assert [got["bn1", f"p{q}"] for q in (15, 50, 85)] == want.tolist()


def test_percentiles_of_an_input_with_a_nan_are_nan_as_torch_quantile_says() -> None:
    net = identity_slot()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    x[3, 5] = math.nan
    got = as_dict(probe_percentiles(net, norm_slots(net), x, epoch=0))
    want = torch.quantile(x.reshape(-1).double(), torch.tensor([0.15, 0.5, 0.85], dtype=torch.float64))
    assert all(math.isnan(v) for v in want.tolist())
    assert all(math.isnan(got["bn1", f"p{q}"]) for q in (15, 50, 85))


def test_percentiles_of_a_standard_normal_input() -> None:
    net = identity_slot()
    x = torch.randn(256, 784, generator=torch.Generator().manual_seed(0))
    got = as_dict(probe_percentiles(net, norm_slots(net), x, epoch=0))
    z85 = 1.0364333894937898  # Φ⁻¹(0.85)
    assert got["bn1", "p15"] == pytest.approx(-z85, abs=0.02)
    assert got["bn1", "p50"] == pytest.approx(0.0, abs=0.02)
    assert got["bn1", "p85"] == pytest.approx(z85, abs=0.02)


# --- gamma -----------------------------------------------------------------------------------------


def test_gamma_set_to_zero_counts_fully_and_the_initial_gamma_not_at_all() -> None:
    net = bn_mlp()
    fresh = as_dict(probe_gamma(net, epoch=0))
    assert fresh == {("bn1", "near_zero_fraction"): 0.0, ("bn1", "abs_mean"): 1.0,
                     ("bn2", "near_zero_fraction"): 0.0, ("bn2", "abs_mean"): 1.0}  # fmt: skip
    with torch.no_grad():
        net.bn1.weight.zero_()
        net.bn2.weight[:2] = GAMMA_NEAR_ZERO / 2  # 2 of 8 just under the threshold
        net.bn2.weight[2:4] = -GAMMA_NEAR_ZERO * 2  # negative ones count by magnitude
    got = as_dict(probe_gamma(net, epoch=1))
    assert got["bn1", "near_zero_fraction"] == 1.0
    assert got["bn1", "abs_mean"] == 0.0
    assert got["bn2", "near_zero_fraction"] == 0.25


def test_networks_without_a_learnt_scale_have_no_gamma_values() -> None:
    torch.manual_seed(0)
    assert probe_gamma(make_net(ModelConfig(hidden=(8,), norm=NormConfig(kind="none"))), epoch=0) == ()
    assert probe_gamma(bn_mlp(affine=False), epoch=0) == ()


# --- statistics gap --------------------------------------------------------------------------------


def test_the_ema_gap_vanishes_after_exact_precise_bn_and_not_before() -> None:
    # One BN layer (the article's MLP): its input does not depend on any normalisation, so PreciseBN's
    # population estimate over the same samples is the exact statistic (up to var's n/(n − 1)).
    torch.manual_seed(0)
    net = make_net(ModelConfig())
    train_x, _ = images(2048, seed=2)
    probe_x, probe_y = images(64, seed=3)
    before = as_dict(probe_statistics_gap(net, train_x.flatten(1), probe_x, probe_y, epoch=0))
    assert before["bn1", "mean_gap"] > 0.5  # running mean 0 against ReLU outputs' positive mean

    calibrated = bn_tools.recalibrate(net, train_x.flatten(1).split(256), "population").model
    after = as_dict(probe_statistics_gap(calibrated, train_x.flatten(1), probe_x, probe_y, epoch=0))
    assert after["bn1", "mean_gap_max"] < 1e-5
    assert after["bn1", "var_gap_max"] < 2 / 2048


def test_train_and_eval_mode_agree_when_the_running_statistics_are_the_probe_batchs() -> None:
    torch.manual_seed(0)
    net = make_net(ModelConfig())
    x, y = images(256, seed=3)
    fresh = as_dict(probe_statistics_gap(net, x.flatten(1), x, y, epoch=0))
    assert fresh[MODEL, "train_loss"] != pytest.approx(fresh[MODEL, "eval_loss"], rel=1e-3)
    calibrated = bn_tools.recalibrate(net, [x], "population").model
    got = as_dict(probe_statistics_gap(calibrated, x.flatten(1), x, y, epoch=0))
    assert got[MODEL, "accuracy_gap"] == 0.0
    assert got[MODEL, "train_accuracy"] == got[MODEL, "eval_accuracy"]
    assert got[MODEL, "train_loss"] == pytest.approx(got[MODEL, "eval_loss"], rel=1e-3)


# --- none of them changes training -----------------------------------------------------------------


def test_every_probe_leaves_mode_parameters_buffers_rng_and_gradients_alone() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden=(16, 8), dropout=0.3, norm=NormConfig(kind="noisy_batch"))
    net = make_net(cfg)
    net.train()
    x, y = images(32)
    net(x)  # move the buffers off their initial values
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    probes = EpochProbes(frozenset(PROBE_NAMES), x, y, norm_slots(net), x.flatten(1))

    values = probes(net, epoch=1, lr=0.01)

    assert {v.probe for v in values} == set(PROBE_NAMES)
    assert net.training
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in net.parameters())
    assert not any(m._forward_pre_hooks for m in net.modules())
    net.eval()
    assert probes(net, epoch=1, lr=0.01) == values  # deterministic, and eval mode is kept too
    assert not net.training


def test_a_run_trains_the_same_with_every_probe_as_with_none() -> None:
    train_set, val_set = train_val_split(make_synthetic(300, seed=0), 0.3)
    cfg = ModelConfig(hidden=(16, 16), norm=NormConfig(kind="batch"))
    runs = {}
    for probes in ((), PROBE_NAMES):
        recorder = Recorder()
        result = train(cfg, TrainConfig(epochs=2, batch_size=32, probes=probes), train_set, val_set, recorder)
        runs[probes] = (result.model.state_dict(), recorder.epochs)
    (plain_state, plain_epochs), (probed_state, probed_epochs) = runs.values()
    assert all(torch.equal(plain_state[k], v) for k, v in probed_state.items())
    assert [m.val_loss for m in plain_epochs] == [m.val_loss for m in probed_epochs]
    assert plain_epochs[0].probes == ()
    # Epoch 1 carries the initial network's values (epoch 0) too; every probe reports.
    assert {(v.epoch, v.probe) for v in probed_epochs[0].probes} == {
        (e, p) for e in (0, 1) for p in PROBE_NAMES
    }
    assert {v.epoch for v in probed_epochs[1].probes} == {2}


def test_a_sync_batch_norm_is_probed_as_batch_norm_without_any_collective(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Only rank 0 probes a data-parallel run: its SyncBatchNorm layers must not all_reduce (the other
    # ranks never join). Here they believe they synchronise: a collective would raise (no group).
    monkeypatch.setattr(distributed, "synchronising", lambda _group: True)
    net = bn_mlp()
    synced = distributed.to_sync_batch_norm(bn_mlp())
    assert isinstance(synced.bn1, distributed.SyncBatchNorm)
    x, y = images(64)
    with pytest.raises((RuntimeError, ValueError)):
        synced.train()(x)  # what the probes must avoid
    plain = as_dict(probe_gradients(net, x, y, epoch=0))
    assert as_dict(probe_gradients(synced, x, y, epoch=0)) == pytest.approx(plain, rel=1e-5)
    assert "forward" not in vars(synced.bn1)  # the class's forward again
