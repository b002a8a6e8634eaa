"""runtime.session: ONNX Runtime failures become one-line user errors (no library needed)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nbsmt_onnx.errors import InferenceError, ModelError, NbsmtError
from nbsmt_onnx.runtime.session import Session, SessionOptions, create_session

NO_LIBRARY = SessionOptions(register_library=False)


def _dynamic_conv_matmul() -> onnx.ModelProto:
    """Conv on (N, 3, H, W) -> Flatten -> MatMul with 4*6*6 rows: only 6x6 images fit."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")
    g = numpy_helper.from_array(rng.standard_normal((4 * 6 * 6, 5)).astype(np.float32), "G")
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "G"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [w, g],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _one_line_error(excinfo: pytest.ExceptionInfo[InferenceError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message
    assert isinstance(excinfo.value, NbsmtError) and excinfo.value.exit_code == 2
    return message


def test_wrong_spatial_size_names_node_shapes_and_fix() -> None:
    session = create_session(_dynamic_conv_matmul(), NO_LIBRARY, what="float model")
    assert isinstance(session, Session)
    ok = session.run(["y"], {"x": np.zeros((2, 3, 6, 6), np.float32)})
    assert ok[0].shape == (2, 5)
    with pytest.raises(InferenceError) as excinfo:
        session.run(["y"], {"x": np.zeros((2, 3, 7, 7), np.float32)})
    message = _one_line_error(excinfo)
    assert "float model" in message
    assert "node 'fc' (MatMul)" in message
    assert "given x (2, 3, 7, 7) float32" in message
    assert "declares x (N, 3, H, W) float32" in message
    assert "fix:" in message and "size the model expects" in message


def test_wrong_dtype_and_rank_and_missing_input_are_user_errors() -> None:
    session = create_session(_dynamic_conv_matmul(), NO_LIBRARY)
    with pytest.raises(InferenceError) as excinfo:
        session.run(None, {"x": np.zeros((2, 3, 6, 6), np.float64)})
    message = _one_line_error(excinfo)
    assert "given x (2, 3, 6, 6) float64" in message and "dtype" in message
    with pytest.raises(InferenceError) as excinfo:
        session.run(None, {"x": np.zeros((3, 6, 6), np.float32)})
    assert "rank" in _one_line_error(excinfo)
    with pytest.raises(InferenceError) as excinfo:
        session.run(None, {})
    message = _one_line_error(excinfo)
    assert "given nothing" in message and "declares x" in message


def test_unloadable_model_is_a_model_error() -> None:
    model = _dynamic_conv_matmul()
    model.graph.node[2].input[1] = "no_such_tensor"
    with pytest.raises(ModelError) as excinfo:
        create_session(model, NO_LIBRARY)
    assert "\n" not in str(excinfo.value) and "cannot load" in str(excinfo.value)


def test_wrapper_exposes_the_session_api() -> None:
    session = create_session(_dynamic_conv_matmul(), NO_LIBRARY)
    assert [i.name for i in session.get_inputs()] == ["x"]
    assert [o.name for o in session.get_outputs()] == ["y"]
