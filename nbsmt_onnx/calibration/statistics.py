"""Streaming, mergeable per-channel statistics (docs/spec.md §4).

The pre-BatchNorm activations of a calibration pass are never kept: each batch
is reduced *inside the graph* (``nbsmt_onnx.graph.probe``) to three numbers per
channel -- the element count ``n``, the batch mean ``m`` and the sum of squared
deviations from that mean ``M2`` -- and the host merges those into a running
:class:`ChannelStatistics` in float64.

Why (count, mean, M2) and not (count, sum, sum of squares): the variance from
raw power sums, ``(S2 - S1**2 / n) / n``, cancels catastrophically when the
mean is large against the spread (e.g. a channel with mean 1e4 and std 1 loses
8 of float64's 16 digits). Combining centred moments with the parallel
formula of Chan, Golub & LeVeque (1979)::

    n   = n_a + n_b
    d   = m_b - m_a
    m   = m_a + d * n_b / n
    M2  = M2_a + M2_b + d**2 * n_a * n_b / n

is exact in real arithmetic for any split of the data, so merging shards gives
the statistics of one pass over all data, up to float64 rounding (~1e-15
relative per merge). Memory is O(channels), independent of the sample count.

The variance is the *population* (biased) variance over all N x spatial
positions of a channel: ``var = M2 / n`` (docs/spec.md §4), which is what
BatchNormalization's running variance means in eval mode.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from nbsmt_onnx.errors import InternalError


@dataclass(frozen=True)
class ChannelStatistics:
    """Per-channel count, mean and sum of squared deviations (float64, immutable).

    ``count`` is per channel so that statistics of different shapes cannot be
    merged silently; in practice every channel of a tensor has the same count.
    """

    count: np.ndarray  # float64 [C]; float so that huge counts do not overflow in products
    mean: np.ndarray  # float64 [C]
    m2: np.ndarray  # float64 [C], sum over samples of (x - mean)**2

    def __post_init__(self) -> None:
        for field in ("count", "mean", "m2"):
            value = np.asarray(getattr(self, field), dtype=np.float64)
            if value.ndim != 1:
                raise InternalError(
                    f"ChannelStatistics.{field} must be 1-D, got shape {value.shape}"
                )
            value = value.copy()
            value.setflags(write=False)
            object.__setattr__(self, field, value)
        if not (self.count.shape == self.mean.shape == self.m2.shape):
            raise InternalError(
                f"ChannelStatistics fields disagree in shape: count {self.count.shape}, "
                f"mean {self.mean.shape}, m2 {self.m2.shape}"
            )
        if np.any(self.count < 0):
            raise InternalError("ChannelStatistics.count must be >= 0")

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def empty(cls, channels: int) -> ChannelStatistics:
        """Statistics of no data: the neutral element of :meth:`merge`."""
        zeros = np.zeros(channels, dtype=np.float64)
        return cls(zeros, zeros, zeros)

    @classmethod
    def from_moments(
        cls, count: float | np.ndarray, mean: np.ndarray, m2: np.ndarray
    ) -> ChannelStatistics:
        """Statistics of one batch from its count (scalar or per channel), mean and M2."""
        mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        count_arr = np.broadcast_to(np.asarray(count, dtype=np.float64), mean.shape)
        return cls(count_arr, mean, np.asarray(m2, dtype=np.float64).reshape(-1))

    @classmethod
    def from_sums(
        cls, count: float | np.ndarray, total: np.ndarray, total_sq: np.ndarray
    ) -> ChannelStatistics:
        """Statistics of one batch from its count, sum and sum of squares.

        Accepted for producers that can only give power sums; prefer
        :meth:`from_moments` (the subtraction here loses digits when the mean
        is large against the standard deviation). A slightly negative M2 from
        that cancellation is clipped to zero.
        """
        total = np.asarray(total, dtype=np.float64).reshape(-1)
        count_arr = np.broadcast_to(np.asarray(count, dtype=np.float64), total.shape)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count_arr > 0, total / count_arr, 0.0)
        m2 = np.asarray(total_sq, dtype=np.float64).reshape(-1) - mean * total
        return cls(count_arr, mean, np.maximum(m2, 0.0))

    @classmethod
    def from_array(cls, x: np.ndarray, channel_axis: int = 1) -> ChannelStatistics:
        """Statistics of an in-memory array (host-side; used for small data and tests)."""
        x = np.moveaxis(np.asarray(x, dtype=np.float64), channel_axis, 0)
        flat = x.reshape(x.shape[0], -1)
        n = flat.shape[1]
        if n == 0:
            return cls.empty(flat.shape[0])
        mean = flat.mean(axis=1)
        m2 = ((flat - mean[:, None]) ** 2).sum(axis=1)
        return cls.from_moments(n, mean, m2)

    # -- combination ----------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    def merge(self, other: ChannelStatistics) -> ChannelStatistics:
        """Statistics of the union of both data sets (Chan et al. parallel combination)."""
        if other.channels != self.channels:
            raise InternalError(
                f"cannot merge statistics of {self.channels} and {other.channels} channels"
            )
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        delta = other.mean - self.mean
        with np.errstate(invalid="ignore", divide="ignore"):
            frac_b = np.where(n > 0, n_b / n, 0.0)
            cross = np.where(n > 0, delta * delta * n_a * frac_b, 0.0)
        mean = self.mean + delta * frac_b
        m2 = self.m2 + other.m2 + cross
        return ChannelStatistics(n, mean, m2)

    @staticmethod
    def merge_all(parts: Iterable[ChannelStatistics], channels: int) -> ChannelStatistics:
        """Merge any number of shards (e.g. from parallel or sharded calibration)."""
        total = ChannelStatistics.empty(channels)
        for part in parts:
            total = total.merge(part)
        return total

    # -- results --------------------------------------------------------------------------
    @property
    def variance(self) -> np.ndarray:
        """Population (biased) variance ``M2 / n``; NaN where a channel saw no data."""
        safe = np.where(self.count > 0, self.count, 1.0)
        return np.where(self.count > 0, self.m2 / safe, np.nan)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.variance)

    @property
    def total_count(self) -> int:
        """Elements seen per channel (all channels see the same number in practice)."""
        return int(self.count.max()) if self.channels else 0


class ChannelAccumulator:
    """Mutable running accumulator over batches; a thin wrapper over :class:`ChannelStatistics`.

    Holds O(channels) floats however many batches are added.
    """

    def __init__(self, channels: int) -> None:
        self._stats = ChannelStatistics.empty(channels)
        self.batches = 0

    def add_moments(self, count: float | np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        """Add one batch given by its (count, mean, M2); a batch with count 0 is ignored."""
        if np.all(np.asarray(count) == 0):
            return
        self._stats = self._stats.merge(ChannelStatistics.from_moments(count, mean, m2))
        self.batches += 1

    def add(self, stats: ChannelStatistics) -> None:
        self._stats = self._stats.merge(stats)
        self.batches += 1

    @property
    def result(self) -> ChannelStatistics:
        return self._stats


@dataclass(frozen=True)
class PairedShift:
    """Per-channel mean shift d = mean_i(d_i) of paired per-sample differences and its SE.

    ``d_i`` is, per sample and channel, the NB-SMT output mean minus the clean
    output mean on the same sample. Mergeable (Chan's formula, via
    :class:`ChannelStatistics`); ``se2 = var(d_i) / N`` with the sample variance.
    """

    stats: ChannelStatistics

    @classmethod
    def from_samples(cls, measured: np.ndarray, clean: np.ndarray) -> PairedShift:
        """From per-sample per-channel means ``[N, C]`` of both models on the same samples."""
        d = np.asarray(measured, dtype=np.float64) - np.asarray(clean, dtype=np.float64)
        return cls(ChannelStatistics.from_array(d, channel_axis=1))

    def merge(self, other: PairedShift) -> PairedShift:
        return PairedShift(self.stats.merge(other.stats))

    @property
    def shift(self) -> np.ndarray:
        return self.stats.mean

    @property
    def se2(self) -> np.ndarray:
        n = self.stats.count
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 1, self.stats.m2 / np.maximum(n - 1, 1) / np.maximum(n, 1), np.inf)

    def shrink_factor(self, k: float) -> np.ndarray:
        """``max(0, 1 - k**2 * SE**2 / d**2)`` per channel (1 everywhere when ``k == 0``)."""
        if k == 0:
            return np.ones_like(self.shift)
        d2 = self.shift**2
        with np.errstate(invalid="ignore", divide="ignore"):
            f = np.where(d2 > 0, 1.0 - k * k * self.se2 / np.where(d2 > 0, d2, 1.0), 0.0)
        return np.asarray(np.clip(f, 0.0, 1.0))
