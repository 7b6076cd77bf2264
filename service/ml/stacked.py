"""Several runs of one configuration, differing only in their seed, trained as one stacked model.

An experiment repeats each configuration over seeds. At the article's size a training step is mostly
fixed cost (dispatch, a dozen small kernels, the optimizer's update), not arithmetic, so K copies of
the network whose weights are stacked into [K, ...] tensors train in about the time of K steps' matrix
products plus one step's fixed cost: each linear layer is one `baddbmm` over the K members, each
BatchNorm one `native_batch_norm` over the K·C channels of the members side by side (a channel's
statistics are still over its own member's batch), and the optimizer one fused kernel over the stacks.

Each member keeps its own model and optimizer: their parameters, buffers, gradients and optimizer
state become views of rows of the stacks, so evaluation, probes, checkpoints and resumption see the
ordinary objects. Each member draws its own initial weights and its own batches (its seed's
permutation), and the kernels compute each member's slice exactly as they compute a network alone:
tests compare stacked training with `training.train` run by run with `torch.equal`, every weight,
buffer, optimizer state and metric. What a stack may hold is what `fastpath.MlpStep` supports.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Any

import torch
from torch import Tensor, nn

from service.ml import fastpath, training
from service.ml.config import ModelConfig, TrainConfig
from service.ml.datasets import ImageDataset, make_synthetic, to_inputs, train_val_split
from service.ml.fastpath import MlpStep, Net, Norm
from service.ml.nets import norm_slots
from service.ml.probes import PROBE_SAMPLES, SlotStatistics, probe_slot_inputs
from service.ml.resume import save_training_state

# Called when a member leaves the stack before the others finish (cancelled, handed back, lease lost),
# with its index among the members as given and its result, so the caller can record it at once.
OnLeave = Callable[[int, training.TrainResult], None]


def stack_key(tcfg: TrainConfig) -> TrainConfig:
    """What members of one stack share: the whole training config but the seed."""
    return dataclasses.replace(tcfg, seed=0)


# BatchNorm over the members' channels side by side is exact only where each member's channels fall on
# the same vector lanes as alone: widths that are a multiple of the widest vector (16 floats, AVX-512).
BATCH_NORM_WIDTH_MULTIPLE = 16


def can_stack(cfg: ModelConfig, tcfg: TrainConfig) -> bool:
    """Whether runs of this configuration train stacked, in this process, with the results they would
    have alone: an MLP and optimizer that the fast path reproduces, in one process; ReLU (tanh and
    sigmoid round by vector lane, so a member would compute its values in other lanes than alone);
    with BatchNorm, widths that are a multiple of BATCH_NORM_WIDTH_MULTIPLE; and one torch thread (with
    more, kernels split their work by its total size, so a stack splits it otherwise than a run alone;
    `make run` gives each training process one). tests/ml/test_stacked.py checks each condition."""
    if cfg.arch != "mlp" or cfg.activation != "relu" or tcfg.processes != 1 or not training.USE_FAST_PATH:
        return False
    if torch.get_num_threads() != 1:
        return False
    if cfg.norm.kind == "batch" and any(width % BATCH_NORM_WIDTH_MULTIPLE for width in cfg.hidden):
        return False
    return training.trains_fast(cfg)  # with either optimizer make_optimizer builds


def warm_up() -> None:
    """Compile the stacked loop and run it briefly (about 0.2 s), so that a training process's first
    stack does not pay for it; nothing where this process cannot stack (more than one thread)."""
    if not can_stack(ModelConfig(), TrainConfig()):
        return
    train_set, val_set = train_val_split(make_synthetic(64, seed=0), 0.5)
    tcfgs = [TrainConfig(epochs=1, seed=seed) for seed in (0, 1)]
    train_stacked(
        ModelConfig(), tcfgs, train_set, val_set, [training.NullCallbacks(), training.NullCallbacks()]
    )


@dataclass
class _Member:
    index: int  # position in the caller's lists
    tcfg: TrainConfig
    callbacks: training.TrainingCallbacks
    model: nn.Module
    optimizer: torch.optim.Optimizer
    poller: training.StopPoller
    result: training.TrainResult
    slots: list[tuple[str, nn.Module]] = field(default_factory=list)
    pending: tuple[SlotStatistics, ...] = ()  # the initial network's probe statistics, sent with epoch 1

    def stopped(self, at_epoch_end: bool) -> bool:
        """Its should_stop(): between steps at most every STOP_CHECK_INTERVAL_S, at an epoch's end always."""
        return self.poller.now() if at_epoch_end else self.poller.due()


