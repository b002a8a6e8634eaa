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
   averaged over outputs (``metric`` in the result). The same run also gives
   *check* metrics, which a kept candidate must not make worse (``checks``):
   argmax disagreement with float for classifier-like outputs; otherwise the
   relative squared error, plus per-position KL and argmax disagreement of
   sequence outputs (``[N, T, C]``, e.g. a text recogniser's per-step class
   scores);
3. the corrections, in graph order, are grouped into at most ``blocks``
   contiguous blocks, and every prefix (blocks 1..k, k = 1..B; the last is
   "all corrections") is scored. Only prefixes: each correction was estimated
   with every upstream one applied, so a prefix is the one kind of subset
   whose corrections are consistent with each other; it also cuts exactly the
   tail where fused models are fragile (layers before sigmoid / softmax
   heads). A prefix is *eligible* if it beats "no correction" on the primary
   metric by more than ``margin`` standard errors of the paired per-sample
   difference and no check metric gets worse by more than ``check_margin``
   standard errors. The eligible prefix with the lowest mean loss is kept;
   when none is eligible nothing is kept and the output is the model without
   recalibration, parameter for parameter.

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
#: A kept prefix may not make a check metric worse by more than this many paired
#: standard errors. 1, not 2: a check is a veto, so erring towards "worse" only
#: costs a correction, never accuracy (docs/recalibration.md §8.2).
DEFAULT_CHECK_MARGIN = 1.0
#: Below this many held-out samples the guard cannot tell anything from noise.
MIN_SAMPLES = 8
#: Primary metrics (lower is closer to float).
METRICS = ("kl", "1-cosine")
#: Every per-sample metric the guard computes; all are distances (lower is better).
ALL_METRICS = ("kl", "1-cosine", "disagreement", "rel-error", "step-kl", "step-disagreement")

BuildFn = Callable[[frozenset[str]], onnx.ModelProto]


@dataclass(frozen=True)
class Scoring:
    """What the guard measures on each output: the primary metric, the checks, output kinds.

    ``kinds`` maps each classifier-like or sequence output to ``logits`` or
    ``probabilities`` (how its scores become a distribution); ``sequences`` are
    the ``[N, T, C]`` outputs scored per position.
    """

    primary: str
    checks: tuple[str, ...]
    kinds: Mapping[str, str] = field(default_factory=dict)
    sequences: frozenset[str] = frozenset()

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.primary, *self.checks)


