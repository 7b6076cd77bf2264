"""The searches domain's logic: submitting a search, advancing it, cancelling it, its public view.

A search advances by ask-and-tell. Each trial trains as an experiment (one configuration × the
search's seeds) through the experiments' own machinery: validated run specs, stored in one
transaction, committed, then published by task name. Whenever one of its runs finishes an epoch or
ends, the worker calls `on_run_event`: the trial's seeds' mean per epoch is reported to Optuna (the
pruner judges the seeds together), a trial whose seeds all ended is told its objective, and new
trials are asked while the budget and `max_in_flight` allow.

One process at a time advances a search (a lease on its row); every event bumps the search's poke
count first, and the lease holder releases only if nobody poked while it worked, so no event is
lost when two runs end at once. Optuna is always called outside bnlab's transactions: on SQLite
its writes need the same database lock.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import optuna
from fastapi import HTTPException, status
from optuna.trial import TrialState
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import session_scope
from service.experiments import repository as experiment_repo
from service.models import Run, RunStatus, Search, SearchTrial, utcnow
from service.queue import BrokerUnavailable
from service.runs import repository as run_repo
from service.runs.schemas import RunCreate
from service.runs.service import publish_runs, require_dataset
from service.searches import repository as search_repo
from service.searches import space
from service.searches.schemas import SearchCreate, SearchPublic, TrialPublic
from service.searches.storage import storage

log = logging.getLogger(__name__)

# Advancing takes seconds (a few Optuna reads and writes, one experiment stored); a holder silent
# this long has died and its lease is taken over.
LEASE = timedelta(seconds=120)
CANCELLED = "cancelled by the user"


# ---------------------------------------------------------------------------------- submitting


def unprocessable(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail)


def validate_space(*, session: Session, settings: Settings, spec: SearchCreate) -> None:
    """422 for a value the space can reach that makes no valid run (checked at each dimension's
    bounds and choices), a start_with point outside the space, or a grid smaller than `trials`."""
    try:
        space.check_start_with(spec)
        variants = [space.planned_runs(spec, spec.name, p)[0].spec for p in space.corner_points(spec)]
    except space.SpaceError as exc:
        raise unprocessable(str(exc)) from exc
    if spec.sampler.kind == "grid" and space.grid_size(spec) < spec.trials:
        raise unprocessable(
            f"the grid sampler has {space.grid_size(spec)} points but trials is {spec.trials}: "
            "lower trials or widen the space"
        )
    for variant in variants:  # the dataset, and the network for it (parameter budget, shape)
        require_dataset(variant, settings, session=session)


def require_budget(*, session: Session, settings: Settings, owner: str | None, spec: SearchCreate) -> None:
    """trials × seeds count against the key's cap on active runs: over the cap on its own, 422;
    over it with what the key already runs or has reserved in other searches, 429."""
    limit, runs = settings.max_active_runs_per_key, spec.trials * len(spec.seeds)
    if runs > limit:
        raise unprocessable(
            f"trials × seeds = {spec.trials} × {len(spec.seeds)} = {runs} runs, over the key's cap of "
            f"{limit} active runs (BNLAB_MAX_ACTIVE_RUNS_PER_KEY)"
        )
    busy = run_repo.count_active_runs(session=session, owner=owner)
    reserved = search_repo.reserved_runs(session=session, owner=owner)
    if busy + reserved + runs > limit:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"key '{owner}' has {busy} queued or running runs and {reserved} more reserved by "
            f"running searches (limit {limit}); this search needs {runs}: wait or cancel some",
            headers={"Retry-After": "30"},
        )


def create_search(*, session: Session, settings: Settings, owner: str | None, spec: SearchCreate) -> Search:
    """Validate, store the search, create its study, then ask (and publish) its first trials."""
    validate_space(session=session, settings=settings, spec=spec)
    require_budget(session=session, settings=settings, owner=owner, spec=spec)
    # The base as the client wrote it: every pass, in any process, applies the trial's values to it
    # (the normalised base has fields derived from others, e.g. model.width from model.hidden).
    stored = spec.model_dump(mode="json") | {"base": spec.submitted_base()}
    search = search_repo.create_search(session=session, name=spec.name, spec=stored, owner=owner)
    session.commit()  # Optuna writes through its own connections: nothing of ours may hold the lock
    try:
        study = optuna.create_study(
            study_name=search.study_name, storage=storage(), direction=spec.direction()
        )
        study.set_user_attr("bnlab_search_id", search.id)
        study.set_user_attr("objective", spec.objective.model_dump(mode="json"))
        for point in spec.start_with:
            study.enqueue_trial({path: space.encode(v) for path, v in point.items()})
    except Exception as exc:
        log.exception("search %s: creating its study failed", search.id)
        search.status, search.error = "failed", f"creating the Optuna study failed: {exc}"
        session.commit()
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=search.error) from exc
    advance(search.id)
    session.refresh(search)
    return search


# ----------------------------------------------------------------------------------- advancing


def epoch_hook(run_id: str) -> Callable[[str], None] | None:
    """What a run's epochs should call: `on_run_event` when the run is a search's trial (its
    pruner reads every epoch), None for the rest, which then pay no lookup per epoch."""
    with session_scope(read_only=True) as session:  # as every run starts: no write lock
        search_id = search_repo.search_of_run(session=session, run_id=run_id)
    return on_run_event if search_id is not None else None


def on_run_event(run_id: str) -> None:
    """A run finished an epoch or ended: advance its search, if it belongs to one."""
    with session_scope(read_only=True) as session:  # after each epoch of every run: no write lock
        search_id = search_repo.search_of_run(session=session, run_id=run_id)
    if search_id is not None:
        advance(search_id)


def advance(search_id: str) -> None:
    with session_scope() as session:
        search_repo.poke(session=session, search_id=search_id)
    while True:
        now = utcnow()
        with session_scope() as session:
            pokes = search_repo.acquire(session=session, search_id=search_id, now=now, until=now + LEASE)
        if pokes is None:
            return  # the holder sees our poke when it releases
        try:
            _advance_once(search_id)
        except BaseException:
            with session_scope() as session:
                search_repo.release(session=session, search_id=search_id, pokes=None)
            raise
        with session_scope() as session:
            if search_repo.release(session=session, search_id=search_id, pokes=pokes):
                return
            search_repo.release(session=session, search_id=search_id, pokes=None)  # poked: go again


@dataclass
class TrialRuns:
    """A running trial's seeds as the database has them now."""

    number: int
    trial_id: int
    experiment_id: str | None
    statuses: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    curves: list[list[float]] = field(default_factory=list)  # the objective's metric per epoch


