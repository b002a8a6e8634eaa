"""Post-training BatchNorm recalibration under NB-SMT (docs/spec.md §4) and fused-layer correction (§5.2).

Strategies for models with BatchNormalization (the math and costs are in
docs/recalibration.md):

``train-mode``
    The paper's procedure. One pass in which every recalibrated BN normalises
    with the statistics of the current batch (``graph.probe.use_batch_statistics``);
    the new running statistics are the population mean and variance of each
    BN's input over all samples of that pass. One pass, any depth.
``sequential``
    Replacement, exact for eval mode: each BN's new statistics are measured
    with every upstream BN already recalibrated. BNs are grouped by
    dependency level (``graph.bn.dependency_levels``); level d is measured
    in pass d+1 on the model with levels < d written back, so the cost is
    (number of levels) passes. When the whole calibration set is one batch,
    the train-mode pass *is* the sequential result and one pass suffices.
``relative``
    Ours: the clean (float) model's BN-input statistics (mu_c, var_c) and the
    NB-SMT model's (mu_n, var_n) are measured on the same data, the latter
    sequentially as above, and the *original* statistics are moved by the
    NB-SMT-induced shift: ``mean' = mean + (mu_n - mu_c)``,
    ``var' = var * ratio(var_n, var_c)`` with the regularised, bounded ratio
    of :class:`VarianceRatio` — bounded to 1 by default
    (:data:`DEFAULT_RELATIVE_RATIO`: the mean shift only; measured, see
    docs/recalibration.md: NB-SMT noise inflates the variance without scaling
    the signal, and normalising it away shrinks the signal). Cost: (number of
    levels) passes, the clean model alongside the first; two passes when the
    calibration data is one batch.
``one-pass``
    For comparison only (docs/spec.md §4 shows it destroys deep models): every BN
    measured once with the *old* upstream statistics, all replaced at once.

The strategies and corrections are entries of one registry
(``calibration.strategies``: each a rule with a host half and an in-graph
half, and a pass schedule); this module only schedules the passes.

For models whose BN is already fused (no BN after an NbSmt op),
:func:`correct_fused_layers` matches each op's output statistics to the clean
model's on the same data, sequentially, and returns per-channel
``y' = a*y + b`` folded into ``w_scale`` and ``B``.

Every pass streams the data through the executor (``runtime.executor``; a
:class:`ProbeReducer` per probed model): per batch only per-channel (count,
mean, M2) leave the graph, merged on the host in float64, left to right in
batch order (``calibration.statistics``), so the result does not depend on
how the batches were spread over workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from nbsmt_onnx.calibration.data import CalibrationData, feed_samples, rebatch
from nbsmt_onnx.calibration.statistics import ChannelStatistics, PairedShift
from nbsmt_onnx.calibration.strategies import (
    ALL_AT_ONCE,
    BATCH_STATISTICS,
    CORRECTIONS,
    DEFAULT_CORRECTION,
    DEFAULT_RATIO,
    DEFAULT_RELATIVE_RATIO,
    DEFAULT_STRATEGY,
    LEVELS,
    STRATEGIES,
    VarianceRatio,
)
from nbsmt_onnx.calibration.strategies import correction as correction_rule
from nbsmt_onnx.calibration.strategies import strategy as strategy_entry
from nbsmt_onnx.config import RecalibrationConfig
from nbsmt_onnx.errors import ConfigError, DataError, InternalError, ModelError
from nbsmt_onnx.graph import memory as _memory
from nbsmt_onnx.graph.bn import (
    BatchNormInfo,
    BatchNormStatistics,
    dependency_levels,
    find_batchnorms,
    group_by_level,
    is_nbsmt,
    layers_without_batchnorm,
    nbsmt_channel_axis,
    read_batchnorm_statistics,
    upstream_nodes,
)
from nbsmt_onnx.graph.fold import (
    ChannelAffine,
    FoldBatchNormIntoNbSmt,
    FoldResult,
    Skip,
    apply_channel_corrections,
    write_batchnorm_statistics,
)
from nbsmt_onnx.graph.probe import (
    CHANNEL_FIRST,
    CHANNEL_LAST,
    ProbeOutputs,
    ProbeResult,
    ProbeSpec,
    add_statistics_probes,
    correct_with_batch_statistics,
    use_batch_statistics,
)
from nbsmt_onnx.runtime.executor import BatchSource, Executor, FeedStream, Job, LocalExecutor
from nbsmt_onnx.runtime.session import SessionOptions

logger = logging.getLogger(__name__)


Feed = Mapping[str, np.ndarray]
#: A callable returning the feed dicts afresh on each call (library callers' own batches).
DataSource = Callable[[], Iterable[Feed]]
#: What the recalibration functions accept: re-iterable batches or such a callable.
Data = BatchSource | DataSource

#: Sessions of the recalibration passes run without ORT's memory arena: recalibration
#: batches are sized to a memory budget (``graph.memory``) and the arena would hold up
#: to twice that.
PASS_SESSION = SessionOptions(memory_arena=False)


@dataclass(frozen=True)
class PassProgress:
    """Progress of one pass over the calibration data (given to the ``progress`` callback)."""

    pass_index: int  # 1-based
    total_passes: int
    description: str
    batches: int  # batches finished in this pass
    finished: bool
    #: batches this pass will run (known from the first pass on), None before
    expected: int | None = None


ProgressCallback = Callable[[PassProgress], None]


@dataclass(frozen=True)
class BatchNormUpdate:
    """What recalibration did to one BN (for the report)."""

    name: str
    level: int
    epsilon: float
    old: BatchNormStatistics
    new: BatchNormStatistics
    #: BN-input statistics on the NB-SMT model, as the strategy measured them
    measured: ChannelStatistics
    #: BN-input statistics on the clean model (``relative`` only)
    reference: ChannelStatistics | None = None
    #: per-channel factor the mean shift was multiplied by (``relative`` with shrinkage)
    shrink: np.ndarray | None = None

    @property
    def mean_shift(self) -> float:
        """RMS over channels of (new mean - old mean), in units of the old std."""
        return _rms_shift(self.new.mean, self.old.mean, self.old.var + self.epsilon)

    @property
    def std_ratio(self) -> float:
        """Geometric mean over channels of new std / old std."""
        return _std_ratio(self.new.var + self.epsilon, self.old.var + self.epsilon)


def _rms_shift(mean: np.ndarray, reference: np.ndarray, reference_var: np.ndarray) -> float:
    """RMS over channels of (mean - reference) / sqrt(reference_var) (report summaries)."""
    z = (mean - reference) / np.sqrt(reference_var)
    return float(np.sqrt(np.mean(z * z)))


def _std_ratio(var: np.ndarray, reference_var: np.ndarray) -> float:
    """Geometric mean over channels of sqrt(var / reference_var) (report summaries)."""
    return float(np.exp(0.5 * np.mean(np.log(var / reference_var))))


@dataclass(frozen=True)
class RecalibrationResult:
    """New BN statistics, the NB-SMT model with them written in, and the cost in passes."""

    strategy: str
    model: onnx.ModelProto
    updates: tuple[BatchNormUpdate, ...]
    skipped: tuple[Skip, ...]
    #: passes over the calibration data
    passes: int
    #: full-data model executions (a pass running the clean and NB-SMT models counts 2)
    model_runs: int

    @property
    def statistics(self) -> dict[str, BatchNormStatistics]:
        return {u.name: u.new for u in self.updates}


@dataclass(frozen=True)
class LayerCorrection:
    """The per-channel correction of one NbSmt op's output (docs/spec.md §5.2)."""

    name: str
    level: int
    correction: ChannelAffine
    #: op output statistics on the NB-SMT model (upstream already corrected), before correction
    measured: ChannelStatistics
    #: op output statistics on the clean model
    reference: ChannelStatistics
    #: per-channel factor the mean correction was multiplied by (None: no shrinkage)
    shrink: np.ndarray | None = None

    @property
    def mean_shift(self) -> float:
        """RMS over channels of (mu_n - mu_c), in units of the clean std (before correction)."""
        return _rms_shift(self.measured.mean, self.reference.mean, self.reference.variance + 1e-12)

    @property
    def std_ratio(self) -> float:
        """Geometric mean over channels of NB-SMT std / clean std (before correction)."""
        return _std_ratio(self.measured.variance + 1e-12, self.reference.variance + 1e-12)


