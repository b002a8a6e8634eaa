"""Expose per-channel statistics of chosen tensors as extra graph outputs.

Calibration must not export whole activation tensors (docs/spec.md §4): for each
probed tensor ``x`` this pass adds, to a *copy* of the model, a few standard
ONNX nodes that reduce ``x`` per channel to

- ``count``: int64 scalar, elements per channel in this batch (N x spatial),
  taken from ``Size(x) / C`` so dynamic batch and spatial sizes work;
- ``mean``: float64 [C], the batch mean;
- ``m2``: float64 [C], the sum of squared deviations from the batch mean.

``x`` is cast to float64 before reducing: the cast is exact, and sums of up
to millions of float32 values then keep ~1e-13 relative accuracy, so the host
accumulator (``calibration.statistics``) matches a NumPy float64 computation
over all data to ~1e-12 rather than float32's ~1e-6. The centred M2 (two
reductions per batch) avoids the cancellation of sum-of-squares formulas.

Layouts: ``channel_axis=1`` is ONNX's NC... layout (BatchNormalization
inputs, NbSmtConv outputs; also [N, C] for BN after a fully connected layer);
``channel_axis=-1`` is [..., C] (NbSmtMatMul / MatMul / Gemm outputs).

:func:`use_batch_statistics` is the train-mode rewrite built on the same
nodes: selected BatchNormalization nodes normalise with the statistics of the
current batch instead of their running statistics.

The mapping from probed tensor to output names is returned as Python objects;
names are made by :class:`~nbsmt_onnx.graph.naming.NameGenerator` and never
parsed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nbsmt_onnx.calibration.statistics import ChannelStatistics
from nbsmt_onnx.errors import InternalError, UnsupportedModelError
from nbsmt_onnx.graph.bn import node_inputs
from nbsmt_onnx.graph.naming import NameGenerator

logger = logging.getLogger(__name__)
_PROTO_LIMIT = 2**31 - 1

CHANNEL_FIRST = 1
CHANNEL_LAST = -1


@dataclass(frozen=True)
class ProbeSpec:
    """A tensor of the main graph to measure, and where its channel axis is."""

    tensor: str
    channel_axis: int = CHANNEL_FIRST

    def __post_init__(self) -> None:
        if self.channel_axis not in (CHANNEL_FIRST, CHANNEL_LAST):
            raise InternalError(
                f"channel_axis must be {CHANNEL_FIRST} or {CHANNEL_LAST}, got {self.channel_axis}"
            )


@dataclass(frozen=True)
class ProbeOutputs:
    """Names of the graph outputs that carry one probed tensor's batch statistics."""

    tensor: str
    channel_axis: int
    count: str
    mean: str
    m2: str
    #: per-sample channel means [N, C] (float64; N = the tensor's axis 0), for paired
    #: per-sample differences between two models on the same samples
    sample_mean: str = ""

    @property
    def statistic_names(self) -> tuple[str, str, str]:
        """The outputs :meth:`statistics` reads (count, mean, M2)."""
        return (self.count, self.mean, self.m2)

    @property
    def names(self) -> tuple[str, ...]:
        return self.statistic_names + ((self.sample_mean,) if self.sample_mean else ())

    def sample_means(self, values: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """Per-sample channel means ``[N, C]`` of one run (None if not probed)."""
        if not self.sample_mean:
            return None
        arr = np.asarray(values[self.sample_mean], dtype=np.float64)
        return arr.reshape(arr.shape[0], -1)

    def statistics(self, values: Mapping[str, np.ndarray]) -> ChannelStatistics:
        """Convert one run's outputs (name -> array) into :class:`ChannelStatistics`."""
        count = int(np.asarray(values[self.count]).reshape(()))
        mean = np.asarray(values[self.mean], dtype=np.float64)
        if count == 0:
            return ChannelStatistics.empty(mean.shape[0])
        return ChannelStatistics.from_moments(count, mean, values[self.m2])


@dataclass(frozen=True)
class ProbeResult:
    """The probed copy of the model and, per probed tensor, its statistic outputs."""

    model: onnx.ModelProto
    outputs: dict[str, ProbeOutputs]

    @property
    def output_names(self) -> list[str]:
        names: list[str] = []
        for probe in self.outputs.values():
            names.extend(probe.names)
        return names

    @property
    def statistic_names(self) -> list[str]:
        """:attr:`output_names` without the per-sample means (when only moments are needed)."""
        return [n for probe in self.outputs.values() for n in probe.statistic_names]


def default_opset(model: onnx.ModelProto) -> int:
    """Version of the default ONNX domain the model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise UnsupportedModelError(
        "the model imports no default ONNX opset; re-export it with a standard opset (>= 11)"
    )


def _available_tensors(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


class _StatisticsBuilder:
    """Emits the reduction nodes for one graph, respecting the model's opset."""

    def __init__(self, model: onnx.ModelProto, names: NameGenerator) -> None:
        self.opset = default_opset(model)
        if self.opset < 11:
            raise UnsupportedModelError(
                f"statistics probes need ONNX opset >= 11, the model has {self.opset}; "
                "convert it with onnx.version_converter"
            )
        self.names = names
        self.initializers: list[onnx.TensorProto] = []
        self._constants: dict[tuple[str, tuple[int, ...]], str] = {}

    def _const_i64(self, purpose: str, values: Sequence[int]) -> str:
        key = (purpose, tuple(values))
        if key not in self._constants:
            name = self.names.new("nbsmt_probe", purpose)
            self.initializers.append(
                numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)
            )
            self._constants[key] = name
        return self._constants[key]

    def _reduce(
        self,
        nodes: list[onnx.NodeProto],
        op: str,
        base: str,
        x: str,
        axes: Sequence[int],
        keepdims: int,
    ) -> str:
        """``op`` (ReduceSum / ReduceSumSquare) over ``axes``; axes became an input at
        opset 13 for ReduceSum and at opset 18 for the other reductions."""
        out = self.names.new(base, op)
        axes_as_input = self.opset >= (13 if op == "ReduceSum" else 18)
        inputs = [x, self._const_i64("axes", axes)] if axes_as_input else [x]
        attrs: dict[str, Any] = {"keepdims": keepdims}
        if not axes_as_input:
            attrs["axes"] = list(axes)
        nodes.append(helper.make_node(op, inputs, [out], name=self.names.new(base, op), **attrs))
        return out

    def _node(
        self,
        nodes: list[onnx.NodeProto],
        op: str,
        inputs: list[str],
        base: str,
        purpose: str,
        **attrs: Any,
    ) -> str:
        out = self.names.new(base, purpose)
        nodes.append(helper.make_node(op, inputs, [out], name=self.names.new(base, op), **attrs))
        return out

    def moments(
        self, x: str, channel_axis: int
    ) -> tuple[list[onnx.NodeProto], str, str, str, str]:
        """Nodes computing (count int64 scalar, mean float64 [C], m2 float64 [C], per-sample
        means float64 [N, C]) of ``x`` (N = axis 0 of ``x``)."""
        nodes: list[onnx.NodeProto] = []
        base = x
        xd = self._node(nodes, "Cast", [x], base, "f64", to=TensorProto.DOUBLE)
        shape = self._node(nodes, "Shape", [x], base, "shape")
        if channel_axis == CHANNEL_FIRST:
            grouped = self._node(
                nodes, "Reshape", [xd, self._const_i64("shape_n_c_rest", [0, 0, -1])], base, "ncs"
            )
            axes: list[int] = [0, 2]
            channels = self._node(
                nodes, "Gather", [shape, self._const_i64("index_1", [1])], base, "channels", axis=0
            )
        else:
            channels = self._node(
                nodes,
                "Gather",
                [shape, self._const_i64("index_last", [-1])],
                base,
                "channels",
                axis=0,
            )
            target = self._node(
                nodes,
                "Concat",
                [self._const_i64("minus_one", [-1]), channels],
                base,
                "shape_rest_c",
                axis=0,
            )
            grouped = self._node(nodes, "Reshape", [xd, target], base, "sc")
            axes = [0]
        size = self._node(nodes, "Size", [x], base, "size")
        count_1 = self._node(nodes, "Div", [size, channels], base, "count_1d")
        count = self._node(
            nodes, "Reshape", [count_1, self._const_i64("scalar_shape", [])], base, "count"
        )
        count_d = self._node(nodes, "Cast", [count], base, "count_f64", to=TensorProto.DOUBLE)
        total = self._reduce(nodes, "ReduceSum", base, grouped, axes, keepdims=1)
        mean_k = self._node(nodes, "Div", [total, count_d], base, "mean_keepdims")
        centred = self._node(nodes, "Sub", [grouped, mean_k], base, "centred")
        # One fused reduction: no float64 tensor of squares is materialised (peak
        # memory of a probe is x, its float64 copy and the centred copy).
        m2 = self._reduce(nodes, "ReduceSumSquare", base, centred, axes, keepdims=0)
        mean = self._node(nodes, "Reshape", [mean_k, self._const_i64("flat", [-1])], base, "mean")
        if channel_axis == CHANNEL_FIRST:  # grouped is [N, C, rest]
            per_sample = self._reduce(nodes, "ReduceMean", base, grouped, [2], keepdims=0)
        else:  # [N, rest..., C] -> [N, rest, C]
            target = self._node(
                nodes,
                "Concat",
                [self._const_i64("keep_n_rest", [0, -1]), channels],
                base,
                "shape_n_rest_c",
                axis=0,
            )
            by_sample = self._node(nodes, "Reshape", [xd, target], base, "nsc")
            per_sample = self._reduce(nodes, "ReduceMean", base, by_sample, [1], keepdims=0)
        return nodes, count, mean, m2, per_sample