def _snapshot(session: Session, search: Search, metric: str) -> list[TrialRuns]:
    running = []
    for trial in search_repo.list_trials(session=session, search_id=search.id):
        if trial.state != search_repo.ACTIVE:
            continue
        seen = TrialRuns(trial.number, trial.trial_id, trial.experiment_id)
        if trial.experiment_id is not None:
            runs = experiment_repo.list_experiment_runs(session=session, experiment_id=trial.experiment_id)
            epochs = experiment_repo.metrics_by_run(session=session, experiment_id=trial.experiment_id)
            for run in sorted(runs, key=lambda r: int(r.spec["train"]["seed"])):
                seen.statuses.append(run.status)
                seen.errors.append(run.error or "")
                seen.run_ids.append(run.id)
                seen.curves.append([float(getattr(m, metric)) for m in epochs.get(run.id, [])])
        running.append(seen)
    return running


def _advance_once(search_id: str) -> None:
    with session_scope() as session:
        search = search_repo.get_search(session=session, search_id=search_id)
        if search is None or search.status != search_repo.ACTIVE:
            return
        spec = SearchCreate.model_validate(search.spec)
        running = _snapshot(session, search, spec.objective.metric)
        study_name, asked = search.study_name, search.trials_asked
    study = optuna.load_study(
        study_name=study_name,
        storage=storage(),
        sampler=space.make_sampler(spec, asked),
        pruner=space.make_pruner(spec),
    )
    in_flight = sum(not _settle(search_id, spec, study, trial) for trial in running)
    while in_flight < spec.max_in_flight and asked < spec.trials:
        outcome = _ask(search_id, spec, study)
        if outcome == "cancelled":
            return
        asked += 1
        in_flight += outcome == "training"
    if in_flight == 0 and asked >= spec.trials:
        with session_scope() as session:
            search = search_repo.get_search(session=session, search_id=search_id, lock=True)
            if search is not None and search.status == search_repo.ACTIVE:
                search_repo.finish_search(session=session, search=search, status="finished")
        log.info("search %s finished", search_id)