@dataclass(frozen=True)
class CorrectionResult:
    variant: str
    model: onnx.ModelProto
    corrections: tuple[LayerCorrection, ...]
    passes: int
    model_runs: int

    @property
    def affine(self) -> dict[str, ChannelAffine]:
        return {c.name: c.correction for c in self.corrections}


@dataclass(frozen=True)
class ProbePartial:
    """The statistics of a run of batches of one probed model (a :class:`ProbeReducer` partial)."""

    batches: int
    #: samples along the first input's axis 0 (checks that every pass sees the same data)
    samples: int
    statistics: dict[str, ChannelStatistics]
    #: tensor -> per-sample channel means [N, C] of each batch, in batch order
    sample_means: dict[str, list[np.ndarray]]


@dataclass(frozen=True)
class ProbeReducer:
    """Executor reducer of a probed model: per-channel statistics of every probed tensor.

    Per batch only the probes' (count, mean, M2) leave the graph (and, with
    ``sample_means``, the per-sample channel means shrinkage needs); partials
    merge with Chan's formula (:meth:`ChannelStatistics.merge`), left before
    right, so the result is the same however the batches were spread.
    """

    probes: tuple[ProbeOutputs, ...]
    sample_means: bool = False

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(
            n for p in self.probes for n in (p.names if self.sample_means else p.statistic_names)
        )

    def reduce(self, outputs: Sequence[np.ndarray], batch: Feed, first_sample: int) -> ProbePartial:
        values = dict(zip(self.outputs, outputs, strict=True))
        means: dict[str, list[np.ndarray]] = {}
        for p in self.probes:
            found = p.sample_means(values) if self.sample_means else None
            if found is not None:
                means[p.tensor] = [found]
        first = next(iter(batch.values()), None)
        samples = int(np.shape(first)[0]) if first is not None and np.ndim(first) else 1
        stats = {p.tensor: p.statistics(values) for p in self.probes}
        return ProbePartial(1, samples, stats, means)

    def merge(self, left: ProbePartial, right: ProbePartial) -> ProbePartial:
        return ProbePartial(
            left.batches + right.batches,
            left.samples + right.samples,
            {t: s.merge(right.statistics[t]) for t, s in left.statistics.items()},
            {
                t: left.sample_means.get(t, []) + right.sample_means.get(t, [])
                for t in {**left.sample_means, **right.sample_means}
            },
        )


