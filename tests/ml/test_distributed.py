"""SyncBatchNorm across 2 real processes (gloo, CPU) is BatchNorm over the global batch, and
train_distributed with it trains the run one process trains over the global batch.

Each test spawns two ranks, wraps Linear/Conv → SyncBatchNorm in DDP, and gives each rank half of
every global batch; the ranks write what they saw (safetensors) and the test compares it, in
float64, with ONE process running the same layers with plain nn.BatchNorm1d/2d over the whole batch:
outputs, input gradients, DDP-averaged parameter gradients and the running statistics after 3 steps.

The launcher and its ranks exchange JSON and safetensors only, and no module of service/ imports pickle.
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.multiprocessing.spawn import ProcessExitedException
from torch.nn.parallel import DistributedDataParallel

from service.ml import distributed
from service.ml.config import ModelConfig, NormConfig, TrainConfig
from service.ml.datasets import ImageDataset, make_synthetic, train_val_split
from service.ml.distributed import (
    DATA,
    FINAL,
    JOB,
    LEFT,
    RESUME,
    WEIGHTS,
    RankFailed,
    RankJob,
    Relay,
    SyncBatchNorm,
    backend_for,
    rank_device,
    read_job,
    synchronising,
    train_distributed,
    write_epoch,
    write_final,
    write_job,
)
from service.ml.fastpath import MlpStep
from service.ml.probes import ProbeValue, SlotStatistics
from service.ml.resume import load_training_state
from service.ml.training import EpochMetrics, TrainResult, build_model, train
from tests.integration.stack import free_port
from tests.ml.test_training import Recorder, without_time

WORLD = 2
STEPS = 3
ATOL = 1e-10
SPAWN_TIMEOUT_S = 90.0
# Whole runs in float32: summation order differs across processes (SGD: Adam would blow rounding up
# on the near-zero gradients of Linear biases before BN).
ATOL_FLOAT32 = 1e-4


@dataclass(frozen=True)
class Case:
    conv: bool = False
    momentum: float | None = 0.1
    affine: bool = True
    batch: int = 8  # global: each rank gets batch / WORLD samples


def build(case: Case, norm: type[nn.Module]) -> nn.Sequential:
    """The same layers and weights in every process: a seeded Linear/Conv, then the norm with a
    non-trivial γ, β (ones and zeros would hide a γ/β mix-up)."""
    torch.manual_seed(0)
    layer: nn.Module = nn.Conv2d(3, 4, 3) if case.conv else nn.Linear(5, 4)
    bn = norm(4, momentum=case.momentum, affine=case.affine)
    model = nn.Sequential(layer, bn).double()
    if case.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_()
    return model


def batches(case: Case) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS global (input, upstream weight) pairs; the loss is mean(output · g) per sample."""
    gen = torch.Generator().manual_seed(1)
    shape = (case.batch, 3, 6, 6) if case.conv else (case.batch, 5)
    out_shape = (case.batch, 4, 4, 4) if case.conv else (case.batch, 4)
    pairs = []
    for step in range(STEPS):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * (step + 1) + step
        pairs.append((x, torch.randn(out_shape, generator=gen, dtype=torch.float64)))
    return pairs


def loss_of(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (y * g).flatten(1).sum(1).mean()  # a mean over the (local) batch, as training losses are


def _rank_main(rank: int, port: int, case: Case, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=30),
    )
    try:
        # No buffer sync after the start: each rank keeps its own running statistics, so the test
        # sees whether the synchronised updates agree instead of rank 0's copy.
        model = DistributedDataParallel(build(case, SyncBatchNorm), forward_sync_buffers=False)
        saved: dict[str, torch.Tensor] = {}
        for step, (x, g) in enumerate(batches(case)):
            x_local, g_local = (t.chunk(WORLD)[rank] for t in (x, g))
            x_local = x_local.clone().requires_grad_(True)
            model.zero_grad()
            y = model(x_local)
            loss_of(y, g_local).backward()  # DDP averages the parameter gradients over the ranks
            assert x_local.grad is not None
            saved[f"{step}.y"], saved[f"{step}.x_grad"] = y.detach(), x_local.grad
            for k, p in model.module.named_parameters():
                assert p.grad is not None
                saved[f"{step}.grad.{k}"] = p.grad
        saved.update({f"buffer.{k}": b for k, b in model.module.named_buffers()})
        safetensors.torch.save_file({k: v.contiguous() for k, v in saved.items()}, f"{out_dir}/{rank}.st")
        dist.barrier()  # leave together, as the ranks of distributed.train_distributed do
        Path(out_dir, f"{LEFT}{rank}").touch()  # and say so, as they do
    finally:
        dist.destroy_process_group()


