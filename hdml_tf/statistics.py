"""Statistics of a comparison over seeds: mean ± sd per variant, paired differences with a 95% interval, wins.

Two variants trained with the same seed see the same data in the same order (the sampler is a pure function of
(seed, step)) and start from the same initialization of the shared layers, so their difference on one seed is a
paired observation. For n seeds with paired differences d_1..d_n:

- mean d̄ and sample standard deviation s (n − 1 in the denominator);
- paired t interval: d̄ ± t_{1−(1−c)/2, n−1} · s / √n (Student's t, `scipy.stats.t`); it assumes the differences are
  roughly normal, which a handful of seeds cannot check, so a bootstrap interval is given beside it;
- bootstrap interval: the c-central percentile interval of the means of `resamples` samples of n differences drawn
  with replacement (NumPy generator seeded with `seed`, so the interval is reproducible). With few seeds it is too
  narrow (it cannot see beyond the observed values): read it as a check of the t interval, not a better one;
- wins: in how many seeds the variant is better (difference > 0), worse, or tied.

Everything here is NumPy / SciPy over small arrays; nothing reads files.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

#: What every comparison says about its intervals.
INTERVAL_NOTE = ("95% intervals of the mean paired difference by Student's t (scipy.stats.t, n − 1 degrees of "
                 "freedom); bootstrap: percentile interval of {resamples} resampled means (NumPy seed {seed})")


@dataclasses.dataclass(frozen=True)
class Summary:
    """Mean and spread of one metric of one variant over its finished seeds (NaN where undefined)."""

    n: int
    mean: float
    sd: float
    low: float  # the 95% t interval of the mean (NaN for n < 2)
    high: float
    minimum: float
    maximum: float

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """variant − reference on the seeds both finished.

    Attributes:
      n: number of paired seeds.
      mean, sd: of the differences (sd with n − 1; NaN for n < 2).
      t_low, t_high: the paired t interval of the mean difference (NaN for n < 2).
      boot_low, boot_high: the bootstrap percentile interval (NaN when not computed or n < 2).
      better, worse, ties: seeds where the difference is > 0, < 0, = 0.
      per_seed: {seed: difference}.
    """

    n: int
    mean: float
    sd: float
    t_low: float
    t_high: float
    boot_low: float
    boot_high: float
    better: int
    worse: int
    ties: int
    per_seed: Dict[int, float]

    def to_dict(self) -> Dict:
        return {**dataclasses.asdict(self), "per_seed": {str(k): v for k, v in self.per_seed.items()}}


def _values(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(list(values), dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"expected a flat sequence of numbers, got shape {array.shape}")
    return array


def sample_sd(values: Sequence[float]) -> float:
    """Sample standard deviation (n − 1 in the denominator); NaN for fewer than 2 values."""
    x = _values(values)
    return float(np.std(x, ddof=1)) if len(x) >= 2 else math.nan


def t_interval(values: Sequence[float], confidence: float = 0.95):
    """(low, high): the Student-t interval of the mean of `values`; (NaN, NaN) for fewer than 2 values.

    Args:
      values: n numbers (e.g. paired differences).
      confidence: coverage in (0, 1).
    """
    from scipy import stats
    x = _values(values)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must lie in (0, 1)")
    if len(x) < 2:
        return math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2.0, len(x) - 1)) * float(np.std(x, ddof=1)) / math.sqrt(len(x))
    mean = float(np.mean(x))
    return mean - half, mean + half


def bootstrap_interval(values: Sequence[float], confidence: float = 0.95, resamples: int = 10000, seed: int = 0):
    """(low, high): percentile bootstrap interval of the mean; (NaN, NaN) for fewer than 2 values or 0 resamples.

    Args:
      values: n numbers.
      confidence: coverage in (0, 1).
      resamples: number of resampled means.
      seed: seeds `numpy.random.default_rng`: the same values, resamples and seed give the same interval.
    """
    x = _values(values)
    if len(x) < 2 or resamples <= 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(int(resamples), len(x)))].mean(axis=1)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean, sd, t interval of the mean, min and max of one variant's values (NaN entries where n is too small)."""
    x = _values(values)
    if not len(x):
        return Summary(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
    low, high = t_interval(x, confidence)
    return Summary(len(x), float(np.mean(x)), sample_sd(x), low, high, float(np.min(x)), float(np.max(x)))


def paired_difference(variant: Mapping[int, float], reference: Mapping[int, float], confidence: float = 0.95,
                      resamples: int = 10000, seed: int = 0) -> Optional[PairedDifference]:
    """variant − reference over the seeds present in both (None when there is none).

    Args:
      variant, reference: {seed: value} of one metric; a seed missing on either side (failed, not yet run) is
        left out of the pairs.
      confidence, resamples, seed: of the intervals (`t_interval`, `bootstrap_interval`).
    """
    seeds = sorted(set(variant) & set(reference))
    if not seeds:
        return None
    d = np.array([float(variant[s]) - float(reference[s]) for s in seeds])
    t_low, t_high = t_interval(d, confidence)
    boot_low, boot_high = bootstrap_interval(d, confidence, resamples, seed)
    return PairedDifference(
        n=len(d), mean=float(np.mean(d)), sd=sample_sd(d), t_low=t_low, t_high=t_high, boot_low=boot_low,
        boot_high=boot_high, better=int(np.sum(d > 0)), worse=int(np.sum(d < 0)), ties=int(np.sum(d == 0)),
        per_seed={s: float(v) for s, v in zip(seeds, d)})
