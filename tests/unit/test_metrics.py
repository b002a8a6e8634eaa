"""Evaluation metrics against hand-computed values (docs/evaluate.md has the definitions)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from nbsmt_onnx.errors import DataError
from nbsmt_onnx.metrics import (
    Agreement,
    SqnrAccumulator,
    TopKAccuracy,
    as_classification,
    bootstrap_counts,
    detect_output_kind,
    log_softmax,
    mcnemar_exact_p,
    paired_proportion_difference,
    percentile_interval,
    resample_means,
    sqnr_db,
    wilson_interval,
    z_value,
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


# --------------------------------------------------------------------------- uncertainty

Z95 = 1.959963984540054  # standard-normal 97.5 % quantile (tables: 1.95996)


def _wilson_by_quadratic(k: int, n: int) -> tuple[float, float]:
    """Wilson's limits as the roots of (p_hat - p)^2 = z^2 p (1 - p) / n, solved for p."""
    ph = k / n
    # (1 + z^2/n) p^2 - (2 ph + z^2/n) p + ph^2 = 0
    a = 1 + Z95**2 / n
    b = -(2 * ph + Z95**2 / n)
    c = ph**2
    disc = math.sqrt(b * b - 4 * a * c)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


@pytest.mark.parametrize(
    ("k", "n", "published"),
    [
        # Wilson 95 % limits as tabulated (e.g. Newcombe 1998, Brown-Cai-DasGupta 2001), 4 decimals
        (8, 10, (0.4902, 0.9433)),
        (0, 10, (0.0, 0.2775)),
        (10, 10, (0.7225, 1.0)),
        (81, 263, (0.2553, 0.3662)),  # Newcombe's (1998) example 81/263
    ],
)
def test_wilson_interval_hand_computed(k: int, n: int, published: tuple[float, float]) -> None:
    iv = wilson_interval(k, n)
    lo, hi = _wilson_by_quadratic(k, n)
    # two closed forms of the same roots: equal to float64 rounding
    assert iv.lo == pytest.approx(lo, abs=1e-12) and iv.hi == pytest.approx(hi, abs=1e-12)
    # the published values are rounded to 4 decimals
    assert iv.lo == pytest.approx(published[0], abs=5e-5)
    assert iv.hi == pytest.approx(published[1], abs=5e-5)
    assert iv.method == "wilson" and iv.level == 0.95
    assert z_value() == pytest.approx(Z95, abs=1e-12)


def test_wilson_edges_and_empty() -> None:
    # p = 0 and p = 1 are exact ends (no float residue), the other end is z^2 / (n + z^2)
    assert wilson_interval(0, 50).lo == 0.0
    assert wilson_interval(50, 50).hi == 1.0
    assert wilson_interval(0, 50).hi == pytest.approx(Z95**2 / (50 + Z95**2), abs=1e-12)
    with pytest.raises(DataError, match="at least one sample"):
        wilson_interval(0, 0)
    with pytest.raises(DataError, match="at least one sample"):
        paired_proportion_difference(np.zeros(0, bool), np.zeros(0, bool))


