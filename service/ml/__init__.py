"""Pure PyTorch core of bnlab: networks, normalizers, datasets, the training loop, checkpoints.

Nothing in this package knows about HTTP, the database or the queue (an import-linter contract in
pyproject.toml keeps it that way); the service layer hands it plain dataclasses and callbacks.
"""
