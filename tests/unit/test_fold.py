"""Folding BN into NbSmt ops, per-channel corrections and BN write-back (docs/spec.md §5).

Two kinds of checks: the folded parameters against the formula computed here
in float64, and folded-vs-unfolded outputs with the NumPy reference evaluator
(no library needed). The same folded-vs-unfolded check in ONNX Runtime with the
library (graph optimisations disabled, otherwise ORT would fold BN itself and
hide a bad fold) is in tests/e2e/test_fold_onnxruntime.py.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from nbsmt_onnx.graph.bn import BatchNormStatistics, find_batchnorms
from nbsmt_onnx.graph.fold import (
    ChannelAffine,
    FoldBatchNormIntoNbSmt,
    apply_channel_corrections,
    fold_batchnorm_into_nbsmt,
    write_batchnorm_statistics,
)
from nbsmt_onnx.ops.reference import reference_evaluator
from tests.unit._bn_models import Builder, image_batches, image_input, initializer, with_outputs

F32_EPS = float(np.finfo(np.float32).eps)


def _expected_fold(model: onnx.ModelProto, conv: str, bn: str, eps: float, bias: bool = True):  # type: ignore[no-untyped-def]
    gamma, beta, mean, var = (
        initializer(model, f"{bn}.{k}").astype(np.float64) for k in ("scale", "B", "mean", "var")
    )
    scale_name = f"{conv}.w_scale" if f"{conv}.x_scale" in _names(model) else f"{conv}.b_scale"
    bias_name = f"{conv}.B" if scale_name.endswith("w_scale") else f"{conv}.bias"
    w_scale = initializer(model, scale_name).astype(np.float64)
    b = initializer(model, bias_name).astype(np.float64) if bias else np.zeros_like(w_scale)
    g = gamma / np.sqrt(var + eps)
    return (w_scale * g).astype(np.float32), ((b - mean) * g + beta).astype(np.float32)


def _names(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _params(model: onnx.ModelProto, node: str) -> tuple[np.ndarray, np.ndarray]:
    n = _node(model, node)
    return initializer(model, n.input[3]), initializer(model, n.input[4])


def _single(bias: bool = True, epsilon: float | None = 1e-3, group: int = 1):  # type: ignore[no-untyped-def]
    b = Builder(seed=11)
    c = b.nbsmt_conv("conv", "x", 4, 4, x_scale=0.02, bias=bias, group=group)
    y = b.bn("bn", c, 4, epsilon=epsilon)
    return b.model([image_input(4)], [y])


@pytest.mark.parametrize(
    ("bias", "epsilon", "group"),
    [(True, 1e-3, 1), (False, 1e-3, 1), (True, None, 1), (True, 1e-3, 4)],
    ids=["bias", "no-bias", "default-epsilon", "depthwise"],
)
def test_fold_parameters(bias: bool, epsilon: float | None, group: int) -> None:
    model = _single(bias, epsilon, group)
    result = FoldBatchNormIntoNbSmt()(model)
    assert result.count == 1 and result.modified and not result.skipped
    out = result.model
    assert [n.op_type for n in out.graph.node] == ["NbSmtConv"]
    assert _node(out, "conv").output[0] == "bn.out"  # graph output name preserved
    w, b = _params(out, "conv")
    ew, eb = _expected_fold(model, "conv", "bn", 1e-5 if epsilon is None else epsilon, bias)
    np.testing.assert_array_equal(w, ew)  # both rounded once from the same float64 value
    np.testing.assert_array_equal(b, eb)
    # integer weights untouched; BN parameters and the old scale/bias removed
    np.testing.assert_array_equal(initializer(out, "conv.Wq"), initializer(model, "conv.Wq"))
    assert not any(n.startswith("bn.") for n in _names(out))
    assert "conv.w_scale" not in _names(out)
    assert model.graph.node[-1].op_type == "BatchNormalization"  # the input model is unchanged


def test_fold_through_identity_and_matmul_rank_2() -> None:
    b = Builder(seed=12)
    mm = b.nbsmt_matmul("fc", "a", 6, 5, a_scale=0.02)
    i = b.node("Identity", [mm], ["id.out"], "id")
    y = b.bn("bn", i, 5)
    inp = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 6])
    model = b.model([inp], [y], rank=2)
    result = fold_batchnorm_into_nbsmt(model)
    assert result.count == 1
    ops = [(n.op_type, n.name) for n in result.model.graph.node]
    assert ops == [("NbSmtMatMul", "fc"), ("Identity", "id")]
    assert _node(result.model, "id").output[0] == "bn.out"
    w, bias = _params(result.model, "fc")
    ew, eb = _expected_fold(model, "fc", "bn", 1e-3)
    np.testing.assert_array_equal(w, ew)
    np.testing.assert_array_equal(bias, eb)


def _two_branches_sharing_bn_params():  # type: ignore[no-untyped-def]
    b = Builder(seed=13)
    shared = ["shared.scale", "shared.B", "shared.mean", "shared.var"]
    y1 = b.bn("bn1", b.nbsmt_conv("conv1", "x", 4, 4, x_scale=0.02), 4, param_names=shared)
    y2 = b.bn("bn2", b.nbsmt_conv("conv2", "x", 4, 4, x_scale=0.02), 4, param_names=shared)
    return b.model([image_input(4)], [y1, y2])


def test_fold_and_write_back_with_shared_bn_initializers() -> None:
    model = _two_branches_sharing_bn_params()
    result = fold_batchnorm_into_nbsmt(model)
    assert result.count == 2
    for conv in ("conv1", "conv2"):
        gamma, beta, mean, var = (
            initializer(model, f"shared.{k}").astype(np.float64)
            for k in ("scale", "B", "mean", "var")
        )
        g = gamma / np.sqrt(var + 1e-3)
        w, bias = _params(result.model, conv)
        np.testing.assert_array_equal(
            w, (initializer(model, f"{conv}.w_scale").astype(np.float64) * g).astype(np.float32)
        )
        np.testing.assert_array_equal(
            bias,
            ((initializer(model, f"{conv}.B").astype(np.float64) - mean) * g + beta).astype(
                np.float32
            ),
        )
    # write-back of different statistics to the two BNs: the shared tensors are copied
    s1 = BatchNormStatistics(np.arange(4.0), np.full(4, 2.0))
    s2 = BatchNormStatistics(-np.arange(4.0), np.full(4, 3.0))
    out = write_batchnorm_statistics(model, {"bn1": s1, "bn2": s2})
    for bn, s in (("bn1", s1), ("bn2", s2)):
        node = _node(out, bn)
        np.testing.assert_array_equal(initializer(out, node.input[3]), s.mean.astype(np.float32))
        np.testing.assert_array_equal(initializer(out, node.input[4]), s.var.astype(np.float32))
        assert node.input[1] == "shared.scale"  # gamma/beta stay shared
    assert "shared.mean" not in _names(out)  # orphaned by both BNs, removed
    # only bn1 rewritten: bn2 keeps reading the original shared statistics
    out1 = write_batchnorm_statistics(model, {"bn1": s1})
    assert _node(out1, "bn2").input[3] == "shared.mean"
    np.testing.assert_array_equal(
        initializer(out1, "shared.mean"), initializer(model, "shared.mean")
    )


def _bias_through_identity():  # type: ignore[no-untyped-def]
    """bn2 reads its bias through Identity(bn1.B): an exporter's de-duplicated initializer
    (the Fashion-MNIST ResNet's down-sampling BNs, docs/models.md)."""
    b = Builder(seed=14)
    y1 = b.bn("bn1", b.nbsmt_conv("conv1", "x", 4, 4, x_scale=0.02), 4)
    dedup = b.node("Identity", ["bn1.B"], ["bn2.B"], "dedup")
    c2 = b.nbsmt_conv("conv2", "x", 4, 4, x_scale=0.02)
    b.init("bn2.scale", (1 + 0.3 * b.rng.normal(size=4)).astype(np.float32))
    b.init("bn2.mean", (0.5 * b.rng.normal(size=4)).astype(np.float32))
    b.init("bn2.var", (0.5 + b.rng.random(size=4)).astype(np.float32))
    y2 = b.node(
        "BatchNormalization",
        [c2, "bn2.scale", dedup, "bn2.mean", "bn2.var"],
        ["bn2.out"],
        "bn2",
        epsilon=1e-3,
    )
    return b.model([image_input(4)], [y1, y2])


def test_bn_parameter_through_identity_is_recalibrated_and_folded() -> None:
    model = _bias_through_identity()
    infos = {i.name: i for i in find_batchnorms(model)}
    assert infos["bn2"].recalibratable and infos["bn2"].fold_target == "conv2"
    # fold only bn2: bn1 still reads bn1.B, so the Identity goes but the initializer stays
    only2 = fold_batchnorm_into_nbsmt(model, only=["bn2"])
    assert only2.count == 1
    assert "dedup" not in {n.name for n in only2.model.graph.node}
    assert "bn1.B" in _names(only2.model)
    beta = initializer(model, "bn1.B").astype(np.float64)
    gamma, mean, var = (
        initializer(model, f"bn2.{k}").astype(np.float64) for k in ("scale", "mean", "var")
    )
    g = gamma / np.sqrt(var + 1e-3)
    _, bias = _params(only2.model, "conv2")
    expected = ((initializer(model, "conv2.B").astype(np.float64) - mean) * g + beta).astype(
        np.float32
    )
    np.testing.assert_array_equal(bias, expected)
    # fold both: nothing reads bn1.B any more
    both = fold_batchnorm_into_nbsmt(model)
    assert both.count == 2
    assert [n.op_type for n in both.model.graph.node] == ["NbSmtConv", "NbSmtConv"]
    assert "bn1.B" not in _names(both.model) and "bn2.mean" not in _names(both.model)


def test_shared_w_scale_is_copied_not_changed_for_the_other_op() -> None:
    b = Builder(seed=14)
    c1 = b.nbsmt_conv("conv1", "x", 4, 4, x_scale=0.02)
    y1 = b.bn("bn1", c1, 4)
    c2 = b.nbsmt_conv("conv2", "x", 4, 4, x_scale=0.02)
    n2 = _node_of(b, "conv2")
    n2.input[3] = "conv1.w_scale"  # the two ops share one scale tensor (one quantized weight)
    model = b.model([image_input(4)], [y1, c2])
    out = fold_batchnorm_into_nbsmt(model).model
    assert _node(out, "conv2").input[3] == "conv1.w_scale"
    np.testing.assert_array_equal(
        initializer(out, "conv1.w_scale"), initializer(model, "conv1.w_scale")
    )
    assert _node(out, "conv1").input[3] != "conv1.w_scale"


def _node_of(b: Builder, name: str) -> onnx.NodeProto:
    return next(n for n in b.nodes if n.name == name)


def test_bn_with_other_consumers_is_skipped_with_reason() -> None:
    b = Builder(seed=15)
    c1 = b.nbsmt_conv("conv1", "x", 4, 4, x_scale=0.02)
    y1 = b.bn("bn1", c1, 4)
    s = b.node("Add", [y1, c1], ["add.out"], "residual")
    model = b.model([image_input(4)], [s])
    result = fold_batchnorm_into_nbsmt(model)
    assert result.count == 0 and not result.modified
    assert [s.node for s in result.skipped] == ["bn1"]
    assert "other consumers" in result.skipped[0].reason
    assert [n.op_type for n in result.model.graph.node] == [
        "NbSmtConv",
        "BatchNormalization",
        "Add",
    ]


def test_channel_corrections_math() -> None:
    model = _single()
    a = np.array([1.0, 0.5, 2.0, 1.25])
    shift = np.array([0.0, 0.1, -0.2, 3.0])
    out = apply_channel_corrections(model, {"conv": ChannelAffine(a, shift)})
    w, bias = _params(out, "conv")
    w0 = initializer(model, "conv.w_scale").astype(np.float64)
    b0 = initializer(model, "conv.B").astype(np.float64)
    np.testing.assert_array_equal(w, (w0 * a).astype(np.float32))
    np.testing.assert_array_equal(bias, (b0 * a + shift).astype(np.float32))
    # composition helper: then() applies the second correction after the first
    c = ChannelAffine(a, shift).then(ChannelAffine(np.full(4, 2.0), np.ones(4)))
    np.testing.assert_allclose(c.scale, 2 * a)
    np.testing.assert_allclose(c.shift, 2 * shift + 1)


# --------------------------------------------------------------------------- execution

Runner = Callable[[onnx.ModelProto], Callable[[dict[str, np.ndarray], list[str]], list[np.ndarray]]]


def _reference_runner(model: onnx.ModelProto):  # type: ignore[no-untyped-def]
    ev = reference_evaluator(model)
    return lambda feed, names: ev.run(names, feed)


def _models_for_execution() -> dict[str, tuple[onnx.ModelProto, list[tuple[str, str]]]]:
    """name -> (unfolded model, [(pre-BN tensor, BN name)]) covering the edge cases."""
    cases: dict[str, tuple[onnx.ModelProto, list[tuple[str, str]]]] = {}
    for label, bias, eps, group in (
        ("bias", True, 1e-3, 1),
        ("no-bias", False, 1e-3, 1),
        ("default-epsilon", True, None, 1),
        ("depthwise", True, 1e-3, 4),
    ):
        cases[label] = (_single(bias, eps, group), [("conv.out", "bn")])
    cases["shared-bn-params"] = (
        _two_branches_sharing_bn_params(),
        [("conv1.out", "bn1"), ("conv2.out", "bn2")],
    )
    b = Builder(seed=16)
    flat = b.node("Flatten", ["x"], ["flat.out"], "flatten")
    mm = b.nbsmt_matmul("fc", flat, 4 * 5 * 5, 6, a_scale=0.02)
    y = b.bn("bn_fc", mm, 6)
    cases["matmul-rank-2"] = (b.model([image_input(4)], [y], rank=2), [("fc.out", "bn_fc")])
    return cases


def _fixed_size_batches():  # type: ignore[no-untyped-def]
    return image_batches(seed=17, c=4, sizes=((2, 5), (3, 5)))


@pytest.mark.parametrize("case", list(_models_for_execution()))
def test_folded_equals_unfolded_reference_evaluator(case: str) -> None:
    _check_equivalence(case, _reference_runner)


def _check_equivalence(case: str, runner: Runner) -> None:
    model, pairs = _models_for_execution()[case]
    folded = fold_batchnorm_into_nbsmt(model)
    assert folded.count == len(pairs), folded.skipped
    outputs = [o.name for o in model.graph.output]
    pre = [p for p, _ in pairs]
    run_unfolded = runner(with_outputs(model, pre))
    run_folded = runner(folded.model)
    infos = {i.name: i for i in find_batchnorms(model)}
    for feed in _fixed_size_batches()():
        ref = run_unfolded(feed, outputs + pre)
        got = run_folded(feed, outputs)
        for (pre_name, bn), out_name in zip(pairs, outputs, strict=True):
            y_pre = ref[len(outputs) + pre.index(pre_name)]
            expected = ref[outputs.index(out_name)]
            actual = got[outputs.index(out_name)]
            gamma, beta, mean, var = (
                initializer(model, getattr(infos[bn], k)).astype(np.float64)
                for k in ("scale", "bias", "mean", "var")
            )
            g = gamma / np.sqrt(var + infos[bn].epsilon)
            shape = (1, -1) + (1,) * (y_pre.ndim - 2)
            # Float32 rounding bound: both paths round each of ~6 operations (scale
            # products, the accumulator scaling, bias add, BN subtract/multiply/add)
            # once, each error <= eps/2 of the magnitudes involved, which are at most
            # |y_pre*g| + |mean*g| + |beta| (+ the result). 16 eps covers the sum with
            # margin; an actual folding mistake is O(|g|) relative, far above it.
            magnitude = (
                np.abs(y_pre * g.reshape(shape))
                + np.abs(mean * g).reshape(shape)
                + np.abs(beta).reshape(shape)
                + np.abs(expected)
            )
            assert np.all(np.abs(actual - expected) <= 16 * F32_EPS * magnitude), (
                case,
                float(np.max(np.abs(actual - expected) / magnitude) / F32_EPS),
            )
