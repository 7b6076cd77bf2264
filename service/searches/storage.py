"""Optuna's RDB storage in bnlab's own database, one per process (like bnlab's engines).

The studies live in Optuna's tables beside bnlab's, so every API and worker process sees the same
study and `optuna-dashboard <database url>` opens it. Optuna creates its tables on first use.
"""

from __future__ import annotations

import logging
import os

import optuna

from service.config import get_settings
from service.db import SQLITE_BUSY_TIMEOUT_MS

# Optuna's INFO lines ("Trial 3 finished ...") would duplicate bnlab's own log lines.
optuna.logging.set_verbosity(optuna.logging.WARNING)
log = logging.getLogger(__name__)

_STORAGES: dict[tuple[str, int], optuna.storages.RDBStorage] = {}


def storage() -> optuna.storages.RDBStorage:
    url = get_settings().sqlalchemy_url
    key = (url, os.getpid())
    if key not in _STORAGES:
        # SQLite: wait for the write lock as bnlab's own engine does instead of failing at once.
        kwargs = (
            {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}}
            if url.startswith("sqlite")
            else {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 8}
        )
        _STORAGES[key] = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    return _STORAGES[key]


def dispose_storages() -> None:
    """Close every pooled connection (tests, before their database is dropped)."""
    for store in _STORAGES.values():
        store.engine.dispose()
    _STORAGES.clear()
