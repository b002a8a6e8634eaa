"""Accuracy and fidelity metrics of ``nbsmt-onnx evaluate`` — pure NumPy, streaming.

Every metric is an *accumulator*: ``update`` takes one batch, ``result``
returns the value over everything seen so far, and ``merge`` combines two
accumulators (sharded evaluation gives the same result as one pass; merged
in sample order, the per-sample values are the same too). Besides float64
sums, the accumulators keep one small value per sample (a hit flag per
top-k, the agreement flag, KL, cosine and the SQNR's signal/noise sums:
~35 bytes per sample, never the outputs), which the uncertainty statistics
below need: the paired comparisons of two models on the same samples.

Definitions (docs/evaluate.md repeats them):

- **top-k accuracy**: the fraction of samples whose label is among the k
  largest outputs. Among exactly equal outputs the lower class index ranks
  first (as ``np.argmax`` does for top-1).
- **top-1 agreement**: the fraction of samples where ``argmax`` of the
  variant's output equals ``argmax`` of the reference (float) output.
- **mean KL divergence**: ``mean over samples of KL(p_ref || p_var) =
  sum_c p_ref[c] * (log p_ref[c] - log p_var[c])`` in nats, where ``p`` is the
  softmax of the output when the model outputs logits, or the output itself
  (clipped to ``PROB_FLOOR`` and renormalised) when it outputs probabilities.
  Which one applies is an option (``"logits"``, ``"probabilities"``) or
  detected from the reference model's first batch (``"auto"``, see
  :func:`detect_output_kind`).
- **cosine similarity**: the mean over samples of
  ``<ref, var> / (|ref| |var|)`` of the flattened outputs (1 when both are
  zero, 0 when only one is).
- **SQNR** (dB): ``10 log10(sum ref^2 / sum (ref - var)^2)`` over all
  elements of all samples (the ratio of the sums, not the mean of per-sample
  ratios, so a few near-zero samples cannot dominate). ``inf`` when the
  outputs are identical.

Uncertainty (docs/evaluate.md, "Uncertainty"), all at the 95 % level by default:

- :func:`wilson_interval` of a proportion (top-1, top-5, agreement);
- :func:`paired_proportion_difference`: the difference of two proportions
  measured on the same samples (a row vs its reference row): Newcombe's
  square-and-add interval for paired data (his method 10, Wilson limits of
  both margins combined with the continuity-corrected phi correlation, as
  recommended by Fagerland, Lydersen and Laake 2014), and McNemar's exact
  two-sided p-value (a binomial test on the discordant pairs);
- :func:`resample_means` + :func:`percentile_interval`: a seeded paired
  bootstrap over samples for the continuous metrics (KL, cosine, SQNR) and
  their differences — every column is resampled with the same sample
  indices, so differences are paired.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from nbsmt_onnx.errors import DataError, InternalError

OUTPUT_KINDS = ("auto", "logits", "probabilities")
#: Smallest probability used in log(p) when the model outputs probabilities
#: (a probability model may output exact zeros; log(0) would make KL infinite).
PROB_FLOOR = 1e-12
#: A batch is taken for probabilities when every value is in [0, 1] and every
#: row sums to 1 within this tolerance (float32 softmax rows sum to 1 within
#: ~1e-6 for 1000 classes; logits practically never pass both tests).
PROB_SUM_TOL = 1e-3


def as_classification(outputs: np.ndarray) -> np.ndarray | None:
    """``outputs`` as float64 ``[N, C]`` if they look like class scores, else None.

    Accepts ``[N, C]`` and ``[N, C, 1, ..., 1]`` (e.g. a 1x1 conv head) with
    ``C >= 2``; anything else (segmentation maps, detection boxes) is not a
    classification output and only gets cosine similarity / SQNR.
    """
    arr = np.asarray(outputs)
    if arr.ndim < 2 or any(d != 1 for d in arr.shape[2:]) or arr.shape[1] < 2:
        return None
    return arr.reshape(arr.shape[0], arr.shape[1]).astype(np.float64, copy=False)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (max-subtracted, so large logits do not overflow)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - np.max(x, axis=1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


def log_probabilities(outputs: np.ndarray, kind: str) -> np.ndarray:
    """Row-wise log-probabilities of ``[N, C]`` outputs that are logits or probabilities."""
    if kind == "logits":
        return log_softmax(outputs)
    if kind == "probabilities":
        p = np.clip(np.asarray(outputs, dtype=np.float64), PROB_FLOOR, None)
        return np.log(p / np.sum(p, axis=1, keepdims=True))
    raise InternalError(
        f"output kind must be resolved to 'logits' or 'probabilities'; got {kind!r}"
    )


def detect_output_kind(outputs: np.ndarray) -> str:
    """``"probabilities"`` if every row of ``[N, C]`` outputs is a distribution, else ``"logits"``."""
    arr = np.asarray(outputs, dtype=np.float64)
    if arr.size == 0:
        return "logits"
    in_range = bool(np.all(arr >= 0.0) and np.all(arr <= 1.0))
    sums_to_one = bool(np.all(np.abs(np.sum(arr, axis=1) - 1.0) <= PROB_SUM_TOL))
    return "probabilities" if in_range and sums_to_one else "logits"


@dataclass
class TopKAccuracy:
    """Streaming top-1 / top-5 accuracy against integer labels."""

    ks: tuple[int, ...] = (1, 5)
    count: int = 0
    correct: dict[int, int] = field(default_factory=dict)
    num_classes: int | None = None
    #: per k, one bool per sample (in update order): the label is among the k largest outputs
    hit_batches: dict[int, list[np.ndarray]] = field(default_factory=dict, repr=False)

    def update(self, outputs: np.ndarray, labels: np.ndarray) -> None:
        scores = as_classification(outputs)
        if scores is None:
            raise DataError(
                f"labels need a classification output [N, classes]; the model's output has shape "
                f"{tuple(np.shape(outputs))}; evaluate without --labels for fidelity metrics"
            )
        lab = np.asarray(labels)
        if lab.shape != (scores.shape[0],):
            raise InternalError(f"labels {lab.shape} do not match outputs {scores.shape}")
        c = scores.shape[1]
        if self.num_classes is None:
            self.num_classes = c
        if lab.size and (int(lab.min()) < 0 or int(lab.max()) >= c):
            bad = int(lab.max()) if int(lab.max()) >= c else int(lab.min())
            raise DataError(
                f"label {bad} is outside the model's {c} classes (0..{c - 1}); check the label file"
            )
        # Rank of the true class = number of classes with a strictly larger score,
        # plus equal scores at a lower index (the argsort tie order). Top-k hit iff rank < k.
        true = scores[np.arange(scores.shape[0]), lab][:, None]
        idx = np.arange(c)[None, :]
        rank = np.sum((scores > true) | ((scores == true) & (idx < lab[:, None])), axis=1)
        for k in self.ks:
            hit = rank < k
            self.correct[k] = self.correct.get(k, 0) + int(np.sum(hit))
            self.hit_batches.setdefault(k, []).append(hit)
        self.count += scores.shape[0]

    def merge(self, other: TopKAccuracy) -> None:
        """Add ``other``'s samples after this one's (per-sample values in that order)."""
        if other.ks != self.ks:
            raise InternalError("cannot merge accuracies with different k")
        self.count += other.count
        for k, v in other.correct.items():
            self.correct[k] = self.correct.get(k, 0) + v
        for k, batches in other.hit_batches.items():
            self.hit_batches.setdefault(k, []).extend(batches)
        self.num_classes = self.num_classes or other.num_classes

    def hits(self, k: int) -> np.ndarray | None:
        """One bool per sample: top-k hit; None when the model has fewer than k classes."""
        if k not in self.ks:
            raise InternalError(f"top-{k} is not accumulated (ks={self.ks})")
        if self.num_classes is not None and self.num_classes < k:
            return None
        return _concat(self.hit_batches.get(k, []), bool)

    def result(self) -> dict[str, float | None]:
        """``{"top1": ..., "top5": ...}``; top-k is None when the model has fewer than k classes."""
        out: dict[str, float | None] = {}
        for k in self.ks:
            valid = self.count > 0 and (self.num_classes is None or self.num_classes >= k)
            out[f"top{k}"] = self.correct.get(k, 0) / self.count if valid else None
        return out


@dataclass
class Agreement:
    """Streaming fidelity of a variant's outputs against reference (float) outputs.

    ``kind`` is ``"logits"`` or ``"probabilities"`` (resolved by the caller);
    classification metrics (agreement, KL) are None for non-classification outputs.
    """

    kind: str = "logits"
    count: int = 0
    classification: bool = True
    agree: int = 0
    kl_sum: float = 0.0
    cosine_sum: float = 0.0
    signal: float = 0.0
    noise: float = 0.0
    #: per-sample values in update order (:meth:`per_sample`), one array per batch
    batches: dict[str, list[np.ndarray]] = field(default_factory=dict, repr=False)

    def update(self, reference: np.ndarray, output: np.ndarray) -> None:
        ref = np.asarray(reference)
        out = np.asarray(output)
        if ref.shape != out.shape:
            raise DataError(
                f"the variant's output has shape {out.shape} but the float model's has {ref.shape}"
            )
        n = ref.shape[0] if ref.ndim else 1
        r = ref.reshape(n, -1).astype(np.float64)
        o = out.reshape(n, -1).astype(np.float64)
        diff = r - o
        signal_i = np.sum(r * r, axis=1)
        noise_i = np.sum(diff * diff, axis=1)
        self.signal += float(np.sum(r * r))
        self.noise += float(np.sum(diff * diff))
        self._keep("signal", signal_i)
        self._keep("noise", noise_i)
        rn = np.sqrt(np.sum(r * r, axis=1))
        on = np.sqrt(np.sum(o * o, axis=1))
        dot = np.sum(r * o, axis=1)
        both_zero = (rn == 0) & (on == 0)
        denom = np.where(rn * on > 0, rn * on, 1.0)
        cos = np.where(both_zero, 1.0, np.where(rn * on > 0, dot / denom, 0.0))
        self.cosine_sum += float(np.sum(cos))
        self._keep("cosine", cos)
        ref_c, out_c = as_classification(ref), as_classification(out)
        if ref_c is None or out_c is None:
            self.classification = False
            self.batches.pop("agree", None)
            self.batches.pop("kl", None)
        elif self.classification:
            agree = np.argmax(ref_c, axis=1) == np.argmax(out_c, axis=1)
            self.agree += int(np.sum(agree))
            lp = log_probabilities(ref_c, self.kind)
            lq = log_probabilities(out_c, self.kind)
            kl = np.sum(np.exp(lp) * (lp - lq), axis=1)
            self.kl_sum += float(np.sum(kl))
            self._keep("agree", agree)
            self._keep("kl", kl)
        self.count += n

    def _keep(self, key: str, values: np.ndarray) -> None:
        self.batches.setdefault(key, []).append(values)

    def merge(self, other: Agreement) -> None:
        """Add ``other``'s samples after this one's (per-sample values in that order)."""
        if other.kind != self.kind:
            raise InternalError("cannot merge agreements with different output kinds")
        self.count += other.count
        self.classification = self.classification and other.classification
        self.agree += other.agree
        self.kl_sum += other.kl_sum
        self.cosine_sum += other.cosine_sum
        self.signal += other.signal
        self.noise += other.noise
        for key, batches in other.batches.items():
            self.batches.setdefault(key, []).extend(batches)
        if not self.classification:
            self.batches.pop("agree", None)
            self.batches.pop("kl", None)

    def per_sample(self, key: str) -> np.ndarray | None:
        """One value per sample, in update order, of ``key``:

        ``"agree"`` (bool: same argmax as the reference), ``"kl"``, ``"cosine"``,
        ``"signal"`` / ``"noise"`` (the sample's sum of ref^2 / (ref - var)^2;
        SQNR = ratio of their sums). None for agree / kl of non-classification outputs.
        """
        if key not in ("agree", "kl", "cosine", "signal", "noise"):
            raise InternalError(f"unknown per-sample value {key!r}")
        if key in ("agree", "kl") and not self.classification:
            return None
        return _concat(self.batches.get(key, []), bool if key == "agree" else np.float64)

    def result(self) -> dict[str, float | None]:
        """``agreement``, ``kl``, ``cosine``, ``sqnr_db`` (None where not applicable)."""
        if self.count == 0:
            return {"agreement": None, "kl": None, "cosine": None, "sqnr_db": None}
        cls = self.classification
        return {
            "agreement": self.agree / self.count if cls else None,
            "kl": self.kl_sum / self.count if cls else None,
            "cosine": self.cosine_sum / self.count,
            "sqnr_db": sqnr_db(self.signal, self.noise),
        }


def _concat(batches: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(batches).astype(dtype, copy=False) if batches else np.zeros(0, dtype)


# --------------------------------------------------------------------------- uncertainty

#: Confidence level of every interval nbsmt-onnx reports.
LEVEL = 0.95
#: Bootstrap resamples (and seed) of the continuous metrics, unless configured otherwise.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
#: Resample-by-sample count matrices are built this many entries at a time (memory bound).
_BOOTSTRAP_CHUNK_ENTRIES = 4_000_000

WILSON = "wilson"
NEWCOMBE_PAIRED = "newcombe-paired"
MCNEMAR_EXACT = "mcnemar-exact"
BOOTSTRAP_PERCENTILE = "paired-bootstrap-percentile"


@dataclass(frozen=True)
class Interval:
    """A two-sided confidence interval ``[lo, hi]`` at ``level``, computed by ``method``."""

    lo: float
    hi: float
    method: str
    level: float = LEVEL

    def contains(self, value: float) -> bool:
        return self.lo <= value <= self.hi

    def to_dict(self) -> dict[str, float | str]:
        return {"lo": self.lo, "hi": self.hi, "method": self.method, "level": self.level}


@dataclass(frozen=True)
class PairedDifference:
    """``row - reference`` of one metric measured on the same samples, with its interval.

    For proportions also McNemar's exact p-value and the discordant pairs:
    ``row_only`` samples count for the row and not for the reference (e.g. the
    row is right, the reference wrong), ``reference_only`` the other way round.
    """

    estimate: float
    interval: Interval
    p_value: float | None = None
    p_method: str | None = None
    row_only: int | None = None
    reference_only: int | None = None
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"estimate": self.estimate, **self.interval.to_dict()}
        if self.p_value is not None:
            out.update(
                p_value=self.p_value,
                p_method=self.p_method,
                row_only=self.row_only,
                reference_only=self.reference_only,
            )
        out["samples"] = self.samples
        return out


def z_value(level: float = LEVEL) -> float:
    """The two-sided standard-normal quantile of ``level`` (1.959964 for 0.95)."""
    if not 0.0 < level < 1.0:
        raise InternalError(f"confidence level must be in (0, 1); got {level!r}")
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def _check_count(successes: int, n: int) -> None:
    if n <= 0:
        raise DataError(
            f"a proportion needs at least one sample; got n = {n} (is the evaluation data empty?)"
        )
    if not 0 <= successes <= n:
        raise InternalError(f"successes {successes} outside 0..{n}")


def wilson_interval(successes: int, n: int, level: float = LEVEL) -> Interval:
    """Wilson's score interval of the proportion ``successes / n``.

    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``; unlike the
    Wald interval it stays inside [0, 1] and is not empty at p = 0 or 1
    (0/n gives ``[0, z^2/(n+z^2)]``).
    """
    _check_count(successes, n)
    z = z_value(level)
    p = successes / n
    z2n = z * z / n
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n))
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(lo, hi, WILSON, level)


def mcnemar_exact_p(row_only: int, reference_only: int) -> float:
    """McNemar's exact two-sided p-value: ``2 P(X <= min(b, c))``, X ~ Bin(b + c, 1/2), at most 1.

    Only the discordant pairs carry information about the difference; with
    none the p-value is 1. Summed in log space (no overflow for ImageNet-size counts).
    """
    if row_only < 0 or reference_only < 0:
        raise InternalError("discordant pair counts must be >= 0")
    m = row_only + reference_only
    k = min(row_only, reference_only)
    if m == 0 or 2 * k >= m:
        return 1.0
    lg = math.lgamma(m + 1)
    logs = [lg - math.lgamma(i + 1) - math.lgamma(m - i + 1) for i in range(k + 1)]
    top = max(logs)
    log_tail = top + math.log(math.fsum(math.exp(v - top) for v in logs)) - m * math.log(2.0)
    return min(1.0, 2.0 * math.exp(log_tail))


def paired_proportion_difference(
    row: np.ndarray, reference: np.ndarray, level: float = LEVEL
) -> PairedDifference:
    """``mean(row) - mean(reference)`` of two per-sample success vectors on the same samples.

    Interval: Newcombe's square-and-add (hybrid score) interval for paired
    proportions (Newcombe 1998, method 10): with ``p1 = mean(row)``,
    ``p2 = mean(reference)``, their Wilson limits ``(l1, u1)``, ``(l2, u2)`` and
    the correlation ``psi`` of the 2x2 table (a = both succeed, b = row only,
    c = reference only, d = neither; ``A = ad - bc``; psi = (A - n/2)/sqrt(margins)
    if A > n/2, 0 if 0 <= A <= n/2, A/sqrt(margins) if A < 0, 0 if a margin is 0):

    ``lo = d - sqrt((p1-l1)^2 + (u2-p2)^2 - 2 psi (p1-l1)(u2-p2))``,
    ``hi = d + sqrt((p2-l2)^2 + (u1-p1)^2 - 2 psi (p2-l2)(u1-p1))``.

    Closed form, inside [-1, 1], not empty without discordant pairs, and
    with close-to-nominal coverage in the comparisons of Fagerland, Lydersen
    and Laake (2014). p-value: :func:`mcnemar_exact_p`.
    """
    r = np.asarray(row, dtype=bool)
    f = np.asarray(reference, dtype=bool)
    if r.shape != f.shape or r.ndim != 1:
        raise InternalError(f"paired vectors differ in shape: {r.shape} vs {f.shape}")
    n = int(r.size)
    if n == 0:
        _check_count(0, 0)
    a = int(np.sum(r & f))
    b = int(np.sum(r & ~f))
    c = int(np.sum(~r & f))
    d = n - a - b - c
    n1, n2 = a + b, a + c
    p1, p2 = n1 / n, n2 / n
    est = (b - c) / n
    w1, w2 = wilson_interval(n1, n, level), wilson_interval(n2, n, level)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    psi = 0.0
    if margins > 0:
        cross = a * d - b * c
        if cross > n / 2.0:
            psi = (cross - n / 2.0) / math.sqrt(margins)
        elif cross < 0:
            psi = cross / math.sqrt(margins)
    dl1, du2 = p1 - w1.lo, w2.hi - p2
    dl2, du1 = p2 - w2.lo, w1.hi - p1
    lo = est - math.sqrt(max(0.0, dl1 * dl1 + du2 * du2 - 2.0 * psi * dl1 * du2))
    hi = est + math.sqrt(max(0.0, dl2 * dl2 + du1 * du1 - 2.0 * psi * dl2 * du1))
    return PairedDifference(
        estimate=est,
        interval=Interval(max(-1.0, lo), min(1.0, hi), NEWCOMBE_PAIRED, level),
        p_value=mcnemar_exact_p(b, c),
        p_method=MCNEMAR_EXACT,
        row_only=b,
        reference_only=c,
        samples=n,
    )


def bootstrap_counts(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Seeded bootstrap resamples of ``n`` samples as count matrices ``[k, n]`` (float64), in chunks.

    Row ``j`` says how often each sample occurs in resample ``j`` (n draws with
    replacement). The draws depend only on ``(n, resamples, seed)``, so every
    metric and every row of a table see the same resamples (paired).
    """
    if n <= 0:
        raise DataError(f"the bootstrap needs at least one sample; got n = {n}")
    if resamples < 1:
        raise InternalError(f"resamples must be >= 1; got {resamples}")
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ENTRIES // n)
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(k, n))
        flat = (idx + (np.arange(k, dtype=np.int64) * n)[:, None]).ravel()
        yield np.bincount(flat, minlength=k * n).reshape(k, n).astype(np.float64)