def _check(model: onnx.ModelProto, when: str) -> None:
    if model.ByteSize() > _PROTO_LIMIT:  # the checker refuses protos over 2 GB; io checks files
        logger.debug("model over 2 GB: onnx.checker skipped here")
        return
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if when == "before":
            raise UnsupportedModelError(f"the model fails onnx.checker: {first}") from err
        raise InternalError(f"statistics probe produced an invalid model: {first}") from err


def _stat_outputs(probe: ProbeOutputs) -> list[onnx.ValueInfoProto]:
    out = [
        helper.make_tensor_value_info(probe.count, TensorProto.INT64, []),
        helper.make_tensor_value_info(probe.mean, TensorProto.DOUBLE, [None]),
        helper.make_tensor_value_info(probe.m2, TensorProto.DOUBLE, [None]),
    ]
    if probe.sample_mean:
        out.append(
            helper.make_tensor_value_info(probe.sample_mean, TensorProto.DOUBLE, [None, None])
        )
    return out


def _normalise_specs(probes: Iterable[ProbeSpec | str]) -> list[ProbeSpec]:
    specs: dict[str, ProbeSpec] = {}
    for probe in probes:
        spec = ProbeSpec(probe) if isinstance(probe, str) else probe
        previous = specs.get(spec.tensor)
        if previous is not None and previous.channel_axis != spec.channel_axis:
            raise InternalError(
                f"tensor {spec.tensor!r} probed with two channel axes "
                f"({previous.channel_axis} and {spec.channel_axis})"
            )
        specs[spec.tensor] = spec
    return list(specs.values())


