"""The training loop, evaluation and inference. Nothing here knows about Celery, HTTP or the database:
progress and cancellation go through a `TrainingCallbacks` object that the task layer supplies.

`train` is the one epoch loop. What varies is the step strategy `make_step` picks from the model and
the machine: the compiled fast path (fastpath.MlpStep) for the MLPs and optimizers it reproduces, else
autograd; and whether the process trains alone or as one rank of a data-parallel run, which the
`parallel` argument says (service/ml/distributed.py starts the ranks and supplies it).

`train`, `evaluate` and `predict_proba` each set the model's mode on purpose: with batch
normalization, train mode normalises with the batch's statistics and updates the running buffers,
eval mode uses the buffers. Evaluating in train mode would silently give different numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cache, partial
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from service.ml import batch_order
from service.ml.agc import agc_parameters, clip_gradients_
from service.ml.config import BATCH_STAT_KINDS, ModelConfig, TrainConfig
from service.ml.datasets import ImageDataset, make_synthetic, to_inputs, to_inputs_once, train_val_split
from service.ml.fastpath import Batches, MlpStep, supports_optimizer
from service.ml.nets import forward_profile, make_net, norm_slots
from service.ml.norms import end_epoch
from service.ml.probes import (
    PROBE_SAMPLES,
    STATISTICS_SAMPLES,
    EpochProbes,
    ProbeValue,
    SlotStatistics,
    capture_slot_inputs,
    slot_statistics,
)
from service.ml.resnets import FIXUP_SCALAR_LR_FACTOR, fixup_scalar_parameters
from service.ml.resume import TrainingState, restore, save_training_state
from service.ml.trainable import restrict_trainable

# should_stop() may query a database: ask at most this often between steps (plus once per epoch end).
STOP_CHECK_INTERVAL_S = 0.5
# A validation batch's largest layer output holds at most this many values (8 MiB of float32): past
# the caches, a batch costs more per sample. Over 4,000 images on two threads, a CNN [32, 64] took
# 0.90-0.93 s at 1,024 images a batch, 0.27-0.31 s at 83 (what this gives it); a ResNet-20 3.4 s and
# 1.6 s at 167; an LSTM with recurrent BN 0.41-0.46 s and 0.36 s at 146; MLPs keep 1,024, which
# their small layers run fastest.
EVALUATION_BATCH_VALUES = 2**21
EVALUATION_MAX_BATCH = 1024
# MLPs that fastpath.MlpStep supports train with its hand-written, compiled loop (same gradients,
# about twice as fast at the article's size); False trains every model through autograd (tests compare).
USE_FAST_PATH = True

# A convolutional network trains in channels-last layout on the CPU when it trains alone
# (`to_channels_last`); False keeps torch's default layout (tests compare the two).
USE_CHANNELS_LAST = True

# Data-parallel processes agree on stopping (one tiny all_reduce) before every call of this many steps.
AGREED_STOP_STEPS = 16

# Trains on the batches of positions [start, stop) of an epoch's order (see fastpath.Batches).
RunBatches = Callable[[Batches, int, int], None]
DeviceName = str  # "cpu", "cuda" or "auto"
CPU = torch.device("cpu")


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # 1-based
    train_loss: float  # sample-weighted mean over the epoch, in train mode (what Keras reports)
    train_accuracy: float
    val_loss: float  # eval mode, after the epoch
    val_accuracy: float
    seconds: float  # wall time of the epoch, validation included
    # Each normalisation slot's input on the probe batch after this epoch; epoch 1 also carries the
    # initial network's (epoch 0), so the stored series starts before any training.
    layer_stats: tuple[SlotStatistics, ...] = ()
    # The probes the run switched on (TrainConfig.probes), after this epoch; epoch 1 also carries
    # the initial network's, as layer_stats does.
    probes: tuple[ProbeValue, ...] = ()
    # Wall time of the epoch's training steps alone: `seconds` less validation.
    train_seconds: float | None = None

    @property
    def diverged(self) -> bool:
        """Whether a loss of this epoch is NaN or infinite: the run diverged and stops here."""
        return not (math.isfinite(self.train_loss) and math.isfinite(self.val_loss))


# Returns the training state (model + optimizer) at this epoch boundary as safetensors bytes.
Snapshot = Callable[[], bytes]


class TrainingCallbacks(Protocol):
    def on_epoch_end(self, metrics: EpochMetrics, snapshot: Snapshot) -> None:
        """Called after each epoch's validation; `snapshot()` serialises the state to resume from."""
        ...

    def should_stop(self) -> bool:
        """Cooperative cancellation: True makes the loop stop at the next step boundary."""
        ...