def train_stacked(
    cfg: ModelConfig,
    tcfgs: Sequence[TrainConfig],
    train_set: ImageDataset,
    val_set: ImageDataset,
    callbacks: Sequence[training.TrainingCallbacks],
    on_leave: OnLeave | None = None,
    device: torch.device = training.CPU,
) -> list[training.TrainResult]:
    """Train one fresh model per config of `tcfgs` (equal but for the seed), stacked; each result is
    what `training.train(cfg, tcfgs[k], train_set, val_set, callbacks[k])` would return.

    A member whose `should_stop()` answers True leaves the stack at once (its result cancelled, passed
    to `on_leave`); the others go on. An exception from any member's callbacks ends the whole stack.
    """
    if not tcfgs or len(tcfgs) != len(callbacks):
        raise ValueError("a stack needs one callbacks object per training config, and at least one")
    if len({stack_key(t) for t in tcfgs}) != 1:
        raise ValueError("the runs of a stack must have equal training configs but for the seed")
    if not can_stack(cfg, tcfgs[0]):
        raise ValueError("this model or optimizer cannot train stacked (see stacked.can_stack)")
    tcfg = tcfgs[0]
    training.check_inputs(cfg, tcfg, train_set, val_set)
    x_all, y_all = to_inputs(train_set.x).flatten(1).to(device), train_set.y.to(device)
    n, bs = len(train_set), tcfg.batch_size
    n_used = training.used_samples(n, bs)
    val_inputs = training.resident(val_set, device)
    probe = val_inputs.x[:PROBE_SAMPLES]
    members = [
        _member(k, cfg, t, c, device, dropped=n_used < n)
        for k, (t, c) in enumerate(zip(tcfgs, callbacks, strict=True))
    ]
    for member in members:
        member.slots = norm_slots(member.model)
        member.pending = probe_slot_inputs(member.model, member.slots, probe, epoch=0)
    everyone = list(members)
    stack = StackedMlp([(m.model, m.optimizer) for m in members])

    for epoch in range(1, tcfg.epochs + 1):
        started = time.monotonic()
        for member in members:
            member.model.train()  # on purpose: evaluate() left the model in eval mode
            for group in member.optimizer.param_groups:
                group["lr"] = training.lr_at(tcfg, epoch)
        orders = torch.stack([training.epoch_permutation(n, m.tcfg.seed, epoch)[:n_used] for m in members])
        batches = StackedBatches.for_epoch(x_all, y_all, orders.to(device), bs)
        rows_per_call = bs * stack.steps_per_call(bs)
        for start in range(0, n_used, rows_per_call):
            staying = _leave_if_stopped(members, on_leave, at_epoch_end=False)
            if len(staying) < len(members):
                members = [members[i] for i in staying]
                if not members:
                    return [m.result for m in everyone]
                # The others' current values, optimizer state included, are copied into smaller stacks.
                stack, batches = (
                    StackedMlp([(m.model, m.optimizer) for m in members]),
                    batches.select(staying),
                )
            stack.run(batches, start, min(start + rows_per_call, n_used))
        for k, member in enumerate(members):
            probes = (probe, member.slots, member.pending)
            metrics = training.epoch_metrics(
                member.model, epoch, batches.totals(k), n_used, started, val_inputs, probes
            )
            member.pending = ()
            member.result.epochs.append(metrics)  # `seconds` is the stack's epoch: its members train together
            snapshot = partial(save_training_state, member.model, member.optimizer, epoch)
            member.callbacks.on_epoch_end(metrics, snapshot)
        if epoch < tcfg.epochs:
            staying = _leave_if_stopped(members, on_leave, at_epoch_end=True)
            if len(staying) < len(members):
                members = [members[i] for i in staying]
                if not members:
                    break
                stack = StackedMlp([(m.model, m.optimizer) for m in members])
    return [m.result for m in everyone]