class _Runner:
    """Runs recalibration passes through the executor; counts them; reports progress.

    A pass runs each probed model over the data as one executor job with a
    :class:`ProbeReducer`; the passes of a strategy must all see the same
    batches (checked).
    """

    def __init__(
        self,
        data: BatchSource,
        executor: Executor | None,
        progress: ProgressCallback | None,
        total_passes: int,
        sample_means: bool = False,
    ) -> None:
        self.data = data
        #: fetch the probes' per-sample channel means too (only shrinkage needs them)
        self.keep_sample_means = sample_means
        self.executor = executor or LocalExecutor()
        self.progress = progress
        self.total_passes = total_passes
        self.passes = 0
        self.model_runs = 0
        self._shape: tuple[int, int] | None = None  # (batches, first-input samples) of pass 1
        #: per probed model of the last pass: tensor -> per-sample channel means [N, C]
        self.sample_means: list[dict[str, np.ndarray]] = []

    def run_pass(
        self, probed: Sequence[ProbeResult], description: str
    ) -> list[dict[str, ChannelStatistics]]:
        """One pass over the data running each probed model; merged statistics per model."""
        self.passes += 1
        self.model_runs += len(probed)
        logger.info("pass %d/%d: %s", self.passes, self.total_passes, description)
        expected = self._shape[0] if self._shape is not None else None
        index, total = self.passes, self.total_passes
        callback = self.progress

        def report(done: int, of: int | None) -> None:
            if callback is not None:
                callback(PassProgress(index, total, description, done, False, of or expected))

        report(0, expected)
        jobs = [
            Job(
                p.model,
                self.data,
                ProbeReducer(tuple(p.outputs.values()), self.keep_sample_means),
                PASS_SESSION,
                what="simulation model" if _uses_library(p.model) else "float model",
            )
            for p in probed
        ]
        try:
            partials: list[ProbePartial] = self.executor.map(jobs, report)
        except DataError as err:
            if "no batches" not in str(err):
                raise
            raise DataError(
                f"calibration data yielded no batches in pass {self.passes}; pass a callable "
                "that returns a fresh iterator each time (recalibration reads the data several "
                "times)"
            ) from err
        for part in partials:
            shape = (part.batches, part.samples)
            if self._shape is None:
                self._shape = shape
            elif self._shape != shape:
                raise DataError(
                    f"calibration data changed between passes ({self._shape[0]} batches/"
                    f"{self._shape[1]} samples, then {shape[0]}/{shape[1]}); use a deterministic "
                    "data source (fixed seed)"
                )
        if callback is not None:
            callback(PassProgress(index, total, description, partials[0].batches, True))
        self.sample_means = [
            {t: np.concatenate(parts, axis=0) for t, parts in part.sample_means.items()}
            for part in partials
        ]
        out: list[dict[str, ChannelStatistics]] = []
        for part in partials:
            for tensor, stats in part.statistics.items():
                if stats.total_count == 0:
                    raise DataError(f"no elements of tensor {tensor!r} were seen in calibration")
            out.append(dict(part.statistics))
        return out


def _uses_library(model: onnx.ModelProto) -> bool:
    return any(is_nbsmt(n) for n in model.graph.node)


def _batches(data: Data) -> BatchSource:
    """``data`` as re-iterable batches (a callable, or an object's ``batches``, once per pass)."""
    if hasattr(data, "batches") and hasattr(data, "samples_in"):
        return data  # type: ignore[return-value]
    data = getattr(data, "batches", data)
    if not callable(data):
        raise ConfigError(
            "calibration data must be a callable returning an iterable of feed dicts "
            "(it is read once per pass)"
        )
    return FeedStream(data)


def _is_single_batch(data: BatchSource) -> bool:
    if data.num_batches is not None:
        return data.num_batches == 1
    it = iter(data.batches())
    first = next(it, None)
    return first is not None and next(it, None) is None


def _select_batchnorms(
    model: onnx.ModelProto, names: Iterable[str] | None
) -> tuple[list[BatchNormInfo], list[Skip]]:
    infos = find_batchnorms(model)
    skipped: list[Skip] = []
    if names is None:
        selected = []
        for info in infos:
            if info.recalibration_blocker is not None:
                skipped.append(Skip(info.name, info.recalibration_blocker))
            elif not info.affected:
                skipped.append(
                    Skip(info.name, "no NbSmt op upstream: its input is unchanged, left as is")
                )
            else:
                selected.append(info)
        return selected, skipped
    wanted = list(dict.fromkeys(names))
    by_name = {i.name: i for i in infos}
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ConfigError(
            f"no BatchNormalization nodes named {unknown}; the model has {sorted(by_name)}"
        )
    for name in wanted:
        blocker = by_name[name].recalibration_blocker
        if blocker is not None:
            raise ConfigError(f"BN {name!r} cannot be recalibrated: {blocker}")
    chosen = set(wanted)
    skipped = [Skip(i.name, "not selected") for i in infos if i.name not in chosen]
    return [by_name[n] for n in wanted], skipped


