"""The recalibration guard's decision rule and the per-channel shrinkage rule.

The guard is driven with tiny float ONNX models (``y = x + bias``) whose bias
depends on which "corrections" are kept, so which subset is closest to the
float model (``y = x``) is known in advance.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nbsmt_onnx.calibration import guard as g
from nbsmt_onnx.calibration.data import ArraySource, CalibrationData, model_inputs
from nbsmt_onnx.calibration.recalibrate import _correction, _shrink_factor
from nbsmt_onnx.calibration.statistics import ChannelStatistics


def _model(bias: np.ndarray) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    b = numpy_helper.from_array(np.asarray(bias, dtype=np.float32), "b")
    graph = helper.make_graph([helper.make_node("Add", ["x", "b"], ["y"])], "g", [x], [y], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _data(n: int = 64) -> CalibrationData:
    model = _model(np.zeros(4))
    specs = model_inputs(model)
    x = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32) * 3
    return CalibrationData(
        specs,
        source=ArraySource({"x": x}, specs, "test"),
        num_samples=n,
        batch_size=16,
        seed=0,
        description="test",
    )


def _builder(biases: dict[frozenset[str], float]):
    def build(keep: frozenset[str]) -> onnx.ModelProto:
        return _model(np.full(4, biases[keep]) * np.array([1.0, -1.0, 0.5, 0.0]))

    return build


UNITS = ["a", "b"]
A, AB = frozenset({"a"}), frozenset({"a", "b"})


@pytest.mark.parametrize(
    ("biases", "kept"),
    [
        ({frozenset(): 1.0, A: 0.5, AB: 0.0}, ("a", "b")),  # corrections help: keep all
        ({frozenset(): 0.0, A: 0.3, AB: 0.6}, ()),  # corrections hurt: keep none
        ({frozenset(): 1.0, A: 0.0, AB: 0.8}, ("a",)),  # the last block hurts: keep a prefix
    ],
)
def test_guard_keeps_the_prefix_closest_to_float(biases, kept):
    result = g.guard(UNITS, _builder(biases), _model(np.zeros(4)), _data(), blocks=2)
    assert result.kept == kept
    assert result.metric == "kl"  # [N, 4] outputs are classifier-like
    assert result.decision == {2: "all", 0: "none", 1: "partial"}[len(kept)]
    assert [b.kept for b in result.blocks] == [u in kept for u in UNITS]
    assert result.samples == 64


def test_guard_rejects_an_improvement_within_noise():
    # Same bias with or without the corrections: no improvement can beat one SE.
    biases = {frozenset(): 0.2, A: 0.2, AB: 0.2}
    result = g.guard(UNITS, _builder(biases), _model(np.zeros(4)), _data(), blocks=2)
    assert result.kept == () and result.chosen_vs_none is None


def test_non_finite_candidates_are_never_kept():
    def build(keep: frozenset[str]) -> onnx.ModelProto:
        return _model(np.full(4, np.nan if keep else 0.5, dtype=np.float32))

    result = g.guard(UNITS, build, _model(np.zeros(4)), _data(), blocks=2)
    assert result.kept == ()
    assert result.all_vs_none.improvement == -math.inf


def _affine(scale: float, bias: np.ndarray) -> onnx.ModelProto:
    """``y = scale * x + bias`` on ``[N, 4]`` (built on :func:`_model`'s Add)."""
    model = _model(bias)
    s = numpy_helper.from_array(np.full(4, scale, dtype=np.float32), "s")
    model.graph.initializer.append(s)
    model.graph.node.insert(0, helper.make_node("Mul", ["x", "s"], ["xs"]))
    model.graph.node[1].input[0] = "xs"
    return model


def test_a_check_that_gets_worse_vetoes_the_primary_improvement():
    # No correction: flattened logits (large KL, argmax never changes). All corrections:
    # the right temperature but a bias that flips the argmax of some samples (small KL,
    # more disagreement). The primary metric alone would keep them; the check vetoes.
    bias = np.array([1.0, -1.0, 0.5, 0.0])

    def build(keep: frozenset[str]) -> onnx.ModelProto:
        return _affine(1.0, bias) if keep == AB else _affine(0.2, np.zeros(4))

    flt, data = _model(np.zeros(4)), _data()
    result = g.guard(UNITS, build, flt, data, blocks=2)
    assert result.checks == ("disagreement",)
    last = result.blocks[-1]
    assert last.comparison.helps(2.0)  # KL improves by > 2 SE ...
    assert last.vetoed_by == ("disagreement",)  # ... but top-1 flips get significantly worse
    assert result.kept == () and result.decision == "none"
    assert "disagreement worse" in result.summary()
    # an infinite check margin turns the veto off: the KL improvement is kept
    lax = g.guard(UNITS, build, flt, data, blocks=2, check_margin=math.inf)
    assert lax.kept == ("a", "b")
    assert lax.chosen_checks["disagreement"].improvement < 0


def test_scoring_of_sequence_and_dense_outputs():
    rng = np.random.default_rng(5)
    seq = rng.normal(size=(6, 7, 5))
    probs = np.exp(seq) / np.exp(seq).sum(-1, keepdims=True)
    dense = rng.normal(size=(6, 1, 4, 4))
    scoring = g.choose_scoring({"seq": probs, "map": dense})
    assert scoring.primary == "1-cosine"
    assert scoring.checks == ("rel-error", "step-kl", "step-disagreement")
    assert scoring.sequences == {"seq"} and scoring.kinds == {"seq": "probabilities"}
    assert g.choose_scoring({"map": dense}).checks == ("rel-error",)
    cls = g.choose_scoring({"y": rng.normal(size=(6, 3))})
    assert (cls.primary, cls.checks) == ("kl", ("disagreement",))


def test_sequence_and_relative_losses_match_direct_computation():
    rng = np.random.default_rng(9)
    ref, out = rng.normal(size=(4, 6, 3)), rng.normal(size=(4, 6, 3))
    p = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True)
    q = np.exp(out) / np.exp(out).sum(-1, keepdims=True)
    np.testing.assert_allclose(
        g.sample_loss(ref, out, "step-kl", "logits"),
        (p * np.log(p / q)).sum(-1).mean(-1),
        rtol=1e-12,
    )
    np.testing.assert_array_equal(
        g.sample_loss(ref, out, "step-disagreement", "logits"),
        (ref.argmax(-1) != out.argmax(-1)).mean(-1),
    )
    np.testing.assert_allclose(
        g.sample_loss(ref, out, "rel-error", ""),
        ((out - ref) ** 2).sum((1, 2)) / (ref**2).sum((1, 2)),
        rtol=1e-12,
    )
    # a zero reference: 0 when matched, 1 otherwise (no division by zero)
    zero = np.zeros((2, 3))
    np.testing.assert_array_equal(
        g.sample_loss(zero, np.array([[0.0, 0, 0], [1, 0, 0]]), "rel-error", ""), [0.0, 1.0]
    )
    with pytest.raises(ValueError, match="unknown guard metric"):
        g.sample_loss(ref, out, "psnr", "")


