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

`train_distributed` runs `training.train`, the one epoch loop, in `processes` rank processes that it
starts as a torchrun-style launcher does: plain `python` subprocesses told their RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT in the environment (a subprocess, unlike a multiprocessing child, may
start from a Celery pool process, which is daemonic). In each rank, `DataParallel` is what the loop
asks of data parallelism: the process group (gloo on the CPU, NCCL on CUDA, one GPU per rank), DDP
wrapping, the rank's shard of every batch (every rank walks the same epoch permutation), the epoch's
totals and stop requests all-reduced. With `sync_batch_norm` each BatchNorm becomes a SyncBatchNorm
for the run, so the run is the single-process one over the global batch, up to rounding. Rank 0
validates, probes and snapshots; the launcher relays that to the callbacks and passes a stop request
on to the ranks. The launcher and the ranks exchange files in a private temporary folder: the job
(data and configs), the epoch reports, the stop request and the final weights. None is a pickle
(unpickling runs code): plain data is JSON, tensors are safetensors (training states in resume.py's
format), and a message's JSON file is written after its tensors, so a reader that sees it finds both.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from contextlib import suppress
from dataclasses import asdict, dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from service.ml import training
from service.ml.checkpoints import tensor_bytes
from service.ml.config import ModelConfig, TrainConfig
from service.ml.datasets import ImageDataset
from service.ml.probes import ProbeValue, SlotStatistics
from service.ml.resume import TrainingState, encode_training_state, load_training_state

log = logging.getLogger(__name__)

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


# How long a rank waits for its peers at a collective before failing the run.
COLLECTIVE_TIMEOUT_S = 300


