"""The Ray backend gives exactly the local backend's results, survives a lost worker,
and runs independent passes concurrently. Runs inside a loopback-only network namespace.
"""

from __future__ import annotations

from pathlib import Path

import executor_support as es
import numpy as np
import onnx
import pytest
import transform_models as tm
from onnx import TensorProto, helper

import nbsmt_onnx as nb
from nbsmt_onnx.calibration.data import model_inputs, open_calibration_data
from nbsmt_onnx.calibration.ranges import collect_ranges
from nbsmt_onnx.config import RangeConfig
from nbsmt_onnx.runtime.executor import DataSpec, Job, LocalExecutor, RayExecutor
from nbsmt_onnx.search import SearchConfig, search

pytestmark = pytest.mark.ray


def _arrays(n: int = 61, seed: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=(n, 3, 8, 8)).astype(np.float32)}


def _npz(tmp_path: Path) -> str:
    path = tmp_path / "calib.npz"
    np.savez(path, **_arrays())
    return str(path)


def test_workers_read_the_data_themselves_and_match_local(
    ray_executor: RayExecutor, tmp_path: Path
) -> None:
    model = es.float_model()
    spec = DataSpec(_npz(tmp_path), num_samples=50, batch_size=4, seed=7)
    ray_stats, ray_range = ray_executor.map(
        [Job(model, spec, es.ChannelStats("c1")), Job(model, spec, es.MinMax("c1"))]
    )
    local_stats, local_range = LocalExecutor().map(
        [Job(model, spec, es.ChannelStats("c1")), Job(model, spec, es.MinMax("c1"))]
    )
    assert ray_range == local_range  # exactly
    assert ray_stats.total_count == 50 * 64
    assert es.same_statistics(ray_stats, local_stats)  # bit for bit: same batches, same merge order


def test_in_memory_data_is_shipped_by_the_driver(ray_executor: RayExecutor) -> None:
    model = es.identity_model()
    data = open_calibration_data(
        _arrays(), model_inputs(model), num_samples=45, batch_size=6, seed=1
    )
    trace = ray_executor.run(Job(model, data, es.Trace("y")))
    assert [(first, size) for first, size, *_ in trace] == [(6 * i, 6) for i in range(7)] + [
        (42, 3)
    ]
    assert es.same_statistics(
        ray_executor.run(Job(model, data, es.ChannelStats("y"))),
        LocalExecutor().run(Job(model, data, es.ChannelStats("y"))),
    )


def test_nbsmt_model_statistics_match_local(
    ray_executor: RayExecutor, tmp_path: Path, nbsmt_library: str
) -> None:
    float_model = es.float_model()
    path = _npz(tmp_path)
    result = nb.transform(
        float_model,
        path,
        nb.TransformConfig(
            threads=4, num_samples=32, recalibration=nb.RecalibrationConfig(enabled=False)
        ),
    )
    sim = result.sim_model
    conv = next(n for n in sim.graph.node if n.op_type == "NbSmtConv")
    sim.graph.output.append(helper.make_tensor_value_info(conv.output[0], TensorProto.FLOAT, None))
    spec = DataSpec(path, num_samples=61, batch_size=8, seed=0)
    a = ray_executor.run(Job(sim, spec, es.ChannelStats(conv.output[0])))
    b = LocalExecutor().run(Job(sim, spec, es.ChannelStats(conv.output[0])))
    assert es.same_statistics(a, b)


def test_a_lost_worker_is_retried_with_the_same_result(
    ray_executor: RayExecutor, tmp_path: Path
) -> None:
    model = es.float_model()
    spec = DataSpec(_npz(tmp_path), num_samples=61, batch_size=4, seed=3)
    marker = tmp_path / "crashed"
    crashing = es.CrashOnce("c1", marker=str(marker), at_sample=30)
    result = ray_executor.run(Job(model, spec, crashing))
    assert marker.exists(), "the worker did not die: the test would prove nothing"
    expected = LocalExecutor().run(Job(model, spec, es.ChannelStats("c1")))
    assert es.same_statistics(result, expected)


