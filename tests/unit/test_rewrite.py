"""The rewrite pass: what is rewritten, what not and why, and that the result computes docs/spec.md §2-§3.

The NB-SMT graphs are run with the NumPy reference (onnx.reference), so no
library is needed. Expected outputs are built independently from docs/spec.md §2
(quantization formulas written out here) and the reference's plain integer
kernels (``int8_conv`` / ``int8_matmul``) at threads=1, where NB-SMT is exact
int8 arithmetic.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import transform_models as tm
from onnx import helper, numpy_helper

from nbsmt_onnx.calibration.ranges import ActivationRange
from nbsmt_onnx.config import Selection, TransformConfig
from nbsmt_onnx.errors import InternalError
from nbsmt_onnx.graph.rewrite import ensure_node_names, plan_rewrite, rewrite_model
from nbsmt_onnx.ops import reference
from nbsmt_onnx.ops.onnx_schema import register_schemas


def _prepare(model: onnx.ModelProto, selection: Selection | None = None):  # type: ignore[no-untyped-def]
    ensure_node_names(model)
    return plan_rewrite(model, selection)


def _ranges(plan, values: dict[str, tuple[float, float]]):  # type: ignore[no-untyped-def]
    return {t: ActivationRange.from_min_max(*values[t]) for t in plan.activation_tensors}


def _spec_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """docs/spec.md §2 weight quantization, written out independently of the code under test."""
    w = w.astype(np.float32)
    moved = np.moveaxis(w, axis, 0)
    amax = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
    s = (amax / np.float32(127)).astype(np.float32)
    s[s == 0] = 1
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / s.reshape(shape)), -127, 127).astype(np.int8)
    return q, s


def _spec_act(x: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.float32]:
    if lo >= 0:
        s = np.float32(hi) / np.float32(255)
        return np.clip(np.rint(x / s), 0, 255).astype(np.int64), s
    s = np.float32(max(abs(lo), abs(hi))) / np.float32(127)
    return np.clip(np.rint(x / s), -127, 127).astype(np.int64), s


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return reference.reference_evaluator(model).run(None, feed)


def test_conv_relu_gemm_plan_and_structure() -> None:
    model = tm.conv_relu_gemm()
    plan = _prepare(model)
    assert [c.node_name for c in plan.candidates] == ["conv1", "conv2", "fc"]
    assert plan.skipped == ()
    assert plan.activation_tensors == ("x", "r1", "flat")
    ranges = _ranges(plan, {"x": (-3.0, 3.0), "r1": (0.0, 8.0), "flat": (0.0, 2.0)})
    result = rewrite_model(model, plan, ranges, TransformConfig(threads=4, mapping="interleave"))
    ops = [(n.op_type, n.domain) for n in result.model.graph.node]
    assert ops[0] == ("NbSmtConv", "nbsmt") and ops[-1] == ("NbSmtMatMul", "nbsmt")
    conv2 = result.model.graph.node[2]
    attrs = {a.name: helper.get_attribute_value(a) for a in conv2.attribute}
    # ONNX Conv attributes copied unchanged; NB-SMT attributes from the config and the range.
    assert (
        attrs["group"] == 2 and list(attrs["strides"]) == [2, 2] and list(attrs["pads"]) == [1] * 4
    )
    assert attrs["threads"] == 4 and attrs["mapping"] == b"interleave" and attrs["act_signed"] == 0
    conv1_attrs = {
        a.name: helper.get_attribute_value(a) for a in result.model.graph.node[0].attribute
    }
    assert conv1_attrs["act_signed"] == 1  # the input x is signed
    assert any(o.domain == "nbsmt" and o.version == 1 for o in result.model.opset_import)
    register_schemas()
    onnx.checker.check_model(result.model, full_check=True)
    # The input model is untouched.
    assert model.graph.node[0].op_type == "Conv"


def test_conv_output_equals_spec_int8_at_threads1() -> None:
    """Conv+bias -> NbSmtConv at T=1 equals s_x * s_w * int8_conv(Xq, Wq) + B exactly."""
    model = tm.conv_relu_gemm(seed=3)
    plan = _prepare(model, Selection(include_names=("conv1",)))
    lo, hi = -2.5, 2.0
    result = rewrite_model(model, plan, _ranges(plan, {"x": (lo, hi)}), TransformConfig(threads=1))
    x = (
        np.random.default_rng(0).uniform(-3, 3, (2, 3, 8, 8)).astype(np.float32)
    )  # beyond the range: clipped
    got = reference.reference_evaluator(result.model).run(["c1"], {"x": x})[0]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    wq, sw = _spec_weight(inits["w1"], 0)
    xq, sx = _spec_act(x, lo, hi)
    acc = reference.int8_conv(xq, wq, pads=[1, 1, 1, 1])
    expected = (np.float32(sx) * sw).astype(np.float32)[None, :, None, None] * acc.astype(
        np.float32
    )
    expected = expected + inits["b1"][None, :, None, None]
    np.testing.assert_array_equal(got, expected.astype(np.float32))


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_whole_model_matches_per_node_reference(threads: int) -> None:
    """Every rewritten node gets exactly the spec's parameters (checked by re-running nbsmt_* by hand)."""
    model = tm.matmul_chain(seed=1)
    plan = _prepare(model)
    ranges = _ranges(plan, {"x": (-2.0, 2.0), "r1": (0.0, 3.0)})
    result = rewrite_model(model, plan, ranges, TransformConfig(threads=threads))
    x = np.random.default_rng(2).standard_normal((5, 6)).astype(np.float32)
    (got,) = _run(result.model, {"x": x})
    w1 = numpy_helper.to_array(model.graph.initializer[0])
    w2 = numpy_helper.to_array(model.graph.node[2].attribute[0].t)
    q1, s1 = _spec_weight(w1, 1)
    q2, s2 = _spec_weight(w2, 1)
    sx1 = np.float32(2.0) / np.float32(127)
    sx2 = np.float32(3.0) / np.float32(255)
    h, _ = reference.nbsmt_matmul(x, q1, sx1, s1, threads=threads, act_signed=1)
    y, _ = reference.nbsmt_matmul(np.maximum(h, 0), q2, sx2, s2, threads=threads, act_signed=0)
    np.testing.assert_array_equal(got, y)
    origins = [r.weight_origin for r in result.rewritten]
    assert origins == ["initializer", "Constant"]
    # the Constant node that held w2 is gone (dead after the rewrite)
    assert "Constant" not in [n.op_type for n in result.model.graph.node]
    assert result.removed_nodes == 1


