"""Measured values where JSON and every database can hold them.

A diverged run's losses and statistics are NaN or infinite: JSON carries neither, SQLite stores NaN
as NULL and Postgres as NaN. Everything that stores, serves or summarises a measured value maps them
to None through this one function (here, in the lowest layer, so that runs, experiments and cards
can all import it).
"""

from __future__ import annotations

import math


def finite_or_none(value: float | None) -> float | None:
    """The value if it is a finite number, else None (NaN, ±infinity, or None itself)."""
    return value if value is not None and math.isfinite(value) else None