def recalibrate_batchnorm(
    model: onnx.ModelProto,
    data: Data,
    *,
    strategy: str = DEFAULT_STRATEGY,
    float_model: onnx.ModelProto | None = None,
    batchnorms: Iterable[str] | None = None,
    ratio: VarianceRatio = DEFAULT_RELATIVE_RATIO,
    single_batch_shortcut: bool = True,
    executor: Executor | None = None,
    progress: ProgressCallback | None = None,
    shrink: float = 0.0,
) -> RecalibrationResult:
    """Re-estimate the running statistics of the BNs of an NB-SMT model.

    ``model`` is the NB-SMT model (BN nodes kept); ``float_model`` the clean
    model with the same BN node names (required by ``relative``). ``data``
    (a ``CalibrationData``, or a callable called once per pass) must yield the
    same feed dicts each time. Every pass runs through ``executor`` (in
    process by default): the statistics are the same however it spreads the
    batches.
    ``batchnorms`` defaults to every BN that can be recalibrated and has an
    NbSmt op upstream; the others are listed in ``skipped``. The returned
    model has the new statistics written into its BN nodes (fold them with
    ``graph.fold.FoldBatchNormIntoNbSmt``).

    ``shrink`` (K, ``relative`` only): each channel's mean shift is multiplied
    by :meth:`PairedShift.shrink_factor` of the per-sample paired differences
    (0: applied in full).
    """
    entry = strategy_entry(strategy)
    if entry.needs_clean and float_model is None:
        raise ConfigError(
            f"strategy {strategy!r} needs the float model to measure the clean statistics"
        )
    data = _batches(data)
    infos, skipped = _select_batchnorms(model, batchnorms)
    if not infos:
        logger.info("no BatchNormalization to recalibrate")
        return RecalibrationResult(strategy, _copy(model), (), tuple(skipped), 0, 0)
    old = {i.name: read_batchnorm_statistics(model, i.name) for i in infos}
    levels = dependency_levels(model, [i.name for i in infos])
    groups = group_by_level(levels)
    by_name = {i.name: i for i in infos}
    rule = entry.rule
    keep_means = shrink > 0 and entry.needs_clean
    clean_inputs: dict[str, str] = {}
    clean_probe: ProbeResult | None = None
    if entry.needs_clean:
        assert float_model is not None
        clean_inputs = _float_batchnorm_inputs(float_model, [i.name for i in infos])
        clean_probe = add_statistics_probes(
            float_model, sorted(set(clean_inputs.values())), only_statistics=True
        )
    reference: dict[str, ChannelStatistics] = {}
    clean_means: dict[str, np.ndarray] = {}

    def update(name: str, measured: ChannelStatistics, means: np.ndarray | None) -> BatchNormUpdate:
        """``rule``'s host half for one BN (shrinkage from the per-sample means, if kept)."""
        info = by_name[name]
        _check_channels(info, measured)
        ref = reference.get(name)
        factor = None
        if ref is not None:
            _check_channels(info, ref)
            factor = _shrink_factor(means, clean_means.get(clean_inputs[name]), shrink)
        new = rule.new_statistics(old[name], measured, ref, ratio, info.epsilon, factor)
        return BatchNormUpdate(
            name, levels[name], info.epsilon, old[name], new, measured, ref, factor
        )

    # The level schedule is exact in one batch-statistics pass when the data is one batch
    # (plus a pass over the clean model first: only worth it with more than one level).
    shortcut = (
        entry.schedule == LEVELS
        and single_batch_shortcut
        and (clean_probe is None or len(groups) > 1)
        and _is_single_batch(data)
    )
    if entry.schedule == BATCH_STATISTICS or shortcut:
        passes = 2 if clean_probe is not None else 1
        if shortcut:
            logger.info(
                "calibration data is one batch: %s is exact in %d pass(es) in batch-statistics mode",
                strategy,
                passes,
            )
        runner = _Runner(data, executor, progress, passes, keep_means)
        if clean_probe is not None:
            (clean,) = runner.run_pass([clean_probe], f"{strategy}: clean model")
            reference = {n: clean[t] for n, t in clean_inputs.items()}
            clean_means = runner.sample_means[0]
        forms = {}
        for n in levels:
            if n in reference:
                _check_channels(by_name[n], reference[n])
            form = rule.batch_form(old[n], reference.get(n), ratio, by_name[n].epsilon)
            if form is not None:
                forms[n] = form
        probed = use_batch_statistics(
            model, list(levels), only_statistics=True, relative=forms or None
        )
        (measured,) = runner.run_pass(
            [probed], f"{strategy}: {len(infos)} BNs in batch-statistics mode"
        )
        means = runner.sample_means[0]
        updates = [
            update(n, measured[by_name[n].input], means.get(by_name[n].input)) for n in levels
        ]
        return _finish(strategy, model, updates, skipped, runner)

    # One pass per dependency level, upstream levels written back (all at once: one pass
    # measuring every BN with the old upstream statistics).
    schedule = [list(levels)] if entry.schedule == ALL_AT_ONCE else groups
    runner = _Runner(data, executor, progress, len(schedule), keep_means)
    current = model
    updates = []
    for level, group in enumerate(schedule):
        probed = add_statistics_probes(
            current, [by_name[n].input for n in group], only_statistics=True
        )
        if entry.schedule == ALL_AT_ONCE:
            description = f"{strategy}: {len(group)} BNs, old upstream statistics"
        else:
            description = f"{strategy}: level {level}, {len(group)} BNs"
        if clean_probe is not None and level == 0:
            measured, clean = runner.run_pass(
                [probed, clean_probe], description + " (+ clean model)"
            )
            reference = {n: clean[t] for n, t in clean_inputs.items()}
            clean_means = runner.sample_means[1]
        else:
            (measured,) = runner.run_pass([probed], description)
        means = runner.sample_means[0]
        level_updates = [
            update(n, measured[by_name[n].input], means.get(by_name[n].input)) for n in group
        ]
        current = write_batchnorm_statistics(current, {u.name: u.new for u in level_updates})
        updates.extend(level_updates)
    return RecalibrationResult(
        strategy, current, tuple(updates), tuple(skipped), runner.passes, runner.model_runs
    )


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _finish(
    strategy: str,
    model: onnx.ModelProto,
    updates: list[BatchNormUpdate],
    skipped: list[Skip],
    runner: _Runner,
) -> RecalibrationResult:
    new_model = write_batchnorm_statistics(model, {u.name: u.new for u in updates})
    return RecalibrationResult(
        strategy, new_model, tuple(updates), tuple(skipped), runner.passes, runner.model_runs
    )


