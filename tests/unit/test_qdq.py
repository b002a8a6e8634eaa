"""QDQ export: standard ops only, same integers and scales, equal to the threads=1 simulation.

The simulation side runs with the NumPy reference (no library); the QDQ side
with stock ONNX Runtime (graph optimisations off, so Q/DQ run as written).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import transform_models as tm
from onnx import helper, numpy_helper

from nbsmt_onnx.calibration.data import model_inputs, open_calibration_data
from nbsmt_onnx.calibration.ranges import collect_ranges
from nbsmt_onnx.config import TransformConfig
from nbsmt_onnx.errors import UnsupportedModelError
from nbsmt_onnx.graph.qdq import to_qdq
from nbsmt_onnx.graph.rewrite import ensure_node_names, plan_rewrite, rewrite_model
from nbsmt_onnx.ops.reference import reference_evaluator


def _sim(model: onnx.ModelProto, x: np.ndarray, threads: int = 1) -> onnx.ModelProto:
    ensure_node_names(model)
    plan = plan_rewrite(model)
    data = open_calibration_data(
        {"x": x}, model_inputs(model), num_samples=len(x), batch_size=8, seed=0
    )
    ranges = collect_ranges(model, plan.activation_tensors, data)
    return rewrite_model(model, plan, ranges, TransformConfig(threads=threads)).model


def _stock(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    ).run(None, feed)


@pytest.mark.parametrize(
    ("build", "shape"),
    [
        (tm.conv_relu_gemm, (16, 3, 8, 8)),
        (tm.matmul_chain, (16, 6)),
        (tm.reshaped_weight_gemm, (16, 4)),
        (tm.gemm_variants, (3, 5)),
    ],
)
def test_qdq_equals_threads1_simulation(build, shape) -> None:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    sim = _sim(build(), x)
    qdq = to_qdq(sim)
    onnx.checker.check_model(qdq, full_check=True)
    assert all(n.domain in ("", "ai.onnx") for n in qdq.graph.node)
    assert all(o.domain != "nbsmt" for o in qdq.opset_import)
    (want,) = reference_evaluator(sim).run(None, {"x": x})
    (got,) = _stock(qdq, {"x": x})
    # Same integers and scales; the QDQ model sums float32 products of dequantized operands
    # instead of exact integers, so outputs differ by float32 rounding: a few ulps of the
    # largest partial sum. 1e-5 of the output's peak covers K <= 54 terms with margin while
    # being ~100x smaller than one quantization step of these layers.
    peak = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * peak)


def test_qdq_structure_per_channel_weights_and_signed_clip() -> None:
    x = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
    sim = _sim(tm.conv_relu_gemm(), x)
    qdq = to_qdq(sim)
    ops = [n.op_type for n in qdq.graph.node]
    assert ops.count("Conv") == 2 and ops.count("MatMul") == 1 and ops.count("Add") == 1
    assert ops.count("Clip") == 1  # only the signed input x is clipped to [-127 s, 127 s]
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    weight_dqs = [
        n
        for n in qdq.graph.node
        if n.op_type == "DequantizeLinear"
        and inits.get(n.input[0], np.zeros(0)).dtype == np.int8
        and inits[n.input[0]].ndim > 0
    ]
    axes = sorted(
        helper.get_attribute_value(a) for n in weight_dqs for a in n.attribute if a.name == "axis"
    )
    assert axes == [0, 0, 1]  # Conv weights per output channel (axis 0), MatMul per column (axis 1)
    zero_points = [inits[n.input[2]] for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(z.dtype.name for z in zero_points) == ["int8", "uint8", "uint8"]
    assert all(int(z) == 0 for z in zero_points)


def test_signed_saturation_matches_spec_not_int8_min() -> None:
    """An input beyond the calibrated range saturates at -127 (SPEC), not at QuantizeLinear's -128."""
    x = np.random.default_rng(2).uniform(-1, 1, (4, 6)).astype(np.float32)
    sim = _sim(tm.matmul_chain(), x)
    qdq = to_qdq(sim)
    far = np.full((1, 6), -50.0, dtype=np.float32)
    (want,) = reference_evaluator(sim).run(None, {"x": far})
    (got,) = _stock(qdq, {"x": far})
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.max(np.abs(want))))


def test_opset_below_13_is_refused() -> None:
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    sim = _sim(tm.matmul_chain(), x)
    for o in sim.opset_import:
        if o.domain == "":
            o.version = 11
    with pytest.raises(UnsupportedModelError, match="QDQ export needs opset >= 13"):
        to_qdq(sim)