class DataParallel:
    """What `training.train` asks of data parallelism, in rank `rank` of `world` processes whose
    process group is up (training.Parallelism)."""

    def __init__(self, rank: int, world: int, device: torch.device, sync_batch_norm: bool) -> None:
        self.shard = training.Shard(rank, world)
        self.reports = rank == 0  # rank 0 validates, probes and snapshots
        self._device, self._sync_batch_norm = device, sync_batch_norm

    def wrap(self, model: nn.Module) -> nn.Module:
        if self._sync_batch_norm:
            to_sync_batch_norm(model)
        # Synced BN keeps the ranks' buffers equal by itself; plain BN takes rank 0's, as DDP does.
        return DistributedDataParallel(
            model,
            device_ids=[self._device] if self._device.type == "cuda" else None,
            forward_sync_buffers=not self._sync_batch_norm,
        )

    def sum_totals(self, totals: tuple[float, int]) -> tuple[float, int]:
        summed = torch.tensor(totals, dtype=torch.float64, device=self._device)  # NCCL: device tensors
        dist.all_reduce(summed)
        return summed[0].item(), int(summed[1].item())

    def any_stop(self, asked: bool) -> bool:
        flag = torch.tensor([1.0 if asked else 0.0], device=self._device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


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


class RankFailed(RuntimeError):
    """A rank process ended with an error (its traceback is in the worker's log)."""


@dataclass(frozen=True)
class RankJob:
    """What every rank trains: `training.train`'s arguments, and how to run."""

    cfg: ModelConfig
    tcfg: TrainConfig
    train_set: ImageDataset
    val_set: ImageDataset
    resume: TrainingState | None
    device: torch.device  # the run's device type; rank r trains on cuda:r where it is CUDA
    threads: int
    launcher_pid: int


# The files of a run's folder (see the module's docstring). Each message is a JSON file (JOB, EPOCH,
# FINAL), written after the safetensors files that hold its tensors (the others but STOP and FAILED).
JOB, DATA, RESUME = "job", "data", "resume"  # configs and the rest; the datasets; a resume state if any
EPOCH, SNAPSHOT = "epoch-", "snapshot-"  # + the epoch's number: rank 0's metrics; its training state
FINAL, WEIGHTS = "final", "weights"  # how the run ended; the model's state dict
STOP, FAILED = "stop", "failed-"  # the launcher's stop request (empty); + a rank: why it failed (text)
LEFT = "left-"  # + a rank: it passed the final barrier, its part of the run done (empty)
# The ranks import this code, wherever the package that the launcher runs lies.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
RANK_COMMAND = "from service.ml.distributed import run_rank; run_rank()"


def train_distributed(
    cfg: ModelConfig,
    tcfg: TrainConfig,
    train_set: ImageDataset,
    val_set: ImageDataset,
    callbacks: training.TrainingCallbacks | None = None,
    resume: TrainingState | None = None,
    device: torch.device = training.CPU,
) -> training.TrainResult:
    """`training.train` across `tcfg.processes` rank processes on `device` (CPU: gloo; CUDA: NCCL, rank
    r on cuda:r); the same result, the model returned on the CPU.

    The last batch is dropped when some shard of it would hold fewer than 2 samples (BN cannot
    normalise one): a remainder of 1 as in `train`, or one smaller than 2 per process.
    """
    callbacks = callbacks or training.NullCallbacks()
    training.check_inputs(cfg, tcfg, train_set, val_set)
    check_processes(tcfg, cfg.norm.kind, device)
    threads = max(1, torch.get_num_threads() // tcfg.processes)  # the processes share the cores
    job = RankJob(cfg, tcfg, train_set, val_set, resume, device, threads, os.getpid())
    with tempfile.TemporaryDirectory(prefix="bnlab-ranks-") as name:
        folder = Path(name)
        write_job(folder, job)
        ranks = launch_ranks(folder, tcfg.processes)
        relay = Relay(folder, callbacks)
        try:
            while not _all_done(ranks, folder):
                relay.drain()
                if callbacks.should_stop():
                    (folder / STOP).touch()
                with suppress(subprocess.TimeoutExpired):  # a while, or until the ranks leave together
                    ranks[0].wait(timeout=training.STOP_CHECK_INTERVAL_S)
            relay.drain()
        finally:
            for process in ranks:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        return relay.result(cfg, tcfg)


def launch_ranks(folder: Path, processes: int) -> list[subprocess.Popen[bytes]]:
    """Start the rank processes as torchrun does: the rendezvous (rank 0's TCP store) and each rank's
    place in the environment, read by `init_process_group("env://")`."""
    paths = [str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    shared = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(processes),
        "PYTHONPATH": os.pathsep.join(paths),
    }
    return [
        subprocess.Popen(
            [sys.executable, "-c", RANK_COMMAND, str(folder)],
            env=os.environ | shared | {"RANK": str(rank)},
        )
        for rank in range(processes)
    ]


def _all_done(ranks: list[subprocess.Popen[bytes]], folder: Path) -> bool:
    """Whether every rank has ended well; RankFailed as soon as one has not. A rank that passed the
    final barrier has done its part: if it dies after that, in gloo's or the interpreter's teardown
    (seen once in a full test run on a loaded machine: SIGABRT, "terminate called without an active
    exception"), nothing of the run is lost."""
    codes = [process.poll() for process in ranks]
    ended_badly = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
    if any(not (folder / f"{LEFT}{rank}").exists() for rank in ended_badly):  # files read only then
        failures = sorted(folder.glob(f"{FAILED}*"), key=lambda path: path.stat().st_mtime)
        # The first to fail names the cause; its peers then fail at their next collective.
        cause = failures[0].read_text() if failures else f"exit codes {codes}"
        raise RankFailed(f"a data-parallel training process failed: {cause}")
    if any(code is None for code in codes):
        return False
    for rank in ended_badly:
        log.warning("data-parallel rank %d exited with %d after its part was done", rank, codes[rank])
    return True


class Relay:
    """The launcher's side: rank 0's epoch reports go to the callbacks, in order; its final state
    rebuilds the model."""

    def __init__(self, folder: Path, callbacks: training.TrainingCallbacks) -> None:
        self.folder, self.callbacks = folder, callbacks
        self.epochs: list[training.EpochMetrics] = []

    def drain(self) -> None:
        for path in sorted(self.folder.glob(f"{EPOCH}*")):  # zero-padded numbers: in epoch order
            metrics, snapshot = read_epoch(path)
            self.epochs.append(metrics)
            self.callbacks.on_epoch_end(metrics, partial(bytes, snapshot))

    def result(self, cfg: ModelConfig, tcfg: TrainConfig) -> training.TrainResult:
        final = self.folder / FINAL
        if not final.exists():
            raise RuntimeError("the training processes ended without reporting a final state")
        outcome = json.loads(final.read_bytes())
        model = training.build_model(cfg, tcfg.seed)
        model.load_state_dict(safetensors.torch.load_file(self.folder / WEIGHTS))
        return training.TrainResult(
            model,
            self.epochs,
            cancelled=outcome["cancelled"],
            dropped_last_batch=outcome["dropped_last_batch"],
        )


@dataclass(frozen=True)
class RankCallbacks:
    """A rank's callbacks: rank 0 (the reporting rank) writes each epoch's report for the launcher;
    every rank is asked to stop by the launcher's stop file, or by the launcher's death (nobody would
    take its reports)."""

    folder: Path
    launcher_pid: int

    def on_epoch_end(self, metrics: training.EpochMetrics, snapshot: training.Snapshot) -> None:
        write_epoch(self.folder, metrics, snapshot())

    def should_stop(self) -> bool:
        return (self.folder / STOP).exists() or os.getppid() != self.launcher_pid


def run_rank() -> None:
    """A rank process's main (RANK_COMMAND): `training.train` as one rank of the run in the folder
    named by its argument; a failure's reason is left there for the launcher."""
    folder, rank = Path(sys.argv[1]), int(os.environ["RANK"])
    try:
        _train_rank(folder, rank)
    except BaseException as exc:
        _write(folder / f"{FAILED}{rank}", f"rank {rank}: {type(exc).__name__}: {exc}".encode())
        raise


def _train_rank(folder: Path, rank: int) -> None:
    job = read_job(folder)
    training.configure_training_process(job.threads)  # as a worker's training process
    device = rank_device(job.device, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's communicator binds to the current device
    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        backend_for(device),
        init_method="env://",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        parallel = DataParallel(rank, world, device, job.tcfg.sync_batch_norm)
        callbacks = RankCallbacks(folder, job.launcher_pid)
        result = training.train(
            job.cfg,
            job.tcfg,
            job.train_set,
            job.val_set,
            callbacks,
            resume=job.resume,
            device=device,
            parallel=parallel,
        )
        if parallel.reports:
            write_final(folder, result)
        # Leave together: a rank that tears its connections down while a peer is still finishing
        # can make gloo abort that peer ("terminate called without an active exception").
        dist.barrier()
        _write(folder / f"{LEFT}{rank}", b"")
    finally:
        dist.destroy_process_group()


def write_job(folder: Path, job: RankJob) -> None:
    """The job: the datasets in DATA, a resume state in RESUME, the rest in JOB (the ranks start after
    all are written)."""
    datasets = {
        "train.x": job.train_set.x,
        "train.y": job.train_set.y,
        "val.x": job.val_set.x,
        "val.y": job.val_set.y,
    }
    _write(folder / DATA, _safetensors(datasets))
    if job.resume is not None:
        _write(folder / RESUME, encode_training_state(job.resume))
    plain = {
        "cfg": job.cfg.to_dict(),
        "tcfg": asdict(job.tcfg),
        "num_classes": {"train": job.train_set.num_classes, "val": job.val_set.num_classes},
        "device": str(job.device),
        "threads": job.threads,
        "launcher_pid": job.launcher_pid,
    }
    _write(folder / JOB, _json(plain))


def read_job(folder: Path) -> RankJob:
    plain = json.loads((folder / JOB).read_bytes())
    data = safetensors.torch.load_file(folder / DATA)
    classes = plain["num_classes"]
    resume = folder / RESUME
    return RankJob(
        cfg=ModelConfig.from_dict(plain["cfg"]),
        tcfg=TrainConfig(**{**plain["tcfg"], "probes": tuple(plain["tcfg"]["probes"])}),
        train_set=ImageDataset(data["train.x"], data["train.y"], classes["train"]),
        val_set=ImageDataset(data["val.x"], data["val.y"], classes["val"]),
        resume=load_training_state(resume.read_bytes()) if resume.exists() else None,
        device=torch.device(plain["device"]),
        threads=plain["threads"],
        launcher_pid=plain["launcher_pid"],
    )


def write_epoch(folder: Path, metrics: training.EpochMetrics, snapshot: bytes) -> None:
    """Rank 0's report of an epoch: the snapshot (a training state, as the callbacks store it), then
    the metrics, whose file the launcher looks for."""
    number = f"{metrics.epoch:06d}"
    _write(folder / f"{SNAPSHOT}{number}", snapshot)
    _write(folder / f"{EPOCH}{number}", _json(asdict(metrics)))


def read_epoch(path: Path) -> tuple[training.EpochMetrics, bytes]:
    """The epoch report at `path` (EPOCH + number) and its snapshot, both files then removed."""
    snapshot_path = path.with_name(f"{SNAPSHOT}{path.name.removeprefix(EPOCH)}")
    plain = json.loads(path.read_bytes())
    snapshot = snapshot_path.read_bytes()
    path.unlink()
    snapshot_path.unlink()
    stats = tuple(SlotStatistics(**entry) for entry in plain.pop("layer_stats"))
    probes = tuple(ProbeValue(**entry) for entry in plain.pop("probes", ()))
    return training.EpochMetrics(**plain, layer_stats=stats, probes=probes), snapshot


def write_final(folder: Path, result: training.TrainResult) -> None:
    """Rank 0's final report: the model's weights, then how the run ended."""
    _write(folder / WEIGHTS, _safetensors(result.model.state_dict()))
    outcome = {"cancelled": result.cancelled, "dropped_last_batch": result.dropped_last_batch}
    _write(folder / FINAL, _json(outcome))


def _safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    return tensor_bytes(tensors)


def _json(plain: Any) -> bytes:
    # Python's json writes NaN and ±Infinity (a diverged run's losses) and reads them back.
    return json.dumps(plain).encode()


def _write(path: Path, data: bytes) -> None:
    """Write `data` whole or not at all: the launcher polls for the file."""
    partial_path = path.with_name(f".{path.name}")  # a dot: outside the launcher's globs
    partial_path.write_bytes(data)
    partial_path.replace(path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
