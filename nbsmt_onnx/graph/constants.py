"""Find the constant value of a tensor: initializer, Constant node or a foldable chain.

Exporters put weights in different places: PyTorch in initializers, Paddle
and TensorFlow often in ``Constant`` nodes, and some graphs compute the
weight from a constant through ``Reshape`` / ``Transpose`` / ``Cast`` /
``Squeeze`` ... (for example a Gemm weight reshaped from a Conv-style
tensor). ``ConstantResolver`` returns the value of such a tensor, evaluating
small constant subgraphs with ``onnx.reference.ReferenceEvaluator`` — or,
where it has no implementation for the model's opset (e.g. DequantizeLinear
before opset 19), with ONNX Runtime through ``runtime.session`` (the one
session factory; onnx-graphsurgeon's folding would open its own sessions) —
or the reason why the tensor is not a constant (a run-time input, an op that
is not folded, a chain too large to evaluate).

It never modifies the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger(__name__)

#: Deterministic, cheap ops whose output is constant when all inputs are.
FOLDABLE_OPS = frozenset(
    {
        "Identity",
        "Reshape",
        "Transpose",
        "Cast",
        "Squeeze",
        "Unsqueeze",
        "Flatten",
        "Concat",
        "Slice",
        "Gather",
        "Split",
        "Mul",
        "Div",
        "Add",
        "Sub",
        "Neg",
        "Sqrt",
        "Reciprocal",
        "DequantizeLinear",
        "Expand",
        "Tile",
        "ConstantOfShape",
        "Shape",
        "Size",
        "Range",
        "Pow",
        "Abs",
        "Min",
        "Max",
        "Clip",
        "Pad",
        "QuantizeLinear",
        "Where",
        "Equal",
    }
)
#: Largest constant chain (number of nodes) evaluated to find one value.
MAX_CHAIN_NODES = 32


@dataclass(frozen=True)
class ConstantLookup:
    """Result of a lookup: ``value`` is None when the tensor is not constant (see ``reason``)."""

    value: np.ndarray | None
    origin: str  # "initializer" | "Constant" | "folded" | "" (not constant)
    reason: str = ""


class ConstantResolver:
    """Answers "is this tensor a constant, and what is its value?" for one graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self._model = model
        self._initializers = {t.name: t for t in graph.initializer}
        self._graph_inputs = {i.name for i in graph.input}
        self._producer: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            for out in node.output:
                if out:
                    self._producer[out] = node
        self._cache: dict[str, ConstantLookup] = {}

    def producer(self, name: str) -> onnx.NodeProto | None:
        return self._producer.get(name)

    def is_constant(self, name: str) -> bool:
        return self.lookup(name).value is not None

    def lookup(self, name: str) -> ConstantLookup:
        if name not in self._cache:
            self._cache[name] = self._lookup(name, depth=0)
        return self._cache[name]

    def _lookup(self, name: str, depth: int) -> ConstantLookup:
        if name in self._initializers:
            # Initializers that are also graph inputs are overridable defaults in
            # ONNX; every exporter that writes them (IR < 4) means them as weights.
            return ConstantLookup(numpy_helper.to_array(self._initializers[name]), "initializer")
        if name in self._graph_inputs:
            return ConstantLookup(None, "", f"{name!r} is a graph input (a run-time tensor)")
        node = self._producer.get(name)
        if node is None:
            return ConstantLookup(None, "", f"{name!r} has no producer")
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            try:
                return ConstantLookup(_constant_node_value(node), "Constant")
            except ValueError as err:
                return ConstantLookup(None, "", f"Constant node {node.name!r}: {err}")
        if node.domain not in ("", "ai.onnx") or node.op_type not in FOLDABLE_OPS:
            return ConstantLookup(
                None, "", f"{name!r} is computed by {node.op_type} node {node.name!r} at run time"
            )
        chain = self._constant_chain(node)
        if isinstance(chain, str):
            return ConstantLookup(None, "", chain)
        try:
            value = self._evaluate(chain, name)
        except Exception as err:  # the reference evaluator raises many types
            return ConstantLookup(
                None, "", f"cannot fold the constant chain producing {name!r}: {err}"
            )
        return ConstantLookup(value, "folded")

    def _constant_chain(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | str:
        """Nodes (topologically ordered) computing ``node`` from constants, or a reason."""
        ordered: list[onnx.NodeProto] = []
        seen: set[int] = set()

        def visit(n: onnx.NodeProto) -> str | None:
            if id(n) in seen:
                return None
            seen.add(id(n))
            if len(seen) > MAX_CHAIN_NODES:
                return f"constant chain longer than {MAX_CHAIN_NODES} nodes"
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                ordered.append(n)
                return None
            if n.domain not in ("", "ai.onnx") or n.op_type not in FOLDABLE_OPS:
                return f"depends on {n.op_type} node {n.name!r}, which is not folded"
            for inp in n.input:
                if not inp or inp in self._initializers:
                    continue
                if inp in self._graph_inputs:
                    return f"depends on graph input {inp!r} (a run-time tensor)"
                producer = self._producer.get(inp)
                if producer is None:
                    return f"depends on {inp!r}, which has no producer"
                reason = visit(producer)
                if reason:
                    return reason
            ordered.append(n)
            return None

        reason = visit(node)
        return reason if reason else ordered

    def _evaluate(self, chain: list[onnx.NodeProto], name: str) -> np.ndarray:
        from onnx.reference import ReferenceEvaluator

        produced = {o for n in chain for o in n.output}
        needed = {i for n in chain for i in n.input if i and i not in produced}
        inits = [self._initializers[i] for i in sorted(needed)]
        graph = onnx.helper.make_graph(
            list(chain),
            "constant_chain",
            inputs=[],
            outputs=[onnx.helper.make_empty_tensor_value_info(name)],
            initializer=inits,
        )
        model = onnx.helper.make_model(
            graph, opset_imports=list(self._model.opset_import), ir_version=self._model.ir_version
        )
        try:
            (value,) = ReferenceEvaluator(model).run([name], {})
        except Exception as ref_err:  # e.g. no implementation of an op at this opset
            from nbsmt_onnx.errors import NbsmtError
            from nbsmt_onnx.runtime.session import SessionOptions, create_session

            try:
                session = create_session(
                    model, SessionOptions(register_library=False), what="constant chain"
                )
                (value,) = session.run([name], {})
            except NbsmtError as ort_err:
                raise ValueError(f"{ref_err}; ONNX Runtime: {ort_err}") from ort_err
            log.debug("folded %d-node constant chain for %s with ONNX Runtime", len(chain), name)
            return np.asarray(value)
        log.debug("folded %d-node constant chain for %s", len(chain), name)
        return np.asarray(value)


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
        if attr.name == "sparse_value":
            raise ValueError("sparse constants are not supported")
    raise ValueError("no numeric value attribute")
