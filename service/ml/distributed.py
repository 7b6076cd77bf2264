"""Batch normalisation synchronised across data-parallel processes, on CPU as on GPU.

The article lists Keras' `synchronized` option: with a batch split across N processes, each
normalises with the statistics of the whole (global) batch rather than of its shard. PyTorch's
`nn.SyncBatchNorm` runs only on CUDA, so `SyncBatchNorm` here does the same with plain tensor ops and
one `all_reduce` per direction, which gloo (CPU) and NCCL (GPU) both provide:

- forward: per channel, the local sum, sum of squares and count are packed into one tensor and
  all-reduced; the global mean and biased variance normalise, the unbiased one (÷(N−1), N the global
  count) moves the running statistics exactly as BatchNorm over the global batch would
  (bn-semantics.md §1: momentum, None = cumulative average, eps, affine, track_running_stats);
- backward: the global statistics depend on every process's inputs, so the two per-channel sums the
  input gradient needs (Σ dy and Σ dy·(x − μ)) are all-reduced as well, as
  torch.nn.modules._functions.SyncBatchNorm does. γ and β gradients stay local: the data-parallel
  wrapper (DDP) all-reduces parameter gradients itself.

Without an initialised process group of more than one process, and in eval mode, the layer is plain
BatchNorm (running statistics in eval), so a model holding it trains and serves in one process too.

`train_distributed` runs the training loop of `training.train` across `processes` processes under
DistributedDataParallel, over gloo on the CPU and NCCL on CUDA (one GPU per process): every process
walks the same epoch permutation and takes its shard of every batch; with `sync_batch_norm` each
BatchNorm becomes a SyncBatchNorm for the run, so the run is the single-process one over the global
batch, up to rounding. Rank 0 validates, probes and snapshots; the calling process relays that to
the callbacks and answers `should_stop()` for all. Only the CPU path has run here (no GPU was lent).
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import queue
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.spawn import start_processes
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from service.ml import training
from service.ml.config import ModelConfig, TrainConfig
from service.ml.datasets import ImageDataset, to_inputs
from service.ml.nets import norm_slots
from service.ml.norms import end_epoch
from service.ml.probes import PROBE_SAMPLES, probe_slot_inputs
from service.ml.resume import TrainingState, load_training_state, restore, save_training_state

ProcessGroup = Any  # torch.distributed.ProcessGroup; None = the default (world) group


def synchronising(group: ProcessGroup = None) -> bool:
    """Whether statistics are shared: a process group is up and holds more than this process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over [N, C] or [N, C, H, W] whose training statistics cover the global batch.

    A subclass of `_BatchNorm` with its buffers and parameters, so checkpoints, fusion and the BN
    tools treat it as BN; it is not an `nn.BatchNorm1d`, so the hand-written MLP step (fastpath),
    whose statistics are local, declines a model that holds it.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: ProcessGroup = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"expected a 2D or 4D input, got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and synchronising(self.process_group)):
            return super().forward(input)  # plain BN: one process, or eval with running statistics
        self._check_input_dim(input)
        mean, var, count = _global_moments(input, self.process_group)
        if self.track_running_stats:
            self._update_running_stats(mean, var, count)
        invstd = torch.rsqrt(var + self.eps).to(input.dtype)
        return _SyncBatchNormFunction.apply(  # type: ignore[no-any-return,no-untyped-call]
            input, self.weight, self.bias, mean.to(input.dtype), invstd, count, self.process_group
        )

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        assert self.running_mean is not None
        assert self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        f = self.momentum if self.momentum is not None else 1.0 / int(self.num_batches_tracked)
        self.running_mean.mul_(1 - f).add_(mean.to(self.running_mean.dtype), alpha=f)
        unbiased = var * count / (count - 1)  # BN's running variance is Bessel-corrected (§1)
        self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)