@dataclass(frozen=True)
class LossReducer:
    """Executor reducer: per-sample losses ``[n, metrics]`` of a model's outputs vs the reference.

    Column 0 is the primary metric, the others ``scoring.checks`` in order. A
    metric is averaged over the outputs it applies to (KL and disagreement:
    classifier-like outputs; step metrics: sequence outputs; cosine and
    relative error: every output).
    """

    names: tuple[str, ...]
    reference: Mapping[str, np.ndarray]
    scoring: Scoring

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.names

    def reduce(
        self, outputs: Sequence[np.ndarray], batch: Mapping[str, np.ndarray], first_sample: int
    ) -> np.ndarray:
        columns = []
        for metric in self.scoring.metrics:
            losses = []
            for name, value in zip(self.names, outputs, strict=True):
                if not _applies(metric, name, self.scoring):
                    continue
                arr = np.asarray(value)
                ref = self.reference[name][first_sample : first_sample + arr.shape[0]]
                losses.append(sample_loss(ref, arr, metric, self.scoring.kinds.get(name, "logits")))
            columns.append(np.mean(losses, axis=0))
        return np.stack(columns, axis=1)

    def merge(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return np.concatenate([left, right])


def _applies(metric: str, name: str, scoring: Scoring) -> bool:
    if metric in ("kl", "disagreement"):
        return name in scoring.kinds and name not in scoring.sequences
    if metric.startswith("step-"):
        return name in scoring.sequences
    return True


def _argmax_differs(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per row of ``[..., C]`` scores: 1.0 where the argmax differs (ties: the first index)."""
    return (np.argmax(ref, axis=-1) != np.argmax(out, axis=-1)).astype(np.float64)


def sample_loss(reference: np.ndarray, value: np.ndarray, metric: str, kind: str) -> np.ndarray:
    """Per-sample distance of ``value`` to ``reference`` (axis 0 = samples); inf where non-finite.

    ``kl`` and ``disagreement`` take classifier-like ``[N, C]`` outputs;
    ``step-kl`` and ``step-disagreement`` take ``[N, T, C]`` outputs and
    average over the T positions; ``1-cosine`` and ``rel-error``
    (``||out - ref||^2 / ||ref||^2``) flatten each sample.
    """
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(value, dtype=np.float64)
    n = ref.shape[0]
    bad = ~np.isfinite(out.reshape(n, -1)).all(axis=1)
    clean = np.nan_to_num(out)
    if metric in ("kl", "disagreement"):
        ref_c, out_c = as_classification(ref), as_classification(clean)
        assert ref_c is not None and out_c is not None
        if metric == "disagreement":
            loss = _argmax_differs(ref_c, out_c)
        else:
            lp_ref = log_probabilities(ref_c, kind)
            lp = log_probabilities(out_c, kind)
            loss = np.sum(np.exp(lp_ref) * (lp_ref - lp), axis=1)
    elif metric in ("step-kl", "step-disagreement"):
        if metric == "step-disagreement":
            loss = _argmax_differs(ref, clean).mean(axis=1)
        else:
            c = ref.shape[-1]
            lp_ref = log_probabilities(ref.reshape(-1, c), kind)
            lp = log_probabilities(clean.reshape(-1, c), kind)
            loss = np.sum(np.exp(lp_ref) * (lp_ref - lp), axis=1).reshape(n, -1).mean(axis=1)
    elif metric == "rel-error":
        a = ref.reshape(n, -1)
        err = np.sum((clean.reshape(n, -1) - a) ** 2, axis=1)
        power = np.sum(a * a, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            # a zero reference: 0 if matched, else 1 (as cosine's convention)
            loss = np.where(
                power > 0, err / np.where(power > 0, power, 1.0), np.where(err > 0, 1.0, 0.0)
            )
    elif metric == "1-cosine":
        a = ref.reshape(n, -1)
        b = clean.reshape(n, -1)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where(
                (na > 0) & (nb > 0),
                np.sum(a * b, axis=1) / np.where(na * nb > 0, na * nb, 1.0),
                np.where((na == 0) & (nb == 0), 1.0, 0.0),
            )
        loss = 1.0 - cos
    else:
        raise ValueError(f"unknown guard metric {metric!r}; expected one of {ALL_METRICS}")
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

    def hurts(self, margin: float) -> bool:
        """Worse (after farther from float) by more than ``margin`` standard errors."""
        return self.improvement < 0 and -self.improvement > margin * self.se

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
    """One block of corrections; ``comparison``: no correction vs blocks 1 .. this one.

    ``checks``: the same comparison on each check metric; ``vetoed_by``: the
    checks that got worse beyond the check margin (the prefix is not eligible).
    """

    units: tuple[str, ...]
    kept: bool
    comparison: Comparison
    checks: Mapping[str, Comparison] = field(default_factory=dict)
    vetoed_by: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "units": list(self.units),
            "kept": self.kept,
            **self.comparison.to_dict(),
            "checks": {m: c.to_dict() for m, c in self.checks.items()},
            "vetoed_by": list(self.vetoed_by),
        }


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
    #: check metrics (must not get worse) and their margin in standard errors
    checks: tuple[str, ...] = ()
    check_margin: float = DEFAULT_CHECK_MARGIN
    #: the kept model vs none on each check metric (empty when nothing is kept)
    chosen_checks: Mapping[str, Comparison] = field(default_factory=dict)

    @property
    def decision(self) -> str:
        if not self.kept:
            return "none"
        return "all" if not self.rejected else "partial"

    def summary(self) -> str:
        """One line for the CLI and the log."""
        total = len(self.kept) + len(self.rejected)
        comp = self.chosen_vs_none or self.all_vs_none
        vetoed = sorted(
            {m for b in self.blocks if b.comparison.helps(self.margin) for m in b.vetoed_by}
        )
        reason = (
            f"every improvement made {', '.join(vetoed)} worse"
            if vetoed
            else ("no held-out improvement")
        )
        what = {
            "none": f"kept none of {total} correction(s): {reason}",
            "all": f"kept all {total} correction(s)",
            "partial": f"kept {len(self.kept)} of {total} correction(s)",
        }[self.decision]
        checks = "".join(
            f", {m} {c.before:.4g} -> {c.after:.4g}" for m, c in self.chosen_checks.items()
        )
        return (
            f"{what}; held-out {self.metric} to float {comp.before:.4g} -> "
            f"{comp.after if self.kept else comp.before:.4g}{checks} "
            f"({self.samples} samples; all corrections: {self.all_vs_none.after:.4g})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "metric": self.metric,
            "samples": self.samples,
            "data": self.data,
            "margin_se": self.margin,
            "checks": list(self.checks),
            "check_margin_se": self.check_margin,
            "kept": list(self.kept),
            "rejected": list(self.rejected),
            "all_vs_none": self.all_vs_none.to_dict(),
            "chosen_vs_none": None
            if self.chosen_vs_none is None
            else self.chosen_vs_none.to_dict(),
            "chosen_checks": {m: c.to_dict() for m, c in self.chosen_checks.items()},
            "blocks": [b.to_dict() for b in self.blocks],
            "evaluations": self.evaluations,
            "summary": self.summary(),
        }


def split_blocks(units: Sequence[str], blocks: int) -> list[tuple[str, ...]]:
    """``units`` (graph order) in at most ``blocks`` contiguous groups of near-equal size."""
    n = len(units)
    k = max(1, min(blocks, n))
    edges = [round(i * n / k) for i in range(k + 1)]
    return [tuple(units[edges[i] : edges[i + 1]]) for i in range(k) if edges[i + 1] > edges[i]]


def _is_sequence(value: np.ndarray) -> bool:
    return value.ndim == 3 and value.shape[1] >= 1 and value.shape[2] >= 2


def choose_scoring(reference: Mapping[str, np.ndarray]) -> Scoring:
    """Primary metric and checks for these reference outputs (module doc, step 2).

    KL (check: argmax disagreement) when every output is classifier-like, with
    logits or probabilities detected; else 1 - cosine (checks: relative error,
    and for ``[N, T, C]`` outputs per-position KL and argmax disagreement).
    """
    scores = {n: as_classification(v) for n, v in reference.items()}
    if all(s is not None for s in scores.values()):
        kinds = {n: detect_output_kind(s) for n, s in scores.items() if s is not None}
        return Scoring("kl", ("disagreement",), kinds)
    sequences = {n: v for n, v in reference.items() if _is_sequence(v)}
    kinds = {n: detect_output_kind(v.reshape(-1, v.shape[-1])) for n, v in sequences.items()}
    checks = ("rel-error",) + (("step-kl", "step-disagreement") if sequences else ())
    return Scoring("1-cosine", checks, kinds, frozenset(sequences))


def guard(
    units: Sequence[str],
    build: BuildFn,
    float_model: onnx.ModelProto,
    heldout: CalibrationData,
    *,
    blocks: int = DEFAULT_BLOCKS,
    margin: float = DEFAULT_MARGIN,
    check_margin: float = DEFAULT_CHECK_MARGIN,
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
    scoring = choose_scoring(usable)
    reducer = LossReducer(tuple(usable), usable, scoring)
    cache: dict[frozenset[str], np.ndarray] = {}

    def loss(keep: frozenset[str], what: str) -> np.ndarray:
        if keep not in cache:
            if progress is not None:
                progress(what)
            cache[keep] = run.run(
                Job(build(keep), heldout, reducer, what=f"guard candidate ({what})")
            )
        return cache[keep]

    def compare(keep: frozenset[str]) -> tuple[Comparison, dict[str, Comparison]]:
        before, after = none, cache[keep]
        checks = {
            m: Comparison.of(before[:, j], after[:, j])
            for j, m in enumerate(scoring.checks, start=1)
        }
        return Comparison.of(before[:, 0], after[:, 0]), checks

    everything = frozenset(units)
    none = loss(frozenset(), "no correction")
    groups = split_blocks(list(units), blocks)
    # Prefixes only: each correction was estimated with every upstream one applied, so a
    # prefix is a model whose corrections are consistent with each other.
    decided: list[GuardBlock] = []
    eligible: list[frozenset[str]] = []
    current: frozenset[str] = frozenset()
    for i, block in enumerate(groups):
        current = current | frozenset(block)
        loss(current, f"blocks 1-{i + 1} of {len(groups)}")
        comp, checks = compare(current)
        vetoed = tuple(m for m, c in checks.items() if c.hurts(check_margin))
        decided.append(GuardBlock(block, False, comp, checks, vetoed))
        if comp.helps(margin) and not vetoed:
            eligible.append(current)
    best = min(eligible, key=lambda c: float(np.mean(cache[c][:, 0])), default=frozenset())
    chosen_vs_none, chosen_checks = compare(best) if best else (None, {})
    decided = [replace(b, kept=bool(best) and set(b.units) <= best) for b in decided]
    result = GuardResult(
        metric=scoring.primary,
        samples=samples,
        data=heldout.description,
        margin=margin,
        kept=tuple(u for u in units if u in best),
        rejected=tuple(u for u in units if u not in best),
        blocks=tuple(decided),
        all_vs_none=compare(everything)[0],
        chosen_vs_none=chosen_vs_none,
        evaluations=len(cache) + 1,
        checks=scoring.checks,
        check_margin=check_margin,
        chosen_checks=chosen_checks,
    )
    logger.info("guard: %s", result.summary())
    return result


__all__ = [
    "ALL_METRICS",
    "DEFAULT_BLOCKS",
    "DEFAULT_CHECK_MARGIN",
    "DEFAULT_FRACTION",
    "DEFAULT_MARGIN",
    "METRICS",
    "MIN_SAMPLES",
    "Comparison",
    "GuardBlock",
    "GuardResult",
    "LossReducer",
    "Scoring",
    "choose_scoring",
    "guard",
    "sample_loss",
    "split_blocks",
]
