"""Write recalibrated statistics back: into BN nodes, or folded into NbSmt ops (docs/spec.md §5).

Folding a BatchNormalization that directly follows an NbSmt op (see
``graph.bn`` for the chains allowed between them)::

    BN(y) = gamma * (y - mean) / sqrt(var + eps) + beta = g * y + (beta - mean * g)
    g = gamma / sqrt(var + eps)

and the op computes ``y = s_x * w_scale[c] * acc + B[c]``, so with

    w_scale' = w_scale * g          B' = (B - mean) * g + beta      (B absent: 0)

the op alone yields BN(y). Only the float per-channel scale and bias change --
never the integer weights -- so the deployed model runs exactly the NB-SMT
arithmetic that was calibrated. The products are formed in float64 and
rounded once to float32.

A per-channel affine correction ``y' = a * y + b`` (models whose BN is already
fused, docs/spec.md §5.2) folds the same way: ``w_scale' = w_scale * a``,
``B' = B * a + b``.

Every pass here returns a new model and never edits its input. New parameter
tensors are always *fresh* initializers (names from ``NameGenerator``), so a
parameter shared by two BNs or two ops is never changed behind the other's
back; initializers and Constant nodes nobody reads any more are removed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from nbsmt_onnx.errors import InternalError, UnsupportedModelError
from nbsmt_onnx.graph.bn import (
    BATCHNORM,
    BatchNormStatistics,
    GraphIndex,
    batchnorm_epsilon,
    find_batchnorms,
    is_nbsmt,
)
from nbsmt_onnx.graph.naming import NameGenerator

logger = logging.getLogger(__name__)
_PROTO_LIMIT = 2**31 - 1

_W_SCALE = 3  # input index of w_scale / b_scale in both NbSmt ops (schema.CONV_INPUTS)
_BIAS = 4  # input index of B / bias


@dataclass(frozen=True)
class ChannelAffine:
    """A per-channel correction ``y' = scale * y + shift`` of an op's output."""

    scale: np.ndarray
    shift: np.ndarray

    def __post_init__(self) -> None:
        scale = np.asarray(self.scale, dtype=np.float64).reshape(-1)
        shift = np.asarray(self.shift, dtype=np.float64).reshape(-1)
        if scale.shape != shift.shape:
            raise InternalError(f"correction scale {scale.shape} and shift {shift.shape} differ")
        if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
            raise InternalError("correction scale and shift must be finite")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "shift", shift)

    @classmethod
    def identity(cls, channels: int) -> ChannelAffine:
        return cls(np.ones(channels), np.zeros(channels))

    def then(self, other: ChannelAffine) -> ChannelAffine:
        """The composition ``other(self(y))``."""
        return ChannelAffine(self.scale * other.scale, self.shift * other.scale + other.shift)


@dataclass(frozen=True)
class Skip:
    """A node a pass did not touch, and why (goes into the report)."""

    node: str
    reason: str


@dataclass(frozen=True)
class FoldedBatchNorm:
    batchnorm: str
    into: str


@dataclass(frozen=True)
class FoldResult:
    """Outcome of :class:`FoldBatchNormIntoNbSmt`: the new model, what was folded, what not."""

    model: onnx.ModelProto
    folded: tuple[FoldedBatchNorm, ...]
    skipped: tuple[Skip, ...]

    @property
    def modified(self) -> bool:
        return bool(self.folded)

    @property
    def count(self) -> int:
        return len(self.folded)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _check(model: onnx.ModelProto, what: str) -> None:
    if model.ByteSize() > _PROTO_LIMIT:  # the checker refuses protos over 2 GB; io checks files
        logger.debug("model over 2 GB: onnx.checker skipped here")
        return
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InternalError(f"{what} produced an invalid model: {first}") from err


def _add_initializer(
    graph: onnx.GraphProto, names: NameGenerator, base: str, purpose: str, value: np.ndarray
) -> str:
    name = names.new(base, purpose)
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def prune_orphans(graph: onnx.GraphProto, candidates: Iterable[str]) -> int:
    """Remove those of ``candidates`` (initializers / Constant outputs) that nothing reads now.

    Only tensors a pass has just disconnected are candidates: dead constants
    that were already in the input model are not this pass's business. A
    dead candidate produced by an ``Identity`` of a constant (a de-duplicated
    initializer, see ``GraphIndex.constant``) goes too, and its input becomes
    a candidate in turn.
    """
    index = GraphIndex(graph)

    def removable(node: onnx.NodeProto) -> bool:
        return node.op_type in ("Constant", "Identity") and node.domain in ("", "ai.onnx")

    dead: set[str] = set()
    pending = [c for c in candidates if c]
    while pending:
        name = pending.pop()
        if name in dead or name in index.graph_inputs or name in index.graph_outputs:
            continue
        users = [
            c for c in index.consumers.get(name, []) if not (removable(c) and c.output[0] in dead)
        ]
        if users:
            continue
        dead.add(name)
        prod = index.producer.get(name)
        if prod is not None and prod[0].op_type == "Identity" and index.constant(name) is not None:
            pending.append(prod[0].input[0])
    if not dead:
        return 0
    keep_nodes = [n for n in graph.node if not (removable(n) and n.output[0] in dead)]
    removed = len(graph.node) - len(keep_nodes)
    del graph.node[:]
    graph.node.extend(keep_nodes)
    keep_inits = [t for t in graph.initializer if t.name not in dead]
    removed += len(graph.initializer) - len(keep_inits)
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    keep_vi = [v for v in graph.value_info if v.name not in dead]
    del graph.value_info[:]
    graph.value_info.extend(keep_vi)
    return removed


def _scale_and_bias(
    index: GraphIndex, node: onnx.NodeProto
) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    if len(node.input) <= _W_SCALE:
        raise UnsupportedModelError(f"NbSmt node {node.name!r} has no w_scale input")
    w_scale = index.constant(node.input[_W_SCALE])
    if w_scale is None:
        raise UnsupportedModelError(f"NbSmt node {node.name!r}: w_scale is not a constant")
    if len(node.input) > _BIAS and node.input[_BIAS]:
        bias = index.constant(node.input[_BIAS])
        if bias is None:
            raise UnsupportedModelError(f"NbSmt node {node.name!r}: bias is not a constant")
    else:
        bias = np.zeros_like(w_scale)
    return w_scale.astype(np.float64), bias.astype(np.float64).reshape(-1), w_scale.dtype


def _set_scale_and_bias(
    graph: onnx.GraphProto,
    names: NameGenerator,
    node: onnx.NodeProto,
    w_scale: np.ndarray,
    bias: np.ndarray,
    dtype: np.dtype,
) -> list[str]:
    """Point the op at fresh scale/bias initializers; return the names it no longer reads."""
    replaced = [node.input[_W_SCALE]] + ([node.input[_BIAS]] if len(node.input) > _BIAS else [])
    node.input[_W_SCALE] = _add_initializer(
        graph, names, node.name, "w_scale", w_scale.astype(dtype)
    )
    bias_name = _add_initializer(graph, names, node.name, "B", bias.astype(dtype))
    while len(node.input) <= _BIAS:
        node.input.append("")
    node.input[_BIAS] = bias_name
    return replaced


class FoldBatchNormIntoNbSmt:
    """Pass: fold every foldable BN into the NbSmt op before it (not in place).

    ``only`` restricts folding to the named BN nodes. BNs that cannot be
    folded are returned in :attr:`FoldResult.skipped` with the reason from
    ``graph.bn.find_batchnorms`` and stay in the graph unchanged.
    """

    in_place = False

    def __init__(self, only: Iterable[str] | None = None) -> None:
        self.only = None if only is None else set(only)

    def __call__(self, model: onnx.ModelProto) -> FoldResult:
        infos = find_batchnorms(model)
        if self.only is not None:
            unknown = self.only - {i.name for i in infos}
            if unknown:
                raise InternalError(f"no BatchNormalization nodes named {sorted(unknown)}")
            infos = [i for i in infos if i.name in self.only]
        out = _copy(model)
        graph = out.graph
        index = GraphIndex(graph)
        names = NameGenerator.for_model(out)
        folded: list[FoldedBatchNorm] = []
        skipped: list[Skip] = []
        remove: set[str] = set()
        orphans: set[str] = set()
        renames: dict[str, str] = {}  # tensor produced by the chain end -> BN output
        for info in infos:
            if info.fold_target is None:
                skipped.append(Skip(info.name, info.fold_blocker or "not foldable"))
                continue
            bn = index.nodes_by_name[info.name]
            target = index.nodes_by_name[info.fold_target]
            gamma, beta, mean, var = (
                index.constant(bn.input[i]).astype(np.float64)  # type: ignore[union-attr]
                for i in range(1, 5)
            )
            g = gamma / np.sqrt(var + batchnorm_epsilon(bn))
            w_scale, bias, dtype = _scale_and_bias(index, target)
            orphans.update(
                _set_scale_and_bias(
                    graph, names, target, w_scale * g, (bias - mean) * g + beta, dtype
                )
            )
            orphans.update(bn.input[1:])
            renames[info.input] = bn.output[0]
            remove.add(info.name)
            folded.append(FoldedBatchNorm(info.name, info.fold_target))
        if folded:
            nodes = [n for n in graph.node if not (n.op_type == BATCHNORM and n.name in remove)]
            for node in nodes:
                for i, o in enumerate(node.output):
                    if o in renames:
                        node.output[i] = renames[o]
            del graph.node[:]
            graph.node.extend(nodes)
            stale = set(renames)
            keep_vi = [v for v in graph.value_info if v.name not in stale]
            del graph.value_info[:]
            graph.value_info.extend(keep_vi)
            prune_orphans(graph, orphans)
            _check(out, "FoldBatchNormIntoNbSmt")
        for f in folded:
            logger.debug("folded BN %s into %s", f.batchnorm, f.into)
        return FoldResult(out, tuple(folded), tuple(skipped))


def fold_batchnorm_into_nbsmt(
    model: onnx.ModelProto, only: Iterable[str] | None = None
) -> FoldResult:
    """Functional form of :class:`FoldBatchNormIntoNbSmt`."""
    return FoldBatchNormIntoNbSmt(only)(model)


def write_batchnorm_statistics(
    model: onnx.ModelProto, statistics: Mapping[str, BatchNormStatistics]
) -> onnx.ModelProto:
    """Copy of ``model`` whose named BN nodes use the given running mean/var (``--no-fold``).

    Each BN gets its own new mean/var initializers in the dtype of the old
    ones, so statistics initializers shared between BNs are effectively copied.
    """
    out = _copy(model)
    graph = out.graph
    index = GraphIndex(graph)
    names = NameGenerator.for_model(out)
    orphans: list[str] = []
    for bn_name, stats in statistics.items():
        node = index.nodes_by_name.get(bn_name)
        if node is None or node.op_type != BATCHNORM:
            raise InternalError(f"no BatchNormalization node named {bn_name!r}")
        old_mean, old_var = index.constant(node.input[3]), index.constant(node.input[4])
        if old_mean is None or old_var is None:
            raise UnsupportedModelError(f"BN {bn_name!r}: running statistics are not constants")
        if old_mean.size != stats.mean.size:
            raise InternalError(
                f"BN {bn_name!r} has {old_mean.size} channels, new statistics have {stats.mean.size}"
            )
        orphans.extend(node.input[3:5])
        node.input[3] = _add_initializer(
            graph,
            names,
            bn_name,
            "running_mean",
            stats.mean.astype(old_mean.dtype).reshape(old_mean.shape),
        )
        node.input[4] = _add_initializer(
            graph,
            names,
            bn_name,
            "running_var",
            stats.var.astype(old_var.dtype).reshape(old_var.shape),
        )
    prune_orphans(graph, orphans)
    _check(out, "write_batchnorm_statistics")
    return out


def apply_channel_corrections(
    model: onnx.ModelProto, corrections: Mapping[str, ChannelAffine]
) -> onnx.ModelProto:
    """Copy of ``model`` with ``y' = a*y + b`` folded into the named NbSmt ops' scale and bias."""
    out = _copy(model)
    graph = out.graph
    index = GraphIndex(graph)
    names = NameGenerator.for_model(out)
    orphans: list[str] = []
    for node_name, corr in corrections.items():
        node = index.nodes_by_name.get(node_name)
        if node is None or not is_nbsmt(node):
            raise InternalError(f"no NbSmt node named {node_name!r}")
        w_scale, bias, dtype = _scale_and_bias(index, node)
        if w_scale.size != corr.scale.size:
            raise InternalError(
                f"{node_name!r} has {w_scale.size} channels, correction has {corr.scale.size}"
            )
        orphans += _set_scale_and_bias(
            graph, names, node, w_scale * corr.scale, bias * corr.scale + corr.shift, dtype
        )
    prune_orphans(graph, orphans)
    _check(out, "apply_channel_corrections")
    return out