def _shrink_factor(
    measured: np.ndarray | None, clean: np.ndarray | None, k: float
) -> np.ndarray | None:
    """Per-channel shrinkage of a mean shift from per-sample means ``[N, C]`` of both models.

    None (no shrinkage) when ``k`` is 0 or per-sample means are missing or do
    not pair up (a model whose axis 0 is not the sample axis).
    """
    if k == 0 or measured is None or clean is None or measured.shape != clean.shape:
        return None
    return PairedShift.from_samples(measured, clean).shrink_factor(k)


def _check_channels(info: BatchNormInfo, stats: ChannelStatistics) -> None:
    if info.channels is not None and stats.channels != info.channels:
        raise ModelError(
            f"BN {info.name!r} has {info.channels} channels but its input has {stats.channels} "
            "along axis 1; the model is inconsistent"
        )


def _float_batchnorm_inputs(float_model: onnx.ModelProto, names: Sequence[str]) -> dict[str, str]:
    """BN name -> its input tensor in the clean model (matched by node name)."""
    found = {
        n.name: n.input[0] for n in float_model.graph.node if n.op_type == "BatchNormalization"
    }
    missing = [n for n in names if n not in found]
    if missing:
        raise ModelError(
            f"the float model has no BatchNormalization nodes named {missing}; "
            "pass the model the NB-SMT model was rewritten from"
        )
    return {n: found[n] for n in names}


def correct_fused_layers(
    model: onnx.ModelProto,
    float_model: onnx.ModelProto,
    data: Data,
    *,
    variant: str = DEFAULT_CORRECTION,
    layers: Iterable[str] | None = None,
    ratio: VarianceRatio = DEFAULT_RATIO,
    single_batch_shortcut: bool = True,
    executor: Executor | None = None,
    progress: ProgressCallback | None = None,
    shrink: float = 0.0,
) -> CorrectionResult:
    """Per-channel correction of NbSmt op outputs against the clean model (docs/spec.md §5.2).

    For each layer (default: every NbSmt op not followed by a BN), in
    dependency order with upstream layers already corrected, measure its
    output statistics on the NB-SMT model (mu_n, var_n) and on the clean
    model (mu_c, var_c) at the node of the same name, and fold

    - ``mean``:      y' = y + (mu_c - mu_n)
    - ``mean+var``:  y' = a*(y - mu_n) + mu_c,  a = sqrt(ratio(var_c, var_n))

    into the op's ``w_scale`` and ``B``. Returns the corrected model.

    ``shrink`` (K): the mean part of each channel's correction is multiplied by
    :meth:`PairedShift.shrink_factor` of the per-sample paired differences.
    """
    rule = correction_rule(variant)
    data = _batches(data)
    names = list(dict.fromkeys(layers)) if layers is not None else layers_without_batchnorm(model)
    nodes = {n.name: n for n in model.graph.node if is_nbsmt(n)}
    unknown = [n for n in names if n not in nodes]
    if unknown:
        raise ConfigError(f"no NbSmt ops named {unknown} in the model")
    if not names:
        return CorrectionResult(variant, _copy(model), (), 0, 0)
    float_nodes = {n.name: n for n in float_model.graph.node}
    clean_specs: dict[str, ProbeSpec] = {}
    for name in names:
        fnode = float_nodes.get(name)
        if fnode is None or fnode.op_type not in ("Conv", "MatMul", "Gemm"):
            raise ModelError(
                f"the float model has no Conv/MatMul/Gemm named {name!r}; pass the model the "
                "NB-SMT model was rewritten from"
            )
        axis = CHANNEL_FIRST if fnode.op_type == "Conv" else CHANNEL_LAST
        clean_specs[name] = ProbeSpec(fnode.output[0], axis)
    clean_probe = add_statistics_probes(
        float_model, list(clean_specs.values()), only_statistics=True
    )
    levels = dependency_levels(model, names)
    groups = group_by_level(levels)
    reference: dict[str, ChannelStatistics] = {}
    clean_samples: dict[str, np.ndarray] = {}
    results: list[LayerCorrection] = []
    if single_batch_shortcut and len(groups) > 1 and _is_single_batch(data):
        logger.info("calibration data is one batch: the correction is exact in two passes")
        runner = _Runner(data, executor, progress, 2, shrink > 0)
        (clean,) = runner.run_pass([clean_probe], f"correction {variant}: clean model")
        reference = {n: clean[s.tensor] for n, s in clean_specs.items()}
        clean_samples = runner.sample_means[0]
        batch_specs = {
            n: rule.batch_form(reference[n], ratio, nbsmt_channel_axis(nodes[n])) for n in names
        }
        probed = correct_with_batch_statistics(model, batch_specs, only_statistics=True)
        (measured,) = runner.run_pass(
            [probed], f"correction {variant}: {len(names)} layers from batch statistics"
        )
        for name in names:
            y = nodes[name].output[0]
            mu = measured[y]
            factor = _shrink_factor(
                runner.sample_means[0].get(y), clean_samples.get(clean_specs[name].tensor), shrink
            )
            corr = _correction(name, mu, reference[name], variant, ratio, factor)
            results.append(LayerCorrection(name, levels[name], corr, mu, reference[name], factor))
        results.sort(key=lambda c: c.level)
        current = apply_channel_corrections(model, {c.name: c.correction for c in results})
        return CorrectionResult(variant, current, tuple(results), runner.passes, runner.model_runs)
    runner = _Runner(data, executor, progress, len(groups), shrink > 0)
    current = model
    for level, group in enumerate(groups):
        specs = {n: ProbeSpec(nodes[n].output[0], nbsmt_channel_axis(nodes[n])) for n in group}
        probed = add_statistics_probes(current, list(specs.values()), only_statistics=True)
        description = f"correction {variant}: level {level}, {len(group)} layers"
        if level == 0:
            measured, clean = runner.run_pass(
                [probed, clean_probe], description + " (+ clean model)"
            )
            reference = {n: clean[s.tensor] for n, s in clean_specs.items()}
            clean_samples = runner.sample_means[1]
        else:
            (measured,) = runner.run_pass([probed], description)
        level_results = []
        for name in group:
            mu = measured[specs[name].tensor]
            factor = _shrink_factor(
                runner.sample_means[0].get(specs[name].tensor),
                clean_samples.get(clean_specs[name].tensor),
                shrink,
            )
            corr = _correction(name, mu, reference[name], variant, ratio, factor)
            level_results.append(LayerCorrection(name, level, corr, mu, reference[name], factor))
        current = apply_channel_corrections(current, {c.name: c.correction for c in level_results})
        results.extend(level_results)
    return CorrectionResult(variant, current, tuple(results), runner.passes, runner.model_runs)


