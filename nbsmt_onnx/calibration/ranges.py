"""Activation ranges for quantization (docs/spec.md §2), measured on the float model.

``max`` estimator: one pass. A copy of the model gets, for every tensor to
calibrate, a ``ReduceMin`` and a ``ReduceMax`` over the whole tensor as extra
graph outputs; the session returns two scalars per tensor and batch, and the
host keeps the running minimum and maximum. Nothing else leaves the graph,
so memory is independent of the number of samples.

``percentile`` estimator: the pass above gives the exact range, a second
pass exposes the tensors themselves one batch at a time and adds them to a
fixed histogram (``bins`` bins over the exact range) per tensor; the batch is
dropped right after. The percentile is read from the cumulative histogram
with a resolution of one bin (``(max - min) / bins``), rounded outwards so
the estimate never cuts more than asked. Memory: one batch of the probed
tensors plus ``bins`` counters per tensor.

Signedness (``min < 0``) always comes from the exact minimum, whatever the
estimator: a tensor that is ever negative is quantized signed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from nbsmt_onnx.calibration.data import CalibrationData, Feed
from nbsmt_onnx.config import RangeConfig
from nbsmt_onnx.errors import DataError, InternalError
from nbsmt_onnx.graph.naming import NameGenerator
from nbsmt_onnx.ops import schema
from nbsmt_onnx.progress import Progress
from nbsmt_onnx.runtime.executor import Executor, Job, LocalExecutor
from nbsmt_onnx.runtime.session import SessionOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActivationRange:
    """The calibrated range of one tensor and the quantization it implies (docs/spec.md §2)."""

    min: float
    max: float
    signed: bool

    @classmethod
    def from_min_max(cls, lo: float, hi: float) -> ActivationRange:
        return cls(float(lo), float(hi), bool(lo < 0))

    def scale(self) -> np.float32:
        """``max / 255`` (unsigned) or ``max(|min|, |max|) / 127`` (signed), in float32.

        A tensor that was zero on all calibration data gets scale 1 (as a
        weight channel of zeros does): any scale quantizes zeros to zero.
        """
        if self.signed:
            peak = max(abs(np.float32(self.min)), abs(np.float32(self.max)))
            scale = np.float32(peak) / np.float32(127)
        else:
            scale = np.float32(max(self.max, 0.0)) / np.float32(255)
        if not scale > 0 or not np.isfinite(scale):
            return np.float32(1.0)
        return np.float32(scale)


class MinMax:
    """Running min/max of several tensors; mergeable."""

    def __init__(self, names: Sequence[str]) -> None:
        self.lo = {n: np.inf for n in names}
        self.hi = {n: -np.inf for n in names}

    def update(self, name: str, lo: float, hi: float) -> None:
        if np.isnan(lo) or np.isnan(hi):
            raise DataError(
                f"tensor {name!r} contains NaN on the calibration data; check the data and the model"
            )
        if lo > hi:  # empty tensor this batch: ReduceMin gives +inf, ReduceMax -inf
            return
        if np.isinf(lo) or np.isinf(hi):
            raise DataError(
                f"tensor {name!r} contains Inf on the calibration data; check the data and the model"
            )
        self.lo[name] = min(self.lo[name], float(lo))
        self.hi[name] = max(self.hi[name], float(hi))

    def merge(self, other: MinMax) -> None:
        for n in other.lo:
            self.update(n, other.lo[n], other.hi[n])

    def ranges(self) -> dict[str, ActivationRange]:
        out = {}
        for n in self.lo:
            if self.lo[n] > self.hi[n]:
                raise DataError(
                    f"tensor {n!r} was empty on every calibration batch; cannot calibrate it"
                )
            out[n] = ActivationRange.from_min_max(self.lo[n], self.hi[n])
        return out


class Histogram:
    """A fixed-edge histogram of one tensor's values (bounded memory, mergeable)."""

    def __init__(self, lo: float, hi: float, bins: int) -> None:
        self.lo, self.hi, self.bins = float(lo), float(hi), bins
        self.counts = np.zeros(bins, dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        if self.hi <= self.lo:
            self.counts[0] += values.size
            return
        v = values.astype(np.float64, copy=False).ravel()
        idx = np.floor((v - self.lo) / (self.hi - self.lo) * self.bins).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.bins)

    def percentile_range(self, percentile: float) -> tuple[float, float]:
        """(lower, upper): the (100-p)-th and p-th percentiles, rounded outwards to bin edges."""
        total = int(self.counts.sum())
        if total == 0 or self.hi <= self.lo:
            return self.lo, self.hi
        width = (self.hi - self.lo) / self.bins
        cum = np.cumsum(self.counts)
        upper_bin = int(np.searchsorted(cum, percentile / 100.0 * total, side="left"))
        lower_bin = int(np.searchsorted(cum, (100.0 - percentile) / 100.0 * total, side="right"))
        upper = min(self.hi, self.lo + (upper_bin + 1) * width)
        lower = max(self.lo, self.lo + lower_bin * width)
        return lower, upper


