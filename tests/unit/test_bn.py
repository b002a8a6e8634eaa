"""Finding BN layers: fold targets, allowed chains, blockers with reasons, dependency levels."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from nbsmt_onnx.errors import ModelError
from nbsmt_onnx.graph.bn import (
    dependency_levels,
    find_batchnorms,
    group_by_level,
    infer_ranks,
    layers_without_batchnorm,
)
from tests.unit._bn_models import Builder, image_input


def _by_name(model):  # type: ignore[no-untyped-def]
    return {i.name: i for i in find_batchnorms(model)}


def test_direct_and_identity_chain_are_foldable() -> None:
    b = Builder()
    c1 = b.nbsmt_conv("conv1", "x", 3, 4, x_scale=0.02)
    y1 = b.bn("bn1", c1, 4)
    c2 = b.nbsmt_conv("conv2", y1, 4, 4, x_scale=0.02)
    i = b.node("Identity", [c2], ["id.out"], "id")
    y2 = b.bn("bn2", i, 4, epsilon=None)
    info = _by_name(b.model([image_input()], [y2]))
    assert info["bn1"].fold_target == "conv1" and info["bn1"].chain == ()
    assert info["bn1"].affected and info["bn1"].recalibratable
    assert info["bn2"].fold_target == "conv2" and info["bn2"].chain == ("id",)
    assert info["bn2"].epsilon == pytest.approx(1e-5)  # ONNX default when the attribute is absent
    assert info["bn1"].epsilon == pytest.approx(1e-3)
    assert info["bn1"].channels == 4


def test_other_consumers_block_folding_but_not_recalibration() -> None:
    b = Builder()
    c1 = b.nbsmt_conv("conv1", "x", 3, 4, x_scale=0.02)
    y1 = b.bn("bn1", c1, 4)
    s = b.node("Add", [y1, c1], ["add.out"], "residual")  # conv1's output has a second user
    info = _by_name(b.model([image_input()], [s]))["bn1"]
    assert info.fold_target is None
    assert "other consumers" in (info.fold_blocker or "") and "residual" in (
        info.fold_blocker or ""
    )
    assert info.recalibratable


def test_graph_output_blocks_folding() -> None:
    b = Builder()
    c1 = b.nbsmt_conv("conv1", "x", 3, 4, x_scale=0.02)
    y1 = b.bn("bn1", c1, 4)
    info = _by_name(b.model([image_input()], [y1, c1]))["bn1"]
    assert info.fold_target is None and "graph output" in (info.fold_blocker or "")


def test_nonlinearity_in_between_blocks_folding() -> None:
    b = Builder()
    c1 = b.nbsmt_conv("conv1", "x", 3, 4, x_scale=0.02)
    r = b.node("Relu", [c1], ["relu.out"], "relu")
    y = b.bn("bn1", r, 4)
    info = _by_name(b.model([image_input()], [y]))["bn1"]
    assert info.fold_target is None and "Relu" in (info.fold_blocker or "")
    assert info.recalibratable  # statistics of the BN input itself: any producer is fine


def test_bn_without_nbsmt_upstream_is_not_affected() -> None:
    b = Builder()
    c0 = b.conv("conv0", "x", 3, 4)  # kept in float (e.g. excluded first layer)
    y0 = b.bn("bn0", c0, 4)
    c1 = b.nbsmt_conv("conv1", y0, 4, 4, x_scale=0.02)
    r = b.node("Relu", [c1], ["relu.out"], "relu")
    c2 = b.conv("conv2", r, 4, 4)  # float conv, but downstream of an NbSmt op
    y2 = b.bn("bn2", c2, 4)
    info = _by_name(b.model([image_input()], [y2]))
    assert not info["bn0"].affected and not info["bn0"].recalibratable
    assert "not an NbSmt op" in (info["bn0"].fold_blocker or "")
    assert info["bn2"].affected and info["bn2"].recalibratable
    assert info["bn2"].fold_target is None


def test_training_mode_and_dynamic_parameters_are_blockers() -> None:
    b = Builder()
    c1 = b.nbsmt_conv("conv1", "x", 3, 4, x_scale=0.02)
    y1 = b.bn("bn1", c1, 4)
    b.nodes[-1].attribute.append(helper.make_attribute("training_mode", 1))
    c2 = b.nbsmt_conv("conv2", y1, 4, 4, x_scale=0.02)
    b.nodes.append(
        helper.make_node(
            "BatchNormalization",
            [c2, "bn2.scale", "bn2.B", "mean_in", "bn2.var"],
            ["bn2.out"],
            name="bn2",
        )
    )
    for label, v in (("scale", 1.0), ("B", 0.0), ("var", 1.0)):
        b.init(f"bn2.{label}", np.full(4, v, dtype=np.float32))
    mean_in = helper.make_tensor_value_info("mean_in", TensorProto.FLOAT, [4])
    info = _by_name(b.model([image_input(), mean_in], ["bn2.out"], opset=15))
    assert "training mode" in (info["bn1"].recalibration_blocker or "")
    assert not info["bn1"].recalibratable and info["bn1"].fold_target is None
    assert "mean_in" in (info["bn2"].recalibration_blocker or "")


def test_unnamed_bn_is_a_clear_error() -> None:
    b = Builder()
    c1 = b.nbsmt_conv("conv1", "x", 3, 4, x_scale=0.02)
    b.bn("", c1, 4)
    with pytest.raises(ModelError, match="no name"):
        find_batchnorms(b.model([image_input()], [".out"]))


def test_matmul_then_bn_folds_only_at_rank_2() -> None:
    for rank, foldable in ((2, True), (3, False)):
        b = Builder()
        mm = b.nbsmt_matmul("fc", "a", 6, 5, a_scale=0.02)
        y = b.bn("bn", mm, 5)
        # rank 3: axis 1 has 5 entries too, so only the rank tells the axes apart
        dims = ["N", 6] if rank == 2 else ["N", 5, 6]
        inp = helper.make_tensor_value_info("a", TensorProto.FLOAT, dims)
        model = b.model([inp], [y], rank=rank)
        assert infer_ranks(model)["fc.out"] == rank
        info = _by_name(model)["bn"]
        if foldable:
            assert info.fold_target == "fc", info.fold_blocker
        else:
            assert info.fold_target is None and "rank 3" in (info.fold_blocker or "")


def test_channel_count_mismatch_blocks_folding() -> None:
    b = Builder()
    mm = b.nbsmt_matmul("fc", "a", 6, 5, a_scale=0.02)
    y = b.bn("bn", mm, 4)  # inconsistent model: BN has 4 channels, op has 5
    inp = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 6])
    info = _by_name(b.model([inp], [y], rank=2))["bn"]
    assert info.fold_target is None and "5 output channels" in (info.fold_blocker or "")


def _branchy():  # type: ignore[no-untyped-def]
    b = Builder()
    a = b.bn("bn_a", b.nbsmt_conv("conv_a", "x", 3, 4, x_scale=0.02), 4)
    c = b.bn("bn_b", b.nbsmt_conv("conv_b", "x", 3, 4, x_scale=0.02), 4)
    s = b.node("Add", [a, c], ["add.out"], "add")
    r = b.node("Relu", [s], ["relu.out"], "relu")
    d = b.bn("bn_c", b.nbsmt_conv("conv_c", r, 4, 4, x_scale=0.02), 4)
    e = b.bn("bn_d", b.nbsmt_conv("conv_d", d, 4, 4, x_scale=0.02), 4)
    f = b.node("Add", [e, a], ["add2.out"], "add2")
    tail = b.nbsmt_conv("conv_tail", f, 4, 4, x_scale=0.02)
    return b.model([image_input()], [tail])


def test_dependency_levels_group_independent_bns() -> None:
    model = _branchy()
    levels = dependency_levels(model, ["bn_a", "bn_b", "bn_c", "bn_d"])
    assert levels == {"bn_a": 0, "bn_b": 0, "bn_c": 1, "bn_d": 2}
    assert group_by_level(levels) == [["bn_a", "bn_b"], ["bn_c"], ["bn_d"]]
    # a subset: levels count only selected nodes upstream
    assert dependency_levels(model, ["bn_a", "bn_d"]) == {"bn_a": 0, "bn_d": 1}
    conv_levels = dependency_levels(model, ["conv_a", "conv_b", "conv_c", "conv_d", "conv_tail"])
    assert conv_levels == {"conv_a": 0, "conv_b": 0, "conv_c": 1, "conv_d": 2, "conv_tail": 3}


def test_layers_without_batchnorm() -> None:
    assert layers_without_batchnorm(_branchy()) == ["conv_tail"]