def resample_means(
    values: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> np.ndarray:
    """Column means of ``values`` ``[n, m]`` under each bootstrap resample: ``[resamples, m]``.

    All columns share the resamples (:func:`bootstrap_counts`), so a statistic
    of two columns (a difference, a ratio of sums) is a paired bootstrap.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    n = x.shape[0]
    out = np.empty((resamples, x.shape[1]), dtype=np.float64)
    start = 0
    for counts in bootstrap_counts(n, resamples, seed):
        out[start : start + counts.shape[0]] = counts @ x / n
        start += counts.shape[0]
    return out


def percentile_interval(
    stats: np.ndarray, level: float = LEVEL, method: str = BOOTSTRAP_PERCENTILE
) -> Interval | None:
    """Percentile interval of bootstrap statistics: the order statistics ``s[k]``, ``s[B-1-k]``.

    ``k = floor(B (1 - level) / 2)`` (B = 2000 at 95 %: the 51st smallest and
    51st largest). Order statistics, not interpolation, so infinite values
    (an SQNR of identical resamples) stay meaningful. None if any statistic is NaN.
    """
    s = np.sort(np.asarray(stats, dtype=np.float64).ravel())
    if s.size == 0 or np.any(np.isnan(s)):
        return None
    k = math.floor(s.size * (1.0 - level) / 2.0 + 1e-9)  # 1e-9: float noise of (1 - level)
    return Interval(float(s[k]), float(s[s.size - 1 - k]), method, level)


def sqnr_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)``; ``inf`` for zero noise, ``-inf`` for zero signal with noise."""
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass
class SqnrAccumulator:
    """Streaming SQNR of one tensor (per-layer outputs): sums of ref^2 and (ref - x)^2."""

    signal: float = 0.0
    noise: float = 0.0
    count: int = 0

    def update(self, reference: np.ndarray, value: np.ndarray) -> None:
        r = np.asarray(reference, dtype=np.float64)
        v = np.asarray(value, dtype=np.float64)
        if r.shape != v.shape:
            raise InternalError(f"per-layer tensors differ in shape: {r.shape} vs {v.shape}")
        d = r - v
        self.signal += float(np.sum(r * r))
        self.noise += float(np.sum(d * d))
        self.count += int(r.shape[0]) if r.ndim else 1

    def merge(self, other: SqnrAccumulator) -> None:
        self.signal += other.signal
        self.noise += other.noise
        self.count += other.count

    def result(self) -> float | None:
        return sqnr_db(self.signal, self.noise) if self.count else None


__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "LEVEL",
    "OUTPUT_KINDS",
    "PROB_FLOOR",
    "Agreement",
    "Interval",
    "PairedDifference",
    "SqnrAccumulator",
    "TopKAccuracy",
    "as_classification",
    "bootstrap_counts",
    "detect_output_kind",
    "log_probabilities",
    "log_softmax",
    "mcnemar_exact_p",
    "paired_proportion_difference",
    "percentile_interval",
    "resample_means",
    "sqnr_db",
    "wilson_interval",
    "z_value",
]
