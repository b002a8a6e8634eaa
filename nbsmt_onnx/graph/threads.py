"""Per-layer thread counts and the speed-up they buy (docs/spec.md §8).

``threads`` is an attribute of every NbSmt node, so a model can run each layer
at its own thread count. This module

- reads a per-layer assignment: node name or regular expression -> 1, 2 or 4
  (:class:`LayerThreads`, e.g. from ``--layer-threads FILE.json``);
- applies it to a simulation model (:func:`assign_threads`, a graph pass that
  returns the new model and what it changed);
- counts each layer's multiply-accumulates per sample from the tensor shapes
  of a concrete batch (:func:`layer_macs`), NbSmt layers and the Conv / MatMul
  / Gemm left in float alike;
- computes the speed-up over an 8-bit array without NB-SMT (:func:`speedup`):
  ``sum(MACs) / sum(MACs / T)``. NB-SMT never stalls, so a layer at T threads
  does T times the MACs per cycle; layers in float or at T = 1 count with
  T = 1. Memory bandwidth, data movement and layers other than
  Conv / MatMul / Gemm are not modelled.

Matching rules: a key that is the name of an NbSmt node sets that node; any
other key is a regular expression that must match a whole node name, tried in
the file's order (the first that matches wins). Names win over expressions.
Nodes no key matches keep the default (``--threads``). A key that matches no
NbSmt node is an error (a typo would otherwise pass silently).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from nbsmt_onnx.config import LayerThreads
from nbsmt_onnx.errors import InternalError
from nbsmt_onnx.graph.shapes import infer_for_inputs, known_shapes
from nbsmt_onnx.ops import schema

#: Op types counted as MAC layers when left in float.
FLOAT_MAC_OPS = ("Conv", "MatMul", "Gemm")


def nbsmt_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [
        n for n in model.graph.node if n.domain == schema.DOMAIN and n.op_type in schema.OP_TYPES
    ]


def node_threads(node: onnx.NodeProto) -> int:
    """The ``threads`` attribute of an NbSmt node (the schema default when absent)."""
    for attr in node.attribute:
        if attr.name == "threads":
            return int(attr.i)
    return schema.SmtAttributes().threads


@dataclass(frozen=True)
class ThreadsResult:
    """What :func:`assign_threads` did: the new model, whether anything changed, every layer's T."""

    model: onnx.ModelProto
    changed: bool
    threads: dict[str, int]


def assign_threads(model: onnx.ModelProto, layers: LayerThreads, default: int) -> ThreadsResult:
    """A copy of ``model`` with each NbSmt node's ``threads`` set by ``layers`` (else ``default``)."""
    nodes = nbsmt_nodes(model)
    names = [n.name for n in nodes]
    if len(set(names)) != len(names) or not all(names):
        raise InternalError("NbSmt nodes must have unique, non-empty names before threads are set")
    wanted = layers.resolve(names, default)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    changed = False
    for node in nbsmt_nodes(out):
        t = wanted[node.name]
        if node_threads(node) == t:
            continue
        changed = True
        attrs = [a for a in node.attribute if a.name != "threads"]
        del node.attribute[:]
        node.attribute.extend([*attrs, onnx.helper.make_attribute("threads", t)])
    if changed and out.ByteSize() < 2**31 - 1:
        onnx.checker.check_model(out)
    return ThreadsResult(out, changed, wanted)


# --------------------------------------------------------------------------- MACs


@dataclass(frozen=True)
class LayerMacs:
    """Multiply-accumulates of one layer per sample, and the threads it runs at (1 in float)."""

    name: str
    op_type: str
    macs: float
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op_type": self.op_type,
            "macs": self.macs,
            "threads": self.threads,
        }


def _attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _node_macs(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """MACs of one Conv / MatMul / Gemm (float or NbSmt) for the whole batch; None if unknown."""
    out = shapes.get(node.output[0]) if node.output else None
    if out is None or len(node.input) < 2:
        return None
    w = shapes.get(node.input[1])
    if node.op_type in ("Conv", schema.CONV):
        if w is None or len(w) < 3:
            return None
        # every output element sums over C/group input channels x kernel positions (= W.shape[1:])
        return math.prod(out) * math.prod(w[1:])
    if node.op_type in ("MatMul", schema.MATMUL):
        a = shapes.get(node.input[0])
        if a is None or not a:
            return None
        return math.prod(out) * int(a[-1])
    if node.op_type == "Gemm":
        a = shapes.get(node.input[0])
        if a is None or len(a) != 2:
            return None
        k = a[0] if _attr_int(node, "transA", 0) else a[1]
        return math.prod(out) * int(k)
    return None


@dataclass(frozen=True)
class MacCount:
    """Per-sample MACs of the MAC layers of a model; ``unknown`` lists layers whose shapes are not."""

    layers: tuple[LayerMacs, ...]
    unknown: tuple[str, ...] = ()

    @property
    def speedup(self) -> float | None:
        """The speed-up figure, or None when some layer's MACs are unknown (it would be wrong)."""
        return None if self.unknown else speedup(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "speedup": self.speedup,
            "total_macs": sum(layer.macs for layer in self.layers),
            "layers": [layer.to_dict() for layer in self.layers],
            "unknown": list(self.unknown),
        }


def layer_macs(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]], batch: int
) -> MacCount:
    """Per-sample MACs of every NbSmt layer and every Conv / MatMul / Gemm left in float.

    ``input_shapes``: the concrete shapes of a batch of ``batch`` samples (e.g.
    the first calibration batch), so dynamic spatial sizes are the data's.
    """
    if batch < 1:
        raise InternalError(f"batch must be >= 1; got {batch}")
    inferred = infer_for_inputs(model, input_shapes, "counting MACs")
    shapes = known_shapes(inferred)
    layers: list[LayerMacs] = []
    unknown: list[str] = []
    for node in inferred.graph.node:
        nbsmt = node.domain == schema.DOMAIN and node.op_type in schema.OP_TYPES
        if not nbsmt and not (node.domain in ("", "ai.onnx") and node.op_type in FLOAT_MAC_OPS):
            continue
        macs = _node_macs(node, shapes)
        if macs is None:
            unknown.append(node.name or node.op_type)
            continue
        threads = node_threads(node) if nbsmt else 1
        layers.append(LayerMacs(node.name, node.op_type, macs / batch, threads))
    return MacCount(tuple(layers), tuple(unknown))


def speedup(layers: Sequence[LayerMacs]) -> float:
    """``sum(MACs) / sum(MACs / T)``: the speed-up over an 8-bit array without NB-SMT."""
    total = sum(layer.macs for layer in layers)
    cycles = sum(layer.macs / layer.threads for layer in layers)
    if total <= 0:
        return 1.0
    return total / cycles
