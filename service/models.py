"""SQLAlchemy 2.0 models: runs, their per-epoch metrics, and their trained weights.

The schema is created only by Alembic migrations (migrations/versions); a test checks that these
models and the migrations agree.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    false,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite hands back naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class RunStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_finished(self) -> bool:
        return self in FINISHED_STATUSES


FINISHED_STATUSES = frozenset({RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled})


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str | None] = mapped_column(String(200))
    # Labels and free text a user sets with PATCH; null in rows written before these columns existed.
    tags: Mapped[list[str] | None] = mapped_column(JSONType)
    notes: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True, default=RunStatus.queued.value)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text)
    # Cancellation is cooperative: the API sets the flag, the training loop reads it between steps.
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    # The API key (by name) that submitted the run; None when the server runs without keys.
    owner: Mapped[str | None] = mapped_column(String(100), index=True)
    # The lease: which worker holds the run, for which attempt, and when it last proved alive.
    worker: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Past this instant the run has overrun its time budget (the spec's hard time limit).
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set when a worker shuts down: the holder checkpoints, hands the run back to the queue and stops.
    release_requested: Mapped[bool] = mapped_column(default=False, server_default=false())
    # Last time the run's message was published; the reaper publishes again when it grows old.
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    epochs_done: Mapped[int] = mapped_column(Integer, default=0)
    # Set for the runs an experiment created: which experiment, and the grid point (dotted spec
    # path -> value) this run trains; its seed is in `spec`.
    experiment_id: Mapped[str | None] = mapped_column(
        ForeignKey("experiments.id", ondelete="CASCADE"), index=True
    )
    grid_point: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    metrics: Mapped[list[EpochMetric]] = relationship(
        back_populates="run", order_by="EpochMetric.epoch", cascade="all, delete-orphan", passive_deletes=True
    )


class EpochMetric(Base):
    __tablename__ = "epoch_metrics"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Null where the value was NaN or infinite: the epoch a run diverged (migration 0008).
    train_loss: Mapped[float | None] = mapped_column(Float)
    train_accuracy: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    val_accuracy: Mapped[float | None] = mapped_column(Float)
    seconds: Mapped[float] = mapped_column(Float)
    # Training samples the epoch went through (its throughput is train_samples / seconds); null in
    # rows written before this column existed.
    train_samples: Mapped[int | None] = mapped_column(Integer)
    # Seconds of the epoch's training steps alone (`seconds` less validation); null in rows written
    # before this column existed.
    train_seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    run: Mapped[Run] = relationship(back_populates="metrics")


class LayerStat(Base):
    """Internal covariate shift, measured: the mean and standard deviation of one normalisation
    slot's input (before normalising) on the run's fixed probe batch, after each epoch (epoch 0 is
    the freshly initialised network). Runs without normalisation are probed at the same slots, so
    with and without BN compare layer by layer."""

    __tablename__ = "layer_stats"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    layer: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Null where not finite (a diverged network's activations).
    input_mean: Mapped[float | None] = mapped_column(Float)
    input_std: Mapped[float | None] = mapped_column(Float)


class ProbeRecord(Base):
    """One value of an epoch-end probe (service/ml/probes.py, docs/probes.md) on the run's fixed probe
    batch: `probe` is the family (gradients, smoothness, percentiles, gamma, statistics_gap), `layer` a
    module name or "model" for the whole network, `name` the quantity (grad_norm, p15, beta, …). One
    generic table serves every family's route and plot; epoch 0 is the freshly initialised network.
    `value` is null where the probe had no finite answer (a growth rate fitted to fewer than two layers)."""

    __tablename__ = "probe_values"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    probe: Mapped[str] = mapped_column(String(32), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    layer: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[float | None] = mapped_column(Float)


class Experiment(Base):
    """A grid of runs over one base spec: one run per grid point and seed."""

    __tablename__ = "experiments"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    tags: Mapped[list[str] | None] = mapped_column(JSONType)
    notes: Mapped[str | None] = mapped_column(Text)
    # The ready-made experiment it came from (GET /api/v1/presets), if any.
    preset: Mapped[str | None] = mapped_column(String(64))
    # The normalised experiment spec (base run spec, grid, seeds, report settings), as submitted.
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    owner: Mapped[str | None] = mapped_column(String(100), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class Search(Base):
    """A hyperparameter search: Optuna's study (in this same database, `study_name`) asks for
    trials; each trial trains as an experiment of one configuration × the search's seeds."""

    __tablename__ = "searches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    owner: Mapped[str | None] = mapped_column(String(100), index=True)
    # The normalised search spec (base run spec, space, trials, seeds, objective, sampler, pruner).
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # running, finished, cancelled or failed (the study could not be created).
    status: Mapped[str] = mapped_column(String(16), default="running")
    error: Mapped[str | None] = mapped_column(Text)
    study_name: Mapped[str] = mapped_column(String(200), unique=True)
    # Trials asked of the study so far (the budget is spec.trials).
    trials_asked: Mapped[int] = mapped_column(Integer, default=0)
    # Advancing the search (tell, ask) is done by one process at a time: whoever holds this lease.
    # Every run event bumps `pokes`; the holder releases only if nobody poked while it worked.
    advancing_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    pokes: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class SearchTrial(Base):
    """One trial of a search: Optuna's trial `number`, its parameters, the experiment that trains
    them (null when they made no valid run spec, or the experiment was deleted) and its outcome."""

    __tablename__ = "search_trials"

    search_id: Mapped[str] = mapped_column(ForeignKey("searches.id", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(Integer)
    experiment_id: Mapped[str | None] = mapped_column(
        ForeignKey("experiments.id", ondelete="SET NULL"), index=True
    )
    # running, complete, pruned or failed (Optuna's states; failed covers cancelled trials too).
    state: Mapped[str] = mapped_column(String(16), default="running")
    params: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # The objective told to Optuna, and the seeds' mean and sample std of the metric behind it.
    value: Mapped[float | None] = mapped_column(Float)
    mean: Mapped[float | None] = mapped_column(Float)
    std: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Dataset(Base):
    """A user's dataset, uploaded as .npz and stored validated, in the database, so that every API
    and worker process sees it without a shared disk. Referenced from run specs by its id."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    owner: Mapped[str | None] = mapped_column(String(100), index=True)
    # Shape of one sample, e.g. [1, 28, 28] or [40], and the number of classes (labels 0..n-1).
    sample_shape: Mapped[list[int]] = mapped_column(JSONType)
    num_classes: Mapped[int] = mapped_column(Integer)
    num_samples: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(16))
    # The validated arrays, re-encoded by the server (never the uploaded bytes as they came).
    format: Mapped[str] = mapped_column(String(32), default="safetensors")
    data: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class RunCheckpoint(Base):
    """The last finished epoch's model and optimizer state, so a re-delivered run resumes there.

    Written in the same transaction as that epoch's metrics, so the two never disagree.
    """

    __tablename__ = "run_checkpoints"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer)
    # safetensors bytes (service.ml.resume.save_training_state): weights, optimizer tensors and
    # the optimizer's JSON metadata. Never pickled.
    state: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ModelArtifact(Base):
    """Trained weights in the database, so every API and worker process sees them without a shared disk."""

    __tablename__ = "model_artifacts"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True, default=1)
    format: Mapped[str] = mapped_column(String(32), default="safetensors")
    weights: Mapped[bytes] = mapped_column(LargeBinary)
    # The JSON config that rebuilds the network (service.ml.config.ModelConfig.to_dict()).
    model_config: Mapped[dict[str, Any]] = mapped_column(JSONType)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# ---------------------------------------------------------------------------------------- serving


class ModelAlias(Base):
    """A stable model name (e.g. `fashion-bn`) for the V2 protocol and the predict routes.

    An alias points at a run, optionally pinned to one version of its model (null: the newest
    version, so a recalibration is picked up), or at the best run of an experiment by a metric.
    """

    __tablename__ = "model_aliases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Either a run (run_id, optionally a pinned version) or an experiment's best run by a metric
    # (experiment_id + metric, resolved when the alias is used, so it follows new results).
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    version: Mapped[int | None] = mapped_column(Integer)
    experiment_id: Mapped[str | None] = mapped_column(
        ForeignKey("experiments.id", ondelete="CASCADE"), index=True
    )
    metric: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Recalibration(Base):
    """How a version > 1 of a run's model was made: PreciseBN statistics recomputed from version
    `base_version` with frozen weights, and what it did to the validation figures."""

    __tablename__ = "recalibrations"
    __table_args__ = (
        ForeignKeyConstraint(
            ["run_id", "version"],
            ["model_artifacts.run_id", "model_artifacts.version"],
            ondelete="CASCADE",
        ),
    )

    run_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_version: Mapped[int] = mapped_column(Integer)
    estimator: Mapped[str] = mapped_column(String(32))
    num_batches: Mapped[int] = mapped_column(Integer)
    batch_size: Mapped[int] = mapped_column(Integer)
    samples: Mapped[int] = mapped_column(Integer)
    val_loss_before: Mapped[float] = mapped_column(Float)
    val_accuracy_before: Mapped[float] = mapped_column(Float)
    val_loss_after: Mapped[float] = mapped_column(Float)
    val_accuracy_after: Mapped[float] = mapped_column(Float)
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
