"""The local executor: every batch reduced once, partials merged left to right in batch order.

No op library needed (float models only). The Ray backend's equality with
this one is tested in tests/ray/ (inside a network namespace).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import executor_support as es
import numpy as np
import onnxruntime as ort
import pytest

from nbsmt_onnx.calibration.data import Feed, model_inputs, open_calibration_data
from nbsmt_onnx.calibration.statistics import ChannelStatistics
from nbsmt_onnx.errors import ConfigError, DataError
from nbsmt_onnx.runtime.executor import (
    DataSpec,
    Job,
    LocalExecutor,
    ModelRun,
    create_executor,
    fold,
    plan_shards,
)


def _arrays(n: int = 37, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=(n, 3, 8, 8)).astype(np.float32)}


@pytest.mark.parametrize(("batches", "workers"), [(1, 1), (1, 4), (7, 2), (10, 3), (100, 2)])
def test_shards_cover_every_batch_once_in_order(batches: int, workers: int) -> None:
    shards = plan_shards(batches, workers)
    assert shards[0][0] == 0 and shards[-1][1] == batches
    assert all(a < b for a, b in shards)
    assert all(s[1] == t[0] for s, t in itertools.pairwise(shards))  # contiguous, no gap/overlap
    assert len(shards) <= max(1, workers * 4)


def test_no_batches_is_a_data_error() -> None:
    assert plan_shards(0, 2) == []
    with pytest.raises(DataError):
        fold(es.MinMax("y"), [])


def test_batch_ranges_concatenate_to_the_whole_pass() -> None:
    model = es.identity_model()
    data = open_calibration_data(
        _arrays(), model_inputs(model), num_samples=30, batch_size=4, seed=3
    )
    whole = np.concatenate([b["x"] for b in data.batches()])
    assert whole.shape[0] == 30
    parts = [b["x"] for a, z in plan_shards(data.num_batches or 0, 3) for b in data.batches(a, z)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    # a range past the end is empty, a partial last batch is kept
    assert data.num_batches == 8
    assert [b["x"].shape[0] for b in data.batches(6, 20)] == [4, 2]
    assert list(data.batches(8, 20)) == []


def test_local_statistics_equal_numpy_over_all_data() -> None:
    model = es.float_model()
    arrays = _arrays()
    data = open_calibration_data(arrays, model_inputs(model), num_samples=37, batch_size=5, seed=0)
    stats = LocalExecutor().run(Job(model, data, es.ChannelStats("c1")))
    # Independent: stock ORT on the same batches (a conv's float32 result may depend on
    # the batch size), outputs concatenated, moments in NumPy over all of them at once.
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as the executor
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    c1 = np.concatenate([sess.run(["c1"], b)[0] for b in data.batches()])
    ref = ChannelStatistics.from_array(c1, channel_axis=1)
    assert stats.total_count == ref.total_count == 37 * 64
    # float64 moments merged over 8 batches vs one pass: summation order only
    np.testing.assert_allclose(stats.mean, ref.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.variance, ref.variance, rtol=1e-12)


def test_first_sample_positions_follow_the_batches() -> None:
    model = es.identity_model()
    data = open_calibration_data(
        _arrays(), model_inputs(model), num_samples=23, batch_size=5, seed=0
    )
    trace = LocalExecutor().run(Job(model, data, es.Trace("y")))
    assert [(first, size) for first, size, *_ in trace] == [
        (0, 5),
        (5, 5),
        (10, 5),
        (15, 5),
        (20, 3),
    ]


def test_data_spec_reopens_the_same_seeded_draw(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "calib.npz"
    np.savez(path, **_arrays())
    model = es.identity_model()
    spec = DataSpec(str(path), num_samples=20, batch_size=6, seed=5)
    direct = open_calibration_data(
        str(path), model_inputs(model), num_samples=20, batch_size=6, seed=5
    )
    a = LocalExecutor().run(Job(model, spec, es.ChannelStats("y")))
    b = LocalExecutor().run(Job(model, direct, es.ChannelStats("y")))
    assert es.same_statistics(a, b)


def test_map_returns_results_in_job_order() -> None:
    model = es.float_model()
    data = open_calibration_data(
        _arrays(), model_inputs(model), num_samples=16, batch_size=4, seed=0
    )
    lo_hi, stats = LocalExecutor().map(
        [Job(model, data, es.MinMax("c1")), Job(model, data, es.ChannelStats("c1"))]
    )
    assert isinstance(lo_hi, tuple) and isinstance(stats, ChannelStatistics)
    assert lo_hi[0] <= float(stats.mean.min()) <= float(stats.mean.max()) <= lo_hi[1]


def test_unknown_executor_is_a_config_error() -> None:
    assert isinstance(create_executor("local"), LocalExecutor)
    with pytest.raises(ConfigError, match="'local' or 'ray'"):
        create_executor("spark")


def test_partials_merged_as_they_arrive_equal_the_fold_in_batch_order() -> None:
    """Runs of batches may arrive in any order; the merges still happen left to right."""
    from nbsmt_onnx.runtime.executor import _Folder

    model = es.float_model()
    data = open_calibration_data(
        _arrays(), model_inputs(model), num_samples=37, batch_size=4, seed=2
    )
    reducer = es.ChannelStats("c1")
    trace = LocalExecutor().run(Job(model, data, es.Trace("c1")))
    parts = LocalExecutor().map(
        [Job(model, data, reducer, start=a, max_batches=a + 1) for a in range(len(trace))]
    )
    runs = [parts[0:3], parts[3:4], parts[4:8], parts[8:]]
    folder = _Folder(reducer)
    for index in (2, 0, 3, 1):
        folder.add(index, runs[index])
    assert es.same_statistics(folder.result(), fold(reducer, parts))
    assert es.same_statistics(folder.result(), LocalExecutor().run(Job(model, data, reducer)))


def test_start_and_stop_select_a_run_of_batches() -> None:
    model = es.identity_model()
    data = open_calibration_data(
        _arrays(), model_inputs(model), num_samples=23, batch_size=5, seed=0
    )
    trace = LocalExecutor().run(Job(model, data, es.Trace("y"), start=2, max_batches=4))
    assert [(first, size) for first, size, *_ in trace] == [(10, 5), (15, 5)]


@dataclass(frozen=True)
class _Pair:
    """A lockstep reducer: both models' outputs of every batch, and that their runs were timed."""

    @property
    def outputs(self) -> tuple[tuple[str, ...], ...]:
        return (("y",), ("c1",))

    def reduce(self, outputs: Sequence[ModelRun], batch: Feed, first_sample: int) -> list:  # type: ignore[type-arg]
        assert all(run.seconds >= 0 for run in outputs)
        (y,), (c1,) = (run.values for run in outputs)
        np.testing.assert_array_equal(y, batch["x"])  # the same batch went through both
        return [(first_sample, y.shape[0], c1.shape)]

    def merge(self, left: list, right: list) -> list:  # type: ignore[type-arg]
        return left + right


def test_lockstep_job_runs_every_model_on_the_same_batch() -> None:
    data = open_calibration_data(
        _arrays(), model_inputs(es.identity_model()), num_samples=13, batch_size=5, seed=4
    )
    job = Job(es.identity_model(), data, _Pair(), lockstep=(es.float_model(),))
    got = LocalExecutor().run(job)
    assert [(first, n) for first, n, _ in got] == [(0, 5), (5, 5), (10, 3)]


def test_feed_streams_count_positions_from_their_feeds() -> None:
    """Feeds of uneven sizes given as a callable: positions come from the feeds themselves."""
    from nbsmt_onnx.runtime.executor import FeedStream

    x = _arrays(12)["x"]
    stream = FeedStream(lambda: [{"x": x[:5]}, {"x": x[5:7]}, {"x": x[7:]}])
    model = es.identity_model()
    trace = LocalExecutor().run(Job(model, stream, es.Trace("y"), start=1))
    assert [(first, size) for first, size, *_ in trace] == [(5, 2), (7, 5)]
    with pytest.raises(DataError, match="fresh iterator"):
        LocalExecutor().run(Job(model, FeedStream(lambda: iter([])), es.Trace("y")))
