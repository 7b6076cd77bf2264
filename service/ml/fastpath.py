"""A hand-written training loop for the MLP family: forward, backward and optimizer without autograd.

The article's network (Flatten → Linear → ReLU → BatchNorm → Linear) is tiny: at batch 32 its matrix
products take about 0.16 ms on one core, while an eager autograd step with `optimizer.step()` costs
about 0.6 ms, most of it dispatch, graph bookkeeping and Python. Here a step is the few dozen tensor
operations the gradients need, each autograd's own kernel (`native_batch_norm` and its backward,
`threshold_backward`, ...), and many steps run in one call of a TorchScript function, so no Python
runs between them; the optimizer update is torch's own fused Adam kernel (or SGD's single-tensor
formula), on the optimizer's own state. The model, the optimizer and their state stay the ordinary
ones, so checkpoints, resumption, evaluation and probes are untouched.

`MlpStep.for_model` accepts only what it reproduces exactly (up to floating-point rounding: tests
compare its gradients and running statistics with autograd's in float64): Flatten, then per block a
Linear, an activation (ReLU, tanh, sigmoid) and an optional BatchNorm1d in either order, then the
output Linear. Anything else (dropout, other norms, weight norm, convolutions) returns None and the
caller trains through autograd.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from enum import Enum
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize


# Codes the TorchScript functions branch on: they take ints (an enum's .value), not Python objects.
class Act(Enum):
    RELU = 0
    TANH = 1
    SIGMOID = 2


class Norm(Enum):
    NONE = 0
    AFTER_ACTIVATION = 1
    BEFORE_ACTIVATION = 2


class Opt(Enum):
    ADAM = 0
    SGD = 1


_ACTIVATIONS: dict[type[nn.Module], int] = {
    nn.ReLU: Act.RELU.value,
    nn.Tanh: Act.TANH.value,
    nn.Sigmoid: Act.SIGMOID.value,
}
# A block's norm slot: exactly BatchNorm1d (no subclass with other statistics) or the empty Identity.
_SLOTS = (nn.BatchNorm1d, nn.Identity)
# Steps per call of the compiled loop: 32 of the article's model (about 10 ms here), fewer for larger
# steps, so that cancellation and the time limit are checked as often at any size (a call costs ~20 µs
# of its own: a fraction of a percent), and at least one.
STEPS_PER_CALL = 32
CALL_WORK = STEPS_PER_CALL * 32 * 101_770  # samples x parameters: 32 article steps at batch 32


@dataclass(frozen=True)
class _Block:
    linear: nn.Linear
    activation: int
    norm: nn.BatchNorm1d | None
    norm_first: bool  # Linear → BN → act (the paper) instead of Linear → act → BN (the Keras code)


@dataclass(frozen=True)
class Net:
    """The tensors of a supported MLP, as the compiled functions take them: per layer (the blocks, then
    the head) its weight and bias with their gradients; per block its activation and norm codes and
    BatchNorm's tensors (None where a block has no BN, or BN has no such tensor) and constants."""

    weights: list[Tensor]
    biases: list[Tensor]
    weight_grads: list[Tensor]
    bias_grads: list[Tensor]
    activations: list[int]
    norm_modes: list[int]
    gammas: list[Tensor | None]
    betas: list[Tensor | None]
    gamma_grads: list[Tensor | None]
    beta_grads: list[Tensor | None]
    running_means: list[Tensor | None]
    running_vars: list[Tensor | None]
    batches_tracked: list[Tensor | None]
    momenta: list[float]  # -1: the cumulative average (momentum=None)
    epsilons: list[float]

    def arguments(self) -> tuple[Any, ...]:
        return (
            self.weights, self.biases, self.weight_grads, self.bias_grads, self.activations,
            self.norm_modes, self.gammas, self.betas, self.gamma_grads, self.beta_grads,
            self.running_means, self.running_vars, self.batches_tracked, self.momenta, self.epsilons,
        )  # fmt: skip