class NullCallbacks:
    def on_epoch_end(self, metrics: EpochMetrics, snapshot: Snapshot) -> None:
        pass

    def should_stop(self) -> bool:
        return False


_NULL_CALLBACKS = NullCallbacks()  # stateless, so one shared default instance is safe


@dataclass
class TrainResult:
    model: nn.Module
    epochs: list[EpochMetrics] = field(default_factory=list)
    cancelled: bool = False
    # True when a final batch of a single sample was skipped each epoch (BN cannot train on it).
    dropped_last_batch: bool = False

    @property
    def diverged_at(self) -> int | None:
        """The epoch whose loss became non-finite (training stopped after reporting it), or None."""
        return next((m.epoch for m in self.epochs if m.diverged), None)


class StopPoller:
    """Calls should_stop() at most every STOP_CHECK_INTERVAL_S between steps, and on demand."""

    def __init__(self, callbacks: TrainingCallbacks) -> None:
        self._callbacks = callbacks
        self._last = time.monotonic()

    def due(self) -> bool:
        if time.monotonic() - self._last < STOP_CHECK_INTERVAL_S:
            return False
        return self.now()

    def now(self) -> bool:
        self._last = time.monotonic()
        return self._callbacks.should_stop()


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a function of (seed, epoch) only, so every configuration
    trained with the same seed sees the same batches in the same order."""
    (state,) = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(state)))


def epoch_order(tcfg: TrainConfig, labels: torch.Tensor, epoch: int) -> torch.Tensor:
    """The sample order of 1-based `epoch` by train.batch_order: the uniform `epoch_permutation`, or a
    class-structured order (service/ml/batch_order.py); each a function of (labels, seed, epoch)."""
    if tcfg.batch_order == "shuffled":
        return epoch_permutation(len(labels), tcfg.seed, epoch)
    return batch_order.epoch_order(
        tcfg.batch_order, labels, tcfg.seed, epoch, tcfg.batch_size, tcfg.batch_classes
    )


def resolve_device(name: DeviceName) -> torch.device:
    """The device to train on: cpu, cuda, or auto (cuda when this process sees a GPU, else cpu).
    Called in the process that trains (a pool child), never in a parent that forks: CUDA does not
    survive a fork (pytorch#40403)."""
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else CPU
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device 'cuda' asked for, but this process sees no CUDA device (torch {torch.__version__})"
        )
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; expected 'cpu', 'cuda' or 'auto'")
    return torch.device(name)


def build_model(cfg: ModelConfig, seed: int) -> nn.Module:
    """make_net under a seeded, forked RNG: identical initial weights per seed, global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_net(cfg)


def make_optimizer(model: nn.Module, tcfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer a run's config asks for, over all of `model`'s parameters (distributed ranks and
    the benchmark build theirs here too)."""
    params = param_groups(model, tcfg.lr)
    # weight_decay is torch's: an L2 term added to the gradient (coupled, also for Adam), on every
    # parameter; adam_eps is 1e-8 in PyTorch and 1e-7 in Keras (the spec's compat picks).
    if tcfg.optimizer == "adam":
        # fused: one kernel per step for all parameters instead of a dozen foreach passes (a fifth
        # of the article's step time); its state is the same, so checkpoints and resumption are too.
        return torch.optim.Adam(
            params, lr=tcfg.lr, eps=tcfg.adam_eps, weight_decay=tcfg.weight_decay, fused=True
        )
    if tcfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    raise ValueError(f"unknown optimizer {tcfg.optimizer!r}; expected 'adam' or 'sgd'")


# A param group's learning rate is the epoch's (lr_at) times its LR_FACTOR (1 when absent).
LR_FACTOR = "lr_factor"