def add_statistics_probes(
    model: onnx.ModelProto,
    probes: Iterable[ProbeSpec | str],
    *,
    only_statistics: bool = False,
    check: bool = True,
) -> ProbeResult:
    """Return a copy of ``model`` that also outputs per-channel batch statistics of ``probes``.

    ``probes`` are tensor names of the main graph (channel axis 1) or
    :class:`ProbeSpec` objects. The original model is not modified. The
    probed model keeps all original outputs unless ``only_statistics``: then
    the statistics are its only outputs and every node they do not depend
    on is removed, so a pass measuring early layers does not pay for the
    rest of the network (graph inputs are all kept, so the same feeds work).
    """
    specs = _normalise_specs(probes)
    if check:
        _check(model, "before")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    available = _available_tensors(graph)
    missing = [s.tensor for s in specs if s.tensor not in available]
    if missing:
        raise InternalError(f"cannot probe tensors missing from the main graph: {missing}")
    builder = _StatisticsBuilder(out, NameGenerator.for_model(out))
    outputs: dict[str, ProbeOutputs] = {}
    for spec in specs:
        nodes, count, mean, m2, per_sample = builder.moments(spec.tensor, spec.channel_axis)
        graph.node.extend(nodes)
        probe = ProbeOutputs(spec.tensor, spec.channel_axis, count, mean, m2, per_sample)
        graph.output.extend(_stat_outputs(probe))
        outputs[spec.tensor] = probe
    graph.initializer.extend(builder.initializers)
    if only_statistics:
        keep = [o for o in graph.output if o.name in {n for p in outputs.values() for n in p.names}]
        del graph.output[:]
        graph.output.extend(keep)
        prune_to_outputs(graph)
    if check:
        _check(out, "after")
    logger.debug("added statistics probes for %d tensors", len(outputs))
    return ProbeResult(out, outputs)


