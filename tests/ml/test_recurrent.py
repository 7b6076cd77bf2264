"""The rnn arch (service/ml/recurrent.py) held to its oracles: the plain cells against torch.nn.LSTM and
torch.nn.GRU given the same weights; recurrent BN's per-step batch and running statistics, layer norm
and batch-layer norm against hand-written loops over the time steps (docs/normalizers.md); eval mode
serving a sample alone as inside a batch; the flops count of all T steps; what it cannot do, said."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load, save
from torch import nn

from service.ml import nets, probes, recurrent
from service.ml.config import ModelConfig, NormConfig
from service.ml.fusion import fuse_bn
from service.ml.norms import BLN_OFFSET, end_epoch, uses_batch_statistics
from service.ml.recurrent import (
    GRULayer,
    LSTMLayer,
    RecurrentBatchLayerNorm,
    RecurrentBatchNorm,
    RecurrentLayer,
    sequence_shape,
)

F64 = torch.float64
H = 5
EPS = 1e-3


def rnn(
    cell: str = "lstm", kind: str = "none", *, shape: tuple[int, ...] = (6, 3), **norm: object
) -> nn.Sequential:
    norm_cfg = NormConfig(kind=kind, position="before_activation", bln_batch_size=8, **norm)  # type: ignore[arg-type]
    cfg = ModelConfig(arch="rnn", input_shape=shape, cell=cell, hidden_size=H, layers=1, norm=norm_cfg)  # type: ignore[arg-type]
    torch.manual_seed(0)
    net = nets.make_net(cfg).double()
    with torch.no_grad():  # γ and β away from their init, so a formula that ignores them fails
        for name, p in net.named_parameters():
            if ".bn" in name:
                p.add_(torch.rand_like(p) * 0.5)
    return net


def layer_of(net: nn.Module) -> RecurrentLayer:
    layer = net.get_submodule("cell1")
    assert isinstance(layer, RecurrentLayer)
    return layer


def bn_formula(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    y = (x - mean) / torch.sqrt(var + EPS)
    y = y * norm.weight if norm.weight is not None else y
    return y + norm.bias if norm.bias is not None else y


def ln_formula(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    return bn_formula(x, mean, var, norm)


def hand_lstm(layer: LSTMLayer, x: torch.Tensor, normalise: object) -> torch.Tensor:
    """The LSTM of Cooijmans et al. eq. 6–8, step by step, with `normalise(slot, value, t)`."""
    n, steps, _ = x.shape
    h = torch.zeros(n, H, dtype=F64)
    c = torch.zeros(n, H, dtype=F64)
    for t in range(steps):
        wx = x[:, t] @ layer.ih.weight.T
        wh = h @ layer.hh.weight.T
        gates = normalise("bn1", wx, t) + normalise("bn2", wh, t) + layer.bias  # type: ignore[operator]
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(normalise("bn3", c, t))  # type: ignore[operator]
    return h


def sequences(n: int = 8, steps: int = 6, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, steps, 3, generator=generator, dtype=F64) * 2 + 0.3


# ------------------------------------------------------------------------- plain cells: torch's


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_plain_cells_equal_torch_given_the_same_weights(cell: str) -> None:
    cfg = ModelConfig(
        arch="rnn", input_shape=(7, 3), cell=cell, hidden_size=H, layers=2, norm=NormConfig(kind="none")
    )  # type: ignore[arg-type]
    net = nets.make_net(cfg).double().eval()
    reference = (nn.LSTM if cell == "lstm" else nn.GRU)(3, H, num_layers=2, batch_first=True).double()
    with torch.no_grad():
        for k in range(2):
            layer = net.get_submodule(f"cell{k + 1}")
            getattr(reference, f"weight_ih_l{k}").copy_(layer.ih.weight)
            getattr(reference, f"weight_hh_l{k}").copy_(layer.hh.weight)
            getattr(reference, f"bias_ih_l{k}").copy_(layer.bias)
            # An LSTM's single bias b is torch's b_ih + b_hh; a GRU keeps torch's two.
            bias_hh = layer.bias_hh if cell == "gru" else torch.zeros_like(layer.bias)
            getattr(reference, f"bias_hh_l{k}").copy_(bias_hh)
    x = sequences(steps=7)
    outputs, _ = reference(x)
    expected = net.get_submodule("out")(outputs[:, -1])
    torch.testing.assert_close(net(x), expected)


def plain(cell: str, dtype: torch.dtype) -> nn.Sequential:
    cfg = ModelConfig(
        arch="rnn", input_shape=(7, 3), cell=cell, hidden_size=H, layers=2, norm=NormConfig(kind="none")
    )  # type: ignore[arg-type]
    torch.manual_seed(0)
    return nets.make_net(cfg).to(dtype)


def outputs_and_gradients(
    net: nn.Module, x: torch.Tensor, *, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits on `x` and the gradients of a loss that weighs every logit differently."""
    monkeypatch.setattr(recurrent, "USE_FUSED_KERNELS", fused)
    net.zero_grad(set_to_none=True)
    logits = net(x)
    weights = torch.linspace(-1, 2, logits.numel(), dtype=logits.dtype).reshape(logits.shape)
    (logits * weights).sum().backward()
    return logits.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("dtype", "tolerance"), [(F64, 1e-12), (torch.float32, 1e-6)], ids=["f64", "f32"])
