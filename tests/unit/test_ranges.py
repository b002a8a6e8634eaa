"""Activation range calibration against an independent NumPy computation over all data at once."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import transform_models as tm

from nbsmt_onnx.calibration.data import model_inputs, open_calibration_data
from nbsmt_onnx.calibration.ranges import ActivationRange, Histogram, MinMax, collect_ranges
from nbsmt_onnx.config import RangeConfig
from nbsmt_onnx.errors import DataError

TENSORS = ("x", "r1", "c2", "flat")


def _all_activations(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every probed tensor for all samples in one stock-ORT run (graph optimisations off)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in TENSORS if t != "x")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    values = sess.run(None, {"x": x})
    out = dict(zip([t for t in TENSORS if t != "x"], values, strict=True))
    out["x"] = x
    return out


def _data(x: np.ndarray, model: onnx.ModelProto, bs: int = 7):  # type: ignore[no-untyped-def]
    return open_calibration_data(
        {"x": x}, model_inputs(model), num_samples=len(x), batch_size=bs, seed=0
    )


def test_max_estimator_equals_numpy_min_max() -> None:
    model = tm.conv_relu_gemm(seed=2)
    x = np.random.default_rng(0).standard_normal((50, 3, 8, 8)).astype(np.float32) * 2
    ranges = collect_ranges(model, TENSORS, _data(x, model))
    acts = _all_activations(model, x)
    for t in TENSORS:
        assert ranges[t].min == float(acts[t].min()) and ranges[t].max == float(acts[t].max()), t
    assert ranges["x"].signed and ranges["c2"].signed
    assert not ranges["r1"].signed and ranges["r1"].min == 0.0


def test_batch_size_does_not_change_ranges() -> None:
    model = tm.conv_relu_gemm(seed=2)
    x = np.random.default_rng(1).standard_normal((20, 3, 8, 8)).astype(np.float32)
    a = collect_ranges(model, TENSORS, _data(x, model, bs=1))
    b = collect_ranges(model, TENSORS, _data(x, model, bs=20))
    assert a == b


def test_percentile_estimator_within_one_bin_of_numpy() -> None:
    model = tm.conv_relu_gemm(seed=2)
    x = np.random.default_rng(3).standard_normal((40, 3, 8, 8)).astype(np.float32)
    cfg = RangeConfig(estimator="percentile", percentile=99.0, bins=2048)
    ranges = collect_ranges(model, TENSORS, _data(x, model), cfg)
    exact = collect_ranges(model, TENSORS, _data(x, model))
    acts = _all_activations(model, x)
    for t in TENSORS:
        width = (exact[t].max - exact[t].min) / cfg.bins
        # "inverted_cdf": the smallest value with at least p% of the data at or below it
        hi = np.percentile(acts[t], 99.0, method="inverted_cdf")
        # rounded outwards to a bin edge: never below the true percentile, at most one bin above
        assert hi - 1e-6 <= ranges[t].max <= hi + width + 1e-6, t
        assert ranges[t].max < exact[t].max, t
        assert ranges[t].signed == exact[t].signed, t
        if exact[t].signed:
            lo = np.percentile(acts[t], 1.0, method="inverted_cdf")
            assert lo - width - 1e-6 <= ranges[t].min <= lo + 1e-6, t
        else:
            assert ranges[t].min >= 0.0


def test_scale_rules() -> None:
    assert ActivationRange.from_min_max(0.0, 5.1).scale() == np.float32(5.1) / np.float32(255)
    r = ActivationRange.from_min_max(-3.0, 1.0)
    assert r.signed and r.scale() == np.float32(3.0) / np.float32(127)
    assert ActivationRange.from_min_max(0.0, 0.0).scale() == np.float32(1.0)  # all-zero tensor
    assert ActivationRange.from_min_max(-0.5, 2.0).scale() == np.float32(2.0) / np.float32(127)


def test_minmax_rejects_nan_and_inf_and_merges() -> None:
    a, b = MinMax(["t"]), MinMax(["t"])
    a.update("t", -1.0, 2.0)
    b.update("t", -3.0, 1.0)
    a.merge(b)
    assert a.ranges()["t"] == ActivationRange(-3.0, 2.0, True)
    with pytest.raises(DataError, match="contains NaN"):
        a.update("t", float("nan"), 1.0)
    with pytest.raises(DataError, match="contains Inf"):
        a.update("t", 0.0, float("inf"))
    with pytest.raises(DataError, match="was empty"):
        MinMax(["u"]).ranges()


def test_histogram_percentiles() -> None:
    h = Histogram(0.0, 100.0, 100)
    h.add(np.arange(100, dtype=np.float32) + 0.5)  # one value per bin
    assert h.percentile_range(99.0) == (1.0, 99.0)
    assert h.percentile_range(100.0) == (0.0, 100.0)