def _correction(
    name: str,
    measured: ChannelStatistics,
    reference: ChannelStatistics,
    variant: str,
    ratio: VarianceRatio,
    factor: np.ndarray | None = None,
) -> ChannelAffine:
    """The host half of correction ``variant`` for layer ``name`` (channels checked first)."""
    if measured.channels != reference.channels:
        raise ModelError(
            f"layer {name!r} has {measured.channels} output channels in the NB-SMT model and "
            f"{reference.channels} in the float model"
        )
    return correction_rule(variant).affine(measured, reference, ratio, factor)


@dataclass(frozen=True)
class BatchPlan:
    """How the transform's recalibration batches the calibration samples (reported).

    ``samples`` of the ``available`` calibration samples are used, in batches
    of ``batch_size``; ``fit`` is how many one batch may hold within
    ``memory_mb`` (``bytes_per_sample`` estimated by ``graph.memory``), None
    when the data could not be re-batched (``note`` says why).
    """

    samples: int | None
    batch_size: int | None
    available: int | None
    fit: int | None
    bytes_per_sample: int | None
    memory_mb: int
    note: str

    @property
    def one_batch(self) -> bool:
        return self.samples is not None and self.samples == self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "batch_size": self.batch_size,
            "available": self.available,
            "fit_in_one_batch": self.fit,
            "mb_per_sample": (
                None if self.bytes_per_sample is None else round(self.bytes_per_sample / 2**20, 3)
            ),
            "memory_mb": self.memory_mb,
            "note": self.note,
        }


