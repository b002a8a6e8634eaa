"""Evaluation metrics against hand-computed values (docs/evaluate.md has the definitions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nbsmt_onnx.errors import DataError
from nbsmt_onnx.metrics import (
    Agreement,
    SqnrAccumulator,
    TopKAccuracy,
    as_classification,
    detect_output_kind,
    log_softmax,
    sqnr_db,
)

# Two samples, three classes. By hand:
#   sample 0: ref [2, 1, 0] -> argmax 0; out [1, 2, 0] -> argmax 1 (disagree)
#   sample 1: ref = out = [0, 0, 1] -> argmax 2 (agree)
#   agreement = 1/2
#   KL(sample 0) = sum p (log p - log q) with p = softmax(ref), q = softmax(out);
#     log p - log q = [2-1, 1-2, 0] (same normaliser Z = e^2 + e + 1), so
#     KL = p0 - p1 = (e^2 - e) / (e^2 + e + 1) = 0.42051...; KL(sample 1) = 0
#   cosine: sample 0 = (2*1 + 1*2) / (sqrt5 * sqrt5) = 0.8; sample 1 = 1 -> mean 0.9
#   SQNR: signal = 4 + 1 + 1 = 6, noise = 1 + 1 = 2 -> 10 log10(3) dB
REF = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
OUT = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
E = math.e
KL0 = (E**2 - E) / (E**2 + E + 1)

# float64 sums of a handful of values: agree to ~1e-15; 1e-12 leaves room for
# the float32 inputs' exact conversion and the log/exp round trip.
TOL = 1e-12


def test_agreement_hand_computed() -> None:
    acc = Agreement(kind="logits")
    acc.update(REF, OUT)
    res = acc.result()
    assert res["agreement"] == 0.5
    assert res["kl"] == pytest.approx(KL0 / 2, abs=TOL)
    assert res["cosine"] == pytest.approx(0.9, abs=TOL)
    assert res["sqnr_db"] == pytest.approx(10 * math.log10(3.0), abs=TOL)


def test_agreement_streaming_equals_one_pass_and_merge() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((37, 10)).astype(np.float32)
    out = (ref + 0.3 * rng.standard_normal((37, 10))).astype(np.float32)
    whole = Agreement()
    whole.update(ref, out)
    streamed = Agreement()
    for start in range(0, 37, 8):
        streamed.update(ref[start : start + 8], out[start : start + 8])
    left, right = Agreement(), Agreement()
    left.update(ref[:20], out[:20])
    right.update(ref[20:], out[20:])
    left.merge(right)
    for other in (streamed, left):
        for key, value in whole.result().items():
            # sums in a different order: equal to float64 rounding
            assert other.result()[key] == pytest.approx(value, rel=1e-12, abs=1e-15)


def test_kl_of_probabilities_equals_kl_of_their_logits() -> None:
    p_ref = np.exp(log_softmax(REF))
    p_out = np.exp(log_softmax(OUT))
    assert detect_output_kind(p_ref) == "probabilities"
    assert detect_output_kind(REF) == "logits"
    acc = Agreement(kind="probabilities")
    acc.update(p_ref.astype(np.float32), p_out.astype(np.float32))
    # float32 probabilities: log-ratios carry ~1e-7 relative rounding
    assert acc.result()["kl"] == pytest.approx(KL0 / 2, rel=1e-6)


def test_probability_detection_rejects_non_distributions() -> None:
    assert detect_output_kind(np.array([[0.2, 0.2]])) == "logits"  # sums to 0.4
    assert detect_output_kind(np.array([[1.5, -0.5]])) == "logits"  # sums to 1, out of range


def test_identical_outputs() -> None:
    acc = Agreement()
    acc.update(REF, REF)
    res = acc.result()
    assert res["agreement"] == 1.0
    assert res["kl"] == pytest.approx(0.0, abs=TOL)
    assert res["cosine"] == pytest.approx(1.0, abs=TOL)
    assert res["sqnr_db"] == math.inf


def test_cosine_of_zero_vectors() -> None:
    acc = Agreement()
    zero = np.zeros((1, 3), dtype=np.float32)
    acc.update(zero, zero)  # both zero: identical -> 1
    acc.update(zero, np.ones((1, 3), dtype=np.float32))  # one zero: orthogonal -> 0
    assert acc.result()["cosine"] == pytest.approx(0.5, abs=TOL)


def test_non_classification_output_gets_only_cosine_and_sqnr() -> None:
    ref = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    acc = Agreement()
    acc.update(ref, ref * 0.5)
    res = acc.result()
    assert res["agreement"] is None and res["kl"] is None
    assert res["cosine"] == pytest.approx(1.0, abs=TOL)
    # noise = (0.5 x)^2 -> SQNR = 10 log10(4)
    assert res["sqnr_db"] == pytest.approx(10 * math.log10(4.0), abs=TOL)


def test_as_classification_shapes() -> None:
    assert as_classification(np.zeros((4, 10, 1, 1))).shape == (4, 10)
    assert as_classification(np.zeros((4, 10, 2, 1))) is None
    assert as_classification(np.zeros((4,))) is None
    assert as_classification(np.zeros((4, 1))) is None


def test_topk_hand_computed() -> None:
    acc = TopKAccuracy(ks=(1, 2))
    labels = np.array([1, 2])
    acc.update(REF, labels)  # sample 0: label 1 is second -> top-1 miss, top-2 hit
    assert acc.result() == {"top1": 0.5, "top2": 1.0}
    acc.update(OUT, labels)  # both top-1 hits
    assert acc.result() == {"top1": 0.75, "top2": 1.0}


def test_topk_ties_rank_lower_index_first() -> None:
    acc = TopKAccuracy(ks=(1,))
    acc.update(np.array([[1.0, 1.0, 0.0]]), np.array([1]))  # argmax picks class 0
    assert acc.result()["top1"] == 0.0
    acc2 = TopKAccuracy(ks=(1,))
    acc2.update(np.array([[1.0, 1.0, 0.0]]), np.array([0]))
    assert acc2.result()["top1"] == 1.0


def test_top5_is_none_with_fewer_than_five_classes() -> None:
    acc = TopKAccuracy()
    acc.update(REF, np.array([0, 2]))
    assert acc.result() == {"top1": 1.0, "top5": None}


def test_topk_rejects_labels_outside_the_classes() -> None:
    with pytest.raises(DataError, match="outside the model's 3 classes"):
        TopKAccuracy().update(REF, np.array([0, 3]))


def test_topk_merge() -> None:
    a, b = TopKAccuracy(), TopKAccuracy()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 8))
    y = rng.integers(0, 8, 20)
    a.update(x[:7], y[:7])
    b.update(x[7:], y[7:])
    a.merge(b)
    whole = TopKAccuracy()
    whole.update(x, y)
    assert a.result() == whole.result()
    # independent check: top-5 via argsort
    top5 = np.argsort(-x, axis=1, kind="stable")[:, :5]
    assert whole.result()["top5"] == np.mean([y[i] in top5[i] for i in range(20)])


def test_sqnr_accumulator() -> None:
    acc = SqnrAccumulator()
    assert acc.result() is None
    ref = np.array([[3.0, 4.0]])
    acc.update(ref, np.array([[3.0, 3.0]]))  # signal 25, noise 1
    assert acc.result() == pytest.approx(10 * math.log10(25.0), abs=TOL)
    assert sqnr_db(0.0, 1.0) == -math.inf
    assert sqnr_db(1.0, 0.0) == math.inf