def test_gemm_alpha_beta_transb_and_folded_weight_chain() -> None:
    """Gemm(alpha, beta, transB) with W = Transpose(Reshape(init)) and C from a Constant node."""
    model = tm.reshaped_weight_gemm()
    plan = _prepare(model)
    assert plan.candidates[0].weight_origin == "folded"
    result = rewrite_model(
        model, plan, _ranges(plan, {"x": (-1.0, 1.0)}), TransformConfig(threads=1)
    )
    assert [n.op_type for n in result.model.graph.node] == ["NbSmtMatMul"]
    assert {t.name for t in result.model.graph.initializer}.isdisjoint({"raw", "shape"})
    x = np.random.default_rng(4).uniform(-1, 1, (3, 4)).astype(np.float32)
    (got,) = _run(result.model, {"x": x})
    raw = numpy_helper.to_array(model.graph.initializer[0])
    bias = numpy_helper.to_array(model.graph.node[2].attribute[0].t)
    w = (raw.reshape(4, 6).T).T * np.float32(0.5)  # transB undoes the Transpose; alpha folded
    wq, sw = _spec_weight(w.astype(np.float32), 1)
    xq, sx = _spec_act(x, -1.0, 1.0)
    acc = reference.int8_matmul(xq, wq)
    expected = (np.float32(sx) * sw) * acc.astype(np.float32) + (bias * np.float32(2.0))
    np.testing.assert_array_equal(got, expected.astype(np.float32))


def test_gemm_transa_scalar_c_and_rowwise_c_refused() -> None:
    model = tm.gemm_variants()
    plan = _prepare(model)
    assert [c.node_name for c in plan.candidates] == ["gemm_ta"]
    (skip,) = plan.skipped
    assert (
        skip.node_name == "gemm_cm"
        and "bias C of shape [5, 2] is not per output column" in skip.reason
    )
    result = rewrite_model(
        model, plan, _ranges(plan, {"x": (-2.0, 2.0)}), TransformConfig(threads=1)
    )
    assert [n.op_type for n in result.model.graph.node] == [
        "Transpose",
        "NbSmtMatMul",
        "Relu",
        "Gemm",
    ]
    x = np.random.default_rng(5).uniform(-2, 2, (3, 5)).astype(np.float32)
    got = reference.reference_evaluator(result.model).run(["g1"], {"x": x})[0]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    wq, sw = _spec_weight(inits["w"] * np.float32(1.5), 1)
    xq, sx = _spec_act(x.T, -2.0, 2.0)
    acc = reference.int8_matmul(xq, wq)
    expected = (np.float32(sx) * sw) * acc.astype(np.float32) + np.float32(0.25) * np.float32(0.5)
    np.testing.assert_array_equal(got, expected.astype(np.float32))


