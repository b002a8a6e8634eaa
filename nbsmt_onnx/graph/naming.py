"""The one place new tensor and node names come from.

Names are never parsed back: information about a tensor lives in Python
objects, not in its name. The helper only guarantees uniqueness and keeps
names readable (``<base>/<purpose>``).
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx


def _graph_names(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    names.update(i.name for i in graph.input)
    names.update(o.name for o in graph.output)
    names.update(v.name for v in graph.value_info)
    names.update(t.name for t in graph.initializer)
    names.update(t.values.name for t in graph.sparse_initializer)
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                names |= _graph_names(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    names |= _graph_names(sub)
    names.discard("")
    return names


class NameGenerator:
    """Hands out names unused in a graph (tensors and nodes share one namespace)."""

    def __init__(self, taken: Iterable[str] = ()) -> None:
        self._taken: set[str] = set(taken)

    @classmethod
    def for_model(cls, model: onnx.ModelProto) -> NameGenerator:
        return cls(_graph_names(model.graph))

    def reserve(self, name: str) -> None:
        """Mark an existing name as used."""
        self._taken.add(name)

    def new(self, base: str, purpose: str) -> str:
        """Return a fresh name ``base/purpose`` (suffixed ``_N`` if needed) and reserve it."""
        stem = f"{base}/{purpose}" if base else purpose
        candidate, i = stem, 1
        while candidate in self._taken:
            candidate = f"{stem}_{i}"
            i += 1
        self._taken.add(candidate)
        return candidate
