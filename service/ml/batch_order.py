"""Class-structured batch orders (train.batch_order, docs/training-switches.md): the epoch's sample
order when it is not the default uniform shuffle (`training.epoch_permutation`). Like that shuffle, each
order is a function of (labels, seed, epoch) alone, so a resumed run sees the batches it would have seen.

- class_sorted: the training set sorted by label, with the order of the classes and of the samples
  within each class shuffled per epoch; cut into batches, each batch holds one class except where one
  class ends and the next begins.
- k_classes: each batch drawn from k classes: per batch, k classes among those with samples left are
  picked at random (weighted by the samples they have left) and the batch is filled from them as evenly
  as their remaining samples allow (its samples shuffled). Only where the k picked classes, and then even
  the k fullest, hold fewer samples than a batch (at the end of the epoch, when the samples left are
  spread over more than k classes) does a batch take samples of further classes, the fullest first.
"""

from __future__ import annotations

import numpy as np
import torch

from service.ml.config import BatchOrder

# Keeps these orders' random streams apart from the uniform shuffle's (SeedSequence([seed, epoch])).
_STREAM = 21


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, _STREAM]))


def _shuffled_classes(labels: np.ndarray, rng: np.random.Generator) -> dict[int, list[int]]:
    """Each class's sample indices, shuffled; the classes in a shuffled order."""
    classes = rng.permutation(np.unique(labels))
    return {int(c): rng.permutation(np.flatnonzero(labels == c)).tolist() for c in classes}


def class_sorted(labels: np.ndarray, seed: int, epoch: int) -> list[int]:
    rng = _rng(seed, epoch)
    return [i for members in _shuffled_classes(labels, rng).values() for i in members]


def k_classes(labels: np.ndarray, seed: int, epoch: int, batch_size: int, k: int) -> list[int]:
    rng = _rng(seed, epoch)
    left = _shuffled_classes(labels, rng)
    order: list[int] = []
    while any(left.values()):
        live = [c for c, members in left.items() if members]
        size = min(batch_size, sum(len(left[c]) for c in live))
        weights = np.array([len(left[c]) for c in live], dtype=np.float64)
        picked = [
            live[i]
            for i in rng.choice(len(live), size=min(k, len(live)), replace=False, p=weights / weights.sum())
        ]
        if sum(len(left[c]) for c in picked) < size:  # not enough: the fullest classes, as many as needed
            picked = sorted(live, key=lambda c: -len(left[c]))
            while len(picked) > k and sum(len(left[c]) for c in picked[:-1]) >= size:
                picked.pop()
        takes = _even_split(size, [len(left[c]) for c in picked])
        batch = [i for c, take in zip(picked, takes, strict=True) for i in left[c][:take]]
        for c, take in zip(picked, takes, strict=True):
            del left[c][:take]
        order.extend(batch[j] for j in rng.permutation(len(batch)))
    return order


def _even_split(total: int, caps: list[int]) -> list[int]:
    """`total` split over bins of capacities `caps` as evenly as they allow (water-filling)."""
    takes = [0] * len(caps)
    remaining = total
    while remaining:
        open_bins = [i for i, cap in enumerate(caps) if takes[i] < cap]
        share = max(1, remaining // len(open_bins))
        for i in open_bins:
            add = min(share, caps[i] - takes[i], remaining)
            takes[i] += add
            remaining -= add
            if not remaining:
                break
    return takes


def epoch_order(
    kind: BatchOrder, labels: torch.Tensor, seed: int, epoch: int, batch_size: int, k: int
) -> torch.Tensor:
    """The sample order of one epoch for a class-structured `kind` (not `shuffled`)."""
    y = labels.cpu().numpy()
    if kind == "class_sorted":
        return torch.tensor(class_sorted(y, seed, epoch), dtype=torch.int64)
    if kind == "k_classes":
        return torch.tensor(k_classes(y, seed, epoch, batch_size, k), dtype=torch.int64)
    raise ValueError(f"unknown batch order {kind!r}; expected 'shuffled', 'class_sorted' or 'k_classes'")