def param_groups(model: nn.Module, lr: float) -> list[dict[str, Any]] | Iterator[nn.Parameter]:
    """The optimizer's parameters: one group of all of them, except in a Fixup network, whose scalar
    biases and multipliers (and classifier bias) train at a tenth of the rate in a second group, as
    in the authors' code (resnets.fixup_scalar_parameters)."""
    scalars = fixup_scalar_parameters(model)
    if not scalars:
        return model.parameters()
    slow = {id(p) for _, p in scalars}
    return [
        {"params": [p for p in model.parameters() if id(p) not in slow]},
        {
            "params": [p for _, p in scalars],
            "lr": lr * FIXUP_SCALAR_LR_FACTOR,
            LR_FACTOR: FIXUP_SCALAR_LR_FACTOR,
        },
    ]


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The epoch's rate on every group, scaled by the group's LR_FACTOR (Fixup's scalars: 0.1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get(LR_FACTOR, 1.0)


@dataclass(frozen=True)
class Shard:
    """The part of every batch a process trains on: the `rank`-th of `world` contiguous parts whose
    sizes differ by at most one (as Tensor.tensor_split cuts); the whole batch for a process alone."""

    rank: int = 0
    world: int = 1

    def bounds(self, start: int, stop: int) -> tuple[int, int]:
        """This shard's positions [lo, hi) of the batch at positions [start, stop)."""
        size, extra = divmod(stop - start, self.world)
        lo = start + self.rank * size + min(self.rank, extra)
        return lo, lo + size + (1 if self.rank < extra else 0)

    def loss_weight(self, start: int, stop: int) -> float:
        """What the shard's mean loss is multiplied by so that DDP's average of the processes' gradients
        is the gradient of the whole batch's mean loss, whatever the shard sizes (exactly 1 alone)."""
        lo, hi = self.bounds(start, stop)
        return self.world * (hi - lo) / (stop - start)


def autograd_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    shard: Shard,
    batches: Batches,
    start: int,
    stop: int,
    agc: float | None = None,
) -> None:
    """The autograd step strategy: per batch, gradients of the mean cross-entropy over this process's
    shard of it, and an optimizer step; each trained sample's results go into `batches`. With `agc`
    (train.agc), the gradients are adaptively clipped at that λ between backward and step."""
    clipped = agc_parameters(unwrapped(model)) if agc is not None else []
    for s in range(start, stop, batches.size):
        e = min(s + batches.size, stop)
        lo, hi = shard.bounds(s, e)
        idx = batches.order[lo:hi]
        y = batches.y.index_select(0, idx)
        logits: torch.Tensor = model(batches.x.index_select(0, idx))
        log_probs = F.log_softmax(logits, dim=1)  # then nll_loss: what F.cross_entropy computes
        loss = F.nll_loss(log_probs, y) * shard.loss_weight(s, e)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        if agc is not None:
            clip_gradients_(clipped, agc)
        optimizer.step()
        batches.picked[lo:hi] = log_probs.detach().gather(1, y.unsqueeze(1))
        batches.predicted[lo:hi] = logits.detach().argmax(dim=1)


@dataclass(frozen=True)
class Step:
    """A step strategy: `run(batches, start, stop)` trains the batches of those positions, given
    `steps_per_call` batches at a time (the loop checks for cancellation between calls)."""

    run: RunBatches
    steps_per_call: int
    fast_path: bool  # fastpath's compiled loop, rather than autograd


def trains_fast(cfg: ModelConfig) -> bool:
    """Whether `make_net(cfg)` trains through the compiled fast path (with either optimizer bnlab
    makes)."""
    return USE_FAST_PATH and _fast_path_supports(cfg)


@cache
def _fast_path_supports(cfg: ModelConfig) -> bool:
    with torch.device("meta"):  # the layers alone matter: no memory, no random draws
        return MlpStep.supports(make_net(cfg))


