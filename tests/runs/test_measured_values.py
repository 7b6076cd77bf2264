"""A measured value that is not finite (a diverged epoch's loss) answers null, whatever the database
holds: new rows store NULL, and a NaN that Postgres stored before is read back as null too."""

from __future__ import annotations

import math

import pytest

from service.ml.finite import finite_or_none
from service.runs.schemas import EpochMetricPublic, RunSummary, SlotStatisticPublic


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_stored_and_served_as_null(value: float) -> None:
    assert finite_or_none(value) is None
    row = {"epoch": 1, "train_loss": value, "train_accuracy": 0.1, "val_loss": value, "val_accuracy": 0.1}
    public = EpochMetricPublic.model_validate(row | {"seconds": 0.5})
    assert (public.train_loss, public.val_loss, public.val_accuracy) == (None, None, 0.1)
    assert "NaN" not in public.model_dump_json()
    assert "Infinity" not in public.model_dump_json()
    assert RunSummary(epochs_done=1, epochs_total=3, val_loss=value).val_loss is None
    assert SlotStatisticPublic(layer="bn1", input_mean=value, input_std=1.0).input_mean is None


def test_finite_values_pass_unchanged() -> None:
    assert finite_or_none(0.25) == 0.25
    assert (
        EpochMetricPublic(
            epoch=2, train_loss=0.5, train_accuracy=None, val_loss=0.25, val_accuracy=1.0, seconds=1.0
        ).val_loss
        == 0.25
    )


def test_one_helper_maps_non_finite_to_none_for_runs_reports_and_cards() -> None:
    # Runs, experiment reports and cards share service.ml.finite's helper: None passes through too
    # (a card's missing comparison), and the report's statistics treat NaN the same way.
    from service.experiments.report import stat

    assert finite_or_none(None) is None
    assert finite_or_none(-math.inf) is None
    assert stat([math.nan, 1.0]).values == [None, 1.0]
