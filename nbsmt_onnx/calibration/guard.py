"""The held-out guard: recalibration is kept only where it makes the model closer to float.

Recalibration estimates per-channel statistics on calibration samples. On
some models (BN-fused detectors and recognisers, heads before sigmoid or
softmax) those corrections do not transfer to other data, and the corrected
model is further from the float model than the uncorrected one. The guard
checks this on samples the corrections were *not* estimated on
(docs/recalibration.md, "The guard"):

1. the float model is run on the held-out samples once; its outputs are the
   reference;
2. every candidate model is scored per held-out sample by its distance to the
   reference: the KL divergence KL(float ‖ candidate) when every output is
   classifier-like (``[N, C]`` scores), else ``1 - cosine`` of each output,
   averaged over outputs (``metric`` in the result);
3. the corrections, in graph order, are grouped into at most ``blocks``
   contiguous blocks, and every prefix (blocks 1..k, k = 1..B; the last is
   "all corrections") is scored. Only prefixes: each correction was estimated
   with every upstream one applied, so a prefix is the one kind of subset
   whose corrections are consistent with each other; it also cuts exactly the
   tail where fused models are fragile (layers before sigmoid / softmax
   heads). The prefix with the lowest mean loss is kept if it beats "no
   correction" by more than ``margin`` standard errors of the paired
   per-sample difference; otherwise nothing is kept and the output is the
   model without recalibration, parameter for parameter.

The guard does not know what a correction is: it receives the unit names
(BN or layer names) and a function that builds the model with a subset of
them applied (``calibration.recalibrate.apply_recalibration``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from nbsmt_onnx.calibration.data import CalibrationData
from nbsmt_onnx.compare import OutputCollector, concatenate
from nbsmt_onnx.errors import DataError
from nbsmt_onnx.metrics import (
    as_classification,
    detect_output_kind,
    log_probabilities,
    z_value,
)
from nbsmt_onnx.runtime.executor import Executor, Job, LocalExecutor

logger = logging.getLogger(__name__)

#: Held-out fraction of the calibration samples (when no separate guard data is given).
DEFAULT_FRACTION = 0.25
#: Blocks of corrections the guard accepts or rejects one by one.
DEFAULT_BLOCKS = 8
#: A change is kept when it lowers the mean held-out loss by more than this many
#: standard errors of the paired per-sample differences. 2, not 1: the best of up
#: to 8 prefixes is taken, and with tens of held-out samples a 1-SE "improvement"
#: of the best prefix did not carry over to other data (docs/recalibration.md §8.2).
DEFAULT_MARGIN = 2.0
#: Below this many held-out samples the guard cannot tell anything from noise.
MIN_SAMPLES = 8
METRICS = ("kl", "1-cosine")

BuildFn = Callable[[frozenset[str]], onnx.ModelProto]


@dataclass(frozen=True)
class LossReducer:
    """Executor reducer: per-sample loss of a model's outputs against reference outputs."""

    names: tuple[str, ...]
    reference: Mapping[str, np.ndarray]
    metric: str
    kinds: Mapping[str, str] = field(default_factory=dict)

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.names

    def reduce(
        self, outputs: Sequence[np.ndarray], batch: Mapping[str, np.ndarray], first_sample: int
    ) -> np.ndarray:
        losses = []
        for name, value in zip(self.names, outputs, strict=True):
            arr = np.asarray(value)
            ref = self.reference[name][first_sample : first_sample + arr.shape[0]]
            losses.append(sample_loss(ref, arr, self.metric, self.kinds.get(name, "logits")))
        return np.mean(losses, axis=0)

    def merge(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return np.concatenate([left, right])


def sample_loss(reference: np.ndarray, value: np.ndarray, metric: str, kind: str) -> np.ndarray:
    """Per-sample distance of ``value`` to ``reference`` (axis 0 = samples); inf where non-finite."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(value, dtype=np.float64)
    n = ref.shape[0]
    bad = ~np.isfinite(out.reshape(n, -1)).all(axis=1)
    if metric == "kl":
        ref_c, out_c = as_classification(ref), as_classification(np.nan_to_num(out))
        assert ref_c is not None and out_c is not None
        lp_ref = log_probabilities(ref_c, kind)
        lp = log_probabilities(out_c, kind)
        loss = np.sum(np.exp(lp_ref) * (lp_ref - lp), axis=1)
    else:
        a = ref.reshape(n, -1)
        b = np.nan_to_num(out).reshape(n, -1)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where(
                (na > 0) & (nb > 0),
                np.sum(a * b, axis=1) / np.where(na * nb > 0, na * nb, 1.0),
                np.where((na == 0) & (nb == 0), 1.0, 0.0),
            )
        loss = 1.0 - cos
    return np.where(bad, np.inf, loss)


@dataclass(frozen=True)
class Comparison:
    """Paired per-sample difference ``loss(before) - loss(after)`` (> 0: after is closer)."""

    before: float
    after: float
    improvement: float
    se: float

    @classmethod
    def of(cls, before: np.ndarray, after: np.ndarray) -> Comparison:
        if not (np.all(np.isfinite(before)) and np.all(np.isfinite(after))):
            worse = not np.all(np.isfinite(after))
            return cls(
                float(np.mean(before)),
                float(np.mean(after)),
                -math.inf if worse else math.inf,
                0.0,
            )
        d = before - after
        se = float(np.std(d, ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.inf
        return cls(float(np.mean(before)), float(np.mean(after)), float(np.mean(d)), se)

    def helps(self, margin: float) -> bool:
        return self.improvement > 0 and self.improvement > margin * self.se

    def to_dict(self) -> dict[str, Any]:
        z = z_value()
        return {
            "loss_before": self.before,
            "loss_after": self.after,
            "improvement": self.improvement,
            "se": self.se,
            "interval95": [self.improvement - z * self.se, self.improvement + z * self.se],
        }


@dataclass(frozen=True)
class GuardBlock:
    """One block of corrections; ``comparison``: no correction vs blocks 1 .. this one."""

    units: tuple[str, ...]
    kept: bool
    comparison: Comparison


@dataclass(frozen=True)
class GuardResult:
    """What the guard decided and the held-out evidence for it."""

    metric: str
    samples: int
    data: str
    margin: float
    kept: tuple[str, ...]
    rejected: tuple[str, ...]
    blocks: tuple[GuardBlock, ...]
    #: all corrections applied vs none (also the last block's comparison)
    all_vs_none: Comparison
    #: the kept model vs none (None when nothing is kept)
    chosen_vs_none: Comparison | None
    #: model evaluations on the held-out samples (the float reference included)
    evaluations: int

    @property
    def decision(self) -> str:
        if not self.kept:
            return "none"
        return "all" if not self.rejected else "partial"

    def summary(self) -> str:
        """One line for the CLI and the log."""
        total = len(self.kept) + len(self.rejected)
        comp = self.chosen_vs_none or self.all_vs_none
        what = {
            "none": f"kept none of {total} correction(s): no held-out improvement",
            "all": f"kept all {total} correction(s)",
            "partial": f"kept {len(self.kept)} of {total} correction(s)",
        }[self.decision]
        return (
            f"{what}; held-out {self.metric} to float {comp.before:.4g} -> "
            f"{comp.after if self.kept else comp.before:.4g} "
            f"({self.samples} samples; all corrections: {self.all_vs_none.after:.4g})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "metric": self.metric,
            "samples": self.samples,
            "data": self.data,
            "margin_se": self.margin,
            "kept": list(self.kept),
            "rejected": list(self.rejected),
            "all_vs_none": self.all_vs_none.to_dict(),
            "chosen_vs_none": None
            if self.chosen_vs_none is None
            else self.chosen_vs_none.to_dict(),
            "blocks": [
                {"units": list(b.units), "kept": b.kept, **b.comparison.to_dict()}
                for b in self.blocks
            ],
            "evaluations": self.evaluations,
            "summary": self.summary(),
        }


def split_blocks(units: Sequence[str], blocks: int) -> list[tuple[str, ...]]:
    """``units`` (graph order) in at most ``blocks`` contiguous groups of near-equal size."""
    n = len(units)
    k = max(1, min(blocks, n))
    edges = [round(i * n / k) for i in range(k + 1)]
    return [tuple(units[edges[i] : edges[i + 1]]) for i in range(k) if edges[i + 1] > edges[i]]


def choose_metric(reference: Mapping[str, np.ndarray]) -> tuple[str, dict[str, str]]:
    """KL when every output is classifier-like (with logits/probabilities detected), else 1-cosine."""
    scores = {n: as_classification(v) for n, v in reference.items()}
    if all(s is not None for s in scores.values()):
        return "kl", {n: detect_output_kind(s) for n, s in scores.items() if s is not None}
    return "1-cosine", {}


def guard(
    units: Sequence[str],
    build: BuildFn,
    float_model: onnx.ModelProto,
    heldout: CalibrationData,
    *,
    blocks: int = DEFAULT_BLOCKS,
    margin: float = DEFAULT_MARGIN,
    executor: Executor | None = None,
    progress: Callable[[str], None] | None = None,
) -> GuardResult:
    """Choose which of ``units`` to keep by held-out fidelity to ``float_model`` (module doc)."""
    run = executor or LocalExecutor()
    names = tuple(o.name for o in float_model.graph.output)
    if progress is not None:
        progress("float reference")
    collected: dict[str, list[np.ndarray]] = run.run(
        Job(float_model, heldout, OutputCollector(names), what="float model")
    )
    reference = concatenate(collected)
    samples = heldout.num_samples
    usable = {
        n: v
        for n, v in reference.items()
        if v.ndim >= 1 and v.shape[0] == samples and np.issubdtype(v.dtype, np.floating)
    }
    if not usable:
        raise DataError(
            "the guard found no float output with one entry per sample to compare; pass --no-guard"
        )
    metric, kinds = choose_metric(usable)
    reducer = LossReducer(tuple(usable), usable, metric, kinds)
    cache: dict[frozenset[str], np.ndarray] = {}

    def loss(keep: frozenset[str], what: str) -> np.ndarray:
        if keep not in cache:
            if progress is not None:
                progress(what)
            cache[keep] = run.run(
                Job(build(keep), heldout, reducer, what=f"guard candidate ({what})")
            )
        return cache[keep]

    everything = frozenset(units)
    none = loss(frozenset(), "no correction")
    groups = split_blocks(list(units), blocks)
    # Prefixes only: each correction was estimated with every upstream one applied, so a
    # prefix is a model whose corrections are consistent with each other.
    decided: list[GuardBlock] = []
    prefixes: list[frozenset[str]] = []
    current: frozenset[str] = frozenset()
    for i, block in enumerate(groups):
        current = current | frozenset(block)
        prefixes.append(current)
        comp = Comparison.of(none, loss(current, f"blocks 1-{i + 1} of {len(groups)}"))
        decided.append(GuardBlock(block, False, comp))
    full = cache[everything]
    best = min(prefixes, key=lambda c: float(np.mean(cache[c])))
    chosen_vs_none: Comparison | None = Comparison.of(none, cache[best])
    if chosen_vs_none is None or not chosen_vs_none.helps(margin):
        best, chosen_vs_none = frozenset(), None
    decided = [replace(b, kept=set(b.units) <= best) for b in decided]
    result = GuardResult(
        metric=metric,
        samples=samples,
        data=heldout.description,
        margin=margin,
        kept=tuple(u for u in units if u in best),
        rejected=tuple(u for u in units if u not in best),
        blocks=tuple(decided),
        all_vs_none=Comparison.of(none, full),
        chosen_vs_none=chosen_vs_none,
        evaluations=len(cache) + 1,
    )
    logger.info("guard: %s", result.summary())
    return result


__all__ = [
    "DEFAULT_BLOCKS",
    "DEFAULT_FRACTION",
    "DEFAULT_MARGIN",
    "METRICS",
    "MIN_SAMPLES",
    "Comparison",
    "GuardBlock",
    "GuardResult",
    "LossReducer",
    "choose_metric",
    "guard",
    "sample_loss",
    "split_blocks",
]
