"""The training switches (docs/training-switches.md) in the epoch loop: each against a hand-written
loop or its definition, and each off leaving training as it was."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from service.ml import trainable, training
from service.ml.config import ModelConfig, NormConfig, TrainConfig
from service.ml.datasets import ImageDataset, make_synthetic, to_inputs, train_val_split
from service.ml.training import build_model, epoch_permutation, make_optimizer, train, used_samples

BN = ModelConfig(hidden=(16, 16))
NO_BN = replace(BN, norm=NormConfig(kind="none"))


@pytest.fixture(scope="module")
def small() -> tuple[ImageDataset, ImageDataset]:
    return train_val_split(make_synthetic(200, seed=5), 0.25)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- train.agc -------------------------------------------------------------------------------------


def clip_by_definition(model: torch.nn.Module, lam: float) -> None:
    """Brock et al. 2021b, §4: for each unit i (a row of a weight, a whole bias) of every parameter but
    the head, G_i ← λ·max(‖W_i‖, 1e-3)/‖G_i‖·G_i where ‖G_i‖/max(‖W_i‖, 1e-3) > λ."""
    for name, p in model.named_parameters():
        if name.startswith("out.") or p.grad is None:
            continue
        units_w = p.detach().reshape(p.shape[0], -1) if p.dim() > 1 else p.detach().reshape(1, -1)
        units_g = p.grad.reshape(units_w.shape)
        for i in range(units_w.shape[0]):  # in float32, as training computes
            w_norm = units_w[i].norm().clamp(min=1e-3)
            g_norm = units_g[i].norm()
            if g_norm / w_norm > lam:
                units_g[i] *= (lam * w_norm) / g_norm


@pytest.mark.parametrize("cfg", [BN, NO_BN])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_agc_run_equals_a_hand_loop_that_clips_by_the_definition(
    small: tuple[ImageDataset, ImageDataset], cfg: ModelConfig, optimizer: str
) -> None:
    train_set, val_set = small
    tcfg = TrainConfig(epochs=2, batch_size=32, seed=3, agc=1e-3, optimizer=optimizer, lr=0.05)  # type: ignore[arg-type]
    trained = train(cfg, tcfg, train_set, val_set).model

    model = build_model(cfg, tcfg.seed)
    opt = make_optimizer(model, tcfg)
    x, y = to_inputs(train_set.x).flatten(1), train_set.y
    n_used = used_samples(len(train_set), tcfg.batch_size)
    for epoch in (1, 2):
        model.train()
        order = epoch_permutation(len(train_set), tcfg.seed, epoch)[:n_used]
        for s in range(0, n_used, tcfg.batch_size):
            idx = order[s : s + tcfg.batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
            clip_by_definition(model, tcfg.agc or 0)
            opt.step()
        model.eval()
    hand, got = model.state_dict(), trained.state_dict()
    for k in hand:
        torch.testing.assert_close(got[k], hand[k], rtol=1e-6, atol=1e-7, msg=k)  # bit-identical on CPU
    # λ = 1e-3 does clip: without it the run ends elsewhere.
    unclipped = train(cfg, replace(tcfg, agc=None), train_set, val_set).model.state_dict()
    assert not torch.allclose(unclipped["fc1.weight"], got["fc1.weight"], atol=1e-4)


def test_agc_trains_through_autograd_and_null_keeps_the_fast_path(
    small: tuple[ImageDataset, ImageDataset],
) -> None:
    model = build_model(BN, 0)
    opt = make_optimizer(model, TrainConfig())
    assert training.make_step(model, opt, 32, tcfg=TrainConfig()).fast_path
    assert not training.make_step(model, opt, 32, tcfg=TrainConfig(agc=0.01)).fast_path
    # agc null is today's training, bit for bit.
    today = train(BN, TrainConfig(epochs=2, seed=1), *small)
    off = train(BN, TrainConfig(epochs=2, seed=1, agc=None), *small)
    assert same_state(today.model, off.model)
    assert [m.val_loss for m in today.epochs] == [m.val_loss for m in off.epochs]


# --- train.frozen_bn_epochs -------------------------------------------------------------------------


class Watch:
    """Captures the model `train` builds; records BN buffers at each epoch end and, per epoch, what each
    BN layer's forward calls saw (its mode, input and output) and the mode of the other layers."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.model: torch.nn.Module | None = None
        self.buffers: list[dict[str, torch.Tensor]] = []
        self.calls: list[list[tuple[bool, torch.Tensor, torch.Tensor]]] = [[]]
        self.other_modes: list[set[bool]] = [set()]
        build = training.build_model

        def capture(cfg: ModelConfig, seed: int) -> torch.nn.Module:
            model = build(cfg, seed)
            self.model = model
            self.buffers.append(self.bn_buffers())
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm1d):
                    module.register_forward_hook(self.bn_hook)
                elif isinstance(module, torch.nn.Dropout):
                    module.register_forward_hook(self.dropout_hook)
            return model

        monkeypatch.setattr(training, "build_model", capture)

    def bn_buffers(self) -> dict[str, torch.Tensor]:
        assert self.model is not None
        return {k: v.clone() for k, v in self.model.named_buffers() if k.startswith("bn")}

    def bn_hook(self, module: torch.nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # training steps only, not validation or probes
            assert isinstance(module, torch.nn.BatchNorm1d)
            # What eval mode computes, with the parameters and buffers of this very call.
            eval_output = F.batch_norm(
                inputs[0], module.running_mean, module.running_var, module.weight, module.bias, eps=module.eps
            )
            self.calls[-1].append((module.training, output.detach(), eval_output.detach()))

    def dropout_hook(
        self, module: torch.nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor
    ) -> None:
        if torch.is_grad_enabled():
            self.other_modes[-1].add(module.training)

    def on_epoch_end(self, metrics: training.EpochMetrics, snapshot: training.Snapshot) -> None:
        self.buffers.append(self.bn_buffers())
        self.calls.append([])
        self.other_modes.append(set())

    def should_stop(self) -> bool:
        return False


def test_frozen_bn_epochs_leave_buffers_alone_and_normalise_with_them(
    small: tuple[ImageDataset, ImageDataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = Watch(monkeypatch)
    cfg = replace(BN, dropout=0.1)
    # No epoch-end probes: the gradient probe runs the network with gradients, in train mode.
    tcfg = TrainConfig(epochs=3, frozen_bn_epochs=2, seed=2, probes=())
    result = train(cfg, tcfg, *small, callbacks=watch)
    initial, after1, after2, after3 = watch.buffers
    assert not all(torch.equal(initial[k], after1[k]) for k in initial)  # epoch 1 trains BN as usual
    for frozen in (after2, after3):  # the frozen epochs leave every buffer bit-identical
        assert all(torch.equal(after1[k], frozen[k]) for k in after1)
    assert {mode for mode, _, _ in watch.calls[0]} == {True}
    for epoch in (1, 2):
        calls = watch.calls[epoch]
        assert calls
        assert {mode for mode, _, _ in calls} == {False}
        assert watch.other_modes[epoch] == {True}  # dropout still trains
        assert all(torch.equal(y, eval_y) for _, y, eval_y in calls)  # train-time output = eval-mode output
    assert not any(torch.equal(y, eval_y) for _, y, eval_y in watch.calls[0])  # unlike unfrozen epochs
    # ... and γ, β still learn in the frozen epochs.
    assert not torch.equal(result.model.state_dict()["bn1.weight"], torch.ones(16))


def test_frozen_bn_trains_through_autograd_and_zero_is_off(small: tuple[ImageDataset, ImageDataset]) -> None:
    model = build_model(BN, 0)
    opt = make_optimizer(model, TrainConfig())
    assert not training.make_step(model, opt, 32, tcfg=TrainConfig(frozen_bn_epochs=1)).fast_path
    today = train(BN, TrainConfig(epochs=2, seed=1), *small)
    off = train(BN, TrainConfig(epochs=2, seed=1, frozen_bn_epochs=0), *small)
    assert same_state(today.model, off.model)


# --- train.trainable -------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize(
    "cfg", [BN, replace(BN, norm=NormConfig(kind="layer")), replace(BN, arch="cnn", channels=(4,))]
)
def test_norm_only_changes_only_gamma_beta_and_the_head(
    small: tuple[ImageDataset, ImageDataset], cfg: ModelConfig, optimizer: str
) -> None:
    tcfg = TrainConfig(epochs=2, seed=4, trainable="norm_only", optimizer=optimizer, lr=0.05)  # type: ignore[arg-type]
    initial = build_model(cfg, tcfg.seed).state_dict()
    params = {name for name, _ in build_model(cfg, tcfg.seed).named_parameters()}
    trained = train(cfg, tcfg, *small).model.state_dict()
    named = {name for name in params if name.split(".")[0] in ("bn1", "bn2", "out")}
    assert named
    assert named < params
    for name in params:
        if name in named:
            assert not torch.equal(initial[name], trained[name]), name
        else:
            assert torch.equal(initial[name], trained[name]), name  # bit-identical: never trained


def test_random_subset_changes_exactly_the_chosen_scalars(small: tuple[ImageDataset, ImageDataset]) -> None:
    # tanh: no dead unit whose weights' gradient is exactly zero (those could not move, chosen or not).
    cfg = replace(BN, norm=NormConfig(kind="layer"), activation="tanh")
    tcfg = TrainConfig(epochs=2, seed=4, trainable="random_subset")
    model = build_model(cfg, tcfg.seed)
    count = trainable.norm_only_count(model)
    masks = trainable.random_masks(model, tcfg.seed)
    assert sum(int(m.sum()) for m in masks.values()) == count
    assert all(bool(((m == 0) | (m == 1)).all()) for m in masks.values())
    assert count == sum(
        p.numel() for n, p in model.named_parameters() if n.split(".")[0] in ("bn1", "bn2", "out")
    )
    initial = model.state_dict()
    trained = train(cfg, tcfg, *small).model.state_dict()
    changed = {n: initial[n] != trained[n] for n in masks}
    assert all(not (changed[n] & (masks[n] == 0)).any() for n in masks)  # nothing outside the mask moves
    assert sum(int(c.sum()) for c in changed.values()) == count  # every chosen scalar moves
    # The draw depends on the seed, spreads over the layers, and is repeatable.
    again = trainable.random_masks(build_model(cfg, tcfg.seed), tcfg.seed)
    assert all(torch.equal(masks[n], again[n]) for n in masks)
    other = trainable.random_masks(model, 5)
    assert not all(torch.equal(masks[n], other[n]) for n in masks)
    assert masks["fc1.weight"].sum() > 0


def test_trainable_all_keeps_the_fast_path_and_others_do_not() -> None:
    model = build_model(BN, 0)
    opt = make_optimizer(model, TrainConfig())
    assert training.make_step(model, opt, 32, tcfg=TrainConfig(trainable="all")).fast_path
    for which in ("norm_only", "random_subset"):
        assert not training.make_step(model, opt, 32, tcfg=TrainConfig(trainable=which)).fast_path


# --- train.batch_order -----------------------------------------------------------------------------


def batch_label_sets(order: torch.Tensor, labels: torch.Tensor, size: int) -> list[set[int]]:
    return [set(labels[order[i : i + size]].tolist()) for i in range(0, len(order), size)]


@pytest.mark.parametrize("epoch", [1, 2])
def test_class_sorted_batches_hold_one_class_except_at_boundaries(
    small: tuple[ImageDataset, ImageDataset], epoch: int
) -> None:
    y = small[0].y
    tcfg = TrainConfig(batch_order="class_sorted", batch_size=16, seed=3)
    order = training.epoch_order(tcfg, y, epoch)
    assert sorted(order.tolist()) == list(range(len(y)))  # every sample once
    runs = [int(c) for c in torch.unique_consecutive(y[order])]
    assert sorted(runs) == sorted(set(runs))  # each class one contiguous run: sorted by label
    boundaries = {i for i in range(1, len(order)) if y[order[i]] != y[order[i - 1]]}
    for b, labels in enumerate(batch_label_sets(order, y, 16)):
        inside = sum(1 for i in boundaries if b * 16 < i < (b + 1) * 16)
        assert len(labels) == 1 + inside
    # The order of the classes and within them changes with the epoch and the seed.
    assert not torch.equal(order, training.epoch_order(tcfg, y, epoch + 1))
    assert not torch.equal(order, training.epoch_order(replace(tcfg, seed=4), y, epoch))


@pytest.mark.parametrize(("size", "k"), [(16, 2), (32, 3), (10, 1), (7, 4)])
def test_k_classes_batches_hold_at_most_k_classes(
    small: tuple[ImageDataset, ImageDataset], size: int, k: int
) -> None:
    y = small[0].y
    tcfg = TrainConfig(batch_order="k_classes", batch_classes=k, batch_size=size, seed=3)
    order = training.epoch_order(tcfg, y, 1)
    assert sorted(order.tolist()) == list(range(len(y)))  # every sample once
    sets = batch_label_sets(order, y, size)
    for b, labels in enumerate(sets):
        if len(labels) <= k:
            continue
        # More than k only where no k classes of the samples left could fill this batch.
        left = torch.bincount(y[order[b * size :]], minlength=10).sort(descending=True).values
        assert int(left[:k].sum()) < min(size, len(order) - b * size), (b, labels)
    assert sum(len(labels) <= k for labels in sets) >= len(sets) / 2
    assert torch.equal(order, training.epoch_order(tcfg, y, 1))


def test_shuffled_is_todays_order_and_sorted_orders_train(small: tuple[ImageDataset, ImageDataset]) -> None:
    y = small[0].y
    assert torch.equal(training.epoch_order(TrainConfig(seed=2), y, 3), epoch_permutation(len(y), 2, 3))
    for tcfg in (
        TrainConfig(epochs=2, batch_order="class_sorted"),
        TrainConfig(epochs=2, batch_order="k_classes", batch_classes=2),
    ):
        result = train(BN, tcfg, *small)
        assert len(result.epochs) == 2
        assert all(torch.isfinite(p).all() for p in result.model.parameters())


# --- all switches in a data-parallel run ------------------------------------------------------------


@pytest.mark.parametrize("which", ["norm_only", "random_subset"])
def test_switches_in_two_synced_processes_match_one_process(
    small: tuple[ImageDataset, ImageDataset], which: str
) -> None:
    from service.ml.distributed import train_distributed  # noqa: PLC0415  # starts processes: only here

    cfg = ModelConfig(hidden=(32,))
    tcfg = TrainConfig(
        epochs=2,
        batch_size=32,
        optimizer="sgd",
        lr=0.1,
        agc=0.01,
        frozen_bn_epochs=1,
        trainable=which,  # type: ignore[arg-type]
        batch_order="k_classes",
        batch_classes=2,
    )
    single = train(cfg, tcfg, *small).model.state_dict()
    synced = train_distributed(
        cfg, replace(tcfg, processes=2, sync_batch_norm=True), *small
    ).model.state_dict()
    for key, value in synced.items():
        torch.testing.assert_close(value, single[key], atol=1e-5, rtol=0, msg=key)