def test_split_blocks_partitions_in_order():
    units = [f"u{i}" for i in range(10)]
    blocks = g.split_blocks(units, 4)
    assert [u for b in blocks for u in b] == units
    assert sorted(len(b) for b in blocks) == [2, 2, 3, 3]
    assert g.split_blocks(units[:3], 8) == [("u0",), ("u1",), ("u2",)]


def test_sample_losses_match_direct_computation():
    rng = np.random.default_rng(3)
    ref, out = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    p = np.exp(ref) / np.exp(ref).sum(1, keepdims=True)
    q = np.exp(out) / np.exp(out).sum(1, keepdims=True)
    np.testing.assert_allclose(
        g.sample_loss(ref, out, "kl", "logits"), (p * np.log(p / q)).sum(1), rtol=1e-12
    )
    cos = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
    np.testing.assert_allclose(g.sample_loss(ref, out, "1-cosine", ""), 1 - cos, rtol=1e-12)
    out[2, 1] = np.nan
    assert g.sample_loss(ref, out, "1-cosine", "")[2] == np.inf


def test_split_is_seeded_disjoint_and_complete():
    data = _data(40)
    est, held = data.split(0.25, seed=7)
    assert held.num_samples == 10 and est.num_samples == 30
    assert set(est.indices) | set(held.indices) == set(data.indices)
    assert not set(est.indices) & set(held.indices)
    assert data.split(0.25, seed=7)[1].indices == held.indices
    assert data.split(0.25, seed=8)[1].indices != held.indices


# ---------------------------------------------------------------- shrinkage


def _stats(per_sample: np.ndarray) -> ChannelStatistics:
    return ChannelStatistics.from_array(per_sample, channel_axis=1)


def test_known_shift_is_corrected_and_noise_is_left_alone():
    rng = np.random.default_rng(11)
    n, c = 256, 6
    clean = rng.normal(size=(n, c)) * 2.0
    # channels 0-2: a real NB-SMT shift of +0.5 (small per-sample spread);
    # channels 3-5: no true shift, per-sample noise of std 1 (estimated shift ~ N(0, 1/16)).
    noise = rng.normal(size=(n, c)) * np.array([0.05] * 3 + [1.0] * 3)
    measured = clean + np.array([0.5] * 3 + [0.0] * 3) + noise
    factor = _shrink_factor(measured, clean, 2.0)
    assert factor is not None
    plain = _correction("l", _stats(measured), _stats(clean), "mean", _unit_ratio())
    shrunk = _correction("l", _stats(measured), _stats(clean), "mean", _unit_ratio(), factor)
    # the real shift is corrected (almost) in full
    np.testing.assert_allclose(shrunk.shift[:3], -0.5, atol=0.02)
    np.testing.assert_allclose(factor[:3], 1.0, atol=0.01)
    # noise-level "shifts" are mostly not applied: shrunk correction well below the plain one
    assert np.all(np.abs(shrunk.shift[3:]) <= np.abs(plain.shift[3:]))
    assert np.mean(np.abs(shrunk.shift[3:])) < 0.5 * np.mean(np.abs(plain.shift[3:]))
    # K = 0 switches shrinkage off
    assert _shrink_factor(measured, clean, 0.0) is None


def test_shrinkage_needs_paired_samples():
    a = np.zeros((4, 3))
    assert _shrink_factor(a, np.zeros((5, 3)), 2.0) is None
    assert _shrink_factor(None, a, 2.0) is None


def _unit_ratio():
    from nbsmt_onnx.calibration.recalibrate import DEFAULT_RATIO

    return DEFAULT_RATIO