@dataclass(frozen=True)
class RelativeShift:
    """Running statistics moved by the batch's shift against a clean reference (one-pass ``relative``).

    A BN given one of these in :func:`use_batch_statistics` normalises with

        mean' = mean_base + (batch_mean - mean_reference)
        var'  = var_base * min(max((batch_var + offset) / var_reference, low), high)

    where ``var_reference`` already includes the offset (``var_c + offset``).
    The node order of this arithmetic is the one
    ``calibration.strategies`` uses on the host in float64, so when the
    batch is the whole calibration set the BN sees bit for bit the
    statistics the level-by-level passes would write.
    """

    mean_base: np.ndarray
    mean_reference: np.ndarray
    var_base: np.ndarray
    var_reference: np.ndarray
    offset: float
    low: float
    high: float


@dataclass(frozen=True)
class BatchCorrection:
    """Per-channel correction of an NbSmt op's output from its own batch statistics (§5.2).

    With batch statistics (mu_n, var_n) of the op's output ``y``:

        a = sqrt(min(max(numerator / (var_n + offset), low), high))   (``scale=True``)
        a = 1                                                         (``scale=False``, mean only)
        b = mean_reference - a * mu_n

    and ``a``/``b`` are folded into a copy of the op (``w_scale * a``,
    ``B * a + b``, in float64, rounded once to float32 — exactly what
    ``graph.fold.apply_channel_corrections`` writes).
    """

    mean_reference: np.ndarray
    numerator: np.ndarray
    offset: float
    low: float
    high: float
    scale: bool
    channel_axis: int = CHANNEL_FIRST


def _const_f64(
    builder: _StatisticsBuilder, base: str, purpose: str, value: np.ndarray | float
) -> str:
    name = builder.names.new(base, purpose)
    builder.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=np.float64), name))
    return name


def _clip(
    builder: _StatisticsBuilder,
    nodes: list[onnx.NodeProto],
    base: str,
    x: str,
    low: float,
    high: float,
) -> str:
    """Nodes for min(max(x, low), high) in float64 (the bounded variance ratios)."""
    x = builder._node(
        nodes, "Max", [x, _const_f64(builder, base, "ratio_low", low)], base, "ratio_lo"
    )
    return builder._node(
        nodes, "Min", [x, _const_f64(builder, base, "ratio_high", high)], base, "ratio_hi"
    )