def _dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]  # per channel: over the batch and any spatial dims


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def _global_moments(x: torch.Tensor, group: ProcessGroup) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, biased variance, count) per channel over every process's shard, in float64.

    float64 because var = E[x²] − μ² cancels: in float32 a channel with a mean far larger than its
    spread would lose its variance; the sums are C numbers, so the wider type costs nothing to send.
    """
    dims = _dims(x)
    wide = x.detach().to(torch.float64)
    count = torch.full((1,), x.numel() // x.shape[1], dtype=torch.float64, device=x.device)
    packed = torch.cat([wide.sum(dims), (wide * wide).sum(dims), count])  # one tensor, one collective
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    channels = x.shape[1]
    total = int(packed[-1].item())
    if total < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    mean = packed[:channels] / total
    var = (packed[channels : 2 * channels] / total - mean * mean).clamp_min(0.0)
    return mean, var, total


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = (x − μ)·invstd·γ + β with μ, invstd of the global batch (`total` values per channel);
    the backward sums across processes what the statistics' gradient needs."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        invstd: torch.Tensor,
        total: int,
        group: ProcessGroup,
    ) -> torch.Tensor:
        y = (x - _per_channel(mean, x)) * _per_channel(invstd, x)
        if weight is not None:
            y = y * _per_channel(weight, x)
        if bias is not None:
            y = y + _per_channel(bias, x)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.group, ctx.total = group, total
        return y

    @staticmethod
    def backward(
        ctx: Any, grad_y: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        x, weight, mean, invstd = ctx.saved_tensors
        dims = _dims(x)
        xmu = x - _per_channel(mean, x)
        sum_dy, sum_dy_xmu = grad_y.sum(dims), (grad_y * xmu).sum(dims)
        grad_weight = sum_dy_xmu * invstd if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(grad_y, xmu, weight, invstd, sum_dy, sum_dy_xmu, ctx)
        return grad_x, grad_weight, grad_bias, None, None, None, None


def _input_grad(
    grad_y: torch.Tensor,
    xmu: torch.Tensor,
    weight: torch.Tensor | None,
    invstd: torch.Tensor,
    sum_dy: torch.Tensor,
    sum_dy_xmu: torch.Tensor,
    ctx: Any,
) -> torch.Tensor:
    """BN's input gradient with μ and σ² of the global batch: the two sums are global too."""
    channels = sum_dy.shape[0]
    packed = torch.cat([sum_dy, sum_dy_xmu])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=ctx.group)
    mean_dy = packed[:channels] / ctx.total
    mean_dy_xmu = packed[channels:] / ctx.total
    scale = invstd if weight is None else invstd * weight
    centred = grad_y - _per_channel(mean_dy, grad_y) - xmu * _per_channel(invstd * invstd * mean_dy_xmu, xmu)
    return centred * _per_channel(scale, grad_y)


def to_sync_batch_norm(module: nn.Module, group: ProcessGroup = None) -> nn.Module:
    """Swap every plain BatchNorm1d/2d in `module` (in place) for a SyncBatchNorm that holds the same
    parameters and buffers, so the state dict, and the network it rebuilds, stay plain BN's."""
    for name, child in module.named_children():
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
            assert isinstance(child, _BatchNorm)
            sync = SyncBatchNorm(child.num_features, child.eps, child.momentum, process_group=group)
            sync.affine, sync.track_running_stats = child.affine, child.track_running_stats
            for pname in ("weight", "bias"):  # None too: make_norm may drop γ or β (center/scale)
                sync.register_parameter(pname, getattr(child, pname))
            for bname in ("running_mean", "running_var", "num_batches_tracked"):
                sync.register_buffer(bname, getattr(child, bname))
            setattr(module, name, sync)
        else:
            to_sync_batch_norm(child, group)
    return module


# Ranks agree on stopping every this many steps (one tiny all_reduce), and at every epoch's end.
STOP_CHECK_STEPS = 16
# How long a rank waits for its peers at a collective before failing the run.
COLLECTIVE_TIMEOUT_S = 300


@dataclass(frozen=True)
class _Job:
    cfg: ModelConfig
    tcfg: TrainConfig
    train_set: ImageDataset
    val_set: ImageDataset
    resume: TrainingState | None
    port: int
    threads: int
    parent_pid: int
    device: torch.device  # the run's device type; rank r trains on cuda:r where it is CUDA


def backend_for(device: torch.device) -> str:
    """The collectives' backend: NCCL between GPUs (gloo's CUDA collectives go through the host),
    gloo on the CPU (NCCL has no CPU tensors)."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Where rank `rank` trains: its own GPU (NCCL refuses two ranks on one device), or the CPU."""
    return torch.device("cuda", rank) if device.type == "cuda" else training.CPU


def check_processes(tcfg: TrainConfig, norm_kind: str, device: torch.device = training.CPU) -> None:
    """Refuse what data-parallel training cannot do, before any process starts."""
    if not 1 <= tcfg.processes <= 64:
        raise ValueError(f"processes must be 1..64, got {tcfg.processes}")
    if device.type == "cuda" and tcfg.processes > (gpus := torch.cuda.device_count()):
        raise ValueError(
            f"{tcfg.processes} data-parallel processes on CUDA need {tcfg.processes} GPUs (NCCL runs "
            f"one process per GPU); this worker sees {gpus}"
        )
    if tcfg.sync_batch_norm and tcfg.processes < 2:
        raise ValueError("sync_batch_norm synchronises across processes: it needs processes >= 2")
    if tcfg.sync_batch_norm and norm_kind != "batch":
        raise ValueError(f"sync_batch_norm applies to norm kind 'batch', not {norm_kind!r}")
    if tcfg.batch_size < 2 * tcfg.processes:
        raise ValueError(
            f"batch_size {tcfg.batch_size} leaves a shard of fewer than 2 samples per process "
            f"({tcfg.processes} processes)"
        )