def run_ranks(case: Case, out_dir: Path) -> list[dict[str, torch.Tensor]]:
    """Spawn WORLD ranks, wait (bounded), kill any left behind; each rank's saved tensors."""
    ctx = mp.start_processes(
        _rank_main, args=(free_port(), case, str(out_dir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=1):  # raises if a rank failed (and ends the other)
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks still running after {SPAWN_TIMEOUT_S} s")
    except ProcessExitedException as exc:
        # gloo now and then aborts a rank in its teardown, after the final barrier: every rank had
        # saved its tensors by then (as train_distributed's launcher, accept it; anything else fails).
        if not (out_dir / f"{LEFT}{exc.error_index}").exists():
            raise
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [safetensors.torch.load_file(out_dir / f"{rank}.st") for rank in range(WORLD)]


def reference(case: Case) -> tuple[dict[str, torch.Tensor], nn.Sequential]:
    """One process, plain BatchNorm over each global batch: the same quantities, unsplit."""
    norm = nn.BatchNorm2d if case.conv else nn.BatchNorm1d
    model = build(case, norm)
    expected: dict[str, torch.Tensor] = {}
    for step, (x, g) in enumerate(batches(case)):
        x = x.clone().requires_grad_(True)
        model.zero_grad()
        y = model(x)
        loss_of(y, g).backward()
        assert x.grad is not None
        expected[f"{step}.y"], expected[f"{step}.x_grad"] = y.detach(), x.grad
        for k, p in model.named_parameters():
            assert p.grad is not None
            expected[f"{step}.grad.{k}"] = p.grad
    return expected, model


def assert_global_batch_semantics(case: Case, tmp_path: Path) -> None:
    ranks = run_ranks(case, tmp_path)
    expected, model = reference(case)
    for rank, got in enumerate(ranks):
        for step in range(STEPS):
            y = expected[f"{step}.y"].chunk(WORLD)[rank]
            torch.testing.assert_close(got[f"{step}.y"], y, atol=ATOL, rtol=0)
            # Each rank's input gradient is that of the sum of the ranks' mean losses, i.e. WORLD
            # times the global mean's (DDP rescales parameter gradients only).
            x_grad = expected[f"{step}.x_grad"].chunk(WORLD)[rank] * WORLD
            torch.testing.assert_close(got[f"{step}.x_grad"], x_grad, atol=ATOL, rtol=0)
            for k, _ in model.named_parameters():
                key = f"{step}.grad.{k}"
                torch.testing.assert_close(got[key], expected[key], atol=ATOL, rtol=0)
        for k, buffer in model.named_buffers():
            torch.testing.assert_close(got[f"buffer.{k}"], buffer, atol=ATOL, rtol=0)
    assert int(ranks[0]["buffer.1.num_batches_tracked"]) == STEPS


def test_synced_bn1d_over_two_processes_equals_one_batchnorm_over_the_global_batch(tmp_path: Path) -> None:
    assert_global_batch_semantics(Case(), tmp_path)


def test_synced_bn2d_after_a_conv_equals_one_batchnorm2d_over_the_global_batch(tmp_path: Path) -> None:
    assert_global_batch_semantics(Case(conv=True, batch=4), tmp_path)


def test_cumulative_average_without_affine_matches_too(tmp_path: Path) -> None:
    assert_global_batch_semantics(Case(momentum=None, affine=False, batch=6), tmp_path)


def test_without_a_process_group_it_is_plain_batchnorm_in_train_and_eval() -> None:
    assert not synchronising()
    case = Case()
    sync, plain = build(case, SyncBatchNorm), build(case, nn.BatchNorm1d)
    for x, _ in batches(case):
        torch.testing.assert_close(sync(x), plain(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(sync.eval()(x), plain.eval()(x), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sync.train()(x[:1])


def test_the_fast_path_declines_a_synced_mlp() -> None:
    # Its hand-written BN step uses local statistics: a synced model must go through autograd.
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 4), nn.ReLU(), SyncBatchNorm(4), nn.Linear(4, 2))
    plain = nn.Sequential(nn.Flatten(), nn.Linear(5, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 2))
    assert MlpStep.for_model(plain) is not None
    assert MlpStep.for_model(model) is None


@pytest.fixture(scope="module")
def small() -> tuple[ImageDataset, ImageDataset]:
    return train_val_split(make_synthetic(240, seed=5), 0.25)  # 180 samples: batches of 32, then 20


def test_two_synced_processes_train_the_run_one_process_trains_over_the_global_batch(
    small: tuple[ImageDataset, ImageDataset],
) -> None:
    cfg, tcfg = ModelConfig(hidden=(32,)), TrainConfig(epochs=2, batch_size=32, optimizer="sgd", lr=0.1)
    single = train(cfg, tcfg, *small)
    recorder = Recorder()
    synced = train_distributed(cfg, replace(tcfg, processes=2, sync_batch_norm=True), *small, recorder)
    assert not synced.cancelled
    assert [m.epoch for m in recorder.epochs] == [1, 2]
    for got, want in zip(recorder.epochs, single.epochs, strict=True):
        assert without_time(got) == pytest.approx(without_time(want), rel=1e-5)
        assert [(s.epoch, s.layer) for s in got.layer_stats] == [(s.epoch, s.layer) for s in want.layer_stats]
        for g, w in zip(got.layer_stats, want.layer_stats, strict=True):
            assert (g.input_mean, g.input_std) == pytest.approx((w.input_mean, w.input_std), rel=1e-4)
    expected = single.model.state_dict()
    for key, value in synced.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=ATOL_FLOAT32, rtol=0, msg=key)
    # The snapshot each epoch is a training state resume accepts: the last one holds the final weights.
    last = load_training_state(recorder.snapshots[-1])
    final = synced.model.state_dict()
    assert last.epoch == 2
    assert all(torch.equal(last.model_state[k], final[k]) for k in final)


def test_a_resumed_distributed_run_continues_where_the_snapshot_left_it(
    small: tuple[ImageDataset, ImageDataset],
) -> None:
    cfg = ModelConfig(hidden=(16,))
    tcfg = TrainConfig(epochs=2, batch_size=32, processes=2, sync_batch_norm=True)
    recorder = Recorder()
    whole = train_distributed(cfg, tcfg, *small, recorder).model.state_dict()
    after_one = load_training_state(recorder.snapshots[0])
    resumed_recorder = Recorder()
    resumed = train_distributed(cfg, tcfg, *small, resumed_recorder, resume=after_one)
    assert [m.epoch for m in resumed_recorder.epochs] == [2]
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, whole[key]), key  # the same processes, the same sums: exactly


def test_unsynced_processes_normalise_per_shard_so_their_statistics_differ(
    small: tuple[ImageDataset, ImageDataset],
) -> None:
    # The control for the test above: without sync, BN sees 16-sample shards, not the 32-sample
    # batch, and the run departs from the single process's by far more than the rounding allowed there.
    cfg, tcfg = ModelConfig(hidden=(32,)), TrainConfig(epochs=2, batch_size=32, optimizer="sgd", lr=0.1)
    single = train(cfg, tcfg, *small).model.state_dict()
    sharded = train_distributed(cfg, replace(tcfg, processes=2), *small).model.state_dict()
    for key in ("bn1.running_var", "fc1.weight"):
        assert (sharded[key] - single[key]).abs().max() > 100 * ATOL_FLOAT32, key


def test_a_failing_rank_fails_the_run_with_its_reason(small: tuple[ImageDataset, ImageDataset]) -> None:
    other = Recorder()  # the training state of another network: every rank's restore refuses it
    train(ModelConfig(hidden=(8,)), TrainConfig(epochs=1), *small, other)
    tcfg = TrainConfig(epochs=1, batch_size=32, processes=2)
    with pytest.raises(RankFailed, match="ResumeError: training state does not fit"):
        train_distributed(
            ModelConfig(hidden=(16,)), tcfg, *small, resume=load_training_state(other.snapshots[0])
        )


def test_a_stop_request_reaches_every_process(small: tuple[ImageDataset, ImageDataset]) -> None:
    recorder = Recorder(stop_at=1)
    tcfg = TrainConfig(epochs=200, batch_size=32, processes=2, sync_batch_norm=True)
    result = train_distributed(ModelConfig(hidden=(8,)), tcfg, *small, recorder)
    assert result.cancelled
    assert len(recorder.epochs) < 200


def test_a_diverging_run_stops_every_process_at_the_epoch_it_diverged(
    small: tuple[ImageDataset, ImageDataset],
) -> None:
    # Weights 100x their init without a norm: the first SGD steps overflow them to NaN. Only rank 0
    # validates, so the ranks must agree to stop, or the others would wait at the next collective.
    cfg = ModelConfig(hidden=(100, 100, 100), init_scale=100.0, norm=NormConfig(kind="none"))
    tcfg = TrainConfig(epochs=5, batch_size=32, optimizer="sgd", lr=0.1, processes=2)
    recorder = Recorder()
    result = train_distributed(cfg, tcfg, *small, recorder)
    assert [m.epoch for m in recorder.epochs] == [1]
    assert result.diverged_at == 1
    assert not result.cancelled


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sync_batch_norm": True}, "needs processes >= 2"),
        ({"processes": 2, "batch_size": 3}, "fewer than 2 samples per process"),
        ({"processes": 0}, "processes must be 1..64"),
    ],
)
def test_impossible_settings_are_refused_before_any_process_starts(
    small: tuple[ImageDataset, ImageDataset], changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        train_distributed(ModelConfig(), replace(TrainConfig(), **changes), *small)  # type: ignore[arg-type]


def test_sync_is_for_plain_batch_norm(small: tuple[ImageDataset, ImageDataset]) -> None:
    tcfg = TrainConfig(processes=2, sync_batch_norm=True)
    with pytest.raises(ValueError, match="norm kind 'batch', not 'layer'"):
        train_distributed(ModelConfig(norm=NormConfig(kind="layer")), tcfg, *small)


def test_collectives_run_over_gloo_on_the_cpu_and_nccl_with_one_gpu_per_rank() -> None:
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda")) == "nccl"
    assert rank_device(torch.device("cpu"), 1) == torch.device("cpu")
    assert rank_device(torch.device("cuda"), 1) == torch.device("cuda", 1)


def test_more_cuda_processes_than_gpus_are_refused_before_any_process_starts(
    small: tuple[ImageDataset, ImageDataset],
) -> None:
    gpus = torch.cuda.device_count()
    tcfg = TrainConfig(processes=gpus + 1, batch_size=64)
    with pytest.raises(ValueError, match=f"need {gpus + 1} GPUs .* sees {gpus}"):
        train_distributed(ModelConfig(), tcfg, *small, device=torch.device("cuda"))


SERVICE = Path(__file__).resolve().parents[2] / "service"
# Modules that pickle (shelve and dill are pickle underneath): unpickling runs code.
PICKLING = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve"}


def imported_modules(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_no_module_of_the_service_imports_pickle() -> None:
    sources = sorted(SERVICE.rglob("*.py"))
    assert SERVICE / "ml" / "distributed.py" in sources
    found = [
        f"{path.relative_to(SERVICE.parent)}: {name}"
        for path in sources
        for name in imported_modules(path)
        if name.split(".")[0] in PICKLING
    ]
    assert found == []


def test_the_job_crosses_the_folder_as_json_and_safetensors(
    small: tuple[ImageDataset, ImageDataset], tmp_path: Path
) -> None:
    recorder = Recorder()
    cfg, tcfg = ModelConfig(hidden=(8,)), TrainConfig(epochs=1, batch_size=32, processes=2)
    train(cfg, tcfg, *small, recorder)
    resume = load_training_state(recorder.snapshots[0])
    features = ImageDataset(torch.randn(6, 40), torch.arange(6) % 3, 3)  # float samples, other classes
    job = RankJob(cfg, tcfg, small[0], features, resume, torch.device("cpu"), 3, 1234)
    write_job(tmp_path, job)
    assert json.loads((tmp_path / JOB).read_bytes())["tcfg"]["processes"] == 2
    assert safetensors.torch.load_file(tmp_path / DATA).keys() == {"train.x", "train.y", "val.x", "val.y"}
    got = read_job(tmp_path)
    assert (got.cfg, got.tcfg, got.device, got.threads, got.launcher_pid) == (cfg, tcfg, job.device, 3, 1234)
    for mine, theirs in ((got.train_set, small[0]), (got.val_set, features)):
        assert (mine.x.dtype, mine.y.dtype, mine.num_classes) == (
            theirs.x.dtype,
            theirs.y.dtype,
            theirs.num_classes,
        )
        assert torch.equal(mine.x, theirs.x)
        assert torch.equal(mine.y, theirs.y)
    assert got.resume is not None
    assert got.resume.epoch == 1
    assert all(torch.equal(got.resume.model_state[k], v) for k, v in resume.model_state.items())
    (tmp_path / RESUME).unlink()
    assert read_job(tmp_path).resume is None  # without the file, no resume


def test_the_epoch_reports_and_final_state_reach_the_launcher_as_they_left_rank_0(tmp_path: Path) -> None:
    stats = (SlotStatistics(0, "bn1", 0.125, 1.5), SlotStatistics(1, "bn1", -1 / 3, 0.1))
    probes = (ProbeValue(0, "gradients", "fc1", "grad_norm", 0.1), ProbeValue(1, "gamma", "bn1", "p50", 1))
    first = EpochMetrics(1, 2.5, 0.25, math.inf, 0.5, 0.75, stats, probes)
    second = EpochMetrics(2, 1 / 7, 0.5, 0.3, 0.625, 0.5)
    write_epoch(tmp_path, second, b"state after 2")  # the launcher takes them in epoch order anyway
    write_epoch(tmp_path, first, b"state after 1")
    cfg, tcfg = ModelConfig(hidden=(8,)), TrainConfig()
    model = build_model(cfg, seed=3)
    write_final(tmp_path, TrainResult(model, cancelled=True, dropped_last_batch=True))
    recorder = Recorder()
    relay = Relay(tmp_path, recorder)
    relay.drain()
    assert recorder.epochs == relay.epochs == [first, second]  # floats exact, inf included
    assert recorder.snapshots == [b"state after 1", b"state after 2"]
    assert {p.name for p in tmp_path.iterdir()} == {FINAL, WEIGHTS}  # relayed reports are removed
    result = relay.result(cfg, tcfg)
    assert (result.cancelled, result.dropped_last_batch) == (True, True)
    assert json.loads((tmp_path / FINAL).read_bytes()) == {"cancelled": True, "dropped_last_batch": True}
    expected = model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in result.model.state_dict().items())


def test_a_rank_that_dies_after_the_final_barrier_loses_nothing_and_one_before_it_fails_the_run(
    tmp_path: Path,
) -> None:
    # Real processes with real exit codes: one ended well, one aborted (SIGABRT, as gloo's teardown
    # once did), one still running.
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    aborted = subprocess.Popen([sys.executable, "-c", "import os; os.abort()"])
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for process in (ended, aborted):
            process.wait(timeout=30)
        assert aborted.returncode == -6
        with pytest.raises(RankFailed, match="exit codes"):
            distributed._all_done([ended, aborted], tmp_path)  # aborted before leaving: the run fails
        (tmp_path / f"{LEFT}1").touch()  # it had passed the final barrier
        assert distributed._all_done([ended, aborted], tmp_path)
        assert not distributed._all_done([ended, aborted, running], tmp_path)  # rank 2 still trains
    finally:
        running.kill()
        running.wait()