def _pairs(a: int, b: int, c: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample vectors of a paired 2x2 table: a both, b row only, c reference only, d neither."""
    row = np.array([1] * a + [1] * b + [0] * c + [0] * d, dtype=bool)
    ref = np.array([1] * a + [0] * b + [1] * c + [0] * d, dtype=bool)
    return row, ref


def test_paired_difference_published_example() -> None:
    # Cavo et al. (2012) complete response before/after consolidation, 161 patients:
    # a=59, b=6, c=16, d=80. Fagerland, Lydersen & Laake, "Statistical Analysis of
    # Contingency Tables" (2017) ch. 8: Newcombe square-and-add -0.0621 (-0.1186 to -0.0046);
    # McNemar exact conditional p = 0.052.
    row, ref = _pairs(59, 6, 16, 80)
    d = paired_proportion_difference(row, ref)
    assert d.estimate == pytest.approx(-10 / 161, abs=1e-15)
    assert d.interval.lo == pytest.approx(-0.1186, abs=5e-5)
    assert d.interval.hi == pytest.approx(-0.0046, abs=5e-5)
    assert (d.row_only, d.reference_only, d.samples) == (6, 16, 161)
    # exact: 2 * sum_{i<=6} C(22, i) / 2^22
    exact = Fraction(2 * sum(math.comb(22, i) for i in range(7)), 2**22)
    assert d.p_value == pytest.approx(float(exact), rel=1e-12)
    # swapping the two models mirrors the interval
    m = paired_proportion_difference(ref, row)
    assert m.interval.lo == pytest.approx(-d.interval.hi, abs=1e-15)
    assert m.interval.hi == pytest.approx(-d.interval.lo, abs=1e-15)
    assert m.p_value == d.p_value


def test_paired_difference_without_discordant_pairs() -> None:
    row, ref = _pairs(150, 0, 0, 50)
    d = paired_proportion_difference(row, ref)
    assert d.estimate == 0.0 and d.p_value == 1.0
    assert d.interval.lo < 0.0 < d.interval.hi  # no evidence either way, but not a point
    # both models always right: the margins are degenerate (psi = 0), the interval is
    # +-(1 - Wilson lower bound of n/n) = +-z^2 / (n + z^2)
    row, ref = _pairs(100, 0, 0, 0)
    d = paired_proportion_difference(row, ref)
    w = Z95**2 / (100 + Z95**2)
    assert d.interval.lo == pytest.approx(-w, abs=1e-12)
    assert d.interval.hi == pytest.approx(w, abs=1e-12)


@pytest.mark.parametrize(("b", "c"), [(0, 5), (3, 9), (10, 10), (40, 21), (310, 402)])
def test_mcnemar_exact_p_against_brute_force(b: int, c: int) -> None:
    # brute force in exact rationals: 2 * P(X <= min(b, c)), X ~ Bin(b + c, 1/2), capped at 1
    m, k = b + c, min(b, c)
    tail = Fraction(sum(math.comb(m, i) for i in range(k + 1)), 2**m)
    expected = min(Fraction(1), 2 * tail)
    # the implementation sums in log space: ~1e-13 relative error for these sizes
    assert mcnemar_exact_p(b, c) == pytest.approx(float(expected), rel=1e-10)
    assert mcnemar_exact_p(0, 0) == 1.0


def test_paired_difference_coverage() -> None:
    """Coverage of the paired interval on simulated tables with a known true difference.

    2000 simulated studies per case: the Monte Carlo standard error of a 95 %
    coverage is 0.005, so [0.93, 0.985] is +-3-4 standard errors around the
    nominal level, leaving room for the method's known slight conservatism.
    """
    rng = np.random.default_rng(1)
    for probs, n in [((0.86, 0.04, 0.06, 0.04), 200), ((0.95, 0.01, 0.03, 0.01), 300)]:
        truth = probs[1] - probs[2]
        covered = 0
        for _ in range(2000):
            cells = rng.choice(4, size=n, p=probs)
            row, ref = (cells == 0) | (cells == 1), (cells == 0) | (cells == 2)
            covered += paired_proportion_difference(row, ref).interval.contains(truth)
        assert 0.93 <= covered / 2000 <= 0.985


def test_bootstrap_is_deterministic_and_paired() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 2))
    a = resample_means(x, 500, seed=7)
    assert np.array_equal(a, resample_means(x, 500, seed=7))
    assert not np.array_equal(a, resample_means(x, 500, seed=8))
    # a column's resamples do not depend on the other columns (same rows of counts);
    # BLAS sums a matrix-vector and a matrix-matrix product in different orders: 1e-12
    alone = resample_means(x[:, :1], 500, seed=7)[:, 0]
    np.testing.assert_allclose(a[:, 0], alone, rtol=1e-12, atol=1e-15)
    # each resample is a mean of n draws with replacement: the counts sum to n
    for counts in bootstrap_counts(300, 500, seed=7):
        assert np.all(counts.sum(axis=1) == 300)
    with pytest.raises(DataError, match="at least one sample"):
        resample_means(np.zeros((0, 1)), 100)


def test_percentile_interval_order_statistics() -> None:
    iv = percentile_interval(np.arange(2000.0)[::-1])
    assert (iv.lo, iv.hi) == (50.0, 1949.0)  # 51st smallest and 51st largest
    inf = percentile_interval(np.array([1.0] * 10 + [math.inf] * 90))
    assert inf is not None and inf.hi == math.inf
    assert percentile_interval(np.array([1.0, math.nan])) is None


def test_bootstrap_interval_of_a_known_difference() -> None:
    """Paired bootstrap of a mean difference: covers the truth, excludes 0 for a large effect.

    200 simulated studies (n = 200, 500 resamples): the true mean difference is
    0.3 by construction; coverage of a percentile interval for a mean at n = 200
    is close to 95 % (Monte Carlo SE 0.015 at 200 studies), so [0.89, 0.99].
    The effect (0.3 with per-sample difference SD 0.5) is 8.5 standard errors
    from 0 at n = 200, so every interval excludes 0; with no effect most contain 0.
    """
    rng = np.random.default_rng(11)
    covered = excluded = null_covered = 0
    for study in range(200):
        ref = rng.exponential(1.0, 200)  # skewed like per-sample KL
        row = ref + 0.3 + 0.5 * rng.standard_normal(200)
        null = ref + 0.5 * rng.standard_normal(200)
        means = resample_means(np.stack([row, ref, null], axis=1), 500, seed=study)
        iv = percentile_interval(means[:, 0] - means[:, 1])
        iv0 = percentile_interval(means[:, 2] - means[:, 1])
        assert iv is not None and iv0 is not None
        covered += iv.contains(0.3)
        excluded += not iv.contains(0.0)
        null_covered += iv0.contains(0.0)
    assert 0.89 <= covered / 200 <= 0.99
    assert excluded == 200
    assert null_covered / 200 >= 0.89


def test_per_sample_values_match_the_sums_and_merge_in_order() -> None:
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((30, 6)).astype(np.float32)
    out = (ref + 0.5 * rng.standard_normal((30, 6))).astype(np.float32)
    labels = rng.integers(0, 6, 30)
    whole, left, right = Agreement(), Agreement(), Agreement()
    whole.update(ref, out)
    left.update(ref[:11], out[:11])
    right.update(ref[11:], out[11:])
    left.merge(right)
    for key in ("agree", "kl", "cosine", "signal", "noise"):
        a, b = whole.per_sample(key), left.per_sample(key)
        assert a is not None and b is not None and a.shape == (30,)
        assert np.array_equal(a, b)
    res = whole.result()
    assert int(np.sum(whole.per_sample("agree"))) == whole.agree
    # sums of the per-sample values equal the running sums (float64, 30 terms)
    assert np.sum(whole.per_sample("kl")) / 30 == pytest.approx(res["kl"], rel=1e-12)
    assert np.sum(whole.per_sample("cosine")) / 30 == pytest.approx(res["cosine"], rel=1e-12)
    sig, noi = np.sum(whole.per_sample("signal")), np.sum(whole.per_sample("noise"))
    assert sqnr_db(sig, noi) == pytest.approx(res["sqnr_db"], rel=1e-12)
    # independent check of the agreement flags
    assert np.array_equal(whole.per_sample("agree"), ref.argmax(1) == out.argmax(1))

    acc, acc_l, acc_r = TopKAccuracy(), TopKAccuracy(), TopKAccuracy()
    acc.update(out, labels)
    acc_l.update(out[:11], labels[:11])
    acc_r.update(out[11:], labels[11:])
    acc_l.merge(acc_r)
    assert np.array_equal(acc.hits(1), out.argmax(1) == labels)
    assert np.array_equal(acc.hits(5), acc_l.hits(5))
    assert int(np.sum(acc.hits(5))) == acc.correct[5]
    assert TopKAccuracy().hits(1).shape == (0,)
    small = TopKAccuracy()
    small.update(REF, np.array([0, 2]))
    assert small.hits(5) is None  # 3 classes: top-5 does not apply
    spatial = Agreement()
    spatial.update(np.ones((2, 3, 2, 2)), np.ones((2, 3, 2, 2)))
    assert spatial.per_sample("agree") is None and spatial.per_sample("kl") is None
