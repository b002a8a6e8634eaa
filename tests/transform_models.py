"""Small models built with onnx.helper for the transform tests (no files, no torch).

Every builder returns a checked ``ModelProto`` with IR version 8 and opset 17
unless told otherwise, so stock ONNX Runtime loads it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 17


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: dict[str, np.ndarray] | None = None,
    *,
    opset: int = OPSET,
    ir_version: int = IR_VERSION,
) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def value(
    name: str, shape: list[int | str | None], dtype: int = TensorProto.FLOAT
) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def conv_relu_gemm(
    seed: int = 0, *, channels: int = 4, size: int = 8, classes: int = 5
) -> onnx.ModelProto:
    """x[N,3,H,W] -> Conv(3x3,pad 1)+B -> Relu -> Conv(3x3, group 2) -> Relu -> GAP -> Flatten -> Gemm(transB)."""
    r = rng(seed)
    inits = {
        "w1": r.normal(0, 0.5, (channels, 3, 3, 3)).astype(np.float32),
        "b1": r.normal(0, 0.1, channels).astype(np.float32),
        "w2": r.normal(0, 0.5, (channels, channels // 2, 3, 3)).astype(np.float32),
        "fc_w": r.normal(0, 0.5, (classes, channels)).astype(np.float32),
        "fc_b": r.normal(0, 0.1, classes).astype(np.float32),
    }
    nodes = [
        helper.make_node(
            "Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node(
            "Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], group=2, strides=[2, 2]
        ),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    return make_model(
        nodes, [value("x", ["N", 3, size, size])], [value("y", ["N", classes])], inits
    )


def conv_bn_relu(seed: int = 0, *, channels: int = 4, size: int = 6) -> onnx.ModelProto:
    """x -> Conv -> BatchNormalization -> Relu -> Conv -> y (BN kept)."""
    r = rng(seed)
    inits = {
        "w1": r.normal(0, 0.5, (channels, 2, 3, 3)).astype(np.float32),
        "gamma": r.uniform(0.5, 1.5, channels).astype(np.float32),
        "beta": r.normal(0, 0.1, channels).astype(np.float32),
        "mean": r.normal(0, 0.1, channels).astype(np.float32),
        "var": r.uniform(0.5, 2.0, channels).astype(np.float32),
        "w2": r.normal(0, 0.5, (3, channels, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn1"], name="bn1"
        ),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2"),
    ]
    return make_model(
        nodes, [value("x", ["N", 2, size, size])], [value("y", ["N", 3, size, size])], inits
    )


def matmul_chain(seed: int = 0, *, k: int = 6, n: int = 5) -> onnx.ModelProto:
    """x[N,k] -> MatMul(W1 initializer) -> Relu -> MatMul(W2 from a Constant node) -> y."""
    r = rng(seed)
    w2 = r.normal(0, 0.5, (n, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Relu", ["m1"], ["r1"], name="relu1"),
        helper.make_node(
            "Constant", [], ["w2"], name="w2_const", value=numpy_helper.from_array(w2, "w2v")
        ),
        helper.make_node("MatMul", ["r1", "w2"], ["y"], name="mm2"),
    ]
    inits = {"w1": r.normal(0, 0.5, (k, n)).astype(np.float32)}
    return make_model(nodes, [value("x", ["N", k])], [value("y", ["N", 3])], inits)


def reshaped_weight_gemm(seed: int = 0) -> onnx.ModelProto:
    """Gemm whose weight is Transpose(Reshape(initializer)) and whose bias comes from a Constant node."""
    r = rng(seed)
    raw = r.normal(0, 0.5, (2, 3, 4)).astype(
        np.float32
    )  # reshaped to [4, 6] -> transposed to [6, 4]
    bias = r.normal(0, 0.1, 6).astype(np.float32)
    nodes = [
        helper.make_node("Reshape", ["raw", "shape"], ["w_flat"], name="reshape_w"),
        helper.make_node("Transpose", ["w_flat"], ["w"], name="transpose_w", perm=[1, 0]),
        helper.make_node(
            "Constant", [], ["c"], name="c_const", value=numpy_helper.from_array(bias, "cv")
        ),
        helper.make_node(
            "Gemm", ["x", "w", "c"], ["y"], name="gemm", alpha=0.5, beta=2.0, transB=1
        ),
    ]
    inits = {"raw": raw, "shape": np.array([4, 6], dtype=np.int64)}
    return make_model(nodes, [value("x", ["N", 4])], [value("y", ["N", 6])], inits)


def shared_weight(seed: int = 0) -> onnx.ModelProto:
    """Two MatMuls share one weight initializer; a third MatMul multiplies two run-time tensors."""
    r = rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="mm_a"),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("MatMul", ["ra", "w"], ["b"], name="mm_b"),
        helper.make_node("Transpose", ["b"], ["bt"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["b", "bt"], ["y"], name="mm_dynamic"),
    ]
    inits = {"w": r.normal(0, 0.5, (4, 4)).astype(np.float32)}
    return make_model(nodes, [value("x", [3, 4])], [value("y", [3, 3])], inits)


def gemm_variants(seed: int = 0) -> onnx.ModelProto:
    """Gemm with transA=1, a scalar C and alpha != 1; then a Gemm with a [M, N] bias (refused)."""
    r = rng(seed)
    nodes = [
        helper.make_node(
            "Gemm", ["x", "w", "c"], ["g1"], name="gemm_ta", transA=1, alpha=1.5, beta=0.5
        ),
        helper.make_node("Relu", ["g1"], ["r1"], name="relu"),
        helper.make_node("Gemm", ["r1", "w2", "cm"], ["y"], name="gemm_cm"),
    ]
    inits = {
        "w": r.normal(0, 0.5, (3, 4)).astype(np.float32),
        "c": np.array(0.25, dtype=np.float32),
        "w2": r.normal(0, 0.5, (4, 2)).astype(np.float32),
        "cm": r.normal(0, 0.1, (5, 2)).astype(np.float32),
    }
    return make_model(nodes, [value("x", [3, 5])], [value("y", [5, 2])], inits)


def reference_run(
    model: onnx.ModelProto, feed: dict[str, np.ndarray], outputs: list[str] | None = None
) -> list[np.ndarray]:
    """Run a (simulation) model with the NumPy reference: NB-SMT ops + inference-mode BN.

    ``nbsmt_onnx.ops.reference.reference_evaluator`` installs both (onnx.reference's
    own BatchNormalization for opsets 9-13 normalises with batch statistics).
    """
    from nbsmt_onnx.ops.reference import reference_evaluator

    return reference_evaluator(model).run(outputs, feed)


def conv_bn_relu_input3(seed: int = 0) -> onnx.ModelProto:
    """:func:`conv_bn_relu` with a 3-channel 8x8 input (the shape the e2e helpers feed)."""
    r = rng(seed)
    inits = {
        "w1": r.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32),
        "gamma": r.uniform(0.5, 1.5, 4).astype(np.float32),
        "beta": r.normal(0, 0.1, 4).astype(np.float32),
        "mean": r.normal(0, 0.1, 4).astype(np.float32),
        "var": r.uniform(0.5, 2.0, 4).astype(np.float32),
        "w2": r.normal(0, 0.5, (3, 4, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn1"], name="bn1"
        ),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2"),
    ]
    return make_model(nodes, [value("x", ["N", 3, 8, 8])], [value("y", ["N", 3, 8, 8])], inits)