def _settle(search_id: str, spec: SearchCreate, study: optuna.Study, trial: TrialRuns) -> bool:
    """Report the trial's new epochs, then tell Optuna its end if it ended or must be pruned.
    Returns whether the trial has ended."""
    if trial.experiment_id is None or not trial.statuses:
        return _tell(search_id, study, trial, TrialState.FAIL, error="its experiment was deleted")
    frozen = storage().get_trial(trial.trial_id)
    if frozen.state.is_finished():  # told by an earlier pass that died before recording it
        return _record_end(search_id, trial, frozen.state, value=frozen.value)
    ended = [RunStatus(s).is_finished for s in trial.statuses]
    live = [
        c
        for c, s in zip(trial.curves, trial.statuses, strict=True)
        if s in ("queued", "running", "succeeded")
    ]
    reported = set(frozen.intermediate_values)
    handle = optuna.trial.Trial(study, trial.trial_id)
    common = min((len(c) for c in live), default=0)
    new_steps = [step for step in range(1, common + 1) if step not in reported]
    prune = False
    for step in new_steps:
        handle.report(sum(c[step - 1] for c in live) / len(live), step)
        # After every step, as in an objective function, and even for a trial whose seeds all
        # ended: Hyperband records a trial's rungs only when it asks, and judges later trials by them.
        prune = spec.pruner.kind != "none" and handle.should_prune()
        if prune:
            break
    if all(ended):
        return _finish(search_id, spec, study, trial)
    if prune:
        return _prune(search_id, study, trial, common)
    return False


def _finish(search_id: str, spec: SearchCreate, study: optuna.Study, trial: TrialRuns) -> bool:
    failed = [(s, e) for s, e in zip(trial.statuses, trial.errors, strict=True) if s != RunStatus.succeeded]
    if failed:
        why = "; ".join(f"a seed {s}" + (f": {e}" if e else "") for s, e in failed)
        return _tell(search_id, study, trial, TrialState.FAIL, error=why[:2000])
    finals = [c[-1] if c else math.nan for c in trial.curves]
    if not all(math.isfinite(v) for v in finals):  # a diverged seed: no score to compare
        shown = ", ".join(f"{v:g}" for v in finals)
        return _tell(
            search_id,
            study,
            trial,
            TrialState.FAIL,
            error=f"a seed's {spec.objective.metric} is not finite ({shown})",
        )
    value, mean, std = space.aggregate(spec.objective, finals)
    return _tell(search_id, study, trial, TrialState.COMPLETE, value=value, mean=mean, std=std)


def _prune(search_id: str, study: optuna.Study, trial: TrialRuns, epoch: int) -> bool:
    with session_scope() as session:
        for run_id in trial.run_ids:
            run = run_repo.get_run(session=session, run_id=run_id)
            if run is not None and not RunStatus(run.status).is_finished:
                run_repo.request_cancel(session=session, run=run)
    log.info("search %s: trial %d pruned after epoch %d", search_id, trial.number, epoch)
    return _tell(search_id, study, trial, TrialState.PRUNED)


def _tell(
    search_id: str,
    study: optuna.Study,
    trial: TrialRuns,
    state: TrialState,
    *,
    value: float | None = None,
    mean: float | None = None,
    std: float | None = None,
    error: str | None = None,
) -> bool:
    if error is not None:
        storage().set_trial_user_attr(trial.trial_id, "error", error)
    if mean is not None:
        storage().set_trial_user_attr(trial.trial_id, "seed_mean", mean)
        storage().set_trial_user_attr(trial.trial_id, "seed_std", std)
    study.tell(trial.number, value if state == TrialState.COMPLETE else None, state=state)
    return _record_end(search_id, trial, state, value=value, mean=mean, std=std, error=error)