def _relative_moments(
    builder: _StatisticsBuilder,
    nodes: list[onnx.NodeProto],
    base: str,
    mean64: str,
    var64: str,
    shift: RelativeShift,
) -> tuple[str, str]:
    """Nodes for ``RelativeShift``'s mean' and var' (float64) from batch mean/var (float64)."""
    diff = builder._node(
        nodes,
        "Sub",
        [mean64, _const_f64(builder, base, "clean_mean", shift.mean_reference)],
        base,
        "mean_shift",
    )
    mean = builder._node(
        nodes,
        "Add",
        [_const_f64(builder, base, "old_mean", shift.mean_base), diff],
        base,
        "relative_mean",
    )
    num = builder._node(
        nodes,
        "Add",
        [var64, _const_f64(builder, base, "ratio_offset", shift.offset)],
        base,
        "var_plus_offset",
    )
    ratio = builder._node(
        nodes,
        "Div",
        [num, _const_f64(builder, base, "clean_var_plus_offset", shift.var_reference)],
        base,
        "var_ratio",
    )
    ratio = _clip(builder, nodes, base, ratio, shift.low, shift.high)
    var = builder._node(
        nodes,
        "Mul",
        [_const_f64(builder, base, "old_var", shift.var_base), ratio],
        base,
        "relative_var",
    )
    return mean, var


def use_batch_statistics(
    model: onnx.ModelProto,
    bn_names: Iterable[str],
    *,
    only_statistics: bool = False,
    check: bool = True,
    relative: Mapping[str, RelativeShift] | None = None,
) -> ProbeResult:
    """Copy of ``model`` where the named BatchNormalization nodes use batch statistics.

    Each selected BN's ``mean``/``var`` inputs are replaced by the mean and
    population variance of its input over the current batch (computed in
    float64, cast to the dtype of the original running statistics), so it
    normalises like a BN in training mode. The batch statistics of every
    selected BN input are also graph outputs (returned like
    :func:`add_statistics_probes`), so one pass both runs the train-mode
    network and measures it. ``only_statistics`` as in :func:`add_statistics_probes`.

    BNs named in ``relative`` normalise instead with their original running
    statistics moved by the batch's shift against clean statistics
    (:class:`RelativeShift`): with the whole calibration set as one batch,
    this is the ``relative`` strategy's sequential result in one pass.
    """
    wanted = list(dict.fromkeys(bn_names))
    relative = dict(relative or {})
    stray = sorted(set(relative) - set(wanted))
    if stray:
        raise InternalError(f"relative shifts given for BNs that are not selected: {stray}")
    if check:
        _check(model, "before")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    by_name = {n.name: n for n in graph.node if n.op_type == "BatchNormalization"}
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise InternalError(f"no BatchNormalization nodes named {unknown} in the main graph")
    stat_dtype = _running_stat_dtypes(graph)
    names = NameGenerator.for_model(out)
    builder = _StatisticsBuilder(out, names)
    outputs: dict[str, ProbeOutputs] = {}
    new_nodes: list[onnx.NodeProto] = []
    selected = set(wanted)
    for node in graph.node:
        if node.op_type == "BatchNormalization" and node.name in selected:
            x = node.input[0]
            if x in outputs:
                probe = outputs[x]
            else:
                nodes, count, mean, m2, per_sample = builder.moments(x, CHANNEL_FIRST)
                new_nodes.extend(nodes)
                probe = ProbeOutputs(x, CHANNEL_FIRST, count, mean, m2, per_sample)
                outputs[x] = probe
            count_d = names.new(node.name, "batch_count_f64")
            var64 = names.new(node.name, "batch_var_f64")
            mean_t = names.new(node.name, "batch_mean")
            var_t = names.new(node.name, "batch_var")
            to = stat_dtype.get(node.name, TensorProto.FLOAT)
            new_nodes.extend(
                [
                    helper.make_node(
                        "Cast",
                        [probe.count],
                        [count_d],
                        name=names.new(node.name, "Cast"),
                        to=TensorProto.DOUBLE,
                    ),
                    helper.make_node(
                        "Div", [probe.m2, count_d], [var64], name=names.new(node.name, "Div")
                    ),
                ]
            )
            mean64 = probe.mean
            if node.name in relative:
                mean64, var64 = _relative_moments(
                    builder, new_nodes, node.name, mean64, var64, relative[node.name]
                )
            new_nodes.extend(
                [
                    helper.make_node(
                        "Cast", [mean64], [mean_t], name=names.new(node.name, "Cast"), to=to
                    ),
                    helper.make_node(
                        "Cast", [var64], [var_t], name=names.new(node.name, "Cast"), to=to
                    ),
                ]
            )
            replaced = onnx.NodeProto()
            replaced.CopyFrom(node)
            replaced.input[3] = mean_t
            replaced.input[4] = var_t
            new_nodes.append(replaced)
        else:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    if only_statistics:
        del graph.output[:]
    for probe in outputs.values():
        graph.output.extend(_stat_outputs(probe))
    graph.initializer.extend(builder.initializers)
    if only_statistics:
        prune_to_outputs(graph)
    if check:
        _check(out, "after")
    return ProbeResult(out, outputs)