def _memory_probe(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with what recalibration measures probed: every BN input and NbSmt output."""
    specs: dict[str, ProbeSpec] = {i.input: ProbeSpec(i.input) for i in find_batchnorms(model)}
    for node in model.graph.node:
        if is_nbsmt(node) and node.output[0] not in specs:
            specs[node.output[0]] = ProbeSpec(node.output[0], nbsmt_channel_axis(node))
    return add_statistics_probes(model, list(specs.values()), only_statistics=True).model


def plan_batches(
    model: onnx.ModelProto, data: Data, samples: int | None, memory_mb: int
) -> tuple[BatchPlan, BatchSource]:
    """Re-batch ``data`` for the exact recalibration routes (see ``RecalibrationConfig``).

    Returns the plan and the data source to use: one batch of as many samples
    as fit in ``memory_mb`` (or of ``samples``, streamed in batches that fit).
    Data that cannot be re-batched (not a ``CalibrationData``, a model with a
    fixed batch size, feeds without a common batch axis) is used as given.
    """
    given = _batches(data)
    source = given.batches

    def as_given(note: str) -> tuple[BatchPlan, BatchSource]:
        logger.info("recalibration uses the calibration batches as given: %s", note)
        return BatchPlan(None, None, None, None, None, memory_mb, note), given

    if not isinstance(data, CalibrationData):
        return as_given("not a CalibrationData")
    if not data.default_layout:
        return as_given("inputs that are constant or hold samples along another axis than 0")
    if any(spec.fixed_batch is not None for spec in data.specs):
        return as_given("the model has a fixed batch size")
    first = data.first_batch()
    if feed_samples(first) is None:
        return as_given("the feeds have no common batch axis")
    if data.source is not None:  # drawn from an indexed source: the count is known
        available = data.num_samples
    else:  # feed iterables: count them (one read of the data)
        available = 0
        for feed in source():
            n = feed_samples(feed)
            if n is None:
                return as_given("the feeds have no common batch axis")
            available += n
    if available == 0:
        raise DataError("calibration data yielded no samples")
    shapes = {k: tuple(np.asarray(v).shape[1:]) for k, v in first.items()}
    try:
        memory = _memory.estimate_activation_memory(_memory_probe(model), shapes)
    except InternalError as err:
        return as_given(f"no memory estimate ({err})")
    fit = memory.largest_batch(memory_mb * 2**20)
    wanted = min(available, fit if samples is None else samples)
    batch = min(wanted, fit)
    per_mb = memory.per_sample / 2**20
    if batch == wanted and wanted < available and samples is None:
        note = (
            f"one batch of {wanted} of the {available} calibration samples (~{per_mb:.1f} MB "
            f"each; {fit} fit in {memory_mb} MB — raise --recal-memory to use more, or set "
            "--recal-samples to stream them at one pass per level of layers)"
        )
    elif batch == wanted:
        note = f"one batch of {wanted} samples (~{per_mb:.1f} MB each; {fit} fit in {memory_mb} MB)"
    else:
        note = (
            f"{wanted} samples streamed in batches of {batch}: one batch of {wanted} would need "
            f"~{memory.batch_bytes(wanted) / 2**20:.0f} MB (+ headroom) > {memory_mb} MB, so "
            "sequential, relative and the correction take one pass per level of layers"
        )
    logger.info("recalibration: %s; %d calibration samples available", note, available)
    # The budget is fixed (results must not depend on the machine); say so if it cannot hold.
    need = memory.batch_bytes(batch) * _memory.SAFETY_FACTOR
    free = _memory.available_memory_bytes()
    if free is not None and need > free:
        logger.warning(
            "a recalibration batch of %d samples may need ~%.0f MB but only %.0f MB of memory "
            "is available; lower --recal-memory (now %d MB) if the run is killed",
            batch,
            need / 2**20,
            free / 2**20,
            memory_mb,
        )
    plan = BatchPlan(wanted, batch, available, fit, memory.per_sample, memory_mb, note)
    regrouped = data.regrouped(batch, wanted)
    return plan, regrouped if regrouped is not None else FeedStream(rebatch(source, batch, wanted))


@dataclass(frozen=True)
class TransformRecalibration:
    """What the transform step gets back: the final simulation model and a JSON-ready report."""

    model: onnx.ModelProto
    batchnorm: RecalibrationResult | None
    fold: FoldResult | None
    correction: CorrectionResult | None
    report: dict[str, Any]
    batches: BatchPlan | None = None
    #: the simulation model recalibration started from (see :func:`apply_recalibration`)
    source: onnx.ModelProto = field(default_factory=onnx.ModelProto)


def recalibrate(
    *,
    float_model: onnx.ModelProto,
    sim_model: onnx.ModelProto,
    data: Any,
    config: Any,
    progress: bool | ProgressCallback | None = None,
    executor: Executor | None = None,
    relative_ratio: VarianceRatio | None = None,
    correction_ratio: VarianceRatio = DEFAULT_RATIO,
    auto_batch: bool = True,
) -> TransformRecalibration:
    """The transform pipeline's recalibration step, in the order the math needs.

    1. BN recalibration with ``config.strategy`` (every BN with an NbSmt op upstream);
    2. ``config.correction`` ("none" | "mean" | "mean+var") for NbSmt ops with no BN
       after them (fused models, classifier heads), measured on the model from 1.
       Ops upstream of a recalibrated BN are left to that BN: correcting them
       afterwards would change the input the BN was just calibrated on;
    3. ``config.fold``: fold BNs into their NbSmt ops (others keep the new statistics).

    ``data`` is a :class:`~nbsmt_onnx.calibration.data.CalibrationData` (its
    ``batches`` method is called once per pass) or any callable returning an
    iterable of feed dicts. ``config`` is a ``config.RecalibrationConfig``.
    ``progress``: True shows a progress bar per pass, or pass a callback.
    ``relative_ratio`` / ``correction_ratio``: the variance ratios of ``relative``
    (default: ``VarianceRatio(bound=config.variance_bound)``, i.e. the mean shift
    only unless the config says otherwise) and of the ``mean+var`` correction.
    ``auto_batch``: regroup a ``CalibrationData`` for the exact routes
    (:func:`plan_batches`, ``config.samples`` / ``config.memory_mb``); False
    uses its batches as given (``bench/recalibration_study.py`` sets batches itself).
    ``executor``: where the passes run (``runtime.executor``; in process by default).
    """
    defaults = RecalibrationConfig()
    if relative_ratio is None:
        bound = getattr(config, "variance_bound", defaults.variance_bound)
        relative_ratio = VarianceRatio(floor=DEFAULT_RELATIVE_RATIO.floor, bound=bound)
    given = _batches(data)
    plan, source = None, given
    if auto_batch:
        plan, source = plan_batches(
            sim_model,
            data,
            getattr(config, "samples", defaults.samples),
            getattr(config, "memory_mb", defaults.memory_mb),
        )
    callback = _progress_bar() if progress is True else (progress or None)
    shrink = getattr(config, "shrink", defaults.shrink)
    bn = recalibrate_batchnorm(
        sim_model,
        # train-mode normalises with each batch's statistics: its batch size is the method's
        given if strategy_entry(config.strategy).schedule == BATCH_STATISTICS else source,
        strategy=config.strategy,
        float_model=float_model,
        ratio=relative_ratio,
        executor=executor,
        progress=callback,
        shrink=shrink,
    )
    model = bn.model
    correction = None
    covered = upstream_nodes(model, [_first_input(model, u.name) for u in bn.updates])
    layers = [n for n in layers_without_batchnorm(model) if n not in covered]
    if config.correction != "none" and layers:
        correction = correct_fused_layers(
            model,
            float_model,
            source,
            variant=config.correction,
            layers=layers,
            ratio=correction_ratio,
            executor=executor,
            progress=callback,
            shrink=shrink,
        )
        model = correction.model
    fold = None
    if config.fold:
        fold = FoldBatchNormIntoNbSmt()(model)
        model = fold.model
    report = _report(bn, correction, fold)
    if plan is not None:
        report["batches"] = plan.to_dict()
    logger.info(
        "recalibration: %d BNs (%s, %d passes), %d layers corrected, %d BNs folded",
        len(bn.updates),
        bn.strategy,
        bn.passes,
        len(correction.corrections) if correction else 0,
        fold.count if fold else 0,
    )
    return TransformRecalibration(model, bn, fold, correction, report, plan, sim_model)


def correction_units(result: TransformRecalibration) -> list[str]:
    """Names of what recalibration changed (BNs and corrected layers), in graph order."""
    names = [u.name for u in result.batchnorm.updates] if result.batchnorm else []
    if result.correction is not None:
        names += [c.name for c in result.correction.corrections]
    position = {n.name: i for i, n in enumerate(result.source.graph.node)}
    return sorted(dict.fromkeys(names), key=lambda n: position.get(n, len(position)))


def apply_recalibration(
    result: TransformRecalibration, keep: Collection[str] | None = None, *, fold: bool = True
) -> tuple[onnx.ModelProto, FoldResult | None]:
    """The simulation model with the new statistics / corrections of ``keep`` (None: all).

    Built from ``result.source`` (the model before recalibration): the kept BNs
    get their new statistics, the kept layers their correction, then BNs are
    folded when ``fold``. With nothing kept the source model itself is returned,
    unfolded: exactly what the transform gives without recalibration.
    """
    wanted = None if keep is None else set(keep)
    stats = {
        u.name: u.new
        for u in (result.batchnorm.updates if result.batchnorm else ())
        if wanted is None or u.name in wanted
    }
    affine = {
        c.name: c.correction
        for c in (result.correction.corrections if result.correction else ())
        if wanted is None or c.name in wanted
    }
    if not stats and not affine:
        return result.source, None
    model = write_batchnorm_statistics(result.source, stats) if stats else _copy(result.source)
    if affine:
        model = apply_channel_corrections(model, affine)
    folded = None
    if fold:
        folded = FoldBatchNormIntoNbSmt()(model)
        model = folded.model
    return model, folded


def _first_input(model: onnx.ModelProto, node_name: str) -> str:
    """First input tensor of the main-graph node ``node_name``."""
    for node in model.graph.node:
        if node.name == node_name:
            return node.input[0]
    raise ModelError(f"no node named {node_name!r} in the model")


def _progress_bar() -> ProgressCallback:
    """One :class:`~nbsmt_onnx.progress.Progress` per pass (a bar on a terminal, else log lines)."""
    from nbsmt_onnx.progress import Progress

    bars: dict[int, Progress] = {}

    def update(p: PassProgress) -> None:
        bar = bars.get(p.pass_index)
        if bar is None:
            bar = bars[p.pass_index] = Progress(
                f"recalibration pass {p.pass_index}/{p.total_passes} ({p.description})", p.expected
            )
        if p.finished:
            bar.close()
        else:
            bar.update(p.batches, p.expected)

    return update


def _shrink_summary(factor: np.ndarray | None) -> dict[str, Any]:
    """Mean shrinkage factor over channels and the share of channels left uncorrected."""
    if factor is None:
        return {}
    return {
        "shrink_factor_mean": float(np.mean(factor)),
        "channels_not_shifted": float(np.mean(factor == 0.0)),
    }


def _stats_summary(stats: ChannelStatistics) -> dict[str, float]:
    return {"mean": float(np.mean(stats.mean)), "std": float(np.mean(stats.std))}


def _report(
    bn: RecalibrationResult, correction: CorrectionResult | None, fold: FoldResult | None
) -> dict[str, Any]:
    """Per BN / corrected layer: level and statistic shift before/after; pass counts."""
    out: dict[str, Any] = {
        "strategy": bn.strategy,
        "passes": bn.passes,
        "model_runs": bn.model_runs,
        "batchnorms": [
            {
                "name": u.name,
                "level": u.level,
                "mean_shift": u.mean_shift,
                "std_ratio": u.std_ratio,
                "old": {
                    "mean": float(np.mean(u.old.mean)),
                    "std": float(np.mean(np.sqrt(u.old.var))),
                },
                "new": {
                    "mean": float(np.mean(u.new.mean)),
                    "std": float(np.mean(np.sqrt(u.new.var))),
                },
                "measured": _stats_summary(u.measured),
                **({"clean": _stats_summary(u.reference)} if u.reference is not None else {}),
                **_shrink_summary(u.shrink),
            }
            for u in bn.updates
        ],
        "skipped": [{"name": s.node, "reason": s.reason} for s in bn.skipped],
    }
    if correction is not None:
        out["correction"] = {
            "variant": correction.variant,
            "passes": correction.passes,
            "model_runs": correction.model_runs,
            "layers": [
                {
                    "name": c.name,
                    "level": c.level,
                    "mean_shift": c.mean_shift,
                    "std_ratio": c.std_ratio,
                    "measured": _stats_summary(c.measured),
                    "clean": _stats_summary(c.reference),
                    **_shrink_summary(c.shrink),
                }
                for c in correction.corrections
            ],
        }
    if fold is not None:
        out["fold"] = fold_summary(fold)
    return out


def fold_summary(fold: FoldResult | None) -> dict[str, Any]:
    """The report's ``fold`` section (None: nothing was folded)."""
    if fold is None:
        return {"folded": [], "kept": []}
    return {
        "folded": [{"batchnorm": f.batchnorm, "into": f.into} for f in fold.folded],
        "kept": [{"name": s.node, "reason": s.reason} for s in fold.skipped],
    }


__all__ = [
    "CORRECTIONS",
    "DEFAULT_CORRECTION",
    "DEFAULT_RATIO",
    "DEFAULT_RELATIVE_RATIO",
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "BatchNormUpdate",
    "BatchPlan",
    "CorrectionResult",
    "DataSource",
    "LayerCorrection",
    "PassProgress",
    "ProbeReducer",
    "RecalibrationResult",
    "TransformRecalibration",
    "VarianceRatio",
    "apply_recalibration",
    "correct_fused_layers",
    "correction_units",
    "fold_summary",
    "plan_batches",
    "recalibrate",
    "recalibrate_batchnorm",
]