def _member(
    index: int,
    cfg: ModelConfig,
    tcfg: TrainConfig,
    callbacks: training.TrainingCallbacks,
    device: torch.device,
    *,
    dropped: bool,
) -> _Member:
    model = training.build_model(cfg, tcfg.seed).to(device)
    optimizer = training.make_optimizer(model, tcfg)
    result = training.TrainResult(model=model, dropped_last_batch=dropped)
    return _Member(index, tcfg, callbacks, model, optimizer, training.StopPoller(callbacks), result)


def _leave_if_stopped(members: list[_Member], on_leave: OnLeave | None, *, at_epoch_end: bool) -> list[int]:
    """The positions of the members that go on; each that asks to stop leaves: its result marked
    cancelled (the epoch in progress is not reported, as in train()) and passed to `on_leave`."""
    staying = []
    for i, member in enumerate(members):
        if not member.stopped(at_epoch_end):
            staying.append(i)
            continue
        member.result.cancelled = True
        if on_leave is not None:
            on_leave(member.index, member.result)
    return staying


class StackedMlp:
    """K supported MLPs of one structure as stacks: `run` trains all K on their own batches.

    Construction turns every parameter, buffer and gradient of the members into a view of one row of
    a [K, ...] stack, so the members' own objects always hold their current values. The optimizer
    state stays each member's own: the update runs per member tensor, not over the stacks, because the
    kernels vectorise a tensor in blocks with a scalar tail, and a member's tail inside a stack would
    go through the vector path and round differently from the member alone."""

    def __init__(self, members: Sequence[tuple[nn.Module, torch.optim.Optimizer]]) -> None:
        steps = [MlpStep.for_model(model) for model, _ in members]
        nets = [step.net for step in steps if step is not None]
        if len(nets) < len(members) or not all(fastpath.supports_optimizer(o) for _, o in members):
            raise ValueError("every member must be an MLP and optimizer that fastpath supports")
        _check_same_structure(nets)
        self._optimizers = [optimizer for _, optimizer in members]
        self.net = _stack_net(nets)

    def steps_per_call(self, batch_size: int) -> int:
        """Steps per call of the compiled loop: as for one network of the stack's total size."""
        work = batch_size * sum(
            w.numel() + b.numel() for w, b in zip(self.net.weights, self.net.biases, strict=True)
        )
        return max(1, min(fastpath.STEPS_PER_CALL, fastpath.CALL_WORK // work))

    @torch.no_grad()
    def run(self, batches: StackedBatches, start: int, stop: int) -> None:
        """Train every member on its batches of `batches.orders[k, start:stop]`."""
        update = self._update()
        if update is None:  # fresh optimizers: their own first step creates their state as it always does
            end = min(start + batches.size, stop)
            x, y = batches.gather(start, end)
            compiled().forward_backward(
                x, y, *self.net.arguments(), batches.picked[:, start:end], batches.predicted[:, start:end]
            )
            for optimizer in self._optimizers:
                optimizer.step()
            start, update = end, self._update()
            assert update is not None  # the steps above created the state
        if start < stop:
            compiled().train_steps(
                batches.x, batches.y, batches.orders, start, stop, batches.size,
                *self.net.arguments(), batches.picked, batches.predicted, *update,
            )  # fmt: skip

    def _update(self) -> tuple[Any, ...] | None:
        """fastpath's optimizer arguments with each list holding every member's tensors; None while a
        member's optimizer has no state yet. The hyperparameters are equal across a stack."""
        updates = [fastpath.optimizer_update(optimizer) for optimizer in self._optimizers]
        if any(update is None for update in updates):
            return None
        present = [update for update in updates if update is not None]
        lists = [[t for update in present for t in update[position]] for position in range(1, 6)]
        return (present[0][0], *lists, present[0][6])


def _check_same_structure(nets: list[Net]) -> None:
    first = nets[0]
    for net in nets[1:]:
        same = (
            net.activations == first.activations
            and net.norm_modes == first.norm_modes
            and net.momenta == first.momenta
            and net.epsilons == first.epsilons
            and [w.shape for w in net.weights] == [w.shape for w in first.weights]
            and [g is None for g in net.gammas] == [g is None for g in first.gammas]
            and [b is None for b in net.betas] == [b is None for b in first.betas]
            and [r is None for r in net.running_means] == [r is None for r in first.running_means]
        )
        if not same:
            raise ValueError("the members of a stack must have the same structure")


def _stack_rows(tensors: list[Any]) -> Tensor:
    """One [K, ...] tensor of the K members' values; each member's tensor becomes a view of its row
    (`.data` keeps the object, so the optimizer's and the module's references stay valid)."""
    stacked = torch.stack([t.detach() for t in tensors])
    for k, t in enumerate(tensors):
        t.data = stacked[k]
    return stacked


def _stack_grads(params: list[Any]) -> Tensor:
    """A zero [K, ...] gradient stack; each member parameter's `.grad` becomes a view of its row."""
    stacked = torch.zeros((len(params), *params[0].shape), dtype=params[0].dtype, device=params[0].device)
    for k, p in enumerate(params):
        p.grad = stacked[k]
    return stacked


def _stack_net(nets: list[Net]) -> Net:
    """The members' Nets as one Net of stacks (their tensors become views of its rows)."""

    def rows(name: str) -> list[Any]:  # Net field `name`, a list over layers with None for no tensor
        layers = zip(*(getattr(net, name) for net in nets), strict=True)
        return [None if members[0] is None else _stack_rows(list(members)) for members in layers]

    def grads(name: str) -> list[Any]:  # the gradients of the parameters of Net field `name`
        layers = zip(*(getattr(net, name) for net in nets), strict=True)
        return [None if members[0] is None else _stack_grads(list(members)) for members in layers]

    first = nets[0]
    return Net(
        weights=rows("weights"),
        biases=rows("biases"),
        weight_grads=grads("weights"),
        bias_grads=grads("biases"),
        activations=list(first.activations),
        norm_modes=list(first.norm_modes),
        gammas=rows("gammas"),
        betas=rows("betas"),
        gamma_grads=grads("gammas"),
        beta_grads=grads("betas"),
        running_means=rows("running_means"),
        running_vars=rows("running_vars"),
        batches_tracked=rows("batches_tracked"),
        momenta=list(first.momenta),
        epsilons=list(first.epsilons),
    )


@dataclass
class StackedBatches:
    """An epoch's data for K members: shared resident rows, each member's sample order [K, n], and
    per member and position the label's log-probability [K, n, 1] and the prediction [K, n]."""

    x: Tensor
    y: Tensor
    orders: Tensor
    size: int
    picked: Tensor
    predicted: Tensor

    @classmethod
    def for_epoch(cls, x: Tensor, y: Tensor, orders: Tensor, size: int) -> StackedBatches:
        picked = torch.zeros(*orders.shape, 1, dtype=x.dtype, device=x.device)
        return cls(x, y, orders, size, picked, torch.zeros_like(orders))

    def gather(self, start: int, end: int) -> tuple[Tensor, Tensor]:
        idx = self.orders[:, start:end]
        k, n = idx.shape
        flat = idx.reshape(-1)
        return self.x.index_select(0, flat).view(k, n, -1), self.y.index_select(0, flat).view(k, n)

    def select(self, rows: list[int]) -> StackedBatches:
        """The same epoch for the members at `rows` only."""
        index = torch.tensor(rows, device=self.orders.device)
        return StackedBatches(
            self.x, self.y, self.orders.index_select(0, index), self.size,
            self.picked.index_select(0, index), self.predicted.index_select(0, index),
        )  # fmt: skip

    def totals(self, k: int) -> tuple[float, int]:
        """Member k's (summed cross-entropy, correct predictions) over the epoch, as Batches.totals."""
        return fastpath.Batches(
            self.x, self.y, self.orders[k], self.size, self.picked[k], self.predicted[k]
        ).totals()


@cache
def compiled() -> fastpath.Compiled:
    """The TorchScript versions of this module's loop (compiled once per process)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # see fastpath.compiled
        return fastpath.Compiled(torch.jit.script(forward_backward), torch.jit.script(train_steps))


# ----------------------------------------------------------------------------------------------------
# TorchScript-compatible functions, as fastpath's with a leading member dimension K on every tensor.


def _bn_forward(
    h: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    tracked: Tensor | None,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train-mode BatchNorm1d of each member's [n, C] slice of h [K, n, C]: one kernel over the K·C
    channels side by side, [n, K·C]. Returns (output [K, n, C], that [n, K·C] input, mean, inv_std)."""
    k, n, c = h.shape[0], h.shape[1], h.shape[2]
    flat = h.transpose(0, 1).reshape(n, k * c)
    factor = momentum
    if tracked is not None:
        tracked.add_(1)
        if momentum < 0:  # momentum=None: the cumulative average (every member has seen as many batches)
            factor = 1.0 / float(tracked[0].item())
    out, mean, inv_std = torch.native_batch_norm(
        flat, _flat(gamma), _flat(beta), _flat(running_mean), _flat(running_var), True, factor, eps
    )
    return out.view(n, k, c).transpose(0, 1), flat, mean, inv_std


def _flat(t: Tensor | None) -> Tensor | None:
    if t is None:
        return t
    return t.view(-1)


def _bn_backward(
    d: Tensor,
    i: int,
    normalised: list[Tensor],
    means: list[Tensor],
    inv_stds: list[Tensor],
    gammas: list[Tensor | None],
    betas: list[Tensor | None],
    gamma_grads: list[Tensor | None],
    beta_grads: list[Tensor | None],
    running_means: list[Tensor | None],
    running_vars: list[Tensor | None],
    epsilons: list[float],
) -> Tensor:
    k, n, c = d.shape[0], d.shape[1], d.shape[2]
    gamma, beta = gammas[i], betas[i]
    grads = torch.ops.aten.native_batch_norm_backward(
        d.transpose(0, 1).reshape(n, k * c), normalised[i], _flat(gamma), _flat(running_means[i]),
        _flat(running_vars[i]), means[i], inv_stds[i], True, epsilons[i],
        [True, gamma is not None, beta is not None],
    )  # fmt: skip
    gamma_grad, beta_grad = gamma_grads[i], beta_grads[i]
    if gamma_grad is not None:
        gamma_grad.view(-1).copy_(grads[1])
    if beta_grad is not None:
        beta_grad.view(-1).copy_(grads[2])
    d_in: Tensor = grads[0]
    return d_in.view(n, k, c).transpose(0, 1)


def forward_backward(
    x: Tensor,
    y: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    weight_grads: list[Tensor],
    bias_grads: list[Tensor],
    activations: list[int],
    norm_modes: list[int],
    gammas: list[Tensor | None],
    betas: list[Tensor | None],
    gamma_grads: list[Tensor | None],
    beta_grads: list[Tensor | None],
    running_means: list[Tensor | None],
    running_vars: list[Tensor | None],
    batches_tracked: list[Tensor | None],
    momenta: list[float],
    epsilons: list[float],
    picked: Tensor,
    predicted: Tensor,
) -> None:
    """One batch of each member: x [K, n, features], y [K, n]; as fastpath.forward_backward per member,
    with picked [K, n, 1] and predicted [K, n]."""
    blocks = len(activations)
    inputs: list[Tensor] = []
    outputs: list[Tensor] = []
    normalised: list[Tensor] = []
    means: list[Tensor] = []
    inv_stds: list[Tensor] = []
    h = x
    for i in range(blocks):
        inputs.append(h)
        h = torch.baddbmm(biases[i].unsqueeze(1), h, weights[i].transpose(1, 2))
        mode = norm_modes[i]
        if mode == Norm.BEFORE_ACTIVATION.value:
            h, flat, mean, inv_std = _bn_forward(
                h, gammas[i], betas[i], running_means[i], running_vars[i], batches_tracked[i], momenta[i],
                epsilons[i],
            )  # fmt: skip
            normalised.append(flat)
            means.append(mean)
            inv_stds.append(inv_std)
        h = fastpath.activate(h, activations[i])
        outputs.append(h)
        if mode == Norm.AFTER_ACTIVATION.value:
            h, flat, mean, inv_std = _bn_forward(
                h, gammas[i], betas[i], running_means[i], running_vars[i], batches_tracked[i], momenta[i],
                epsilons[i],
            )  # fmt: skip
            normalised.append(flat)
            means.append(mean)
            inv_stds.append(inv_std)
        if mode == Norm.NONE.value:  # keep the lists indexed by block
            normalised.append(h)
            means.append(h)
            inv_stds.append(h)
    logits = torch.baddbmm(biases[blocks].unsqueeze(1), h, weights[blocks].transpose(1, 2))
    log_probs = logits.log_softmax(dim=2)
    target = y.unsqueeze(2)
    picked.copy_(torch.gather(log_probs, 2, target))
    predicted.copy_(torch.argmax(logits, dim=2))
    d_log_probs = torch.zeros_like(log_probs).scatter_(2, target, -1.0 / y.shape[1])
    d = torch.ops.aten._log_softmax_backward_data(d_log_probs, log_probs, 2, log_probs.dtype)
    torch.bmm(d.transpose(1, 2), h, out=weight_grads[blocks])
    torch.sum(d, dim=1, out=bias_grads[blocks])
    d = torch.bmm(d, weights[blocks])
    for i in range(blocks - 1, -1, -1):
        mode = norm_modes[i]
        if mode == Norm.AFTER_ACTIVATION.value:
            d = _bn_backward(d, i, normalised, means, inv_stds, gammas, betas, gamma_grads, beta_grads,
                             running_means, running_vars, epsilons)  # fmt: skip
        d = fastpath.activation_backward(d, outputs[i], activations[i])
        if mode == Norm.BEFORE_ACTIVATION.value:
            d = _bn_backward(d, i, normalised, means, inv_stds, gammas, betas, gamma_grads, beta_grads,
                             running_means, running_vars, epsilons)  # fmt: skip
        torch.bmm(d.transpose(1, 2), inputs[i], out=weight_grads[i])
        torch.sum(d, dim=1, out=bias_grads[i])
        if i > 0:
            d = torch.bmm(d, weights[i])


def train_steps(
    x_all: Tensor,
    y_all: Tensor,
    orders: Tensor,
    start: int,
    stop: int,
    batch_size: int,
    weights: list[Tensor],
    biases: list[Tensor],
    weight_grads: list[Tensor],
    bias_grads: list[Tensor],
    activations: list[int],
    norm_modes: list[int],
    gammas: list[Tensor | None],
    betas: list[Tensor | None],
    gamma_grads: list[Tensor | None],
    beta_grads: list[Tensor | None],
    running_means: list[Tensor | None],
    running_vars: list[Tensor | None],
    batches_tracked: list[Tensor | None],
    momenta: list[float],
    epsilons: list[float],
    picked: Tensor,
    predicted: Tensor,
    optimizer: int,
    params: list[Tensor],
    grads: list[Tensor],
    state_a: list[Tensor],
    state_b: list[Tensor],
    steps: list[Tensor],
    hyper: list[float],
) -> None:
    """The batches of orders[:, start:stop]: a stacked forward-backward, then the members' updates
    (fastpath.train_steps' optimizer arguments, each list holding every member's tensors)."""
    k = orders.shape[0]
    counter = fastpath.shared_step(steps)
    for s in range(start, stop, batch_size):
        e = min(s + batch_size, stop)
        idx = orders[:, s:e].reshape(-1)
        forward_backward(
            x_all.index_select(0, idx).view(k, e - s, -1), y_all.index_select(0, idx).view(k, e - s),
            weights, biases, weight_grads, bias_grads, activations, norm_modes, gammas, betas, gamma_grads,
            beta_grads, running_means, running_vars, batches_tracked, momenta, epsilons, picked[:, s:e],
            predicted[:, s:e],
        )  # fmt: skip
        fastpath.update(optimizer, params, grads, state_a, state_b, steps, counter, hyper)
    fastpath.store_step(steps, counter)
