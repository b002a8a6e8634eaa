"""Per-layer threads: the assignment rules, the graph pass, MACs against hand counts, speed-up.

No library needed: models are rewritten (not run) and MACs come from shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import transform_models as tm

from nbsmt_onnx.calibration.ranges import ActivationRange
from nbsmt_onnx.config import LayerThreads, Selection, TransformConfig
from nbsmt_onnx.errors import ConfigError
from nbsmt_onnx.graph.rewrite import ensure_node_names, plan_rewrite, rewrite_model
from nbsmt_onnx.graph.threads import (
    LayerMacs,
    assign_threads,
    layer_macs,
    nbsmt_nodes,
    node_threads,
    speedup,
)

# conv_relu_gemm(channels=4, size=8, classes=5), counted by hand per sample:
CONV1 = 4 * 8 * 8 * (3 * 3 * 3)  # out 4x8x8, each over 3 channels x 3x3 = 6912
CONV2 = 4 * 4 * 4 * (2 * 3 * 3)  # stride 2 -> 4x4, group 2: 2 channels x 3x3 each = 1152
FC = 5 * 4  # Gemm [N,4] x [4,5] (transB) = 20


def _sim(threads: int = 2, exclude_gemm: bool = True) -> onnx.ModelProto:
    model = tm.conv_relu_gemm(0)
    ensure_node_names(model)
    plan = plan_rewrite(model, Selection(exclude_op_types=("Gemm",) if exclude_gemm else ()))
    ranges = {t: ActivationRange.from_min_max(0.0, 4.0) for t in plan.activation_tensors}
    return rewrite_model(model, plan, ranges, TransformConfig(threads=threads)).model


def _by_name(count) -> dict[str, LayerMacs]:  # type: ignore[no-untyped-def]
    return {layer.name: layer for layer in count.layers}


def test_macs_of_the_float_model_match_hand_counts() -> None:
    count = layer_macs(tm.conv_relu_gemm(0), {"x": (3, 3, 8, 8)}, batch=3)
    layers = _by_name(count)
    assert {n: layer.macs for n, layer in layers.items()} == {
        "conv1": CONV1,
        "conv2": CONV2,
        "fc": FC,
    }
    assert all(layer.threads == 1 for layer in count.layers)
    assert count.unknown == () and count.speedup == 1.0


def test_macs_are_per_sample_and_follow_the_data_size() -> None:
    one = layer_macs(tm.conv_relu_gemm(0), {"x": (1, 3, 8, 8)}, batch=1)
    five = layer_macs(tm.conv_relu_gemm(0), {"x": (5, 3, 8, 8)}, batch=5)
    assert _by_name(one)["conv1"].macs == _by_name(five)["conv1"].macs == CONV1
    big = layer_macs(tm.conv_relu_gemm(0, size=16), {"x": (2, 3, 16, 16)}, batch=2)
    assert _by_name(big)["conv1"].macs == 4 * CONV1 and _by_name(big)["fc"].macs == FC


def test_speedup_of_a_mixed_model_is_macs_over_cycles() -> None:
    count = layer_macs(_sim(threads=2), {"x": (2, 3, 8, 8)}, batch=2)
    layers = _by_name(count)
    assert (layers["conv1"].threads, layers["conv2"].threads, layers["fc"].threads) == (2, 2, 1)
    assert layers["conv1"].op_type == "NbSmtConv" and layers["fc"].op_type == "Gemm"
    expected = (CONV1 + CONV2 + FC) / (CONV1 / 2 + CONV2 / 2 + FC)
    assert count.speedup == pytest.approx(expected, rel=1e-12)


def test_matmul_macs() -> None:
    model = tm.matmul_chain(0, k=6, n=5)  # x[N,6] @ w1[6,5] -> relu -> @ w2[5,3]
    count = layer_macs(model, {"x": (4, 6)}, batch=4)
    assert {n: layer.macs for n, layer in _by_name(count).items()} == {"mm1": 6 * 5, "mm2": 5 * 3}


def test_speedup_formula_edges() -> None:
    assert speedup([LayerMacs("a", "NbSmtConv", 100.0, 4)]) == 4.0
    assert speedup([LayerMacs("a", "NbSmtConv", 100.0, 4), LayerMacs("b", "Conv", 100.0, 1)]) == (
        pytest.approx(200 / 125)
    )
    assert speedup([]) == 1.0


def test_names_win_over_expressions_and_unlisted_layers_keep_the_default() -> None:
    sim = _sim(threads=2, exclude_gemm=False)
    rules = LayerThreads.from_mapping({"conv.*": 1, "conv1": 4})
    result = assign_threads(sim, rules, default=2)
    assert result.threads == {"conv1": 4, "conv2": 1, "fc": 2}
    assert result.changed
    assert {n.name: node_threads(n) for n in nbsmt_nodes(result.model)} == result.threads
    assert {n.name: node_threads(n) for n in nbsmt_nodes(sim)} == {"conv1": 2, "conv2": 2, "fc": 2}
    # the first matching expression wins
    first = assign_threads(sim, LayerThreads.from_mapping({"conv2|fc": 4, "fc": 1}), default=2)
    assert first.threads == {"conv1": 2, "conv2": 4, "fc": 1}
    unchanged = assign_threads(sim, LayerThreads(), default=2)
    assert not unchanged.changed and unchanged.threads == {"conv1": 2, "conv2": 2, "fc": 2}


def test_assigned_threads_reach_the_speedup() -> None:
    sim = assign_threads(_sim(threads=2), LayerThreads.from_mapping({"conv1": 4}), 2).model
    count = layer_macs(sim, {"x": (1, 3, 8, 8)}, batch=1)
    assert count.speedup == pytest.approx((CONV1 + CONV2 + FC) / (CONV1 / 4 + CONV2 / 2 + FC))


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"conv9": 4}, "match no NB-SMT layer"),
        ({"conv1": 3}, "must be one of 1, 2, 4"),
        ({"conv1": True}, "must be one of 1, 2, 4"),
        ({"conv(": 2}, "neither a node name nor a valid regular expression"),
    ],
)
def test_bad_assignments_are_config_errors(mapping: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=message):
        assign_threads(_sim(), LayerThreads.from_mapping(mapping), default=2)


def test_load_from_json(tmp_path: Path) -> None:
    good = tmp_path / "threads.json"
    good.write_text(json.dumps({"conv1": 1, "conv2": 4}))
    assert LayerThreads.load(good).to_dict() == {"conv1": 1, "conv2": 4}
    for text, message in [("[1, 2]", "JSON object"), ("{conv1: 1", "is not JSON")]:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            LayerThreads.load(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        LayerThreads.load(tmp_path / "missing.json")


def test_the_pass_leaves_its_input_alone() -> None:
    sim = _sim(threads=2)
    before = sim.SerializeToString()
    assign_threads(sim, LayerThreads.from_mapping({"conv1": 4}), default=2)
    assert sim.SerializeToString() == before
    assert np.isfinite(layer_macs(sim, {"x": (1, 3, 8, 8)}, 1).speedup or np.nan)
