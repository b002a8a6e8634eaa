"""The recalibration strategies and layer corrections by name: one registry (docs/spec.md §4-§5.2).

Each entry holds both halves of its rule:

- the **host half** turns statistics measured over the calibration data
  (float64, merged on the host) into new BN running statistics, or into a
  per-channel affine correction ``y' = a*y + b`` of an NbSmt op's output;
- the **in-graph half** is the same rule for the batch-statistics pass
  (``graph.probe.use_batch_statistics`` / ``correct_with_batch_statistics``):
  when the calibration set is one batch, every layer is corrected in the
  graph from its own batch statistics, with the host half's float64
  operations in the same order, so one pass gives the level-by-level result
  bit for bit.

``calibration.recalibrate`` schedules the passes from an entry's
``schedule``; ``config`` and the command line take their choices from
:data:`STRATEGY_CHOICES` and :data:`CORRECTION_CHOICES`. This module reads no
configuration (``config`` imports it), so adding a strategy here is the one
change that makes it selectable everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nbsmt_onnx.calibration.statistics import ChannelStatistics
from nbsmt_onnx.errors import ConfigError
from nbsmt_onnx.graph.bn import BatchNormStatistics
from nbsmt_onnx.graph.fold import ChannelAffine
from nbsmt_onnx.graph.probe import CHANNEL_FIRST, BatchCorrection, RelativeShift


@dataclass(frozen=True)
class VarianceRatio:
    """Regularised, bounded per-channel variance ratio ``num / den`` (relative strategy, §5.2).

    ``ratio = clip((num + e) / (den + e), 1/bound, bound)`` with
    ``e = eps + floor * mean_over_channels(den_ref)``: ``eps`` is the BN's
    epsilon (0 for fused layers), the ``floor`` term keeps channels whose
    calibration variance is tiny against the layer's typical variance (dead
    or rarely active channels on out-of-domain data) from producing huge
    ratios from noise, and ``bound`` caps what a small calibration set may
    do to any channel (default 4: the std changes at most 2x).
    """

    floor: float = 0.01
    bound: float = 4.0
    #: only ever *amplify* the signal: a variance that NB-SMT lowered (the signal was
    #: attenuated) is compensated, a variance it raised (noise added) is left alone
    amplify_only: bool = False

    def __post_init__(self) -> None:
        if not (self.floor >= 0 and np.isfinite(self.floor)):
            raise ConfigError(
                f"variance-ratio floor must be a finite number >= 0, got {self.floor}"
            )
        if not (self.bound >= 1 and np.isfinite(self.bound)):
            raise ConfigError(
                f"variance-ratio bound must be a finite number >= 1, got {self.bound}"
            )

    def offset(self, reference: np.ndarray, eps: float = 0.0) -> float:
        """``e`` added to numerator and denominator."""
        return max(eps + self.floor * float(np.mean(reference)), 1e-12)

    def relative_limits(self) -> tuple[float, float]:
        """Clip range of ``var_n / var_c`` (``relative``: ``var' = var * ratio``)."""
        return 1.0 / self.bound, 1.0 if self.amplify_only else self.bound

    def correction_limits(self) -> tuple[float, float]:
        """Clip range of ``var_c / var_n`` (``mean+var``: ``a = sqrt(ratio)``)."""
        return 1.0 if self.amplify_only else 1.0 / self.bound, self.bound

    def __call__(
        self,
        num: np.ndarray,
        den: np.ndarray,
        reference: np.ndarray,
        eps: float = 0.0,
        limits: tuple[float, float] | None = None,
    ) -> np.ndarray:
        e = self.offset(reference, eps)
        low, high = limits if limits is not None else (1.0 / self.bound, self.bound)
        return np.clip((num + e) / (den + e), low, high)


#: Variance ratio of the ``mean+var`` correction (and of ``relative`` when asked for).
DEFAULT_RATIO = VarianceRatio()
#: ``relative`` transfers the mean shift only by default (bound 1: ratio fixed at 1).
DEFAULT_RELATIVE_RATIO = VarianceRatio(bound=1.0)


# --------------------------------------------------------------------------- BatchNorm strategies

#: How a strategy's passes are scheduled (``calibration.recalibrate``).
BATCH_STATISTICS = "batch-statistics"  # one pass, every BN normalising with its batch's statistics
LEVELS = "levels"  # one pass per dependency level, upstream levels already written back
ALL_AT_ONCE = "all-at-once"  # one pass, every BN measured with the old upstream statistics


@dataclass(frozen=True)
class Replacement:
    """New statistics = the measured ones (``train-mode``, ``sequential``, ``one-pass``)."""

    needs_clean = False

    def new_statistics(
        self,
        old: BatchNormStatistics,
        measured: ChannelStatistics,
        reference: ChannelStatistics | None,
        ratio: VarianceRatio,
        eps: float,
        factor: np.ndarray | None = None,
    ) -> BatchNormStatistics:
        """Host half."""
        return BatchNormStatistics(measured.mean, measured.variance)

    def batch_form(
        self,
        old: BatchNormStatistics,
        reference: ChannelStatistics | None,
        ratio: VarianceRatio,
        eps: float,
    ) -> RelativeShift | None:
        """In-graph half: plain batch statistics."""
        return None


@dataclass(frozen=True)
class RelativeShiftRule:
    """``mean' = mean + f*(mu_n - mu_c)``, ``var' = var * ratio(var_n, var_c)`` (``relative``).

    ``f`` is the per-channel shrinkage factor (1 without shrinkage).
    """

    needs_clean = True

    def new_statistics(
        self,
        old: BatchNormStatistics,
        measured: ChannelStatistics,
        reference: ChannelStatistics | None,
        ratio: VarianceRatio,
        eps: float,
        factor: np.ndarray | None = None,
    ) -> BatchNormStatistics:
        """Host half."""
        assert reference is not None
        var_c = reference.variance
        k = ratio(measured.variance, var_c, var_c, eps, ratio.relative_limits())
        shift = measured.mean - reference.mean
        if factor is not None:
            shift = factor * shift
        return BatchNormStatistics(old.mean + shift, old.var * k)

    def batch_form(
        self,
        old: BatchNormStatistics,
        reference: ChannelStatistics | None,
        ratio: VarianceRatio,
        eps: float,
    ) -> RelativeShift | None:
        """In-graph half: the same float64 operations, in the same order, on the batch's statistics."""
        assert reference is not None
        var_c = reference.variance
        e = ratio.offset(var_c, eps)
        low, high = ratio.relative_limits()
        return RelativeShift(
            mean_base=old.mean,
            mean_reference=reference.mean,
            var_base=old.var,
            var_reference=var_c + e,
            offset=e,
            low=low,
            high=high,
        )


@dataclass(frozen=True)
class BatchNormStrategy:
    """One BN recalibration strategy: its rule (host and in-graph halves) and its schedule."""

    name: str
    rule: Replacement | RelativeShiftRule
    schedule: str
    summary: str
    #: offered by ``config`` and the command line (``one-pass`` is for comparison only)
    choice: bool = True

    @property
    def needs_clean(self) -> bool:
        """Measures the clean (float) model too."""
        return self.rule.needs_clean


STRATEGIES: dict[str, BatchNormStrategy] = {
    s.name: s
    for s in (
        BatchNormStrategy(
            "train-mode",
            Replacement(),
            BATCH_STATISTICS,
            "the paper's procedure: every BN normalises with the current batch's statistics; "
            "the new statistics are those of all samples",
        ),
        BatchNormStrategy(
            "sequential",
            Replacement(),
            LEVELS,
            "replacement, exact for eval mode: each BN measured with the upstream BNs already "
            "recalibrated",
        ),
        BatchNormStrategy(
            "relative",
            RelativeShiftRule(),
            LEVELS,
            "the original statistics moved by the NB-SMT-induced shift (clean vs NB-SMT, "
            "measured sequentially)",
        ),
        BatchNormStrategy(
            "one-pass",
            Replacement(),
            ALL_AT_ONCE,
            "every BN measured with the old upstream statistics, all replaced at once "
            "(for comparison only: wrong on deep models)",
            choice=False,
        ),
    )
}
#: What users may choose (``config.RecalibrationConfig.strategy``, ``--strategy``).
STRATEGY_CHOICES = tuple(name for name, s in STRATEGIES.items() if s.choice)
#: Chosen by measurement (docs/recalibration.md, "Measured"): the only strategy that does
#: not hurt with out-of-domain calibration data, and the best on every model measured.
DEFAULT_STRATEGY = "relative"


def strategy(name: str) -> BatchNormStrategy:
    """The registry entry of ``name`` (ConfigError listing the names otherwise)."""
    found = STRATEGIES.get(name)
    if found is None:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return found


# --------------------------------------------------------------------------- layer corrections


@dataclass(frozen=True)
class LayerCorrectionRule:
    """Correction of an NbSmt op's output towards the clean model's statistics (§5.2).

    - ``mean`` (``scale=False``):  y' = y + f*(mu_c - mu_n)
    - ``mean+var`` (``scale=True``): y' = a*(y - mu_n) + mu_n + f*(mu_c - mu_n),
      ``a = sqrt(ratio(var_c, var_n))``

    ``f`` is the per-channel shrinkage factor (the plain correction when None).
    """

    name: str
    scale: bool
    summary: str

    def affine(
        self,
        measured: ChannelStatistics,
        reference: ChannelStatistics,
        ratio: VarianceRatio,
        factor: np.ndarray | None = None,
    ) -> ChannelAffine:
        """Host half: ``y' = a*y + b`` from the statistics over all samples."""
        if not self.scale:
            a = np.ones(measured.channels)
        else:
            a = np.sqrt(
                ratio(
                    reference.variance,
                    measured.variance,
                    reference.variance,
                    limits=ratio.correction_limits(),
                )
            )
        if factor is None:
            return ChannelAffine(a, reference.mean - a * measured.mean)
        b = (1.0 - a) * measured.mean + factor * (reference.mean - measured.mean)
        return ChannelAffine(a, b)

    def batch_form(
        self, reference: ChannelStatistics, ratio: VarianceRatio, channel_axis: int = CHANNEL_FIRST
    ) -> BatchCorrection:
        """In-graph half: the same float64 operations, in the same order, on the batch's statistics."""
        e = ratio.offset(reference.variance)
        low, high = ratio.correction_limits()
        return BatchCorrection(
            mean_reference=reference.mean,
            numerator=reference.variance + e,
            offset=e,
            low=low,
            high=high,
            scale=self.scale,
            channel_axis=channel_axis,
        )


CORRECTIONS: dict[str, LayerCorrectionRule] = {
    c.name: c
    for c in (
        LayerCorrectionRule("mean", False, "shift each channel's mean to the clean model's"),
        LayerCorrectionRule(
            "mean+var", True, "also scale each channel to the clean model's variance (bounded)"
        ),
    )
}
#: ``none`` turns the correction off.
CORRECTION_CHOICES = ("none", *CORRECTIONS)
#: Chosen by measurement: ``mean+var`` hurts MobileNetV2 badly and helps the
#: Fashion-MNIST ResNet only within noise.
DEFAULT_CORRECTION = "mean"


def correction(name: str) -> LayerCorrectionRule:
    """The registry entry of ``name`` (ConfigError listing the names otherwise)."""
    found = CORRECTIONS.get(name)
    if found is None:
        raise ConfigError(f"unknown correction {name!r}; choose one of {', '.join(CORRECTIONS)}")
    return found