def train_distributed(
    cfg: ModelConfig,
    tcfg: TrainConfig,
    train_set: ImageDataset,
    val_set: ImageDataset,
    callbacks: training.TrainingCallbacks | None = None,
    resume: TrainingState | None = None,
    device: torch.device = training.CPU,
) -> training.TrainResult:
    """`training.train` across `tcfg.processes` processes on `device` (CPU: gloo; CUDA: NCCL, rank r
    on cuda:r); the same result, the model returned on the CPU.

    The last batch is dropped when some shard of it would hold fewer than 2 samples (BN cannot
    normalise one): a remainder of 1 as in `train`, or one smaller than 2 per process.
    """
    callbacks = callbacks or training.NullCallbacks()
    training.check_inputs(cfg, tcfg, train_set, val_set)
    check_processes(tcfg, cfg.norm.kind, device)
    threads = max(1, torch.get_num_threads() // tcfg.processes)  # the processes share the cores
    job = _Job(cfg, tcfg, train_set, val_set, resume, _free_port(), threads, os.getpid(), device)
    spawn = mp.get_context("spawn")
    messages, stop = spawn.Queue(), spawn.Event()
    with _children_allowed():
        ranks = start_processes(  # type: ignore[no-untyped-call]
            _rank_main, args=(job, messages, stop), nprocs=tcfg.processes, join=False, start_method="spawn"
        )
    relay = _Relay(callbacks)
    try:
        while not ranks.join(timeout=training.STOP_CHECK_INTERVAL_S):
            relay.drain(messages)
            if callbacks.should_stop():
                stop.set()
        relay.drain(messages)
    finally:
        for process in ranks.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return relay.result(cfg, tcfg)


@contextmanager
def _children_allowed() -> Iterator[None]:
    """Lift multiprocessing's ban on children of a daemonic process while the ranks start.

    A Celery prefork pool process is daemonic, and multiprocessing refuses to start processes from
    one lest they outlive it. Ours do not: train_distributed joins or kills them before it returns,
    and a rank whose parent died (a pool process killed at its time limit) stops at its next
    stop check (`_agreed_stop`) or, blocked in a collective, at the gloo timeout.
    """
    config: dict[str, Any] = getattr(multiprocessing.current_process(), "_config", {})
    saved = dict(config)
    config.pop("daemon", None)
    # Celery's billiard keeps the key as its own AuthenticationString, which the spawn start method
    # cannot send to the children: the same key as the standard library's type.
    if "authkey" in config:
        stdlib_key = getattr(multiprocessing.process, "AuthenticationString")  # noqa: B009  (untyped)
        config["authkey"] = stdlib_key(bytes(config["authkey"]))
    try:
        yield
    finally:
        config.clear()
        config.update(saved)


class _Relay:
    """The calling process's side: rank 0's epoch reports go to the callbacks; its final state
    rebuilds the model."""

    def __init__(self, callbacks: training.TrainingCallbacks) -> None:
        self.callbacks = callbacks
        self.epochs: list[training.EpochMetrics] = []
        self.final: tuple[bytes, bool, bool] | None = None

    def drain(self, messages: Any) -> None:
        while True:
            try:
                kind, *payload = messages.get(timeout=0.05)
            except queue.Empty:
                return
            if kind == "epoch":
                metrics, snapshot = payload
                self.epochs.append(metrics)
                self.callbacks.on_epoch_end(metrics, partial(bytes, snapshot))
            else:
                self.final = (payload[0], payload[1], payload[2])

    def result(self, cfg: ModelConfig, tcfg: TrainConfig) -> training.TrainResult:
        if self.final is None:
            raise RuntimeError("the training processes ended without reporting a final state")
        state_bytes, cancelled, dropped = self.final
        model = training.build_model(cfg, tcfg.seed)
        model.load_state_dict(load_training_state(state_bytes).model_state)
        return training.TrainResult(model, self.epochs, cancelled=cancelled, dropped_last_batch=dropped)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _rank_main(rank: int, job: _Job, messages: Any, stop: Any) -> None:
    training.configure_training_process(job.threads)  # as a worker's training process
    device = rank_device(job.device, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's communicator binds to the current device
    dist.init_process_group(
        backend_for(device),
        init_method=f"tcp://127.0.0.1:{job.port}",
        rank=rank,
        world_size=job.tcfg.processes,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        _train_rank(rank, device, job, messages, stop)
        # Leave together: a rank that tears its connections down while a peer is still finishing
        # can make gloo abort that peer ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _agreed_stop(stop: Any, parent_pid: int, device: torch.device) -> bool:
    """True on every rank when any rank saw the stop request, or lost its parent (nobody would take
    its reports): they must leave at the same step."""
    asked = stop.is_set() or os.getppid() != parent_pid
    flag = torch.tensor([1.0 if asked else 0.0], device=device)  # NCCL reduces device tensors only
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def _kept_samples(n: int, tcfg: TrainConfig) -> int:
    remainder = n % tcfg.batch_size
    return n - remainder if remainder and remainder < 2 * tcfg.processes else n


def _train_rank(rank: int, device: torch.device, job: _Job, messages: Any, stop: Any) -> None:
    """One process's share of `training.train`'s loop; rank 0 reports to the calling process."""
    cfg, tcfg, processes = job.cfg, job.tcfg, job.tcfg.processes
    model = training.build_model(cfg, tcfg.seed).to(device)  # drawn on the CPU, as in train
    if tcfg.sync_batch_norm:
        to_sync_batch_norm(model)
    optimizer = training.make_optimizer(model, tcfg)
    first_epoch = 1
    if job.resume is not None:
        # A copy: the state came through shared memory, and the optimizer would adopt its tensors
        # as they are, so every rank would update one shared momentum buffer.
        restore(copy.deepcopy(job.resume), model, optimizer)
        first_epoch = job.resume.epoch + 1
    # Synced BN keeps the ranks' buffers equal by itself; plain BN takes rank 0's, as DDP does.
    ddp = DistributedDataParallel(
        model,
        device_ids=[device] if device.type == "cuda" else None,
        forward_sync_buffers=not tcfg.sync_batch_norm,
    )
    x_all, y_all = to_inputs(job.train_set.x).flatten(1).to(device), job.train_set.y.to(device)
    n, bs = len(job.train_set), tcfg.batch_size
    n_used = _kept_samples(n, tcfg)
    # Only rank 0 validates and probes: the other ranks leave the validation split as it came.
    val_inputs = training.resident(job.val_set, device) if rank == 0 else job.val_set
    probe, slots = val_inputs.x[:PROBE_SAMPLES], norm_slots(model)
    pending = probe_slot_inputs(model, slots, probe, epoch=0) if first_epoch == 1 and rank == 0 else ()
    cancelled, epoch = False, first_epoch - 1
    for epoch in range(first_epoch, tcfg.epochs + 1):
        started = time.monotonic()
        model.train()  # on purpose: evaluate() left rank 0's model in eval mode
        for group in optimizer.param_groups:
            group["lr"] = training.lr_at(tcfg, epoch)
        order = training.epoch_permutation(n, tcfg.seed, epoch)[:n_used].to(device)
        totals = torch.zeros(
            2, dtype=torch.float64, device=device
        )  # this shard's summed loss, correct predictions
        for i, start in enumerate(range(0, n_used, bs)):
            if i % STOP_CHECK_STEPS == 0 and _agreed_stop(stop, job.parent_pid, device):
                cancelled = True
                break
            idx = order[start : start + bs]
            mine = idx.tensor_split(processes)[rank]
            logits = ddp(x_all.index_select(0, mine))
            y = y_all.index_select(0, mine)
            loss_sum = F.cross_entropy(logits, y, reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            # DDP averages gradients over the ranks: scaled so, the average is the gradient of the
            # mean loss over the global batch, whatever the shard sizes.
            (loss_sum * (processes / len(idx))).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            totals += torch.stack([loss_sum.detach().double(), (logits.argmax(1) == y).sum().double()])
        if cancelled:
            break  # the epoch in progress is not reported, as in train
        dist.all_reduce(totals)
        end_epoch(model)
        if rank == 0:
            val_loss, val_accuracy = training.evaluate(model, val_inputs)
            metrics = training.EpochMetrics(
                epoch=epoch,
                train_loss=totals[0].item() / n_used,
                train_accuracy=totals[1].item() / n_used,
                val_loss=val_loss,
                val_accuracy=val_accuracy,
                seconds=time.monotonic() - started,
                layer_stats=(*pending, *probe_slot_inputs(model, slots, probe, epoch=epoch)),
            )
            pending = ()
            messages.put(("epoch", metrics, save_training_state(model, optimizer, epoch)))
        if epoch < tcfg.epochs and _agreed_stop(stop, job.parent_pid, device):
            cancelled = True
            break
    if rank == 0:
        messages.put(("done", save_training_state(model, optimizer, epoch), cancelled, n_used < n))
