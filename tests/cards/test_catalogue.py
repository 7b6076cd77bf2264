"""The catalogue itself: every card's contrasts pick out one configuration each, every scale expands
into valid experiments where the card is available, quoted paper figures are verified ones, and the
quick scale fits the 5-minute budget by the cost model."""

from __future__ import annotations

import pytest

from service.cards import service, verdicts
from service.cards.catalogue import CARDS
from service.experiments.presets import PRESETS

AVAILABLE_ON_MAIN = {
    "article-seed",
    "article-depth",
    "wu-he-2018",
    "ziaee-2022",
    "summers-2020",
    "higher-lr",
    "small-batch",
    "deep-sigmoid",
    "init-scale",
    "cooijmans-2016",
}


@pytest.mark.parametrize("name", list(CARDS))
def test_every_contrast_term_matches_exactly_one_configuration(name: str) -> None:
    card = CARDS[name]
    verdicts.check_contrasts(card)
    assert {"test", "quick", "full"} <= set(card.sizes)
    assert len({c.name for c in card.contrasts}) == len(card.contrasts)
    for c in card.contrasts:
        assert c.smallest > 0
        assert c.direction in (1, -1)
        if c.paper_effect is not None:
            assert any(f.verified for f in card.paper_figures), (
                "only verified figures give the paper's number"
            )


@pytest.mark.parametrize("name", list(CARDS))
def test_available_cards_expand_at_every_scale_within_the_quick_budget(name: str) -> None:
    card = CARDS[name]
    reason = service.unavailable_reason(name, "fashion-mnist")
    if reason is not None:
        assert card.needs, f"{name} is unavailable ({reason}) without saying what it needs"
        return
    for scale in ("test", "quick", "full"):
        specs = service.experiment_specs(card, scale, "synthetic" if scale == "test" else "fashion-mnist")
        assert all(s.seeds for s in specs)
    quick = service.experiment_specs(card, "quick", "fashion-mnist")
    assert service.estimate(quick, processes=2) <= 300
    assert service.estimate(service.experiment_specs(card, "test", "synthetic"), processes=2) <= 10


def test_which_cards_this_build_can_run() -> None:
    runnable = {n for n in CARDS if service.unavailable_reason(n, "fashion-mnist") is None}
    assert runnable >= AVAILABLE_ON_MAIN  # features landing on main make more cards runnable, never fewer


def test_every_preset_is_a_card() -> None:
    assert set(PRESETS) - {"seed-keras"} <= set(CARDS)
    assert "article-seed" in CARDS
