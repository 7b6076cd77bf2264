"""The normalizers that came after BN, each held to its paper's formula (docs/normalizers.md): FRN with
its TLU, scaled weight standardization with the NF-ResNet gains, noisy BN's time-varying noise, and
inference example weighing; each serves in eval mode a sample alone as inside a batch, and fuses or
says why not."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from service.ml.config import ModelConfig, NormConfig
from service.ml.fusion import fuse_bn
from service.ml.nets import make_net
from service.ml.norms import (
    NF_GAMMA,
    BatchRenorm,
    FilterResponseNorm,
    GhostBatchNorm,
    NoisyBatchNorm,
    ScaledWeightStandardization,
    WeighedBatchNorm,
    make_norm,
)
from service.ml.training import build_model

C = 6
F64 = torch.float64


def frn(**changes: object) -> FilterResponseNorm:
    module = make_norm(NormConfig(kind="frn", position="before_activation", **changes), C, spatial=True)  # type: ignore[arg-type]
    assert isinstance(module, FilterResponseNorm)
    module.double()
    with torch.no_grad():
        module.weight.copy_(torch.linspace(0.5, 2, C))
        module.bias.copy_(torch.linspace(-1, 1, C))
        module.tau.copy_(torch.linspace(-0.3, 0.4, C))
        module.eps.fill_(-0.02)  # a learned ε may cross zero: the formula uses |ε|
    return module


def per_channel(t: torch.Tensor, dims: int) -> torch.Tensor:
    return t.reshape(1, -1, *([1] * (dims - 2)))


# ------------------------------------------------------------------------------------- FRN


@pytest.mark.parametrize("shape", [(5, C, 4, 3), (7, C)], ids=["conv", "mlp-1x1"])
def test_frn_is_the_papers_formula_with_the_tlu(shape: tuple[int, ...]) -> None:
    module = frn()
    x = torch.randn(*shape, dtype=F64) * 3 + 0.5
    # ν² = mean of x² over each sample's channel (H, W); a [N, C] feature is a 1×1 map: ν² = x².
    nu2 = x.pow(2).mean((2, 3), keepdim=True) if x.dim() == 4 else x.pow(2)
    x_hat = x / torch.sqrt(nu2 + 0.02)
    y = per_channel(module.weight, x.dim()) * x_hat + per_channel(module.bias, x.dim())
    expected = torch.maximum(y, per_channel(module.tau, x.dim()))
    torch.testing.assert_close(module(x), expected, atol=1e-12, rtol=0)
    assert (module(x) == per_channel(module.tau, x.dim()).expand_as(x)).any()  # the threshold bites


def test_frn_is_per_sample_the_same_in_train_and_eval_and_learns_eps_and_tau() -> None:
    module = frn()
    x = torch.randn(64, C, 3, 3, dtype=F64, requires_grad=True)
    out = module.train()(x)
    torch.testing.assert_close(module.eval()(x), out, atol=0, rtol=0)
    torch.testing.assert_close(module(x[:1]), out[:1], atol=1e-12, rtol=0)
    out.sum().backward()
    assert module.eps.grad is not None
    assert module.eps.grad != 0
    assert module.tau.grad is not None
    assert module.tau.grad.abs().sum() > 0


def test_frn_replaces_the_activation_and_refuses_other_activations_or_positions() -> None:
    cfg = ModelConfig(arch="cnn", channels=(4, 8), norm=NormConfig(kind="frn", position="before_activation"))
    net = make_net(cfg)
    assert [type(net.get_submodule(n)) for n in ("conv1", "bn1", "act1")] == [
        nn.Conv2d,
        FilterResponseNorm,
        nn.Identity,
    ]
    for bad in (
        ModelConfig(norm=NormConfig(kind="frn", position="after_activation")),
        ModelConfig(activation="tanh", norm=NormConfig(kind="frn", position="before_activation")),
    ):
        with pytest.raises(ValueError, match="TLU"):
            make_net(bad)


# ------------------------------------------------------------------------------------- scaled WS


def test_nf_gammas_give_unit_variance_after_the_activation() -> None:
    # γ is defined by Var(γ·g(z)) = 1 for z ~ N(0, 1); ReLU's is the paper's closed form.
    assert NF_GAMMA["relu"] == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)), abs=1e-15)
    z = torch.randn(2_000_000, dtype=F64, generator=torch.Generator().manual_seed(0))
    for name, act in (("relu", torch.relu), ("gelu", nn.functional.gelu), ("tanh", torch.tanh)):
        assert (NF_GAMMA[name] * act(z)).var().item() == pytest.approx(1.0, abs=0.01), name
    assert (NF_GAMMA["sigmoid"] * torch.sigmoid(z)).var().item() == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize(("arch", "activation"), [("mlp", "relu"), ("cnn", "relu"), ("mlp", "tanh")])
def test_ws_weights_are_the_papers_scaled_standardization(arch: str, activation: str) -> None:
    cfg = ModelConfig(
        arch=arch,  # type: ignore[arg-type]
        hidden=(16, 12),
        channels=(4, 6),
        activation=activation,  # type: ignore[arg-type]
        norm=NormConfig(kind="ws"),
    )
    net = make_net(cfg).double()
    names = ("fc1", "fc2") if arch == "mlp" else ("conv1", "conv2")
    for index, name in enumerate(names):
        layer = net.get_submodule(name)
        assert isinstance(layer, nn.Linear | nn.Conv2d)
        assert parametrize.is_parametrized(layer, "weight")
        (standardization,) = net.get_submodule(f"{name}.parametrizations.weight").children()
        assert isinstance(standardization, ScaledWeightStandardization)
        assert standardization.gain is not None
        with torch.no_grad():
            standardization.gain.copy_(torch.linspace(0.5, 2, standardization.gain.shape[0]))
        raw = net.get_parameter(f"{name}.parametrizations.weight.original")
        w = raw.flatten(1)
        fan_in = w.shape[1]
        gamma = 1.0 if index == 0 else NF_GAMMA[activation]  # the first layer sees the data
        expected = (
            standardization.gain[:, None]
            * gamma
            * (w - w.mean(1, keepdim=True))
            / torch.sqrt(fan_in * w.var(1, unbiased=False, keepdim=True))
        )
        torch.testing.assert_close(layer.weight.flatten(1), expected, atol=1e-12, rtol=0)
        # Each unit's standardised weights sum to 0 and have squared norm (g·γ)².
        torch.testing.assert_close(layer.weight.flatten(1).sum(1), torch.zeros(w.shape[0], dtype=F64))
        torch.testing.assert_close(
            layer.weight.flatten(1).pow(2).sum(1), (standardization.gain * gamma) ** 2, atol=1e-10, rtol=0
        )
        # Invariant to a per-unit rescaling and shift of the raw weights, as BN is to its input's.
        before = layer.weight.detach().clone()
        with torch.no_grad():
            raw.mul_(torch.linspace(0.1, 5, raw.shape[0]).reshape(-1, *[1] * (raw.dim() - 1))).add_(0.3)
        torch.testing.assert_close(layer.weight, before, atol=1e-10, rtol=0)
    assert isinstance(net.get_submodule("bn1"), nn.Identity)
    assert not parametrize.is_parametrized(net.get_submodule("out"))  # NF-ResNets' head is plain


def test_ws_without_affine_has_no_gain_and_the_state_dict_rebuilds_the_network() -> None:
    plain_gain = make_net(ModelConfig(norm=NormConfig(kind="ws", affine=False)))
    (standardization,) = plain_gain.get_submodule("fc1.parametrizations.weight").children()
    assert isinstance(standardization, ScaledWeightStandardization)
    assert standardization.gain is None
    cfg = ModelConfig(hidden=(16,), norm=NormConfig(kind="ws"))
    trained, rebuilt = build_model(cfg, 1), build_model(cfg, 2)
    rebuilt.load_state_dict(trained.state_dict())
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(rebuilt(x), trained(x), atol=0, rtol=0)


# ------------------------------------------------------------------------------------- noisy BN


def noisy(momentum: float = 0.1, seed: int = 0, **changes: object) -> NoisyBatchNorm:
    torch.manual_seed(seed)
    module = make_norm(NormConfig(kind="noisy_batch", momentum=momentum, **changes), C, spatial=False)  # type: ignore[arg-type]
    assert isinstance(module, NoisyBatchNorm)
    return module.double()


def test_noisy_bn_is_bn_plus_the_steps_noise_with_bounded_time_varying_mean_and_scale() -> None:
    module, bn = noisy(noise_mean=0.5, noise_std=2.0), make_norm(NormConfig(momentum=0.1), C, spatial=False)
    bn.double()
    previous = None
    for step in range(3):
        x = torch.randn(4096, C, dtype=F64) * 3 + 1
        mean, scale, z = module.draw(x)  # what this step will draw (the stream is keyed on the step)
        assert int(module.noise_step) == step
        y, plain = module(x), bn(x)
        torch.testing.assert_close(y - plain, mean + scale * z, atol=1e-12, rtol=0)
        assert (mean.abs() <= 0.5).all()
        assert ((scale >= 0) & (scale <= 2.0)).all()
        # Per-activation noise, i.i.d. over the samples: its moments per channel are the step's.
        noise = y - plain
        torch.testing.assert_close(noise.mean(0), mean, atol=4 * 2.0 / 64, rtol=0)
        torch.testing.assert_close(noise.std(0), scale, atol=0.1, rtol=0)
        if previous is not None:  # a new distribution every step
            assert not torch.allclose(mean, previous[0])
            assert not torch.allclose(scale, previous[1])
        previous = (mean, scale)
    # The noise comes after BN: the running statistics are exactly BN's.
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(module, name), getattr(bn, name), atol=1e-12, rtol=0)


def test_noisy_bn_is_noise_free_in_eval_and_without_autograd() -> None:
    module = noisy()
    for _ in range(3):
        module(torch.randn(16, C, dtype=F64) + 2)
    bn = make_norm(NormConfig(momentum=0.1), C, spatial=False).double()
    bn.load_state_dict({k: v for k, v in module.state_dict().items() if not k.startswith("noise_")})
    x = torch.randn(64, C, dtype=F64)
    module.eval()
    bn.eval()
    torch.testing.assert_close(module(x), bn(x), atol=0, rtol=0)
    torch.testing.assert_close(module(x[:1]), module(x)[:1], atol=1e-12, rtol=0)
    module.train()
    bn.train()
    step = int(module.noise_step)
    with torch.no_grad():  # recalibration and the batch-statistics answer: plain BN, no draw
        torch.testing.assert_close(module(x), bn(x), atol=1e-12, rtol=0)
    assert int(module.noise_step) == step


def test_noisy_bn_noise_is_set_by_the_run_seed_and_layer_and_resumes_from_the_state_dict() -> None:
    x = torch.randn(32, C, dtype=F64)
    assert torch.equal(noisy(seed=3)(x), noisy(seed=3)(x))
    assert not torch.allclose(noisy(seed=3)(x), noisy(seed=4)(x))
    # Two layers of one network draw different noise; the global RNG is not touched.
    cfg = ModelConfig(hidden=(C, C), norm=NormConfig(kind="noisy_batch"))
    net = build_model(cfg, 5)
    layers = [m for m in net.modules() if isinstance(m, NoisyBatchNorm)]
    assert [int(m.noise_key[0]) for m in layers] == [5, 5]
    assert [int(m.noise_key[1]) for m in layers] == [0, 1]
    first, second = (m.draw(torch.zeros(2, C))[0] for m in layers)
    assert not torch.allclose(first, second)
    images = torch.rand(8, 1, 28, 28)
    state = torch.get_rng_state()
    net.train()(images).sum().backward()
    assert torch.equal(torch.get_rng_state(), state)
    # Same weights as a batch run of the same seed: the noise draws nothing at construction.
    batch_net = build_model(ModelConfig(hidden=(C, C), norm=NormConfig(kind="batch")), 5)
    for name in ("fc1.weight", "fc2.weight", "out.weight"):
        assert torch.equal(net.state_dict()[name], batch_net.state_dict()[name])
    # Resuming: a module restored after 2 steps draws the 3rd step's noise, as the original does.
    original, restored = noisy(seed=7), noisy(seed=8)
    batches = [torch.randn(16, C, dtype=F64) for _ in range(3)]
    original(batches[0])
    original(batches[1])
    restored.load_state_dict(original.state_dict())
    torch.testing.assert_close(restored(batches[2]), original(batches[2]), atol=0, rtol=0)


# ------------------------------------------------------------------------------------- example weighing


def weighed(alpha: float, kind: str = "batch") -> nn.Module:
    cfg = NormConfig(kind=kind, example_weight=alpha, momentum=0.5, virtual_batch_size=4)  # type: ignore[arg-type]
    module = make_norm(cfg, C, spatial=True).double()
    with torch.no_grad():
        module.get_parameter("weight").copy_(torch.linspace(0.5, 2, C))
        module.get_parameter("bias").copy_(torch.linspace(-1, 1, C))
    for _ in range(4):
        module(torch.randn(8, C, 3, 3, dtype=F64) * 2 + 1)
    return module.eval()


def summers_formula(module: nn.Module, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Summers & Dinneen 2020 §3: μ_i = α·E[x_i] + (1 − α)·μ, σ²_i = α·E[x_i²] + (1 − α)(σ² + μ²) − μ_i²,
    E over the example's own positions, μ and σ² the population (running) statistics."""
    dims = x.dim()
    own = tuple(range(2, dims))
    mean_x = x.mean(own, keepdim=True) if own else x
    mean_x2 = x.pow(2).mean(own, keepdim=True) if own else x.pow(2)
    mu, var = (
        per_channel(module.get_buffer("running_mean"), dims),
        per_channel(module.get_buffer("running_var"), dims),
    )
    mu_i = alpha * mean_x + (1 - alpha) * mu
    var_i = alpha * mean_x2 + (1 - alpha) * (var + mu**2) - mu_i**2
    x_hat = (x - mu_i) / torch.sqrt(var_i + 1e-3)
    weight, bias = module.get_parameter("weight"), module.get_parameter("bias")
    return per_channel(weight, dims) * x_hat + per_channel(bias, dims)


