"""The cores a training process may use: all those the node's other training processes leave idle.

`make run` starts one training process per core, one thread each, so that the runs of a pair or a
grid train side by side without oversubscribing the cores. A run that trains alone would leave the
other cores idle: this module gives it their threads while nobody else needs them, and takes them
back as soon as another run of the node starts or a run waits in the queue (which an idle training
process will claim at once). Small models keep one thread whatever happens: their steps last tens
of microseconds and a second thread only adds its synchronisation (bench/train.py measured the
article's pair ten times slower on two threads per process).

Only when the thread count is automatic (BNLAB_TORCH_THREADS=0); a set count is left alone.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from service.config import get_settings
from service.ml import nets, training
from service.ml.config import ModelConfig, TrainConfig
from service.runs import repository as run_repo

# Below this many floating-point operations a training step (forward, backward: three forward
# passes' worth, times the batch), a second thread does not pay for itself.
MIN_STEP_FLOPS_FOR_MORE_THREADS = 50e6
# How often a training process looks again at what its node runs.
RESIZE_INTERVAL_S = 2.0


def step_flops(cfg: ModelConfig, tcfg: TrainConfig) -> float:
    return 3.0 * nets.forward_flops(cfg) * tcfg.batch_size


@dataclass
class CoreShare:
    """The intra-op threads of the training process running one run on worker process `worker`."""

    worker: str  # the lease's worker: "<celery node>/<pid>"
    wants_more: bool  # the model is large enough for a second thread to pay
    checked_at: float = field(default=float("-inf"))

    @classmethod
    def for_run(cls, worker: str, cfg: ModelConfig, tcfg: TrainConfig) -> CoreShare:
        automatic = get_settings().torch_threads == 0
        return cls(worker, automatic and step_flops(cfg, tcfg) >= MIN_STEP_FLOPS_FOR_MORE_THREADS)

    def resize(self, session: Session) -> None:
        """Size this process's threads to the node's idle cores (at most every RESIZE_INTERVAL_S)."""
        if not self.wants_more or time.monotonic() - self.checked_at < RESIZE_INTERVAL_S:
            return
        self.checked_at = time.monotonic()
        node = self.worker.rpartition("/")[0]
        enough = get_settings().training_processes
        demand = run_repo.count_training_demand(session=session, node=node, enough=enough)
        training.set_threads(threads_for(demand))

    def restore(self) -> None:
        """Back to the process's share, for whatever run it trains next."""
        if self.wants_more:
            training.set_threads(get_settings().effective_torch_threads())


def threads_for(demand: int) -> int:
    """Threads for one of `demand` processes that want the node's cores (this one included): the
    cores divided among them, never fewer than the process's own share."""
    settings = get_settings()
    cores = os.cpu_count() or 1
    sharing = max(1, demand)
    return max(settings.effective_torch_threads(), cores // sharing)