def make_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    shard: Shard = Shard(),
    tcfg: TrainConfig | None = None,
) -> Step:
    """The step strategy for this model and machine: the compiled fast path for the MLPs and optimizers
    it supports, trained by one process (its gradients and BN statistics are its own batch's); else
    autograd, through `model` as given (DDP-wrapped in a data-parallel rank), on `shard` of each batch.
    The training switches of `tcfg` that the fast path does not reproduce (`needs_autograd`) pick
    autograd."""
    alone = shard.world == 1
    fast = (
        MlpStep.for_model(model)
        if alone and USE_FAST_PATH and supports_optimizer(optimizer) and not needs_autograd(tcfg)
        else None
    )
    if fast is not None:
        return Step(partial(fast.run, optimizer), fast.steps_per_call(batch_size), fast_path=True)
    steps_per_call = 1 if alone else AGREED_STOP_STEPS
    agc = tcfg.agc if tcfg is not None else None
    return Step(partial(autograd_steps, model, optimizer, shard, agc=agc), steps_per_call, fast_path=False)


def to_channels_last(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A convolutional `model`'s 4-D weights (and so its activations) in channels-last layout, in place:
    oneDNN's convolutions and their gradients run faster on it on the CPU (a third less step time for
    the cnn family, a sixth for ResNet-20, on one thread). The same values, summed in another order:
    equal to the default layout's up to float rounding. The optimizer's 4-D state (a resumed run's,
    loaded in the default layout) follows its parameter, since fused Adam reads a parameter and its
    moments as one layout. Saving is unchanged: checkpoints store contiguous copies."""
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # documented, not in the stubs
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() == 4:
                state[key] = value.contiguous(memory_format=torch.channels_last)


def needs_autograd(tcfg: TrainConfig | None) -> bool:
    """Whether the run's training switches need the autograd step: the compiled fast path computes its
    gradients itself (no AGC, every parameter trained) and always trains BN with batch statistics (no
    FrozenBN)."""
    return tcfg is not None and (tcfg.agc is not None or tcfg.frozen_bn_epochs > 0 or tcfg.trainable != "all")


def bn_frozen(tcfg: TrainConfig, epoch: int) -> bool:
    """Whether 1-based `epoch` is one of the last `frozen_bn_epochs` (FrozenBN, Wu & Johnson 2021)."""
    return epoch > tcfg.epochs - tcfg.frozen_bn_epochs


def freeze_batch_norm(model: nn.Module) -> None:
    """FrozenBN: every BatchNorm layer in eval mode (normalising with, and leaving alone, its running
    statistics) while the rest of `model` stays in train mode."""
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.eval()


def unwrapped(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (whose parameter names carry a `module.` prefix), else `model`."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    assert isinstance(inner, nn.Module)
    return inner


class Parallelism(Protocol):
    """How the process running `train` shares the run with others: `ONE_PROCESS` trains alone;
    distributed.DataParallel is one rank of a data-parallel run."""

    @property
    def shard(self) -> Shard:
        """The part of every batch this process trains on."""
        ...

    @property
    def reports(self) -> bool:
        """Whether this process validates, probes and reports each epoch (one of the ranks does)."""
        ...

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the steps train through (the model itself, or its DDP wrapper)."""
        ...

    def sum_totals(self, totals: tuple[float, int]) -> tuple[float, int]:
        """An epoch's (summed cross-entropy, correct predictions) over every process's shards."""
        ...

    def any_stop(self, asked: bool) -> bool:
        """Whether any process was `asked` to stop: they all leave at the same step."""
        ...


class OneProcess:
    """No data parallelism: whole batches, this process's totals, its own stop requests."""

    shard = Shard()
    reports = True

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def sum_totals(self, totals: tuple[float, int]) -> tuple[float, int]:
        return totals

    def any_stop(self, asked: bool) -> bool:
        return asked


ONE_PROCESS = OneProcess()