def test_independent_passes_run_concurrently(ray_executor: RayExecutor) -> None:
    model = es.identity_model()
    data = open_calibration_data(
        _arrays(16), model_inputs(model), num_samples=16, batch_size=4, seed=0
    )
    rows = ray_executor.map([Job(model, data, es.Trace("y", sleep=0.5)) for _ in range(2)])
    spans = [(pid, start, end) for row in rows for _, _, pid, start, end in row]
    assert len({pid for pid, _, _ in spans}) == 2  # both workers took part
    overlapping = any(p != q and s1 < e2 and s2 < e1 for p, s1, e1 in spans for q, s2, e2 in spans)
    assert overlapping, f"no two batches ran at the same time: {spans}"


@pytest.mark.parametrize("estimator", ["max", "percentile"])
def test_activation_ranges_on_ray_equal_local(
    ray_executor: RayExecutor, tmp_path: Path, estimator: str
) -> None:
    model = es.float_model()
    data = open_calibration_data(
        _npz(tmp_path), model_inputs(model), num_samples=61, batch_size=4, seed=9
    )
    config = RangeConfig(estimator=estimator)
    tensors = ["x", "c1", "r1"]
    on_ray = collect_ranges(model, tensors, data, config, executor=ray_executor)
    local = collect_ranges(model, tensors, data, config)
    assert on_ray == local  # exactly: min/max and histogram counts are exact


def test_search_on_ray_equals_local(
    ray_executor: RayExecutor, tmp_path: Path, nbsmt_library: str
) -> None:
    """Candidate evaluations spread over the workers give the same search, to the bit."""
    model = tmp_path / "m.onnx"
    onnx.save(tm.conv_relu_gemm(0), model)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((32, 3, 8, 8)).astype(np.float32))
    np.savez(tmp_path / "e.npz", x=rng.standard_normal((120, 3, 8, 8)).astype(np.float32))
    config = SearchConfig(max_drop=2.0, transform=nb.TransformConfig(num_samples=32))
    args = (model, tmp_path / "c.npz", tmp_path / "e.npz", config)
    on_ray = search(*args, executor=ray_executor).plan()
    local = search(*args).plan()
    on_ray.pop("wall_time_s"), local.pop("wall_time_s")
    assert on_ray == local


def test_transform_and_evaluate_on_ray_equal_local(
    ray_executor: RayExecutor, tmp_path: Path, nbsmt_library: str
) -> None:
    """transform's range and statistics passes on two workers: the same model and report numbers."""
    from nbsmt_onnx.api import evaluate

    model = tm.conv_relu_gemm(0)
    rng = np.random.default_rng(3)
    calib = {"x": rng.standard_normal((40, 3, 8, 8)).astype(np.float32)}
    held_out = {"x": rng.standard_normal((48, 3, 8, 8)).astype(np.float32)}
    config = nb.TransformConfig(num_samples=40, batch_size=8, threads=4)
    on_ray = nb.transform(model, calib, config, executor=ray_executor)
    local = nb.transform(model, calib, config)
    assert on_ray.sim_model.graph.initializer == local.sim_model.graph.initializer
    assert on_ray.ranges == local.ranges
    layers = [(entry["node"], entry.get("nbsmt")) for entry in local.report["layers"]]
    assert [(entry["node"], entry.get("nbsmt")) for entry in on_ray.report["layers"]] == layers
    assert any(stats for _, stats in layers), "the statistics pass measured nothing"

    eval_config = nb.EvaluateConfig(transform=config, threads=(2, 4))
    rows_ray = evaluate(model, held_out, calib, eval_config, executor=ray_executor).to_dict()
    rows_local = evaluate(model, held_out, calib, eval_config).to_dict()
    assert [r["metrics"] for r in rows_ray["rows"]] == [r["metrics"] for r in rows_local["rows"]]