def test_the_fused_kernel_computes_what_the_step_loop_does(
    cell: str, train: bool, dtype: torch.dtype, tolerance: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.lstm / torch.gru on the layer's own parameters: outputs and every parameter's gradient as
    the step loop's, up to float rounding (the products are summed in another order)."""
    net = plain(cell, dtype).train(train)
    assert all(layer.runs_fused() for layer in recurrent.layers(net))
    x = sequences(steps=7).to(dtype)
    loop, loop_grads = outputs_and_gradients(net, x, fused=False, monkeypatch=monkeypatch)
    fused, fused_grads = outputs_and_gradients(net, x, fused=True, monkeypatch=monkeypatch)
    assert len(fused_grads) == len(loop_grads) == len(list(net.parameters()))
    torch.testing.assert_close(fused, loop, rtol=0, atol=tolerance)
    for got, expected in zip(fused_grads, loop_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)
    with torch.inference_mode():  # how evaluate and serving call it
        torch.testing.assert_close(net(x), loop, rtol=0, atol=tolerance)


def test_normalised_or_observed_cells_run_the_step_loop() -> None:
    """Only a plain cell nobody hooks runs fused: a norm in the cell, or a hook on a product or a slot
    (what the probes and the flops count register), needs each step's call."""
    assert not any(layer.runs_fused() for layer in recurrent.layers(rnn("lstm", "batch")))
    layer = layer_of(plain("lstm", F64))
    assert layer.runs_fused()
    for module in (layer.ih, layer.hh, layer.bn1, layer.bn3):
        handle = module.register_forward_pre_hook(lambda *_: None)
        assert not layer.runs_fused()
        handle.remove()
    assert layer.runs_fused()


def test_probes_of_a_plain_cell_see_the_last_steps_slot_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    net = plain("lstm", torch.float32)
    x = torch.randn(16, 7, 3)
    slots = nets.norm_slots(net)
    seen = probes.probe_slot_inputs(net, slots, x, epoch=1)
    monkeypatch.setattr(recurrent, "USE_FUSED_KERNELS", False)
    assert probes.probe_slot_inputs(net, slots, x, epoch=1) == seen
    assert [s.layer for s in seen] == [f"cell{k}.bn{j}" for k in (1, 2) for j in (1, 2, 3)]
    # bn1's input at the last step is W_x·x_T, which the recorded mean is of.
    last = net.get_submodule("cell1").ih(x[:, -1]).detach().double()
    assert seen[0].input_mean == pytest.approx(last.mean().item())


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_weights_saved_by_the_step_loop_load_and_run_fused(
    cell: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint's keys are the cell's own (no flat torch.nn.LSTM weights): old ones load unchanged."""
    monkeypatch.setattr(recurrent, "USE_FUSED_KERNELS", False)
    old = plain(cell, torch.float32).eval()
    x = torch.randn(4, 7, 3)
    with torch.no_grad():
        expected = old(x)
    biases = ["bias", "bias_hh"] if cell == "gru" else ["bias"]
    keys = [f"cell{k}.{name}" for k in (1, 2) for name in ("ih.weight", "hh.weight", *biases)]
    assert sorted(old.state_dict()) == sorted([*keys, "out.weight", "out.bias"])
    monkeypatch.setattr(recurrent, "USE_FUSED_KERNELS", True)
    torch.manual_seed(1)
    new = nets.make_net(
        ModelConfig(
            arch="rnn", input_shape=(7, 3), cell=cell, hidden_size=H, layers=2, norm=NormConfig(kind="none")
        )  # type: ignore[arg-type]
    ).eval()
    new.load_state_dict(load(save(old.state_dict())))
    with torch.no_grad():
        torch.testing.assert_close(new(x), expected, rtol=0, atol=1e-6)


def run_and_differentiate(
    net: nn.Module, x: torch.Tensor, *, at_once: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and every parameter's gradient (train mode) or the logits alone (eval), and the buffers."""
    monkeypatch.setattr(recurrent, "NORMALISE_STEPS_AT_ONCE", at_once)
    net.zero_grad(set_to_none=True)
    logits = net(x)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    if net.training:
        weights = torch.linspace(-1, 2, logits.numel(), dtype=logits.dtype).reshape(logits.shape)
        (logits * weights).sum().backward()
        state |= {f"grad {n}": p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return logits.detach(), state


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("max_steps", [None, 4], ids=["a-slot-per-step", "slots-shared-beyond-4"])
def test_recurrent_bn_of_the_input_product_over_all_steps_at_once_is_step_by_steps(
    cell: str, max_steps: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bn1 normalises the T steps' W_x·x_t in one call (training: each step's own batch statistics,
    its running statistics moved; eval: each step's running statistics) as T calls would; beyond
    max_steps (a shared slot) it goes step by step."""
    x = sequences()
    results = []
    for at_once in (False, True):
        net = rnn(cell, "batch", momentum=0.3, max_steps=max_steps)
        bn1 = layer_of(net).bn1
        assert isinstance(bn1, RecurrentBatchNorm)
        assert (bn1.all_steps(torch.zeros(2, 6, bn1.num_features, dtype=F64)) is None) == (max_steps == 4)
        trained = [
            run_and_differentiate(net, x + k, at_once=at_once, monkeypatch=monkeypatch) for k in range(2)
        ]
        net.eval()
        results.append((trained, run_and_differentiate(net, x, at_once=at_once, monkeypatch=monkeypatch)))
    (step_by_step, step_eval), (at_once, once_eval) = results
    for (logits, state), (expected_logits, expected_state) in zip(at_once, step_by_step, strict=True):
        torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-12)
        assert state.keys() == expected_state.keys()
        for key in state:
            torch.testing.assert_close(state[key], expected_state[key], rtol=0, atol=1e-12)
    torch.testing.assert_close(once_eval[0], step_eval[0], rtol=0, atol=1e-12)


def test_recurrent_bn_under_the_cumulative_average_trains_step_by_step() -> None:
    norm = layer_of(rnn("lstm", "batch", momentum=None)).bn1
    assert isinstance(norm, RecurrentBatchNorm)
    assert norm.all_steps(torch.zeros(2, 6, 4 * H, dtype=F64)) is None
    assert norm.eval().all_steps(torch.zeros(2, 6, 4 * H, dtype=F64)) is not None


def test_the_init_is_torchs_uniform_bound() -> None:
    layer = layer_of(rnn("gru"))
    bound = 1 / math.sqrt(H)
    for p in (layer.ih.weight, layer.hh.weight, layer.bias, layer.bias_hh):
        assert p is not None
        assert p.abs().max() <= bound
        assert p.abs().max() > bound / 2


# ---------------------------------------------------------------------------- recurrent BN


def test_recurrent_bn_starts_at_gamma_point_one_with_one_bias() -> None:
    cfg = ModelConfig(arch="rnn", hidden_size=H, norm=NormConfig(kind="batch", position="before_activation"))
    layer = layer_of(nets.make_net(cfg))
    assert isinstance(layer, LSTMLayer)
    for slot in ("bn1", "bn2", "bn3"):
        norm = getattr(layer, slot)
        assert isinstance(norm, RecurrentBatchNorm)
        assert torch.equal(norm.weight, torch.full_like(norm.weight, 0.1))
        assert norm.max_steps == 28  # the default limit: the sequence's length (28 rows)
    # Products without β: the cell's single bias b replaces them; the cell state's BN has its β.
    assert layer.bn1.bias is None
    assert layer.bn2.bias is None
    assert torch.equal(layer.bn3.bias, torch.zeros(H))


def test_recurrent_bn_training_uses_each_steps_batch_statistics_and_keeps_them_per_step() -> None:
    net = rnn("lstm", "batch", momentum=0.3).train()
    layer = layer_of(net)
    assert isinstance(layer, LSTMLayer)
    x = sequences()
    seen: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def normalise(slot: str, value: torch.Tensor, t: int) -> torch.Tensor:
        mean, var = value.mean(0), value.var(0, unbiased=False)
        seen[(slot, t)] = (mean, value.var(0, unbiased=True))
        return bn_formula(value, mean, var, getattr(layer, slot))

    expected = hand_lstm(layer, x, normalise)
    out = layer(x)
    torch.testing.assert_close(out[:, -1], expected)
    for slot in ("bn1", "bn2", "bn3"):
        norm = getattr(layer, slot)
        for t in range(6):
            mean, unbiased_var = seen[(slot, t)]
            torch.testing.assert_close(norm.running_mean[t], 0.3 * mean)
            torch.testing.assert_close(norm.running_var[t], 0.7 + 0.3 * unbiased_var)
        assert norm.num_batches_tracked.tolist() == [1] * 6


def test_recurrent_bn_eval_uses_each_steps_running_statistics_and_the_last_beyond_the_limit() -> None:
    net = rnn("lstm", "batch", max_steps=3).eval()
    layer = layer_of(net)
    assert isinstance(layer, LSTMLayer)
    with torch.no_grad():
        for slot in ("bn1", "bn2", "bn3"):
            norm = getattr(layer, slot)
            norm.running_mean.copy_(torch.randn_like(norm.running_mean))
            norm.running_var.copy_(torch.rand_like(norm.running_var) + 0.5)
    x = sequences(steps=6)

    def normalise(slot: str, value: torch.Tensor, t: int) -> torch.Tensor:
        norm = getattr(layer, slot)
        s = min(t, 2)  # steps 3, 4, 5 use step 2's statistics
        return bn_formula(value, norm.running_mean[s], norm.running_var[s], norm)

    torch.testing.assert_close(layer(x)[:, -1], hand_lstm(layer, x, normalise))


def test_recurrent_bn_training_beyond_the_limit_updates_the_last_slot() -> None:
    net = rnn("gru", "batch", max_steps=2, momentum=None).train()
    layer = layer_of(net)
    layer(sequences(steps=5))
    # Cumulative average (momentum null): slot 0 saw step 0, slot 1 saw steps 1 to 4.
    assert layer.bn1.num_batches_tracked.tolist() == [1, 4]


def test_cumulative_average_and_no_running_statistics() -> None:
    layer = layer_of(rnn("lstm", "batch", track_running_stats=False).eval())
    x = sequences()

    def normalise(slot: str, value: torch.Tensor, t: int) -> torch.Tensor:
        return bn_formula(value, value.mean(0), value.var(0, unbiased=False), getattr(layer, slot))

    assert isinstance(layer, LSTMLayer)
    torch.testing.assert_close(layer(x)[:, -1], hand_lstm(layer, x, normalise))


# ---------------------------------------------------------------------- layer norm, batch-layer


def test_layer_norm_in_the_cell_is_the_formula() -> None:
    layer = layer_of(rnn("lstm", "layer").train())
    assert isinstance(layer, LSTMLayer)
    x = sequences()
    expected = hand_lstm(layer, x, lambda slot, value, t: ln_formula(value, getattr(layer, slot)))
    torch.testing.assert_close(layer(x)[:, -1], expected)
    assert layer.bn1.bias is None
    assert layer.bn3.bias is not None


def hand_bln(value: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    x_b = (value - mean) / torch.sqrt(var + EPS)
    x_f = (value - value.mean(1, keepdim=True)) / torch.sqrt(value.var(1, unbiased=False, keepdim=True) + EPS)
    mixed = (x_f * (1 / 8 - BLN_OFFSET) + x_b * (1 - 1 / 8 - BLN_OFFSET)) / math.sqrt(value.shape[1])
    mixed = mixed * norm.weight
    return mixed + norm.bias if norm.bias is not None else mixed


def test_batch_layer_norm_in_the_cell_is_the_formula_with_per_step_epoch_statistics() -> None:
    net = rnn("lstm", "batch_layer", max_steps=4).train()
    layer = layer_of(net)
    assert isinstance(layer, LSTMLayer)
    assert isinstance(layer.bn2, RecurrentBatchLayerNorm)
    batches = [sequences(seed=s) for s in (1, 2)]
    sums: dict[tuple[str, int], list[torch.Tensor]] = {}

    def normalise(slot: str, value: torch.Tensor, t: int) -> torch.Tensor:
        mean, var = value.mean(0), value.var(0, unbiased=False)
        sums.setdefault((slot, min(t, 3)), []).append(torch.stack([mean, value.var(0, unbiased=True)]))
        return hand_bln(value, mean, var, getattr(layer, slot))

    for x in batches:
        torch.testing.assert_close(layer(x)[:, -1], hand_lstm(layer, x, normalise))
    end_epoch(net)
    for (slot, s), parts in sums.items():
        average = torch.stack(parts).mean(0)
        norm = getattr(layer, slot)
        torch.testing.assert_close(norm.running_mean[s], average[0])
        torch.testing.assert_close(norm.running_var[s], average[1])
    net.eval()  # eval: the population statistics of each step's slot, the last one beyond the limit
    x = sequences(seed=3)

    def population(slot: str, value: torch.Tensor, t: int) -> torch.Tensor:
        norm = getattr(layer, slot)
        return hand_bln(value, norm.running_mean[min(t, 3)], norm.running_var[min(t, 3)], norm)

    torch.testing.assert_close(layer(x)[:, -1], hand_lstm(layer, x, population))


def test_gru_normalises_its_two_products() -> None:
    layer = layer_of(rnn("gru", "layer").train())
    assert isinstance(layer, GRULayer)
    assert layer.bias_hh is not None
    x = sequences()
    h = torch.zeros(8, H, dtype=F64)
    for t in range(6):
        a = ln_formula(x[:, t] @ layer.ih.weight.T, layer.bn1) + layer.bias
        u = ln_formula(h @ layer.hh.weight.T, layer.bn2) + layer.bias_hh
        r = torch.sigmoid(a[:, :H] + u[:, :H])
        z = torch.sigmoid(a[:, H : 2 * H] + u[:, H : 2 * H])
        n = torch.tanh(a[:, 2 * H :] + r * u[:, 2 * H :])
        h = (1 - z) * n + z * h
    torch.testing.assert_close(layer(x)[:, -1], h)
    assert not hasattr(layer, "bn3")


# -------------------------------------------------------------------------- serving, sequences

KINDS = ["none", "batch", "layer", "batch_layer"]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("kind", KINDS)
def test_eval_serves_a_sample_alone_as_inside_a_batch_of_64(cell: str, kind: str) -> None:
    norm = NormConfig(kind=kind, position="before_activation", bln_batch_size=16)  # type: ignore[arg-type]
    cfg = ModelConfig(arch="rnn", cell=cell, hidden_size=16, layers=2, norm=norm)  # type: ignore[arg-type]
    torch.manual_seed(0)
    net = nets.make_net(cfg).train()
    net(torch.rand(16, 1, 28, 28))  # running statistics away from their init
    end_epoch(net)
    net.eval()
    batch = torch.rand(64, 1, 28, 28)
    with torch.no_grad():
        together = net(batch)
        alone = net(batch[17:18])
    torch.testing.assert_close(alone, together[17:18], rtol=1e-5, atol=1e-6)


def test_an_image_is_read_row_by_row() -> None:
    assert sequence_shape((1, 28, 28)) == (28, 28)
    assert sequence_shape((3, 32, 32)) == (32, 96)
    assert sequence_shape((40,)) == (40, 1)
    assert sequence_shape((12, 5)) == (12, 5)
    with pytest.raises(ValueError, match="none of these"):
        sequence_shape((2, 3, 4, 5))
    with pytest.raises(ValueError, match="at most 1024 steps"):
        sequence_shape((3000,))
    cfg = ModelConfig(arch="rnn", input_shape=(3, 4, 5), hidden_size=H, norm=NormConfig(kind="none"))
    reader = nets.make_net(cfg).get_submodule("sequence")
    image = torch.arange(60.0).reshape(1, 3, 4, 5)
    rows = reader(image.flatten(1))
    assert rows.shape == (1, 4, 15)
    # Step 2 is row 2: channel 0's five values, then channel 1's, then channel 2's.
    assert torch.equal(rows[0, 2], torch.cat([image[0, c, 2] for c in range(3)]))


def test_flops_count_every_step_of_the_recurrence() -> None:
    cfg = ModelConfig(arch="rnn", hidden_size=16, norm=NormConfig(kind="none"))
    flops = nets.forward_flops(cfg)
    matmuls = 28 * 2 * (28 * 64 + 16 * 64) + 2 * 16 * 10  # W_x·x_t and W_h·h_{t−1} at all 28 steps
    assert matmuls < flops < 1.5 * matmuls
    longer = ModelConfig(arch="rnn", input_shape=(1, 56, 28), hidden_size=16, norm=NormConfig(kind="none"))
    assert nets.forward_flops(longer) > 1.9 * flops  # twice the steps, about twice the work


def test_norms_and_errors() -> None:
    with pytest.raises(ValueError, match="no recurrent form"):
        nets.make_net(ModelConfig(arch="rnn", norm=NormConfig(kind="group")))
    net = rnn("lstm", "batch")
    assert [name for name, _ in nets.norm_slots(net)] == ["cell1.bn1", "cell1.bn2", "cell1.bn3"]
    assert uses_batch_statistics(layer_of(net).bn1)
    fused, report = fuse_bn(net.eval())
    assert fused is net
    assert report.reason is not None
    assert "inside its recurrent cell" in report.reason
    plain, plain_report = fuse_bn(rnn("lstm", "none").eval())
    assert plain_report.fused


def test_probes_see_the_cells() -> None:
    net = rnn("lstm", "batch").float()
    x, y = torch.randn(16, 6, 3), torch.randint(0, 10, (16,))
    grads = probes.probe_gradients(net, x, y, 0)
    layers = {v.layer for v in grads if v.name == "grad_norm"}
    assert layers == {"cell1.ih", "cell1.hh", "out"}
    gamma = probes.probe_gamma(net, 0)
    assert {v.layer for v in gamma} == {"cell1.bn1", "cell1.bn2", "cell1.bn3"}
    slots = nets.norm_slots(net)
    percentiles = probes.probe_percentiles(net, slots, x, 0)
    assert {v.layer for v in percentiles} == {"cell1.bn1", "cell1.bn2", "cell1.bn3"}
    gap = probes.probe_statistics_gap(net, x, x, y, 0)
    # Per-step running statistics are left out of the per-layer gap; the train/eval gap is measured.
    assert {v.layer for v in gap} == {probes.MODEL}
    assert {v.name for v in gap} >= {"accuracy_gap", "train_accuracy", "eval_accuracy"}


def test_slot_probes_of_a_cell_report_its_last_step_input() -> None:
    """A cell calls each slot once a step; the probes report the last step's input, as measured in a
    hook at that call (here, the oracle: every call measured, the last kept)."""
    net = rnn("lstm", "batch").float().eval()
    x = torch.randn(16, 6, 3)
    slots = nets.norm_slots(net)
    last: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}

    def keep(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            last[name] = args[0].detach().clone()
            calls[name] = calls.get(name, 0) + 1

        return hook

    handles = [module.register_forward_pre_hook(keep(name)) for name, module in slots]
    with torch.inference_mode():
        net(x)
    for handle in handles:
        handle.remove()
    assert set(calls.values()) == {6}  # one call a step
    statistics = {s.layer: (s.input_mean, s.input_std) for s in probes.probe_slot_inputs(net, slots, x, 0)}
    percentiles = {(v.layer, v.name): v.value for v in probes.probe_percentiles(net, slots, x, 0)}
    for name, values in last.items():
        flat = values.double()
        assert statistics[name] == (flat.mean().item(), flat.std(unbiased=False).item())
        expected = np.quantile(flat.numpy().reshape(-1), [q / 100 for q in probes.PERCENTILES])
        assert [percentiles[(name, f"p{q}")] for q in probes.PERCENTILES] == [float(v) for v in expected]


def test_a_stored_rnn_config_rebuilds_the_network_and_old_configs_load_unchanged() -> None:
    norm = NormConfig(kind="batch", position="before_activation", max_steps=7)
    cfg = ModelConfig(arch="rnn", cell="gru", hidden_size=H, layers=2, norm=norm)
    stored = cfg.to_dict()
    assert (stored["cell"], stored["hidden_size"], stored["layers"], stored["norm"]["max_steps"]) == (
        "gru",
        H,
        2,
        7,
    )
    assert ModelConfig.from_dict(stored) == cfg
    torch.manual_seed(0)
    net = nets.make_net(cfg)
    again = nets.make_net(ModelConfig.from_dict(stored))
    again.load_state_dict(net.state_dict())  # same keys and shapes: running statistics [7, 3H]
    assert net.state_dict()["cell1.bn1.running_mean"].shape == (7, 3 * H)
    old = {k: v for k, v in ModelConfig().to_dict().items() if k not in ("cell", "hidden_size", "layers")}
    del old["norm"]["max_steps"]
    assert ModelConfig.from_dict(old) == ModelConfig()