class MlpStep:
    """Training steps of a supported MLP. `step(x, y)` fills every parameter's `.grad`, updates BN's
    running statistics and returns (mean cross-entropy, correct predictions) as tensors; `run(...)`
    trains a range of an epoch's batches, optimizer update included."""

    def __init__(self, blocks: list[_Block], head: nn.Linear) -> None:
        self._params = [p for b in blocks for p in _block_params(b)] + [head.weight, head.bias]
        for p in self._params:
            p.grad = torch.zeros_like(p)  # written in place every step: no allocation, no zero_grad
        self.net = _net(blocks, head)

    @classmethod
    def for_model(cls, model: nn.Module) -> MlpStep | None:
        """A step for `model` if its layers are all supported, else None (train with autograd)."""
        matched = _match_model(model)
        return None if matched is None else cls(*matched)

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether `for_model` makes a step for `model`, without making it (its gradient buffers
        and compiled network)."""
        return _match_model(model) is not None

    def steps_per_call(self, batch_size: int) -> int:
        """How many steps `run` should be given at a time (see STEPS_PER_CALL)."""
        work = batch_size * sum(p.numel() for p in self._params)
        return max(1, min(STEPS_PER_CALL, CALL_WORK // work))

    @torch.no_grad()
    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        picked = torch.empty(len(y), 1, dtype=x.dtype, device=x.device)
        predicted = torch.empty_like(y)
        compiled().forward_backward(x.flatten(1), y, *self.net.arguments(), picked, predicted)
        return -picked.mean(), (predicted == y).sum()

    @torch.no_grad()
    def run(
        self,
        optimizer: torch.optim.Optimizer,
        batches: Batches,
        start: int,
        stop: int,
    ) -> None:
        """Train on the batches of `batches.order[start:stop]`, `batches.size` samples each, and write
        each sample's log-probability of its label and its prediction into `batches` at its position."""
        update = optimizer_update(optimizer)
        if update is None:  # a fresh optimizer: its own first step creates its state as it always does
            end = min(start + batches.size, stop)
            idx = batches.order[start:end]
            x, y = batches.x.index_select(0, idx), batches.y.index_select(0, idx)
            compiled().forward_backward(
                x, y, *self.net.arguments(), batches.picked[start:end], batches.predicted[start:end]
            )
            optimizer.step()
            start = end
            update = optimizer_update(optimizer)
            assert update is not None  # the step above created the state
        if start < stop:
            compiled().train_steps(
                batches.x, batches.y, batches.order, start, stop, batches.size,
                *self.net.arguments(), batches.picked, batches.predicted, *update,
            )  # fmt: skip


@dataclass
class Batches:
    """An epoch's data as the loop reads it: flat rows resident on the device, the epoch's sample order
    and batch size, and per position the label's log-probability and the prediction (the epoch's
    loss and accuracy are summed from these once, at its end: no per-step host sync)."""

    x: Tensor
    y: Tensor
    order: Tensor
    size: int
    picked: Tensor  # [samples, 1], float
    predicted: Tensor  # [samples], int64

    @classmethod
    def for_epoch(cls, x: Tensor, y: Tensor, order: Tensor, size: int) -> Batches:
        # A position nobody trains here (another data-parallel process's shard) adds nothing to the
        # totals: no loss, and a prediction of -1, which no label equals.
        picked = torch.zeros(len(order), 1, dtype=x.dtype, device=x.device)
        return cls(x, y, order, size, picked, torch.full_like(order, -1))

    def totals(self) -> tuple[float, int]:
        """(summed cross-entropy, correct predictions) over the epoch's samples this process trained."""
        loss_sum = -self.picked.sum(dtype=torch.float64).item()
        correct = int((self.predicted == self.y.index_select(0, self.order)).sum().item())
        return loss_sum, correct