_W_SCALE = 3  # input index of w_scale / b_scale in both NbSmt ops (ops.schema)
_BIAS = 4  # input index of B / bias


def correct_with_batch_statistics(
    model: onnx.ModelProto,
    corrections: Mapping[str, BatchCorrection],
    *,
    only_statistics: bool = False,
    check: bool = True,
) -> ProbeResult:
    """Copy of ``model`` where the named NbSmt ops' outputs are corrected from batch statistics.

    For each named op (``corrections``: node name -> :class:`BatchCorrection`)
    the op's output is renamed and measured (batch statistics, returned like
    :func:`add_statistics_probes`, keyed by the *original* output name), and a
    copy of the op with ``w_scale' = w_scale * a`` and ``B' = B * a + b``
    computed in the graph produces the original output name for every
    downstream user. The copy runs the same integer NB-SMT arithmetic as the
    deployed, folded op, so with the whole calibration set as one batch every
    layer sees exactly what the level-by-level correction would give it: one
    pass instead of one per dependency level, at twice the cost of each
    corrected op. ``w_scale`` and ``B`` must be graph constants (initializers
    or Constant outputs).
    """
    if check:
        _check(model, "before")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    by_name = {n.name: n for n in graph.node}
    unknown = [name for name in corrections if name not in by_name]
    if unknown:
        raise InternalError(f"no nodes named {unknown} in the main graph")
    names = NameGenerator.for_model(out)
    builder = _StatisticsBuilder(out, names)
    outputs: dict[str, ProbeOutputs] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        spec = corrections.get(node.name)
        if spec is None:
            new_nodes.append(node)
            continue
        if len(node.input) <= _W_SCALE or not node.input[_W_SCALE]:
            raise InternalError(f"node {node.name!r} has no w_scale input")
        y = node.output[0]
        raw = names.new(node.name, "uncorrected")
        measured = onnx.NodeProto()
        measured.CopyFrom(node)
        del measured.output[:]
        measured.output.append(raw)  # the stats output, if any, moves to the corrected copy
        new_nodes.append(measured)
        nodes, count, mean, m2, per_sample = builder.moments(raw, spec.channel_axis)
        new_nodes.extend(nodes)
        outputs[y] = ProbeOutputs(y, spec.channel_axis, count, mean, m2, per_sample)
        base = node.name
        w64 = builder._node(
            new_nodes, "Cast", [node.input[_W_SCALE]], base, "w_scale_f64", to=TensorProto.DOUBLE
        )
        if len(node.input) > _BIAS and node.input[_BIAS]:
            b64 = builder._node(
                new_nodes, "Cast", [node.input[_BIAS]], base, "bias_f64", to=TensorProto.DOUBLE
            )
        else:
            b64 = builder._node(
                new_nodes, "Mul", [w64, _const_f64(builder, base, "zero", 0.0)], base, "zero_bias"
            )
        if spec.scale:
            count_d = builder._node(
                new_nodes, "Cast", [count], base, "count_f64", to=TensorProto.DOUBLE
            )
            var = builder._node(new_nodes, "Div", [m2, count_d], base, "batch_var")
            den = builder._node(
                new_nodes,
                "Add",
                [var, _const_f64(builder, base, "offset", spec.offset)],
                base,
                "var_plus_offset",
            )
            ratio = builder._node(
                new_nodes,
                "Div",
                [_const_f64(builder, base, "clean_var_plus_offset", spec.numerator), den],
                base,
                "var_ratio",
            )
            ratio = _clip(builder, new_nodes, base, ratio, spec.low, spec.high)
            a = builder._node(new_nodes, "Sqrt", [ratio], base, "scale")
            shift = builder._node(
                new_nodes,
                "Sub",
                [
                    _const_f64(builder, base, "clean_mean", spec.mean_reference),
                    builder._node(new_nodes, "Mul", [a, mean], base, "scaled_mean"),
                ],
                base,
                "shift",
            )
            w_new = builder._node(new_nodes, "Mul", [w64, a], base, "w_scale_corrected")
            b_new = builder._node(
                new_nodes,
                "Add",
                [builder._node(new_nodes, "Mul", [b64, a], base, "bias_scaled"), shift],
                base,
                "bias_corrected",
            )
        else:
            shift = builder._node(
                new_nodes,
                "Sub",
                [_const_f64(builder, base, "clean_mean", spec.mean_reference), mean],
                base,
                "shift",
            )
            w_new = w64
            b_new = builder._node(new_nodes, "Add", [b64, shift], base, "bias_corrected")
        corrected = onnx.NodeProto()
        corrected.CopyFrom(node)
        corrected.name = names.new(node.name, "corrected")
        while len(corrected.input) <= _BIAS:
            corrected.input.append("")
        corrected.input[_W_SCALE] = builder._node(
            new_nodes, "Cast", [w_new], base, "w_scale_f32", to=TensorProto.FLOAT
        )
        corrected.input[_BIAS] = builder._node(
            new_nodes, "Cast", [b_new], base, "bias_f32", to=TensorProto.FLOAT
        )
        new_nodes.append(corrected)
    del graph.node[:]
    graph.node.extend(new_nodes)
    if only_statistics:
        del graph.output[:]
    for probe in outputs.values():
        graph.output.extend(_stat_outputs(probe))
    graph.initializer.extend(builder.initializers)
    if only_statistics:
        prune_to_outputs(graph)
    if check:
        _check(out, "after")
    return ProbeResult(out, outputs)


