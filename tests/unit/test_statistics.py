"""Streaming per-channel statistics against an independent NumPy computation over all data."""

from __future__ import annotations

import numpy as np
import pytest

from nbsmt_onnx.calibration.statistics import ChannelAccumulator, ChannelStatistics
from nbsmt_onnx.errors import InternalError

# Relative tolerance of the streaming result against NumPy over all data at once:
# both are float64; the merge formula is exact in real arithmetic, and each of the
# ~20 merges below adds O(1e-16) relative error, so 1e-9 (the bound) is
# a generous margin that still catches any formula mistake (those are O(1)).
RTOL = 1e-9


def _batches(rng: np.random.Generator, channels: int = 5) -> list[np.ndarray]:
    """Batches of varying N and spatial size, per-channel offsets far from 0."""
    out = []
    offsets = np.array([0.0, 1e4, -3.0, 250.0, 1e-3])[:channels]
    scales = np.array([1.0, 0.5, 10.0, 1e-2, 3.0])[:channels]
    for n, hw in [(1, 3), (7, 5), (3, 1), (16, 4), (2, 9)]:
        x = rng.normal(size=(n, channels, hw, hw)) * scales[None, :, None, None]
        out.append(x + offsets[None, :, None, None])
    return out


def _numpy_all_at_once(batches: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    flat = np.concatenate([np.moveaxis(b, 1, 0).reshape(b.shape[1], -1) for b in batches], axis=1)
    return flat.mean(axis=1), flat.var(axis=1), flat.shape[1]  # np.var: population (ddof=0)


def test_streaming_equals_numpy_over_all_data() -> None:
    rng = np.random.default_rng(1)
    batches = _batches(rng)
    acc = ChannelAccumulator(5)
    for b in batches:
        s = ChannelStatistics.from_array(b)
        acc.add_moments(s.count, s.mean, s.m2)
    mean, var, n = _numpy_all_at_once(batches)
    np.testing.assert_allclose(acc.result.mean, mean, rtol=RTOL, atol=0)
    np.testing.assert_allclose(acc.result.variance, var, rtol=RTOL, atol=0)
    assert acc.result.total_count == n
    assert acc.batches == len(batches)


def test_merge_of_shards_equals_one_pass_in_any_order() -> None:
    rng = np.random.default_rng(2)
    batches = _batches(rng) + _batches(rng)
    parts = [ChannelStatistics.from_array(b) for b in batches]
    one_pass = ChannelStatistics.merge_all(parts, 5)
    # shards: two "workers", each merging its own batches, then merged in reverse order
    shard_a = ChannelStatistics.merge_all(parts[::2], 5)
    shard_b = ChannelStatistics.merge_all(parts[1::2], 5)
    for merged in (shard_b.merge(shard_a), shard_a.merge(shard_b)):
        np.testing.assert_allclose(merged.mean, one_pass.mean, rtol=RTOL, atol=0)
        np.testing.assert_allclose(merged.m2, one_pass.m2, rtol=RTOL, atol=0)
        np.testing.assert_array_equal(merged.count, one_pass.count)
    mean, var, _ = _numpy_all_at_once(batches)
    np.testing.assert_allclose(one_pass.variance, var, rtol=RTOL, atol=0)
    np.testing.assert_allclose(one_pass.mean, mean, rtol=RTOL, atol=0)


def test_large_mean_small_spread_is_stable() -> None:
    """Mean 1e6, std 1e-2: sum/sum-of-squares in float64 would lose the variance entirely."""
    rng = np.random.default_rng(3)
    batches = [1e6 + 1e-2 * rng.normal(size=(8, 2, 4, 4)) for _ in range(10)]
    merged = ChannelStatistics.merge_all((ChannelStatistics.from_array(b) for b in batches), 2)
    _, var, _ = _numpy_all_at_once(batches)
    np.testing.assert_allclose(merged.variance, var, rtol=1e-6, atol=0)  # see comment below
    # 1e-6 here (not 1e-9): NumPy's own two-pass variance of values ~1e6 carries
    # ~1e-16 * 1e6 / 1e-2 = 1e-8 relative error in each deviation, i.e. ~1e-8..1e-7 in var.
    naive = ChannelStatistics.merge_all(
        (
            ChannelStatistics.from_sums(
                b.shape[0] * b.shape[2] * b.shape[3],
                b.sum(axis=(0, 2, 3)),
                (b * b).sum(axis=(0, 2, 3)),
            )
            for b in batches
        ),
        2,
    )
    # The naive route is far off: this proves the test data can tell the two apart.
    assert np.max(np.abs(naive.variance / var - 1)) > 1e-3


def test_from_sums_matches_from_moments_on_well_conditioned_data() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 3, 5, 5))
    n = 4 * 25
    a = ChannelStatistics.from_sums(n, x.sum(axis=(0, 2, 3)), (x * x).sum(axis=(0, 2, 3)))
    b = ChannelStatistics.from_array(x)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12)
    np.testing.assert_allclose(a.variance, b.variance, rtol=1e-12)


def test_channel_last_array() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 7, 3)) + np.arange(3)
    s = ChannelStatistics.from_array(x, channel_axis=-1)
    np.testing.assert_allclose(s.mean, x.reshape(-1, 3).mean(axis=0), rtol=RTOL)
    np.testing.assert_allclose(s.variance, x.reshape(-1, 3).var(axis=0), rtol=RTOL)


def test_empty_is_neutral_and_reports_nan_variance() -> None:
    rng = np.random.default_rng(6)
    s = ChannelStatistics.from_array(rng.normal(size=(2, 3, 2, 2)))
    e = ChannelStatistics.empty(3)
    for merged in (e.merge(s), s.merge(e)):
        np.testing.assert_array_equal(merged.mean, s.mean)
        np.testing.assert_array_equal(merged.m2, s.m2)
    assert np.all(np.isnan(e.variance))
    acc = ChannelAccumulator(3)
    acc.add_moments(0, np.full(3, np.nan), np.full(3, np.nan))  # an empty batch is ignored
    assert acc.batches == 0 and acc.result.total_count == 0


def test_mismatched_channels_refuse_to_merge() -> None:
    with pytest.raises(InternalError, match="3 and 4 channels"):
        ChannelStatistics.empty(3).merge(ChannelStatistics.empty(4))


def test_memory_does_not_grow_with_batches() -> None:
    acc = ChannelAccumulator(4)
    rng = np.random.default_rng(7)
    for _ in range(200):
        s = ChannelStatistics.from_array(rng.normal(size=(2, 4, 3, 3)))
        acc.add(s)
    r = acc.result
    assert r.mean.shape == r.m2.shape == r.count.shape == (4,)
    assert r.total_count == 200 * 2 * 9


def test_statistics_are_immutable() -> None:
    s = ChannelStatistics.empty(2)
    with pytest.raises(ValueError):
        s.mean[0] = 1.0
