"""Accuracy and fidelity metrics of ``nbsmt-onnx evaluate`` — pure NumPy, streaming.

Every metric is an *accumulator*: ``update`` takes one batch, ``result``
returns the value over everything seen so far, and ``merge`` combines two
accumulators (sharded evaluation gives the same result as one pass). Only
sums are kept, never the outputs themselves, so memory does not grow with
the number of samples. All sums are float64.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
            self.correct[k] = self.correct.get(k, 0) + int(np.sum(rank < k))
        self.count += scores.shape[0]

    def merge(self, other: TopKAccuracy) -> None:
        if other.ks != self.ks:
            raise InternalError("cannot merge accuracies with different k")
        self.count += other.count
        for k, v in other.correct.items():
            self.correct[k] = self.correct.get(k, 0) + v
        self.num_classes = self.num_classes or other.num_classes

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
        self.signal += float(np.sum(r * r))
        self.noise += float(np.sum(diff * diff))
        rn = np.sqrt(np.sum(r * r, axis=1))
        on = np.sqrt(np.sum(o * o, axis=1))
        dot = np.sum(r * o, axis=1)
        both_zero = (rn == 0) & (on == 0)
        denom = np.where(rn * on > 0, rn * on, 1.0)
        cos = np.where(both_zero, 1.0, np.where(rn * on > 0, dot / denom, 0.0))
        self.cosine_sum += float(np.sum(cos))
        ref_c, out_c = as_classification(ref), as_classification(out)
        if ref_c is None or out_c is None:
            self.classification = False
        elif self.classification:
            self.agree += int(np.sum(np.argmax(ref_c, axis=1) == np.argmax(out_c, axis=1)))
            lp = log_probabilities(ref_c, self.kind)
            lq = log_probabilities(out_c, self.kind)
            self.kl_sum += float(np.sum(np.exp(lp) * (lp - lq)))
        self.count += n

    def merge(self, other: Agreement) -> None:
        if other.kind != self.kind:
            raise InternalError("cannot merge agreements with different output kinds")
        self.count += other.count
        self.classification = self.classification and other.classification
        self.agree += other.agree
        self.kl_sum += other.kl_sum
        self.cosine_sum += other.cosine_sum
        self.signal += other.signal
        self.noise += other.noise

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
    "OUTPUT_KINDS",
    "PROB_FLOOR",
    "Agreement",
    "SqnrAccumulator",
    "TopKAccuracy",
    "as_classification",
    "detect_output_kind",
    "log_probabilities",
    "log_softmax",
    "sqnr_db",
]