def prune_to_outputs(graph: onnx.GraphProto) -> None:
    """Remove nodes, initializers and value_info the graph outputs do not depend on.

    Graph inputs are kept even when unused, so callers can feed the same dict.
    """
    all_nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(all_nodes) for o in n.output if o}
    needed: set[str] = set()
    stack = [o.name for o in graph.output]
    keep: set[int] = set()
    while stack:
        tensor = stack.pop()
        if tensor in needed:
            continue
        needed.add(tensor)
        i = producer.get(tensor)
        if i is not None and i not in keep:
            keep.add(i)
            stack.extend(node_inputs(all_nodes[i]))
    nodes = [n for i, n in enumerate(all_nodes) if i in keep]
    inits = [t for t in graph.initializer if t.name in needed]
    infos = [v for v in graph.value_info if v.name in needed]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _running_stat_dtypes(graph: onnx.GraphProto) -> dict[str, int]:
    """Element type of each BN's running-mean input, where it is known."""
    known: dict[str, int] = {t.name: t.data_type for t in graph.initializer}
    for vi in list(graph.input) + list(graph.value_info):
        if vi.type.HasField("tensor_type"):
            known.setdefault(vi.name, vi.type.tensor_type.elem_type)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    known.setdefault(node.output[0], attr.t.data_type)
    return {
        n.name: known[n.input[3]]
        for n in graph.node
        if n.op_type == "BatchNormalization" and len(n.input) > 3 and n.input[3] in known
    }