def _record_end(search_id: str, trial: TrialRuns, state: TrialState, **fields: object) -> bool:
    name = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}.get(state, "failed")
    with session_scope() as session:
        search_repo.end_trial(session=session, search_id=search_id, number=trial.number, state=name, **fields)
    log.info("search %s: trial %d %s", search_id, trial.number, name)
    return True


def _ask(
    search_id: str, spec: SearchCreate, study: optuna.Study
) -> Literal["training", "failed", "cancelled"]:
    """Ask Optuna for a trial and train it: "training", or "failed" when its values make no valid
    run (the trial counts, and the next is asked), or "cancelled" when the search was meanwhile."""
    asked = study.ask(fixed_distributions=space.distributions(spec))
    params = space.decode(spec, asked.params)
    study_id = storage().get_study_id_from_name(study.study_name)
    trial_id = storage().get_trial_id_from_study_id_trial_number(study_id, asked.number)
    with session_scope() as session:
        search = search_repo.get_search(session=session, search_id=search_id, lock=True)
        if search is None or search.status != search_repo.ACTIVE:
            cancelled = True
        else:
            cancelled = False
            name = f"{search.name[:100]} #{asked.number}"
            trial = search_repo.add_trial(
                session=session, search=search, number=asked.number, trial_id=trial_id, params=params
            )
            try:
                planned = space.planned_runs(spec, name, params)
            except space.SpaceError as exc:
                trial.state, trial.error, planned = "failed", str(exc), []
            if planned:
                experiment = experiment_repo.create_experiment(
                    session=session,
                    name=name,
                    spec=space.trial_experiment(spec, name, params).model_dump(mode="json"),
                    preset=None,
                    owner=search.owner,
                )
                trial.experiment_id = experiment.id
                runs = [
                    experiment_repo.add_run(
                        session=session,
                        experiment_id=experiment.id,
                        spec=p.spec,
                        grid_point=p.point,
                        owner=search.owner,
                    )
                    for p in planned
                ]
                to_publish = [(run.id, p.spec) for run, p in zip(runs, planned, strict=True)]
    if cancelled:
        study.tell(asked, state=TrialState.FAIL)
        return "cancelled"
    if not planned:  # the sampled values make no valid run: a failed trial, and the next is asked
        storage().set_trial_user_attr(trial_id, "error", trial.error)
        study.tell(asked, state=TrialState.FAIL)
        return "failed"
    asked.set_user_attr("experiment_id", experiment.id)
    log.info("search %s: trial %d asks %s", search_id, asked.number, params)
    _publish(to_publish)
    return "training"


def _publish(runs: list[tuple[str, RunCreate]]) -> None:
    with session_scope() as session:
        try:
            publish_runs(session=session, runs=runs)
        except BrokerUnavailable:  # queued and committed: the reaper publishes them later
            log.warning("broker unreachable: %d runs of a search trial left for the reaper", len(runs))


# ---------------------------------------------------------------------------------- cancelling


def cancel_search(*, session: Session, search: Search) -> None:
    """Stop the search: no further trials, every unfinished run of its trials cancelled, the
    running trials told to Optuna as failed (Optuna has no cancelled state)."""
    locked = search_repo.get_search(session=session, search_id=search.id, lock=True)
    if locked is None or locked.status != search_repo.ACTIVE:
        return
    search_repo.finish_search(session=session, search=locked, status="cancelled")
    stopped = []
    for trial in search_repo.list_trials(session=session, search_id=search.id):
        if trial.state != search_repo.ACTIVE:
            continue
        stopped.append(trial.trial_id)
        trial.state, trial.error = "failed", CANCELLED
        for run in _trial_runs(session, trial):
            if not RunStatus(run.status).is_finished:
                run_repo.request_cancel(session=session, run=run)
    study_name = locked.study_name
    session.commit()
    for trial_id in stopped:
        try:
            storage().set_trial_user_attr(trial_id, "error", CANCELLED)
            storage().set_trial_state_values(trial_id, state=TrialState.FAIL)
        except (RuntimeError, ValueError) as exc:  # a worker told it first
            log.info("search study %s: trial %d already ended (%s)", study_name, trial_id, exc)