def _probe_model(
    model: onnx.ModelProto, tensors: Sequence[str], expose: bool
) -> tuple[onnx.ModelProto, dict[str, tuple[str, ...]]]:
    """A copy of ``model`` whose only outputs are min/max scalars (or copies) of ``tensors``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    g = probe.graph
    names = NameGenerator.for_model(probe)
    outputs: dict[str, tuple[str, ...]] = {}
    del g.output[:]
    for t in tensors:
        if expose:
            out = names.new(t, "probe")
            g.node.append(
                helper.make_node("Identity", [t], [out], name=names.new(t, "probe_identity"))
            )
            g.output.append(helper.make_empty_tensor_value_info(out))
            outputs[t] = (out,)
        else:
            lo, hi = names.new(t, "range_min"), names.new(t, "range_max")
            g.node.append(
                helper.make_node(
                    "ReduceMin", [t], [lo], name=names.new(t, "range_reducemin"), keepdims=0
                )
            )
            g.node.append(
                helper.make_node(
                    "ReduceMax", [t], [hi], name=names.new(t, "range_reducemax"), keepdims=0
                )
            )
            g.output.extend(
                [
                    helper.make_tensor_value_info(lo, onnx.TensorProto.FLOAT, []),
                    helper.make_tensor_value_info(hi, onnx.TensorProto.FLOAT, []),
                ]
            )
            outputs[t] = (lo, hi)
    return probe, outputs


@dataclass(frozen=True)
class MinMaxReducer:
    """Executor reducer: per-batch min/max scalars of each tensor -> :class:`MinMax`."""

    tensors: tuple[str, ...]
    outputs: tuple[str, ...]  # (min, max) output of each tensor, in ``tensors`` order

    def reduce(self, outputs: Sequence[np.ndarray], batch: Feed, first_sample: int) -> MinMax:
        found = MinMax(self.tensors)
        for k, t in enumerate(self.tensors):
            found.update(t, float(outputs[2 * k]), float(outputs[2 * k + 1]))
        return found

    def merge(self, left: MinMax, right: MinMax) -> MinMax:
        left.merge(right)
        return left


@dataclass(frozen=True)
class HistogramReducer:
    """Executor reducer: histograms of each exposed tensor over fixed edges."""

    tensors: tuple[str, ...]
    outputs: tuple[str, ...]  # the exposed copy of each tensor
    edges: tuple[tuple[float, float], ...]  # (lo, hi) of each tensor
    bins: int

    def reduce(
        self, outputs: Sequence[np.ndarray], batch: Feed, first_sample: int
    ) -> dict[str, Histogram]:
        out = {}
        for t, (lo, hi), value in zip(self.tensors, self.edges, outputs, strict=True):
            out[t] = Histogram(lo, hi, self.bins)
            out[t].add(np.asarray(value))
        return out

    def merge(
        self, left: dict[str, Histogram], right: dict[str, Histogram]
    ) -> dict[str, Histogram]:
        for t, hist in right.items():
            # a new array: partials that crossed processes may be read-only views
            left[t].counts = left[t].counts + hist.counts
        return left


def _pass(
    model: onnx.ModelProto,
    data: CalibrationData,
    reducer: Any,
    desc: str,
    progress: bool,
    threads: int,
    executor: Executor | None,
) -> Any:
    uses_library = any(n.domain == schema.DOMAIN for n in model.graph.node)
    job = Job(
        model,
        data,
        reducer,
        SessionOptions(intra_op_threads=threads, register_library=uses_library),
        what="simulation model" if uses_library else "float model",
    )
    with Progress(desc, data.num_batches, enabled=progress) as bar:
        return (executor or LocalExecutor()).run(job, bar.update)


def collect_ranges(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    data: CalibrationData,
    config: RangeConfig | None = None,
    *,
    progress: bool = False,
    intra_op_threads: int = 0,
    executor: Executor | None = None,
) -> dict[str, ActivationRange]:
    """Calibrate the range of every tensor in ``tensors`` on ``data`` with the float ``model``.

    Both passes (min/max, and the histogram for the percentile estimator) run
    through ``executor`` (in process by default) as per-batch partial results
    merged in batch order, so the ranges do not depend on how the work is split.
    """
    config = config or RangeConfig()
    tensors = list(dict.fromkeys(tensors))
    if not tensors:
        return {}
    probe, outs = _probe_model(model, tensors, expose=False)
    order = tuple(o for t in tensors for o in outs[t])
    minmax = _pass(
        probe, data, MinMaxReducer(tuple(tensors), order), "activation ranges", progress,
        intra_op_threads, executor,
    )  # fmt: skip
    exact = minmax.ranges()
    log.info("ranges: %d tensor(s) over %s batch(es)", len(tensors), data.num_batches or "all")
    if config.estimator == "max":
        return exact
    if config.estimator != "percentile":
        raise InternalError(f"unknown estimator {config.estimator!r}")
    probe, outs = _probe_model(model, tensors, expose=True)
    reducer = HistogramReducer(
        tuple(tensors),
        tuple(outs[t][0] for t in tensors),
        tuple((exact[t].min, exact[t].max) for t in tensors),
        config.bins,
    )
    hists = _pass(
        probe, data, reducer, "activation ranges (histogram)", progress, intra_op_threads, executor
    )
    out = {}
    for t in tensors:
        lo, hi = hists[t].percentile_range(config.percentile)
        signed = exact[t].signed
        # An unsigned tensor keeps 0 as its lower end; a signed one keeps a negative lower end.
        out[t] = ActivationRange(min(lo, 0.0) if signed else max(lo, 0.0), hi, signed)
    return out
