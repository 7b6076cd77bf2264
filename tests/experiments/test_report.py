"""The experiment report's arithmetic on hand-made metric rows: grid expansion, mean ± std over
seeds, best epochs, epochs-to-target, winners, and the verdict rule for claims."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest

from service.experiments.grid import GridError, config_label, expand
from service.experiments.report import Claim, EpochRow, RunResult, Term, judge, report
from service.experiments.schemas import ExperimentCreate

NONE = {"model.norm.kind": "none"}
BATCH = {"model.norm.kind": "batch"}
SPEC = ExperimentCreate.model_validate(
    {"name": "r", "grid": {"model.norm.kind": ["none", "batch"]}, "seeds": [0, 1, 2], "target": 0.8}
)


def row(epoch: int, acc: float, loss: float) -> EpochRow:
    return EpochRow(
        epoch=epoch, val_accuracy=acc, val_loss=loss, train_accuracy=acc + 0.01, train_loss=loss - 0.01
    )


def run(point: dict[str, Any], seed: int, accs: list[float], status: str = "succeeded") -> RunResult:
    return RunResult(point, seed, status, [row(i + 1, a, 1 - a) for i, a in enumerate(accs)])


def results(none_accs: list[list[float]], batch_accs: list[list[float]]) -> list[RunResult]:
    return [run(NONE, s, a) for s, a in enumerate(none_accs)] + [
        run(BATCH, s, a) for s, a in enumerate(batch_accs)
    ]


def make_report(rows: list[RunResult], claims: tuple[Claim, ...] = (), target: float = 0.8) -> Any:
    return report(experiment_id="e" * 32, spec=SPEC, preset=None, results=rows, target=target, claims=claims)


def test_final_and_best_are_mean_and_sample_std_over_seeds() -> None:
    none_accs = [[0.5, 0.82, 0.79], [0.6, 0.7, 0.81], [0.55, 0.75, 0.84]]
    got = make_report(results(none_accs, [[0.9], [0.9], [0.9]])).configurations[0]
    finals = [0.79, 0.81, 0.84]
    assert got.config == "norm=none"
    assert got.final["val_accuracy"].mean == pytest.approx(statistics.fmean(finals))
    assert got.final["val_accuracy"].std == pytest.approx(statistics.stdev(finals))  # ddof=1
    assert got.final["val_accuracy"].values == pytest.approx(finals)
    assert got.final["val_loss"].mean == pytest.approx(1 - statistics.fmean(finals))
    assert got.final["train_loss"].values == pytest.approx([1 - a - 0.01 for a in finals])
    assert got.best["val_accuracy"].values == pytest.approx([0.82, 0.81, 0.84])  # max over epochs
    assert got.best["val_loss"].values == pytest.approx([1 - 0.82, 1 - 0.81, 1 - 0.84])  # min over epochs


def test_epochs_to_target_per_seed_and_mean_over_those_that_reached_it() -> None:
    got = make_report(results([[0.5, 0.82], [0.6, 0.7], [0.85, 0.9]], [[0.1], [0.1], [0.1]]))
    ett = got.configurations[0].epochs_to_target
    assert ett.per_seed == {"0": 2, "1": None, "2": 1}
    assert (ett.reached, ett.mean, ett.target) == (2, 1.5, 0.8)
    assert got.configurations[1].epochs_to_target.mean is None
    assert (
        make_report(results([[0.5, 0.82]] * 3, [[0.1]] * 3), target=0.5)
        .configurations[0]
        .epochs_to_target.mean
        == 1
    )


def test_single_seed_has_no_std_and_unfinished_runs_do_not_count() -> None:
    rows = [run(NONE, 0, [0.7]), run(NONE, 1, [0.9], status="running"), run(NONE, 2, [], status="failed")]
    rows += [run(BATCH, s, [0.8]) for s in range(3)]
    got = make_report(rows)
    none = got.configurations[0]
    assert (none.runs, none.succeeded, none.unfinished, none.failed) == (3, 1, 1, 1)
    assert (none.final["val_accuracy"].mean, none.final["val_accuracy"].std) == (0.7, None)
    assert got.finished is False


def test_a_diverged_seed_makes_the_mean_null_not_nan() -> None:
    rows = results([[0.5]] * 3, [[0.9]] * 3)
    rows[0] = RunResult(NONE, 0, "succeeded", [EpochRow(1, 0.1, math.nan, 0.1, math.inf)])
    got = make_report(rows).configurations[0]
    assert got.final["val_loss"].mean is None
    assert got.final["val_loss"].values[0] is None
    # Its accuracy is the argmax of non-finite logits: no number of it is averaged with the others.
    assert got.final["val_accuracy"].mean is None
    assert got.model_dump_json()  # JSON-safe: no NaN anywhere


def test_a_diverged_run_counts_as_failed_and_diverged_and_makes_its_configuration_null() -> None:
    """What the worker leaves of a diverged seed: status failed, finite epochs, then the epoch whose
    losses were stored as null (read back through EpochRow.stored)."""
    rows = results([[0.5, 0.6]] * 3, [[0.8, 0.9]] * 3)
    diverged_epochs = [row(1, 0.7, 0.4), EpochRow.stored(2, 0.1, None, 0.1, None)]
    rows[1] = RunResult(NONE, 1, "failed", diverged_epochs)
    rows.append(RunResult(NONE, 3, "failed", [row(1, 0.95, 0.05)]))  # failed for another reason
    claim = Claim(
        "BN raises the accuracy", "final.val_accuracy", (Term(BATCH, 1.0), Term(NONE, -1.0)), "b − n"
    )
    got = make_report(rows, claims=(claim,))
    none = got.configurations[0]
    assert (none.runs, none.succeeded, none.failed, none.diverged) == (4, 2, 2, 1)
    for section in (none.final, none.best):
        for metric in ("val_accuracy", "val_loss", "train_accuracy", "train_loss"):
            # Seeds 0, 1, 2: the diverged seed is a null value, not its last or best number; seed 3
            # (failed without diverging) is not counted at all.
            assert section[metric].n == 3
            assert section[metric].values[1] is None
            assert section[metric].mean is None
    assert got.configurations[1].diverged == 0
    assert got.claims[0].verdict == "inconclusive"
    assert "non-finite value (diverged)" in got.claims[0].evidence
    assert "final.val_accuracy" not in {w.metric for w in got.winners if w.config == "norm=none"}
    assert "NaN" not in got.model_dump_json()


def test_stored_rows_read_null_as_nan_and_only_non_finite_losses_diverge() -> None:
    assert math.isnan(EpochRow.stored(3, None, 0.5, 0.5, 0.5).val_accuracy)
    assert not EpochRow.stored(3, None, 0.5, 0.5, 0.5).diverged  # an accuracy alone does not diverge
    assert EpochRow.stored(3, 0.5, 0.5, 0.5, None).diverged
    assert EpochRow(1, 0.5, math.inf, 0.5, 0.5).diverged
    assert not row(1, 0.5, 0.5).diverged


def test_winners_pick_the_best_mean_per_metric() -> None:
    winners = {w.metric: w for w in make_report(results([[0.7, 0.82]] * 3, [[0.81, 0.9]] * 3)).winners}
    assert winners["final.val_accuracy"].config == "norm=batch"
    assert winners["final.val_accuracy"].runner_up == "norm=none"
    assert winners["final.val_loss"].config == "norm=batch"
    assert winners["final.val_loss"].better == "lower"
    assert winners["epochs_to_target"].config == "norm=batch"
    assert winners["epochs_to_target"].mean == 1


CLAIM = Claim(
    sentence="BN lowers the validation loss",
    metric="final.val_loss",
    terms=(Term(NONE, 1.0), Term(BATCH, -1.0)),
    contrast="none − batch",
)


@pytest.mark.parametrize(
    ("none_accs", "batch_accs", "verdict"),
    [
        # none's loss is 0.30 ± 0.01, batch's 0.20 ± 0.01: far outside the noise band.
        ([[0.69], [0.70], [0.71]], [[0.79], [0.80], [0.81]], "supported"),
        # The other way round: the data contradict the claim (bn-semantics.md §6 saw this).
        ([[0.79], [0.80], [0.81]], [[0.69], [0.70], [0.71]], "not supported"),
        # A difference of 0.005 with a seed spread of 0.05: within the noise.
        ([[0.65], [0.70], [0.75]], [[0.655], [0.705], [0.755]], "inconclusive"),
    ],
)
def test_verdicts_follow_the_written_rule(
    none_accs: list[list[float]], batch_accs: list[list[float]], verdict: str
) -> None:
    claim = make_report(results(none_accs, batch_accs), (CLAIM,)).claims[0]
    none_loss = [1 - a[0] for a in none_accs]
    batch_loss = [1 - a[0] for a in batch_accs]
    difference = statistics.fmean(none_loss) - statistics.fmean(batch_loss)
    noise = 2 * math.sqrt(statistics.variance(none_loss) / 3 + statistics.variance(batch_loss) / 3)
    assert claim.difference == pytest.approx(difference)
    assert claim.noise == pytest.approx(noise)
    assert claim.verdict == verdict
    assert f"{difference:+.4f}" in claim.evidence
    assert "norm=none" in claim.evidence
    assert "norm=batch" in claim.evidence


def test_unfinished_runs_or_a_single_seed_are_inconclusive() -> None:
    rows = results([[0.7]] * 3, [[0.9]] * 3)
    rows[0] = run(NONE, 0, [0.7], status="running")
    assert make_report(rows, (CLAIM,)).claims[0].verdict == "inconclusive"
    assert "unfinished" in make_report(rows, (CLAIM,)).claims[0].evidence
    one_seed = results([[0.7]], [[0.9]])
    judged = make_report(one_seed, (CLAIM,)).claims[0]
    assert (judged.verdict, judged.difference) == ("inconclusive", None)
    assert "fewer than 2" in judged.evidence


def test_a_claim_term_must_match_exactly_one_configuration() -> None:
    configs = make_report(results([[0.7]] * 3, [[0.9]] * 3)).configurations
    with pytest.raises(ValueError, match="matches 0 configurations"):
        judge(Claim("x", "final.val_loss", (Term({"model.norm.kind": "layer"}, 1.0),), "x"), configs)


def test_grid_expansion_one_run_per_point_and_seed_in_order() -> None:
    spec = ExperimentCreate.model_validate(
        {
            "name": "grid",
            "base": {"dataset": {"name": "synthetic", "limit": 100}, "train": {"epochs": 2}},
            "grid": {"model.norm.kind": ["none", "batch"], "train.lr": [0.001, 0.01]},
            "seeds": [3, 4],
        }
    )
    planned = expand(spec)
    assert [(p.point["model.norm.kind"], p.point["train.lr"], p.seed) for p in planned] == [
        (kind, lr, seed) for kind in ("none", "batch") for lr in (0.001, 0.01) for seed in (3, 4)
    ]
    first = planned[-1].spec
    assert (first.model.norm.kind, first.train.lr, first.train.seed, first.train.epochs) == (
        "batch",
        0.01,
        4,
        2,
    )
    assert first.dataset.limit == 100
    assert first.name == "grid: norm=batch lr=0.01 seed=4"
    assert config_label({"model.hidden": [64, 32], "train.momentum": 0.0}) == "hidden=64x32 momentum=0"


def test_grid_points_re_derive_what_depends_on_them() -> None:
    """A point is applied to the base as submitted, so fields derived from others follow the point:
    Adam's epsilon from `compat`, PyTorch's momentum from Keras' (both found in review)."""
    spec = ExperimentCreate.model_validate(
        {
            "name": "compat",
            "base": {"model": {"norm": {"keras_momentum": 0.99}}},
            "grid": {"compat": ["pytorch", "keras"], "model.norm.keras_momentum": [0.99, 0.9]},
            "seeds": [0],
        }
    )
    ran = {(p.point["compat"], p.point["model.norm.keras_momentum"]): p.spec for p in expand(spec)}
    assert {key: (s.train.adam_eps, s.model.norm.momentum) for key, s in ran.items()} == {
        ("pytorch", 0.99): (1e-8, 0.01),
        ("pytorch", 0.9): (1e-8, 0.1),
        ("keras", 0.99): (1e-7, 0.01),
        ("keras", 0.9): (1e-7, 0.1),
    }
    # The experiment itself still echoes its normalised base.
    assert spec.base.model.norm.momentum == 0.01


def test_a_bad_grid_point_names_the_point_and_the_field() -> None:
    spec = ExperimentCreate.model_validate({"name": "g", "grid": {"train.batch_size": [32, 1]}})
    with pytest.raises(GridError, match=r"batch_size=1 \(seed 0\).*train\.batch_size"):
        expand(spec)
    too_many = ExperimentCreate.model_validate(
        {"name": "g", "grid": {"train.lr": [0.1 * i for i in range(1, 17)]}, "seeds": [0, 1, 2, 3, 4]}
    )
    with pytest.raises(GridError, match="80 runs .* the limit is 64"):
        expand(too_many)
