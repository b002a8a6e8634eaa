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
    qdq = to_qdq(sim, "u8s8")
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


def test_qdq_default_u8u8_structure_shifts_weights_and_signed_activations() -> None:
    x = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
    sim = _sim(tm.conv_relu_gemm(), x)
    qdq = to_qdq(sim)
    sim_inits = {t.name: numpy_helper.to_array(t) for t in sim.graph.initializer}
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    # Activations: every zero point uint8; 128 for the signed input x, 0 after the ReLUs.
    zps = sorted(int(inits[n.input[2]]) for n in qdq.graph.node if n.op_type == "QuantizeLinear")
    assert zps == [0, 0, 128]
    assert {
        inits[n.input[2]].dtype.name for n in qdq.graph.node if n.op_type == "QuantizeLinear"
    } == {"uint8"}
    # Weights: the simulation's int8 integers + 128 as uint8, with a zero point of 128 per channel.
    for node in sim.graph.node:
        if node.domain != "nbsmt":
            continue
        wq = sim_inits[node.input[1]]
        dq = next(
            n
            for n in qdq.graph.node
            if n.op_type == "DequantizeLinear" and n.input[1] == node.input[3]
        )
        np.testing.assert_array_equal(inits[dq.input[0]].astype(np.int16) - 128, wq)
        assert inits[dq.input[0]].dtype == np.uint8
        assert np.all(inits[dq.input[2]] == 128) and inits[dq.input[2]].shape == (
            wq.shape[0] if node.op_type == "NbSmtConv" else wq.shape[1],
        )


def test_signed_saturation_matches_spec_not_int8_min() -> None:
    """An input beyond the calibrated range saturates at -127 (spec §2), not at QuantizeLinear's -128."""
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


# --------------------------------------------------------------------------- ORT's default optimisations
#
# Deployments run the QDQ model with ONNX Runtime's default graph optimisations, under
# which ORT fuses DQ -> MatMul/Conv (-> Q) into integer kernels (QGemm, QLinearConv,
# MatMulIntegerToFloat). The models below are built so those kernels are used and so the
# uint8 x int8 kernels of CPUs without VNNI would saturate (activations near 255 next to
# weights near 127 of the same sign: 2 * 255 * 127 > 32767). The fused kernels also
# requantize a layer's output themselves (acc * (s_x s_w / s_y), rounded), which can
# differ from the simulation's round((s_x s_w acc) / s_y) by one step, but only where the
# value lies within float32 rounding of a .5 boundary. The bound below is exactly that:
# one step of every hidden element closer than DELTA_STEPS to a boundary, carried
# through the next layer's |weights|, plus the float32 term of the tests above.

DELTA_STEPS = 1e-3  # float32 error of y / s_y is ~4 ulp * 255 ~ 6e-5 steps; 15x margin


def _optimised_op_types(model: onnx.ModelProto) -> set[str]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}


