"""The ML core's user-facing error type, shared by the dataset readers."""

from __future__ import annotations


class DatasetError(Exception):
    """A dataset is missing or unreadable; the message is meant for the end user."""
