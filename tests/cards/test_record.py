"""The replications record (`bnlab cards run --write`): built from the API's answers alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.client.cards import record


def claim(name: str, verdict: str, reason: str | None) -> dict[str, Any]:
    return {
        "name": name, "sentence": f"{name} holds.", "contrast": "b − n", "metric": "final.val_accuracy",
        "direction": "positive", "smallest": 0.01, "n": 5, "effect": 0.05, "ci_low": 0.01, "ci_high": 0.09,
        "bootstrap_low": None, "bootstrap_high": None, "p_value": 0.01, "adjusted_p": 0.02, "hedges_g": 1.2,
        "seeds_for_power": 4, "verdict": verdict, "reason": reason,
    }  # fmt: skip


def card(name: str, available: bool) -> dict[str, Any]:
    return {
        "name": name, "title": f"{name} title", "citation": "Someone 2020", "claim": "It helps.",
        "paper_setup": "ImageNet.", "paper_figures": [{"text": "23.6 %", "verified": True}],
        "setup": "An MLP.", "differences": "Smaller data.", "available": available,
        "unavailable_reason": None if available else "needs a probe",
    }  # fmt: skip


def test_the_record_has_each_card_its_verdict_table_time_and_an_honest_difference_line() -> None:
    report = {
        "run_id": "a" * 32, "scale": "quick", "dataset": "fashion-mnist", "created_at": "2026-12-06T08:48:00",
        "runs": {"succeeded": 10}, "measured_seconds": 40.0, "estimated_seconds": 33, "load": (1.5, 2.0),
        "claims": [claim("helps", "supported", None), claim("faster", "inconclusive", "too few seeds")],
        "summary": "Of 2 claims, supported: helps.",
    }  # fmt: skip
    text = record(
        [card("one", True), card("two", False)], {"one": report}, "quick", figures_dir="replications"
    )
    assert "| [one](#one) | 2026-12-06T08:48 | 40 s (33 s) | helps: supported, faster: inconclusive |" in text
    assert "| two | – | – | unavailable: needs a probe |" in text
    assert "![one](replications/one.png)" in text
    assert "+0.0500 [+0.0100, +0.0900] | 0.01 | 0.02 | 1.20 | 4 | **supported** |" in text
    assert (
        "40 s measured against 33 s estimated (+21 %); the machine's 1-minute load average at its start 1.5"
        in text
    )
    assert (
        "Where bnlab differs from the paper: faster is inconclusive (too few seeds). Why that may be: Smaller"
        in text
    )
    assert "The paper's figure (verified): 23.6 %" in text
    assert "Not run here: needs a probe." in text


def test_a_reused_run_keeps_the_load_recorded_when_it_ran(tmp_path: Path) -> None:
    from service.client.cards import _keep_load

    store = tmp_path / "loads.json"
    _keep_load(store, "one", {"run_id": "r1", "load": (3.0, 4.0)})
    reused = {"run_id": "r1", "load": (None, 1.0)}
    _keep_load(store, "one", reused)
    assert reused["load"] == (3.0, 4.0)
    other = {"run_id": "r2", "load": (None, 1.0)}
    _keep_load(store, "one", other)
    assert other["load"] == (None, 1.0)