def optimizer_update(optimizer: torch.optim.Optimizer) -> tuple[Any, ...] | None:
    """The compiled loop's optimizer arguments for `optimizer`'s single group, from its own state
    tensors (updated in place, so checkpoints see them), or None while that state does not exist."""
    (group,) = optimizer.param_groups
    params: list[Tensor] = group["params"]
    grads = [p.grad for p in params]
    states = [optimizer.state.get(p) for p in params]
    if isinstance(optimizer, torch.optim.Adam):
        if not all(states):
            return None
        beta1, beta2 = group["betas"]
        first = [s["exp_avg"] for s in states]  # type: ignore[index]
        second = [s["exp_avg_sq"] for s in states]  # type: ignore[index]
        steps = [s["step"] for s in states]  # type: ignore[index]
        hyper = [float(group["lr"]), float(beta1), float(beta2), float(group["eps"])]
        return Opt.ADAM.value, params, grads, first, second, steps, [*hyper, float(group["weight_decay"])]
    momentum = float(group["momentum"])
    if momentum and not all(states):
        return None
    buffers = [s["momentum_buffer"] for s in states] if momentum else []  # type: ignore[index]
    hyper = [float(group["lr"]), momentum, 0.0, 0.0, float(group["weight_decay"])]
    return Opt.SGD.value, params, grads, buffers, [], [], hyper


def supports_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `run` reproduces `optimizer.step()`: fused Adam as training makes it, or plain SGD."""
    if len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    if type(optimizer) is torch.optim.Adam:  # not AdamW: decoupled weight decay is another kernel
        unsupported = group["amsgrad"] or group["maximize"] or group.get("decoupled_weight_decay")
        return bool(group["fused"]) and not unsupported
    if type(optimizer) is torch.optim.SGD:
        return not (group["nesterov"] or group["maximize"] or group["dampening"])
    return False


@cache
def compiled() -> Compiled:
    """The TorchScript versions of this module's loop (compiled once per process: about 0.15 s)."""
    with warnings.catch_warnings():
        # torch.jit.script is deprecated in favour of torch.compile, which on this 2-core CPU does not
        # pay for its compile time at this size; torch is pinned, and the functions run unscripted too.
        warnings.simplefilter("ignore", DeprecationWarning)
        return Compiled(torch.jit.script(forward_backward), torch.jit.script(train_steps))


@dataclass(frozen=True)
class Compiled:
    """Calls the scripted functions without TorchScript's graph optimisations: they rewrite some
    operations (addmm into mm + add, for one), which rounds differently from autograd. Unoptimised,
    the gradients are autograd's bit for bit, and the loop measured as fast."""

    _forward_backward: Any
    _train_steps: Any

    def forward_backward(self, *args: Any) -> None:
        with torch.jit.optimized_execution(False):  # type: ignore[attr-defined]
            self._forward_backward(*args)

    def train_steps(self, *args: Any) -> None:
        with torch.jit.optimized_execution(False):  # type: ignore[attr-defined]
            self._train_steps(*args)


def _plain_linear(layer: nn.Linear) -> bool:
    return layer.bias is not None and not parametrize.is_parametrized(layer)


def _match_block(layers: list[nn.Module]) -> _Block | None:
    """Linear, then the activation and the norm slot (BatchNorm1d or an empty Identity) in either order."""
    linear = layers[0]
    if len(layers) < 3 or not isinstance(linear, nn.Linear) or not _plain_linear(linear):
        return None
    second, third = layers[1:3]
    if type(second) in _ACTIVATIONS and type(third) in _SLOTS:
        return _Block(linear, _ACTIVATIONS[type(second)], _batch_norm(third), norm_first=False)
    if type(second) in _SLOTS and type(third) in _ACTIVATIONS:
        return _Block(linear, _ACTIVATIONS[type(third)], _batch_norm(second), norm_first=True)
    return None