def _trial_runs(session: Session, trial: SearchTrial) -> list[Run]:
    if trial.experiment_id is None:
        return []
    return list(experiment_repo.list_experiment_runs(session=session, experiment_id=trial.experiment_id))


def delete_search(*, session: Session, search: Search) -> None:
    """Cancel, then delete the search, its trials' experiments (runs and all) and its study."""
    cancel_search(session=session, search=search)
    for trial in search_repo.list_trials(session=session, search_id=search.id):
        experiment = (
            experiment_repo.get_experiment(session=session, experiment_id=trial.experiment_id)
            if trial.experiment_id
            else None
        )
        if experiment is not None:
            experiment_repo.delete_experiment(session=session, experiment=experiment)
    study_name = search.study_name
    session.delete(search)
    session.commit()
    with contextlib.suppress(KeyError):  # its study was never created
        optuna.delete_study(study_name=study_name, storage=storage())


# ----------------------------------------------------------------------------------- the view


def search_or_404(session: Session, search_id: str) -> Search:
    search = search_repo.get_search(session=session, search_id=search_id)
    if search is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"search {search_id} not found")
    return search


def search_public(*, session: Session, search: Search, importances: bool = False) -> SearchPublic:
    spec = SearchCreate.model_validate(search.spec)
    trials = [
        _trial_public(session, spec, t) for t in search_repo.list_trials(session=session, search_id=search.id)
    ]
    counts = {state: 0 for state in ("running", "complete", "pruned", "failed")}
    for trial in trials:
        counts[trial.state] += 1
    complete = [t for t in trials if t.state == "complete" and t.value is not None]
    pick = max if spec.direction() == "maximize" else min
    best = pick(complete, key=lambda t: t.value or 0.0) if complete else None
    ranked = (
        cached_importances(search.id, search.study_name, len(complete))
        if importances and len(complete) >= 2
        else None
    )
    return SearchPublic.model_validate(
        {
            "id": search.id,
            "name": search.name,
            "status": search.status,
            "error": search.error,
            "spec": spec,
            "study_name": search.study_name,
            "created_at": search.created_at,
            "finished_at": search.finished_at,
            "trial_counts": counts,
            "best": best,
            "trials": trials,
            "importances": ranked[0] if ranked else None,
            "importance_method": ranked[1] if ranked else None,
        }
    )


def _trial_public(session: Session, spec: SearchCreate, trial: SearchTrial) -> TrialPublic:
    values: list[float | None] = []
    if trial.experiment_id is not None:
        runs = sorted(_trial_runs(session, trial), key=lambda r: int(r.spec["train"]["seed"]))
        last = run_repo.last_epoch_metrics(session=session, runs=runs)
        values = [float(getattr(last[r.id], spec.objective.metric)) if r.id in last else None for r in runs]
    return TrialPublic(
        number=trial.number,
        state=trial.state,
        params=trial.params,
        experiment_id=trial.experiment_id,
        value=trial.value,
        mean=trial.mean,
        std=trial.std,
        values=values,
        error=trial.error,
    )


def load_study(search: Search) -> optuna.Study:
    return optuna.load_study(study_name=search.study_name, storage=storage())


@functools.lru_cache(maxsize=64)
def cached_importances(search_id: str, study_name: str, complete: int) -> tuple[dict[str, float], str] | None:
    """Importances change only when a trial completes: a dashboard polling a running search (every
    few seconds) computes them once per completed trial, not once per poll."""
    return parameter_importances(search_id, study_name)


def parameter_importances(search_id: str, study_name: str) -> tuple[dict[str, float], str] | None:
    """Parameter importances of the complete trials by Optuna's fANOVA, and the method's name. None
    when Optuna cannot tell (e.g. every trial tried the same values)."""
    evaluator, method = optuna.importance.FanovaImportanceEvaluator(seed=0), "fanova"
    try:
        with warnings.catch_warnings():
            # e.g. "importances will be equal" when every trial scored the same: the numbers say so.
            warnings.simplefilter("ignore", UserWarning)
            study = optuna.load_study(study_name=study_name, storage=storage())
            found = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as exc:
        log.info("search %s: no importances (%s)", search_id, exc)
        return None
    return {name: float(value) for name, value in found.items()}, method