def test_shared_weight_quantized_once_and_dynamic_matmul_skipped() -> None:
    model = tm.shared_weight()
    plan = _prepare(model)
    assert [c.node_name for c in plan.candidates] == ["mm_a", "mm_b"]
    (skip,) = plan.skipped
    assert skip.node_name == "mm_dynamic" and skip.reason.startswith("dynamic weights")
    result = rewrite_model(
        model, plan, _ranges(plan, {"x": (-1.0, 1.0), "ra": (0.0, 1.0)}), TransformConfig()
    )
    mm_a, mm_b = (n for n in result.model.graph.node if n.op_type == "NbSmtMatMul")
    assert mm_a.input[1] == mm_b.input[1] and mm_a.input[3] == mm_b.input[3]
    int8_inits = [t for t in result.model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_inits) == 1
    assert all(r.weight_shared for r in result.rewritten)
    assert "w" not in {t.name for t in result.model.graph.initializer}  # float weight removed


def test_selection_include_exclude_keep_first_last() -> None:
    model = tm.conv_relu_gemm()
    ensure_node_names(model)
    plan = plan_rewrite(model, Selection(exclude_op_types=("Gemm",)))
    assert [c.node_name for c in plan.candidates] == ["conv1", "conv2"]
    assert "op type Gemm" in plan.skipped[0].reason
    plan = plan_rewrite(model, Selection(exclude_regex=("conv.*",)))
    assert [c.node_name for c in plan.candidates] == ["fc"]
    plan = plan_rewrite(model, Selection(include_names=("conv2",)))
    assert [c.node_name for c in plan.candidates] == ["conv2"]
    assert all("matches no --include rule" in s.reason for s in plan.skipped)
    plan = plan_rewrite(model, Selection(keep_first=True, keep_last=True))
    assert [c.node_name for c in plan.candidates] == ["conv2"]
    reasons = {s.node_name: s.reason for s in plan.skipped}
    assert "first layer" in reasons["conv1"] and "last layer" in reasons["fc"]


def test_unsupported_attribute_and_dynamic_conv_weight() -> None:
    r = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="odd", pads=[0, 0, 0, 0]),
        helper.make_node("Conv", ["c", "x_w"], ["y"], name="dyn"),
    ]
    model = tm.make_model(
        nodes,
        [tm.value("x", [1, 2, 5, 5]), tm.value("x_w", [2, 2, 1, 1])],
        [tm.value("y", [1, 2, 5, 5])],
        {"w": r.normal(size=(2, 2, 1, 1)).astype(np.float32)},
    )
    model.graph.node[0].attribute.append(helper.make_attribute("foo_bar", 1))
    plan = _prepare(model)
    assert plan.candidates == ()
    reasons = {s.node_name: s.reason for s in plan.skipped}
    assert reasons["odd"] == "unsupported attribute 'foo_bar'"
    assert reasons["dyn"].startswith("dynamic weights") and "graph input" in reasons["dyn"]


def test_unnamed_nodes_get_unique_names() -> None:
    model = tm.matmul_chain()
    for node in model.graph.node:
        node.name = ""
    assert ensure_node_names(model) == 4
    names = [n.name for n in model.graph.node]
    assert len(set(names)) == 4 and all(names)


def test_ir3_initializer_inputs_are_removed_with_their_weight() -> None:
    """Old exporters list initializers as graph inputs; the replaced weight's input must go too."""
    model = tm.matmul_chain()
    w1 = model.graph.initializer[0]
    model.graph.input.append(
        helper.make_tensor_value_info(w1.name, onnx.TensorProto.FLOAT, list(w1.dims))
    )
    plan = _prepare(model)
    result = rewrite_model(
        model, plan, _ranges(plan, {"x": (-1.0, 1.0), "r1": (0.0, 1.0)}), TransformConfig()
    )
    assert [i.name for i in result.model.graph.input] == ["x"]


def test_missing_range_is_an_internal_error() -> None:
    model = tm.matmul_chain()
    plan = _prepare(model)
    with pytest.raises(InternalError, match="no calibrated range"):
        rewrite_model(model, plan, {}, TransformConfig())