def _batch_norm(slot: nn.Module) -> nn.BatchNorm1d | None:
    return slot if isinstance(slot, nn.BatchNorm1d) else None


def _block_params(block: _Block) -> list[Tensor]:
    params = [block.linear.weight, block.linear.bias]
    if block.norm is not None:
        params += [p for p in (block.norm.weight, block.norm.bias) if p is not None]
    return params


def _match_model(model: nn.Module) -> tuple[list[_Block], nn.Linear] | None:
    """`model`'s blocks and head if every layer is one the fast path trains: Flatten, then
    Linear → act → norm blocks (or Linear → norm → act), then a plain Linear."""
    children = list(model.children())
    if not children or not isinstance(children[0], nn.Flatten) or children[0].end_dim != -1:
        return None
    layers, blocks = children[1:], []
    while len(layers) > 1:
        block = _match_block(layers)
        if block is None:
            return None
        blocks.append(block)
        layers = layers[3:]
    head = layers[0] if layers else None
    if not isinstance(head, nn.Linear) or not _plain_linear(head):
        return None
    return blocks, head


def _net(blocks: list[_Block], head: nn.Linear) -> Net:
    linears = [b.linear for b in blocks] + [head]
    norms = [b.norm for b in blocks]

    def grad(p: Tensor | None) -> Tensor | None:
        return None if p is None else p.grad

    def mode(b: _Block) -> int:
        if b.norm is None:
            return int(Norm.NONE.value)
        return int((Norm.BEFORE_ACTIVATION if b.norm_first else Norm.AFTER_ACTIVATION).value)

    def running(bn: nn.BatchNorm1d | None, name: str) -> Tensor | None:
        tracked = bn is not None and bn.track_running_stats
        return getattr(bn, name) if tracked else None

    return Net(
        weights=[m.weight for m in linears],
        biases=[m.bias for m in linears],
        weight_grads=[m.weight.grad for m in linears],  # type: ignore[misc]
        bias_grads=[m.bias.grad for m in linears],  # type: ignore[misc]
        activations=[b.activation for b in blocks],
        norm_modes=[mode(b) for b in blocks],
        gammas=[None if bn is None else bn.weight for bn in norms],
        betas=[None if bn is None else bn.bias for bn in norms],
        gamma_grads=[None if bn is None else grad(bn.weight) for bn in norms],
        beta_grads=[None if bn is None else grad(bn.bias) for bn in norms],
        running_means=[running(bn, "running_mean") for bn in norms],
        running_vars=[running(bn, "running_var") for bn in norms],
        batches_tracked=[running(bn, "num_batches_tracked") for bn in norms],
        momenta=[-1.0 if bn is None or bn.momentum is None else float(bn.momentum) for bn in norms],
        epsilons=[1e-5 if bn is None else float(bn.eps) for bn in norms],
    )


# ----------------------------------------------------------------------------------------------------
# TorchScript-compatible functions: tensors, lists, ints and floats only; no Python objects.


def activate(z: Tensor, activation: int) -> Tensor:
    if activation == Act.RELU.value:
        return torch.relu(z)
    if activation == Act.TANH.value:
        return torch.tanh(z)
    return torch.sigmoid(z)


def activation_backward(d: Tensor, out: Tensor, activation: int) -> Tensor:
    """dL/d(input) from dL/d(output) and the output: autograd's own kernels for each activation."""
    if activation == Act.RELU.value:
        d_in: Tensor = torch.ops.aten.threshold_backward(d, out, 0.0)
    elif activation == Act.TANH.value:
        d_in = torch.ops.aten.tanh_backward(d, out)
    else:
        d_in = torch.ops.aten.sigmoid_backward(d, out)
    return d_in