@pytest.mark.parametrize("kind", ["batch", "ghost", "batch_renorm", "noisy_batch"])
@pytest.mark.parametrize("shape", [(64, C, 3, 3), (64, C)], ids=["conv", "mlp"])
def test_example_weighing_is_the_papers_formula_and_per_sample(kind: str, shape: tuple[int, ...]) -> None:
    alpha = 0.2
    module = weighed(alpha, kind)
    x = torch.randn(*shape, dtype=F64) * 1.5 - 0.5
    out = module(x)
    torch.testing.assert_close(out, summers_formula(module, x, alpha), atol=1e-10, rtol=0)
    # The example's own statistics are per sample: alone it is normalised as inside any batch.
    torch.testing.assert_close(module(x[:1]), out[:1], atol=1e-12, rtol=0)
    torch.testing.assert_close(module(x[5:9]), out[5:9], atol=1e-12, rtol=0)
    # α = 0 is BN with the population statistics.
    assert isinstance(module, WeighedBatchNorm | GhostBatchNorm | BatchRenorm)
    module.example_weight = 0.0
    expected = summers_formula(module, x, 0.0)
    torch.testing.assert_close(module(x), expected, atol=1e-10, rtol=0)


def test_example_weighing_trains_as_batch_norm() -> None:
    torch.manual_seed(0)
    module = make_norm(NormConfig(example_weight=0.3, momentum=0.2), C, spatial=False)
    assert isinstance(module, WeighedBatchNorm)
    bn = make_norm(NormConfig(momentum=0.2), C, spatial=False)
    assert type(bn) is nn.BatchNorm1d  # α = 0 keeps PyTorch's module (and the fast path)
    for _ in range(3):
        x = torch.randn(16, C) * 2 + 1
        torch.testing.assert_close(module(x), bn(x), atol=0, rtol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(module.get_buffer(name), bn.get_buffer(name), atol=0, rtol=0)
    assert isinstance(weighed(0.1, "ghost"), GhostBatchNorm)


# ------------------------------------------------------------------------------------- fusion and serving


NEW_KINDS = [
    ModelConfig(arch=arch, hidden=(24, 16), channels=(4, 8), norm=norm)
    for arch in ("mlp", "cnn")
    for norm in (
        NormConfig(kind="frn", position="before_activation"),
        NormConfig(kind="ws"),
        NormConfig(kind="noisy_batch", position="before_activation", momentum=0.3),
        NormConfig(kind="noisy_batch", position="after_activation", momentum=0.3),
        NormConfig(kind="batch", position="before_activation", example_weight=0.1, momentum=0.3),
    )
]


def new_id(cfg: ModelConfig) -> str:
    n = cfg.norm
    return f"{cfg.arch}-{n.kind}-{n.position}" + (f"-alpha{n.example_weight}" if n.example_weight else "")


@pytest.mark.parametrize("cfg", NEW_KINDS, ids=new_id)
def test_new_kinds_fuse_within_1e_5_or_say_why_and_serve_a_sample_alone_as_in_a_batch(
    cfg: ModelConfig,
) -> None:
    net = build_model(cfg, 0)
    assert isinstance(net, nn.Sequential)
    net.train()
    for _ in range(3):
        net(torch.rand(16, 1, 28, 28)).sum().backward()
    net.eval()
    x = torch.rand(64, 1, 28, 28)
    with torch.inference_mode():
        many = net(x)
        torch.testing.assert_close(net(x[:1]), many[:1], atol=1e-6, rtol=0)
    fused, report = fuse_bn(net)
    per_input = cfg.norm.kind == "frn" or cfg.norm.example_weight > 0
    cnn_bn_after_act = cfg.arch == "cnn" and cfg.norm.position == "after_activation" and cfg.norm.kind != "ws"
    assert report.fused == (not per_input and not cnn_bn_after_act), report.reason
    if not report.fused:
        assert fused is net
        assert report.reason is not None
        assert "bn1" in report.reason
        return
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert not any(parametrize.is_parametrized(m) for m in fused.modules())
    if cfg.norm.kind == "ws":
        assert [label for label, _ in report.folded][0].endswith(".weight_standardization")
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), many, atol=1e-5, rtol=0)
