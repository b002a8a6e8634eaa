"""Weights computed by constant chains the reference evaluator cannot run at the model's opset
(DequantizeLinear before opset 19) or did not fold (ConstantOfShape): folded, rewritten."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import transform_models as tm
from onnx import helper, numpy_helper

from nbsmt_onnx.graph.constants import ConstantResolver
from nbsmt_onnx.graph.rewrite import ensure_node_names, plan_rewrite


def _dq_conv(opset: int) -> tuple[onnx.ModelProto, np.ndarray]:
    r = np.random.default_rng(0)
    wq = r.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    scale = r.uniform(0.01, 0.02, 4).astype(np.float32)
    inits = {"wq": wq, "ws": scale, "wz": np.zeros(4, np.int8)}
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0, name="dq"),
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    model = tm.make_model(
        nodes, [tm.value("x", ["N", 3, 8, 8])], [tm.value("y", ["N", 4, 8, 8])], inits, opset=opset
    )
    return model, (wq.astype(np.float32) * scale[:, None, None, None]).astype(np.float32)


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_dequantize_linear_weight_chain_is_folded(opset: int) -> None:
    model, want = _dq_conv(opset)
    lookup = ConstantResolver(model).lookup("w")
    assert lookup.origin == "folded", lookup.reason
    # DequantizeLinear is (q - zp) * scale in float32: exact for these values.
    np.testing.assert_array_equal(lookup.value, want)
    ensure_node_names(model)
    plan = plan_rewrite(model)
    assert [c.node_name for c in plan.candidates] == ["conv"] and plan.skipped == ()


def test_constant_of_shape_weight_is_folded() -> None:
    value = numpy_helper.from_array(np.array([0.25], np.float32))
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["w"], value=value, name="cos"),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    model = tm.make_model(
        nodes,
        [tm.value("x", ["N", 6])],
        [tm.value("y", ["N", 5])],
        {"shape": np.array([6, 5], np.int64)},
    )
    lookup = ConstantResolver(model).lookup("w")
    np.testing.assert_array_equal(lookup.value, np.full((6, 5), 0.25, np.float32))
    plan = plan_rewrite(model)
    assert [c.node_name for c in plan.candidates] == ["mm"]


def test_a_chain_from_a_graph_input_stays_dynamic_with_its_reason() -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("ConstantOfShape", ["s"], ["w"], name="cos"),
        helper.make_node("MatMul", ["z", "w"], ["y"], name="mm"),
    ]
    model = tm.make_model(
        nodes,
        [tm.value("x", [6, 5]), tm.value("z", ["N", 6])],
        [tm.value("y", ["N", 5])],
    )
    lookup = ConstantResolver(model).lookup("w")
    assert lookup.value is None and "graph input 'x'" in lookup.reason