def _bn_forward(
    t: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    tracked: Tensor | None,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Train-mode BatchNorm1d as nn.BatchNorm1d computes it: the kernel it calls, which normalises by
    the batch statistics and moves the running buffers; the counter first, as F.batch_norm's caller."""
    factor = momentum
    if tracked is not None:
        tracked.add_(1)
        if momentum < 0:  # momentum=None: the cumulative average over the batches seen
            factor = 1.0 / float(tracked.item())
    return torch.native_batch_norm(t, gamma, beta, running_mean, running_var, True, factor, eps)


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
    """One batch: every gradient of the mean cross-entropy into the `*_grads` tensors, BN's running
    statistics updated, and each sample's log-probability of its label and prediction written into
    `picked` [n, 1] and `predicted` [n]."""
    blocks = len(activations)
    inputs: list[Tensor] = []  # each block's input
    outputs: list[Tensor] = []  # each activation's output
    normalised: list[Tensor] = []  # each BN's input (the activation's output where BN comes after it)
    means: list[Tensor] = []
    inv_stds: list[Tensor] = []
    h = x
    for i in range(blocks):
        inputs.append(h)
        h = torch.addmm(biases[i], h, weights[i].t())
        mode = norm_modes[i]
        if mode == Norm.BEFORE_ACTIVATION.value:
            normalised.append(h)
            h, mean, inv_std = _bn_forward(
                h, gammas[i], betas[i], running_means[i], running_vars[i], batches_tracked[i], momenta[i],
                epsilons[i],
            )  # fmt: skip
            means.append(mean)
            inv_stds.append(inv_std)
        h = activate(h, activations[i])
        outputs.append(h)
        if mode == Norm.AFTER_ACTIVATION.value:
            normalised.append(h)
            h, mean, inv_std = _bn_forward(
                h, gammas[i], betas[i], running_means[i], running_vars[i], batches_tracked[i], momenta[i],
                epsilons[i],
            )  # fmt: skip
            means.append(mean)
            inv_stds.append(inv_std)
        if mode == Norm.NONE.value:  # keep the lists indexed by block
            normalised.append(h)
            means.append(h)
            inv_stds.append(h)
    logits = torch.addmm(biases[blocks], h, weights[blocks].t())
    log_probs = logits.log_softmax(dim=1)
    target = y.unsqueeze(1)
    torch.gather(log_probs, 1, target, out=picked)
    torch.argmax(logits, dim=1, out=predicted)
    # d(mean CE)/d logits = (softmax − one-hot) / n, by the kernels autograd runs for cross_entropy
    # (nll_loss's gradient, then log_softmax's), so the gradients are autograd's to the last bit.
    d_log_probs = torch.zeros_like(log_probs).scatter_(1, target, -1.0 / len(y))
    d = torch.ops.aten._log_softmax_backward_data(d_log_probs, log_probs, 1, log_probs.dtype)
    torch.mm(d.t(), h, out=weight_grads[blocks])
    torch.sum(d, dim=0, out=bias_grads[blocks])
    d = torch.mm(d, weights[blocks])
    for i in range(blocks - 1, -1, -1):
        mode = norm_modes[i]
        if mode == Norm.AFTER_ACTIVATION.value:
            d = _bn_backward(d, i, normalised, means, inv_stds, gammas, betas, gamma_grads, beta_grads,
                             running_means, running_vars, epsilons)  # fmt: skip
        d = activation_backward(d, outputs[i], activations[i])
        if mode == Norm.BEFORE_ACTIVATION.value:
            d = _bn_backward(d, i, normalised, means, inv_stds, gammas, betas, gamma_grads, beta_grads,
                             running_means, running_vars, epsilons)  # fmt: skip
        torch.mm(d.t(), inputs[i], out=weight_grads[i])
        torch.sum(d, dim=0, out=bias_grads[i])
        if i > 0:  # the network's input needs no gradient
            d = torch.mm(d, weights[i])


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
    """Block i's BN: its parameters' gradients into their `.grad`; returns dL/d(BN input)."""
    gamma, beta = gammas[i], betas[i]
    grads = torch.ops.aten.native_batch_norm_backward(
        d, normalised[i], gamma, running_means[i], running_vars[i], means[i], inv_stds[i], True,
        epsilons[i], [True, gamma is not None, beta is not None],
    )  # fmt: skip
    gamma_grad, beta_grad = gamma_grads[i], beta_grads[i]
    if gamma_grad is not None:
        gamma_grad.copy_(grads[1])
    if beta_grad is not None:
        beta_grad.copy_(grads[2])
    d_in: Tensor = grads[0]
    return d_in


def train_steps(
    x_all: Tensor,
    y_all: Tensor,
    order: Tensor,
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
    """The batches of order[start:stop]: a forward-backward and an optimizer update each.

    Adam: state_a/state_b/steps are exp_avg/exp_avg_sq/step and hyper is (lr, beta1, beta2, eps,
    weight_decay); SGD: state_a holds the momentum buffers (empty without momentum) and hyper is
    (lr, momentum, -, -, weight_decay)."""
    counter = shared_step(steps)
    for s in range(start, stop, batch_size):
        e = min(s + batch_size, stop)
        idx = order[s:e]
        forward_backward(
            x_all.index_select(0, idx), y_all.index_select(0, idx), weights, biases, weight_grads,
            bias_grads, activations, norm_modes, gammas, betas, gamma_grads, beta_grads, running_means,
            running_vars, batches_tracked, momenta, epsilons, picked[s:e], predicted[s:e],
        )  # fmt: skip
        update(optimizer, params, grads, state_a, state_b, steps, counter, hyper)
    store_step(steps, counter)


def shared_step(steps: list[Tensor]) -> Tensor | None:
    """One counter standing for every parameter's Adam step count while the compiled loop runs, when
    they are all equal (always, for the optimizers training makes: every step updates every parameter):
    a step then increments one tensor instead of one per parameter (a few µs each, ~3 % of the
    article's step). None when they differ, or for SGD (no counters): each is then counted as torch
    counts it. `store_step` writes the count back, so the optimizer's state is what it would be."""
    if len(steps) == 0:
        return None
    for step in steps:
        if not torch.equal(step, steps[0]):
            return None
    return steps[0].clone()


def store_step(steps: list[Tensor], counter: Tensor | None) -> None:
    if counter is not None:
        for step in steps:
            step.copy_(counter)


def update(
    optimizer: int,
    params: list[Tensor],
    grads: list[Tensor],
    state_a: list[Tensor],
    state_b: list[Tensor],
    steps: list[Tensor],
    counter: Tensor | None,
    hyper: list[float],
) -> None:
    """One optimizer step of the compiled loops (see train_steps for the arguments; `counter` is
    shared_step's)."""
    if optimizer == Opt.SGD.value:
        sgd(params, grads, state_a, hyper)
        return
    # What torch.optim.Adam(fused=True).step() does for one group: the step counts, then its kernel.
    if counter is None:
        torch._foreach_add_(steps, 1)
    else:
        counter.add_(1)
        steps = [counter for _ in steps]
    torch._fused_adam_(
        params, grads, state_a, state_b, [], steps, amsgrad=False, lr=hyper[0], beta1=hyper[1],
        beta2=hyper[2], weight_decay=hyper[4], eps=hyper[3], maximize=False, grad_scale=None,
        found_inf=None,
    )  # fmt: skip


def sgd(params: list[Tensor], grads: list[Tensor], buffers: list[Tensor], hyper: list[float]) -> None:
    """torch.optim.SGD's single-tensor update (no dampening, not Nesterov), operation for operation."""
    lr, momentum, weight_decay = hyper[0], hyper[1], hyper[4]
    for i in range(len(params)):
        g = grads[i]
        if weight_decay != 0:
            g = g.add(params[i], alpha=weight_decay)
        if momentum != 0:
            g = buffers[i].mul_(momentum).add_(g)
        params[i].add_(g, alpha=-lr)