def _initializers(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: t.SerializeToString() for t in model.graph.initializer}


@pytest.mark.parametrize("strategy", ["relative", "sequential", "train-mode"])
def test_recalibration_on_ray_equals_local(
    ray_executor: RayExecutor, nbsmt_library: str, strategy: str
) -> None:
    """Streamed recalibration passes (several batches, per-sample means for shrinkage) on two
    workers give the very same BN statistics, layer corrections and folded scales/biases."""
    from nbsmt_onnx.calibration.recalibrate import recalibrate

    model = tm.conv_bn_relu(1)
    calib = {
        "x": np.abs(np.random.default_rng(5).standard_normal((44, 2, 6, 6))).astype(np.float32)
    }
    off = nb.TransformConfig(
        num_samples=44, threads=4, recalibration=nb.RecalibrationConfig(enabled=False)
    )
    sim = nb.transform(model, calib, off).sim_model
    data = open_calibration_data(calib, model_inputs(model), num_samples=44, batch_size=8, seed=2)
    config = nb.RecalibrationConfig(strategy=strategy, shrink=2.0, fold=True)
    args = {"float_model": model, "sim_model": sim, "data": data, "config": config}
    on_ray = recalibrate(**args, auto_batch=False, executor=ray_executor)
    local = recalibrate(**args, auto_batch=False)
    assert on_ray.batchnorm is not None and on_ray.batchnorm.passes >= 1
    assert on_ray.correction is not None and on_ray.correction.corrections
    assert _initializers(on_ray.model) == _initializers(local.model)  # bit for bit
    assert on_ray.report == local.report


def test_transform_with_recalibration_on_ray_equals_local(
    ray_executor: RayExecutor, nbsmt_library: str
) -> None:
    """The whole transform (ranges, recalibration, guard, statistics) on two workers: the same
    folded scales and biases and the same guard decision."""
    model = tm.conv_bn_relu(2)
    calib = {
        "x": np.abs(np.random.default_rng(6).standard_normal((48, 2, 6, 6))).astype(np.float32)
    }
    config = nb.TransformConfig(num_samples=48, batch_size=8, threads=4)
    on_ray = nb.transform(model, calib, config, executor=ray_executor)
    local = nb.transform(model, calib, config)
    assert _initializers(on_ray.sim_model) == _initializers(local.sim_model)
    assert on_ray.report["recalibration"] == local.report["recalibration"]


@pytest.mark.parametrize("layer_samples", [0, 20])
def test_scoring_pass_on_ray_equals_local(
    ray_executor: RayExecutor, nbsmt_library: str, layer_samples: int
) -> None:
    """evaluate's lockstep scoring pass (every row on each batch; the first batches also fetch
    per-layer tensors) on two workers: every number of every row is the local one."""
    from nbsmt_onnx.api import evaluate

    model = tm.conv_bn_relu(4)
    rng = np.random.default_rng(8)
    calib = {"x": np.abs(rng.standard_normal((32, 2, 6, 6))).astype(np.float32)}
    held_out = {"x": np.abs(rng.standard_normal((70, 2, 6, 6))).astype(np.float32)}
    config = nb.EvaluateConfig(
        transform=nb.TransformConfig(num_samples=32, threads=4),
        threads=(2, 4),
        layer_samples=layer_samples,
        eval_batch_size=8,
    )

    def rows(result: object) -> list[dict[str, object]]:
        timing = ("prepare_s", "inference_s", "wall_s")
        return [
            {k: v for k, v in row.items() if k not in timing}
            for row in result.to_dict()["rows"]  # type: ignore[attr-defined]
        ]

    on_ray = rows(evaluate(model, held_out, calib, config, executor=ray_executor))
    local = rows(evaluate(model, held_out, calib, config))
    assert on_ray == local
    assert all(row["samples"] == 70 for row in local if row["available"])
