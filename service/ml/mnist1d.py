"""MNIST-1D (Greydanus 2020, "Scaling down deep learning"), generated here with numpy, offline.

A port of the reference generator (github.com/greydanus/mnist1d, `mnist1d/data.py` and
`mnist1d/transform.py`), whose package cannot be installed here and whose ready-made file is a
pickle. Each of the 10 digits is a 12-point 1-D template; a sample is its template
  1. padded with 36..60 zeros at the end, then linearly interpolated to 72 points,
  2. scaled by 1 ± 0.2, translated (rolled) by 0..47 points,
  3. where it is zero, filled with Gaussian-smoothed (σ = 2) noise of scale 0.25,
  4. plus iid Gaussian noise of scale 0.02, sheared by a linear ramp of slope ±0.375,
  5. interpolated to 40 points.
The whole set is then standardised (zero mean, unit std over every value) and split 4000 / 1000.
The random draws come from numpy's legacy RandomState seeded with 42, in the reference's order, so
the defaults reproduce what the reference package regenerates with its own defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_CLASSES = 10
LENGTH = 40  # final_seq_length
TRAIN_SIZE = 4000
TEST_SIZE = 1000


@dataclass(frozen=True)
class Mnist1dArgs:
    """The reference's `get_dataset_args()` defaults (its download URL and pickle path left out)."""

    num_samples: int = TRAIN_SIZE + TEST_SIZE
    train_split: float = 0.8
    template_len: int = 12
    padding: tuple[int, int] = (36, 60)
    scale_coeff: float = 0.4
    max_translation: int = 48
    corr_noise_scale: float = 0.25
    iid_noise_scale: float = 2e-2
    shear_scale: float = 0.75
    final_seq_length: int = LENGTH
    seed: int = 42


@dataclass(frozen=True)
class Mnist1dData:
    x: np.ndarray  # float32 [train, 40]
    y: np.ndarray  # int64 [train]
    x_test: np.ndarray
    y_test: np.ndarray


_TEMPLATES = np.asarray(
    [
        [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
        [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
        [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
        [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
        [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
        [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
        [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
        [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
    ]
)


def templates() -> np.ndarray:
    """The 10 digit templates [10, 12], whitened, starting at 0, divided by 6 (as the reference)."""
    x = _TEMPLATES - _TEMPLATES.mean(1, keepdims=True)
    x /= x.std(1, keepdims=True)
    x -= x[:, :1]  # the signal starts (and ends) at 0
    scaled: np.ndarray = x / 6.0
    return scaled


def make_dataset(args: Mnist1dArgs | None = None) -> Mnist1dData:
    """The standardised MNIST-1D train and test splits for `args` (the reference defaults if None)."""
    args = args or Mnist1dArgs()
    rs = np.random.RandomState(args.seed)  # the legacy stream, as the reference's np.random.seed
    per_class = args.num_samples // NUM_CLASSES
    xs = [transform(t, args, rs) for t in templates() for _ in range(per_class)]
    ys = np.repeat(np.arange(NUM_CLASSES), per_class)
    order = rs.permutation(len(ys))
    x, y = np.stack(xs)[order], ys[order]
    x = (x - x.mean()) / x.std()  # centre the dataset, unit standard deviation
    split = int(len(y) * args.train_split)
    x, y = x.astype(np.float32), y.astype(np.int64)
    return Mnist1dData(x[:split], y[:split], x[split:], y[split:])


def transform(template: np.ndarray, args: Mnist1dArgs, rs: np.random.RandomState) -> np.ndarray:
    """One sample from one template; the draws are in the reference's order (rand, rand, choice,
    randn, randn, rand) so the stream, and so the dataset, match it."""
    low, high = args.padding
    padded = np.concatenate([template + 1e-8, np.zeros(low + int(rs.rand() * (high - low + 1)))])
    x = _interpolate(padded, args.template_len + high)
    x *= 1 + args.scale_coeff * (rs.rand() - 0.5)
    x = np.roll(x, rs.choice(args.max_translation))
    mask = x != 0
    x = mask * x + (1 - mask) * _gaussian_smooth(args.corr_noise_scale * rs.randn(*x.shape), sigma=2.0)
    x = x + args.iid_noise_scale * rs.randn(*x.shape)
    x = x - args.shear_scale * (rs.rand() - 0.5) * np.linspace(-0.5, 0.5, len(x))
    return _interpolate(x, args.final_seq_length)


def _interpolate(x: np.ndarray, n: int) -> np.ndarray:
    """Linear resampling of x onto n evenly spaced points (scipy's interp1d, kind='linear')."""
    return np.asarray(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(x)), x))


def _gaussian_smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter on 1-D data with its defaults: truncate at 4σ, 'reflect'
    boundaries (d c b a | a b c d | d c b a, numpy's 'symmetric')."""
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(x, radius, mode="symmetric")
    return np.convolve(padded, kernel, mode="valid")