def _ort_defaults(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    """Stock ONNX Runtime with its default session options (ORT_ENABLE_ALL)."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feed)[0], dtype=np.float64)


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def _boundary_candidates(hidden: np.ndarray, scale: float) -> np.ndarray:
    """1 where hidden / scale is within DELTA_STEPS of a rounding boundary (a possible flip)."""
    steps = hidden.astype(np.float64) / scale
    frac = steps - np.floor(steps)
    return ((np.abs(frac - 0.5) < DELTA_STEPS) & (steps > -0.5)).astype(np.float64)


def _mlp_no_bias(seed: int = 0) -> onnx.ModelProto:
    r = np.random.default_rng(seed)
    sign = lambda shape: np.where(r.random(shape) < 0.5, -1.0, 1.0)  # noqa: E731
    w0 = (sign((64, 48)) * r.uniform(0.6, 1.0, (64, 48))).astype(np.float32)
    w1 = (sign((48, 10)) * r.uniform(0.6, 1.0, (48, 10))).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"], name="fc0"),
        helper.make_node("Relu", ["h0"], ["a0"], name="relu0"),
        helper.make_node("MatMul", ["a0", "w1"], ["y"], name="fc1"),
    ]
    return tm.make_model(
        nodes, [tm.value("x", ["N", 64])], [tm.value("y", ["N", 10])], {"w0": w0, "w1": w1}
    )


def _conv_no_bias(seed: int = 0) -> onnx.ModelProto:
    r = np.random.default_rng(seed)
    w1 = (r.choice([-1.0, 1.0], (16, 3, 3, 3)) * r.uniform(0.6, 1.0, (16, 3, 3, 3))).astype(
        np.float32
    )
    w2 = (r.choice([-1.0, 1.0], (8, 16, 3, 3)) * r.uniform(0.6, 1.0, (8, 16, 3, 3))).astype(
        np.float32
    )
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    return tm.make_model(
        nodes,
        [tm.value("x", ["N", 3, 8, 8])],
        [tm.value("y", ["N", 8, 8, 8])],
        {"w1": w1, "w2": w2},
    )


def _float_conv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    model = tm.make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        [tm.value("x", list(x.shape), onnx.TensorProto.DOUBLE)],
        [tm.value("y", [x.shape[0], w.shape[0], x.shape[2], x.shape[3]], onnx.TensorProto.DOUBLE)],
        {"w": w.astype(np.float64)},
    )
    (out,) = onnx.reference.ReferenceEvaluator(model).run(None, {"x": x.astype(np.float64)})
    return np.asarray(out)


@pytest.mark.parametrize("case", ["mlp", "conv"])
def test_qdq_equals_threads1_simulation_with_ort_default_optimisations(case: str) -> None:
    r = np.random.default_rng(3)
    if case == "mlp":  # unsigned input (pixels in [0, 1]): uint8 activations from the start
        model, x = _mlp_no_bias(), r.uniform(0, 1, (64, 64)).astype(np.float32)
        first, second, hidden = "fc0", "fc1", "a0"
    else:  # signed input: the uint8 activations with zero point 128 are exercised too
        model, x = _conv_no_bias(), r.standard_normal((16, 3, 8, 8)).astype(np.float32)
        first, second, hidden = "conv1", "conv2", "r1"
    sim = _sim(model, x)
    qdq = to_qdq(sim)  # the default representation
    fused = _optimised_op_types(qdq)
    # The premise: ORT's defaults run integer kernels for this model (if a future ORT stops
    # fusing, this test no longer tests the deployment path and must be revisited).
    assert fused & {"QGemm", "QLinearConv", "MatMulIntegerToFloat", "QLinearMatMul"}, fused
    want_out, hidden_value = reference_evaluator(sim).run(["y", hidden], {"x": x})
    want = np.asarray(want_out, dtype=np.float64)
    got = _ort_defaults(qdq, {"x": x})

    h_scale = float(_init(sim, _node(sim, second).input[2]))
    w2 = _init(sim, _node(sim, second).input[1]).astype(np.float64)
    w2_scale = _init(sim, _node(sim, second).input[3]).astype(np.float64)
    cand = _boundary_candidates(np.asarray(hidden_value), h_scale)
    if case == "mlp":
        flips = h_scale * (cand @ np.abs(w2)) * w2_scale  # [N, 10]
    else:
        flips = h_scale * _float_conv(cand, np.abs(w2)) * w2_scale[None, :, None, None]
    peak = float(np.max(np.abs(want)))
    bound = flips + 1e-5 * peak  # see test_qdq_equals_threads1_simulation for the 1e-5
    excess = np.abs(got - want) - bound
    assert np.all(excess <= 0), (
        f"{first}->{second}: QDQ under ORT defaults exceeds the rounding bound by up to "
        f"{float(excess.max()):.4g} (peak {peak:.4g}); fused ops {sorted(fused)}"
    )
    # The bound is tight enough to mean something: well below one step of every output.
    assert float(np.mean(cand)) < 0.01


@pytest.mark.parametrize("representation", ["u8s8", "s8s8", "u8u8"])
def test_every_representation_keeps_the_integers_with_optimisations_off(
    representation: str,
) -> None:
    x = np.random.default_rng(4).uniform(0, 1, (16, 64)).astype(np.float32)
    sim = _sim(_mlp_no_bias(), x)
    qdq = to_qdq(sim, representation)
    onnx.checker.check_model(qdq, full_check=True)
    (want,) = reference_evaluator(sim).run(None, {"x": x})
    (got,) = _stock(qdq, {"x": x})
    peak = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * peak)  # as above
    if representation == "u8u8":  # no int8 weight left behind, every weight stored as uint8
        kinds = {numpy_helper.to_array(t).dtype.name for t in qdq.graph.initializer}
        assert "int8" not in kinds and "uint8" in kinds


def test_unknown_representation_is_refused() -> None:
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    with pytest.raises(UnsupportedModelError, match="u8u8"):
        to_qdq(_sim(tm.matmul_chain(), x), "u4u4")