def lr_at(tcfg: TrainConfig, epoch: int) -> float:
    """The learning rate of 1-based `epoch`: a function of the config alone, so a resumed run sets
    the same rates without any scheduler state to save."""
    if tcfg.schedule == "none":
        return tcfg.lr
    if tcfg.schedule == "step":
        return tcfg.lr * tcfg.gamma ** ((epoch - 1) // tcfg.step_size)
    if tcfg.schedule == "cosine":
        return tcfg.lr * (1 + math.cos(math.pi * (epoch - 1) / tcfg.epochs)) / 2
    raise ValueError(f"unknown schedule {tcfg.schedule!r}; expected 'none', 'step' or 'cosine'")


def check_inputs(cfg: ModelConfig, tcfg: TrainConfig, train_set: ImageDataset, val_set: ImageDataset) -> None:
    """ValueError with the reason if this config cannot train on these data."""
    if tcfg.epochs < 1 or tcfg.batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    if len(train_set) < 2 or len(val_set) < 1:
        raise ValueError("training needs at least 2 training samples and 1 validation sample")
    if cfg.norm.kind in BATCH_STAT_KINDS and tcfg.batch_size < 2:
        raise ValueError(
            f"norm kind {cfg.norm.kind!r} cannot train with batch_size 1 (one value per channel)"
        )
    # Compared by size: the net flattens its input, so (1, 28, 28) and (784,) describe the same data.
    if (
        math.prod(train_set.sample_shape) != math.prod(cfg.input_shape)
        or train_set.num_classes != cfg.num_classes
    ):
        raise ValueError(
            f"data ({train_set.sample_shape}, {train_set.num_classes} classes) do not fit the model"
            f" ({tuple(cfg.input_shape)}, {cfg.num_classes} classes)"
        )


def train(
    cfg: ModelConfig,
    tcfg: TrainConfig,
    train_set: ImageDataset,
    val_set: ImageDataset,
    callbacks: TrainingCallbacks = _NULL_CALLBACKS,
    resume: TrainingState | None = None,
    device: torch.device = CPU,
    parallel: Parallelism = ONE_PROCESS,
) -> TrainResult:
    """Train a fresh `make_net(cfg)` with softmax cross-entropy; validate after every epoch.

    Deterministic on CPU for a given seed and thread count. A final batch of one sample is dropped
    for every configuration (BN would raise on it; dropping it for all keeps the data identical
    across the configurations being compared); other partial batches are kept, as in Keras.

    With `resume`, training continues after `resume.epoch` from that state: each epoch's data order
    depends only on (seed, epoch), so the resumed epochs see the batches they would have seen.

    The weights are drawn on the CPU whatever the `device`, so a seed starts from the same network
    everywhere; the model comes back on `device`.

    As one rank of a data-parallel run (`parallel`), the process trains its shard of every batch, the
    epoch's totals are summed over the ranks, and only the reporting rank validates, probes and calls
    `on_epoch_end`.
    """
    check_inputs(cfg, tcfg, train_set, val_set)
    model = build_model(cfg, tcfg.seed).to(device)
    restrict_trainable(model, tcfg.trainable, tcfg.seed)  # train.trainable; before the optimizer and DDP
    optimizer = make_optimizer(model, tcfg)  # after .to(): the fused kernel runs where its parameters are
    first_epoch = 1
    if resume is not None:
        restore(resume, model, optimizer)
        first_epoch = resume.epoch + 1
    if USE_CHANNELS_LAST and device.type == "cpu" and parallel.shard.world == 1:
        to_channels_last(model, optimizer)
    bs = tcfg.batch_size
    step = make_step(parallel.wrap(model), optimizer, bs, parallel.shard, tcfg)
    # Converted once and resident for all epochs; flat rows (every net flattens its input first), so
    # a batch is one index_select (advanced indexing of the image-shaped tensor costs ten times more).
    x_all, y_all = to_inputs_once(train_set.x).flatten(1).to(device), train_set.y.to(device)
    reports = parallel.reports  # the other ranks leave the validation split as it came
    val_inputs = resident(val_set, device) if reports else val_set
    val_batch = evaluation_batch_size(cfg)
    n = len(train_set)
    n_used = used_samples(n, bs, parallel.shard.world)
    result = TrainResult(model=model, dropped_last_batch=n_used < n)
    poller = StopPoller(callbacks)
    probe, slots = val_inputs.x[:PROBE_SAMPLES], norm_slots(model)  # after wrap: it may swap BN layers
    more = EpochProbes(
        frozenset(tcfg.probes),
        probe,
        val_inputs.y[:PROBE_SAMPLES],
        slots,
        x_all[:STATISTICS_SAMPLES],
        chunk=val_batch,
    )

    def probed(epoch: int, lr: float) -> tuple[tuple[SlotStatistics, ...], tuple[ProbeValue, ...]]:
        # The slot statistics and the other probes; one forward pass gives both the slots' inputs.
        seen = capture_slot_inputs(model, slots, probe)
        return slot_statistics(seen, slots, epoch), more(model, epoch, lr, seen)

    # The initial network's probes (epoch 0) travel with epoch 1; a resumed run has them stored.
    pending, pending_more = probed(0, lr_at(tcfg, 1)) if first_epoch == 1 and reports else ((), ())
    rows_per_call = bs * step.steps_per_call

    for epoch in range(first_epoch, tcfg.epochs + 1):
        started = time.monotonic()
        model.train()  # on purpose: evaluate() left the model in eval mode
        if bn_frozen(tcfg, epoch):
            freeze_batch_norm(model)
        set_learning_rate(optimizer, lr_at(tcfg, epoch))
        order = epoch_order(tcfg, train_set.y, epoch)[:n_used].to(device)
        batches = Batches.for_epoch(x_all, y_all, order, bs)
        for start in range(0, n_used, rows_per_call):
            if parallel.any_stop(poller.due()):
                result.cancelled = True
                return result  # the epoch in progress is not reported
            step.run(batches, start, min(start + rows_per_call, n_used))
        # Summed once per epoch from per-sample values: no .item() (a host sync) per step.
        totals = parallel.sum_totals(batches.totals())
        trained = time.monotonic()  # after the sum, which waits for a GPU's queued steps
        if reports:
            metrics = epoch_metrics(
                model, epoch, totals, n_used, (started, trained), val_inputs, val_batch=val_batch
            )
            # The probes after validation, outside the epoch's seconds (timed as the table does).
            stats, values = probed(epoch, lr_at(tcfg, epoch))
            metrics = replace(metrics, layer_stats=(*pending, *stats), probes=(*pending_more, *values))
            pending, pending_more = (), ()
            result.epochs.append(metrics)
            callbacks.on_epoch_end(metrics, partial(save_training_state, model, optimizer, epoch))
        else:
            end_epoch(model)  # as epoch_metrics does on the reporting rank: the ranks' models stay alike
        # A NaN or infinite loss does not come back: the epoch is reported (what is not finite is
        # stored as null) and training ends there; the ranks agree, as only one of them validates.
        if parallel.any_stop(not math.isfinite(totals[0]) or (reports and result.epochs[-1].diverged)):
            return result
        if epoch < tcfg.epochs and parallel.any_stop(poller.now()):
            result.cancelled = True
            return result
    return result


def resident(ds: ImageDataset, device: torch.device) -> ImageDataset:
    """`ds` as the network's float inputs on `device`, converted once (and reused by the process's
    next runs on the same split): for the split a run evaluates after every epoch (converting
    12,000 Fashion-MNIST images took 27 ms an epoch, more than the forward pass). to_inputs and
    evaluate leave float inputs as they are, so the metrics are equal."""
    return ImageDataset(to_inputs_once(ds.x).to(device), ds.y.to(device), ds.num_classes)


def used_samples(n: int, batch_size: int, processes: int = 1) -> int:
    """The samples an epoch trains on: all but a final batch that some process's shard of it would
    leave with a single sample, which BN could not normalise: with one process, a final batch of one
    (dropped for every configuration, so that the data stay identical across those compared)."""
    remainder = n % batch_size
    return n - remainder if 0 < remainder < 2 * processes else n


def epoch_metrics(
    model: nn.Module,
    epoch: int,
    totals: tuple[float, int],
    n_used: int,
    times: tuple[float, float],
    val_set: ImageDataset,
    *,
    val_batch: int = EVALUATION_MAX_BATCH,
) -> EpochMetrics:
    """An epoch's end: population statistics made final, then validation in eval mode, `val_batch`
    samples at a time; `totals` is the epoch's (summed cross-entropy, correct predictions) over its
    `n_used` samples, `times` when the epoch started and when its training steps ended
    (time.monotonic), and `val_set` is best `resident`."""
    loss_sum, correct = totals
    started, trained = times
    end_epoch(model)  # per-epoch population statistics (batch_layer) are final before validating
    val_loss, val_accuracy = evaluate(model, val_set, val_batch)
    return EpochMetrics(
        epoch=epoch,
        train_loss=loss_sum / n_used,
        train_accuracy=correct / n_used,
        val_loss=val_loss,
        val_accuracy=val_accuracy,
        seconds=time.monotonic() - started,
        train_seconds=trained - started,
    )


def configure_training_process(threads: int) -> None:
    """Set up torch in a process that trains: `threads` intra-op threads, and subnormal floats flushed
    to zero (FTZ/DAZ, `torch.set_flush_denormal`).

    Why the flush: under Adam, the moments of parameters whose gradient is exactly zero (the weights of
    Fashion-MNIST's always-black border pixels, dead ReLU units) decay geometrically through the
    subnormal range, where some CPUs compute at a fraction of their speed: on an earlier build machine
    the article's BN network took 1.1 s an epoch on one thread without the flush, 0.55 s with it
    (on an AMD EPYC, Zen 4, 0.99-1.08x: that CPU barely slows down), with the same
    validation accuracies (numbers below 1.2e-38 do not move a network's outputs). TensorFlow flushes
    on CPU by default for the same reason. The flag belongs to the calling thread: it covers all of
    training with one thread per process, as `make run` starts them; other intra-op threads keep
    subnormals."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def set_threads(threads: int) -> None:
    """Change this process's intra-op threads between steps (service/runs/cores.py sizes them)."""
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def warm_up() -> None:
    """Train the article's network briefly on generated data, so that what torch and this module set
    up lazily (torch.optim's import of torch._dynamo, about a second; the fast path's compilation)
    happens now: workers call this as each training process starts, not in its first run."""
    train_set, val_set = train_val_split(make_synthetic(64, seed=0), 0.5)
    train(ModelConfig(), TrainConfig(epochs=1), train_set, val_set)


def evaluation_batch_size(cfg: ModelConfig) -> int:
    """The validation batch for `make_net(cfg)`: as large as its activations fit EVALUATION_BATCH_VALUES."""
    largest = max(1, forward_profile(cfg).largest_output)
    return max(1, min(EVALUATION_MAX_BATCH, EVALUATION_BATCH_VALUES // largest))


def evaluate(
    model: nn.Module, ds: ImageDataset, batch_size: int = EVALUATION_MAX_BATCH
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over `ds`, in eval mode: BN uses its running statistics."""
    n = len(ds)
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    model.eval()  # on purpose: train mode would normalise with batch statistics and move the buffers
    device = _device_of(model)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    # Balanced chunks (sizes differ by at most 1) never leave a batch of one, which a BN layer
    # without running stats (track_running_stats=False) could not normalise.
    chunks = math.ceil(n / batch_size)
    with torch.inference_mode():
        for x_u8, y in zip(ds.x.tensor_split(chunks), ds.y.tensor_split(chunks), strict=True):
            y = y.to(device)
            logits: torch.Tensor = model(to_inputs(x_u8.to(device)))
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(dim=1) == y).sum()
    return loss_sum.item() / n, correct.item() / n


def predict_proba(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities [N, classes] for float inputs [N, *input_shape] or flat [N, features]."""
    expected = _input_features(model)
    if inputs.dim() < 2 or math.prod(inputs.shape[1:]) != expected:
        raise ValueError(
            f"inputs must be [N, ...] with {expected} values per sample, got {tuple(inputs.shape)}"
        )
    model.eval()  # on purpose: inference must use running statistics, whatever mode the model was left in
    with torch.inference_mode():
        logits: torch.Tensor = model(inputs.to(_device_of(model), torch.float32))
        return logits.softmax(dim=1).cpu()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _input_features(model: nn.Module) -> int:
    # A cnn reshapes its flattened input to (C, H, W) first; an mlp's first Linear takes it all.
    first = next((m for m in model.modules() if isinstance(m, nn.Unflatten | nn.Linear)), None)
    if isinstance(first, nn.Unflatten):
        return math.prod(first.unflattened_size)
    if first is None:
        raise ValueError("model has no Linear layer")
    return first.in_features
