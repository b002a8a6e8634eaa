"""Model forms real exporters produce: model-local functions, control-flow bodies,
initializers listed as graph inputs (keep_initializers_as_inputs, IR 3)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import transform_models as tm
from onnx import helper

from nbsmt_onnx import TransformConfig, transform
from nbsmt_onnx.api import inspect
from nbsmt_onnx.ops.reference import reference_evaluator


@pytest.fixture(autouse=True)
def _library(nbsmt_library: str) -> str:
    return nbsmt_library


def _x(n: int = 16, c: int = 3, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, c, size, size)).astype(np.float32)


def _function_model() -> onnx.ModelProto:
    """conv_relu_gemm's first Conv + Relu wrapped in a model-local function ``block``."""
    base = tm.conv_relu_gemm()
    conv1, relu1 = base.graph.node[0], base.graph.node[1]
    func = helper.make_function(
        "local",
        "block",
        ["x", "w1", "b1"],
        ["r1"],
        [conv1, relu1],
        opset_imports=[helper.make_opsetid("", tm.OPSET)],
    )
    call = helper.make_node("block", ["x", "w1", "b1"], ["r1"], name="block_call", domain="local")
    nodes = [call, *base.graph.node[2:]]
    graph = helper.make_graph(
        nodes, "g", base.graph.input, base.graph.output, base.graph.initializer
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", tm.OPSET), helper.make_opsetid("local", 1)],
        functions=[func],
        ir_version=tm.IR_VERSION,
    )
    onnx.checker.check_model(model)
    return model


def test_conv_inside_a_model_local_function_is_rewritten() -> None:
    model = _function_model()
    result = inspect(model)
    rewritten = {op for _, op, _ in result.rewritten}
    assert len(result.rewritten) == 3 and rewritten == {"Conv", "Gemm"}, result.rewritten
    assert result.skipped == ()
    x = _x()
    out = transform(model, {"x": x}, TransformConfig(threads=1, num_samples=16, export="both"))
    assert out.report["summary"]["rewritten"] == 3
    assert not out.sim_model.functions  # inlined
    # The inlined model computes what the function model computes (float, same graph).
    (want,) = reference_evaluator(model).run(None, {"x": x})
    (got,) = reference_evaluator(tm.conv_relu_gemm()).run(None, {"x": x})
    np.testing.assert_array_equal(want, got)


def test_convs_inside_if_bodies_are_listed_as_skipped_with_a_reason() -> None:
    base = tm.conv_relu_gemm()
    w = onnx.numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((5, 5)).astype(np.float32), "wb"
    )
    body = helper.make_graph(
        [helper.make_node("MatMul", ["y", "wb"], ["yb"], name="inner_mm")],
        "then",
        [],
        [tm.value("yb", ["N", 5])],
        [w],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["yo"], name="inner_id")],
        "else",
        [],
        [tm.value("yo", ["N", 5])],
    )
    nodes = [
        *base.graph.node,
        helper.make_node(
            "If", ["flag"], ["out"], name="branch", then_branch=body, else_branch=other
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [*base.graph.input, tm.value("flag", [], onnx.TensorProto.BOOL)],
        [tm.value("out", ["N", 5])],
        base.graph.initializer,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", tm.OPSET)], ir_version=tm.IR_VERSION
    )
    result = inspect(model)
    (skip,) = result.skipped
    assert skip.node_name == "inner_mm" and "subgraph of 'branch'" in skip.reason
    assert len(result.rewritten) == 3


def _inits_as_inputs(model: onnx.ModelProto, ir_version: int, opset: int) -> onnx.ModelProto:
    g = model.graph
    inputs = [*g.input] + [
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer
    ]
    graph = helper.make_graph(g.node, g.name, inputs, g.output, g.initializer)
    out = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )
    onnx.checker.check_model(out)
    return out


@pytest.mark.parametrize(("ir_version", "opset"), [(8, 17), (3, 8)])
def test_initializers_listed_as_inputs_are_constants_bn_recalibrated(
    ir_version: int, opset: int
) -> None:
    plain = tm.conv_bn_relu()
    model = _inits_as_inputs(plain, ir_version, opset)
    x = np.random.default_rng(0).standard_normal((32, 2, 6, 6)).astype(np.float32)
    config = TransformConfig(threads=2, num_samples=32, export="sim")
    with_inputs = transform(model, {"x": x}, config)
    reference = transform(plain, {"x": x}, config)
    assert with_inputs.report["recalibration"]["batchnorms"], with_inputs.report["recalibration"]
    assert (
        with_inputs.report["recalibration"]["batchnorms"]
        == reference.report["recalibration"]["batchnorms"]
    )
    onnx.checker.check_model(with_inputs.sim_model)
    assert with_inputs.sim_model.ir_version >= 4
    assert [i.name for i in with_inputs.sim_model.graph.input] == ["x"]
