"""Static estimate of the activation memory one run of a model needs.

Recalibration is exact in two passes when the whole calibration set is one
batch (docs/recalibration.md §3), so the transform puts as many samples into
one batch as a memory budget allows. This module says how much memory a batch
of ``n`` samples needs, without running the model:

1. fix the graph inputs to the batch's shapes and run ONNX shape inference
   (the NbSmt ops have Python-side schemas with inference,
   ``ops.onnx_schema``), which gives every intermediate tensor's size;
2. order the nodes as ONNX Runtime does by default (a depth-first
   post-order from the leaf nodes, in node order: each leaf's ancestry runs
   just before it, so a statistics probe appended at the end of the graph
   runs right after the tensor it measures) and walk them: a tensor is live
   from its producer to its last consumer (ORT frees it then); the peak is
   the largest sum of live tensors at any node.

Done for batch sizes 1 and 2, the difference is the memory per sample and the
rest is fixed (statistics outputs, shape tensors). Initializers are not
counted: they are the model's, whatever the batch. Kernel scratch space
(the NbSmt ops bound theirs per call) and allocator overhead are not visible
here; callers leave headroom in their budget (``SAFETY_FACTOR``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from nbsmt_onnx.errors import InternalError
from nbsmt_onnx.graph.shapes import infer_for_inputs

logger = logging.getLogger(__name__)

#: Budgets are divided by this. Measured (bench/bench_recalibration_memory.py, peak RSS
#: growth of the recalibration step over the estimate, per sample): MobileNetV2 1.11-1.18,
#: Fashion-MNIST ResNet 1.30-1.52 (small tensors: allocator overhead), plus ~0.05-0.2 GB
#: fixed (docs/recalibration.md §3).
SAFETY_FACTOR = 2.0


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class ActivationMemory:
    """Peak activation bytes of one run: ``fixed + per_sample * batch``."""

    per_sample: int
    fixed: int

    def batch_bytes(self, samples: int) -> int:
        return self.fixed + self.per_sample * samples

    def largest_batch(self, budget_bytes: int) -> int:
        """The most samples one batch may hold within ``budget_bytes`` (at least 1)."""
        if self.per_sample <= 0:
            raise InternalError("activation memory per sample must be positive")
        usable = budget_bytes / SAFETY_FACTOR - self.fixed
        return max(1, int(usable // self.per_sample))


def _tensor_bytes(vi: onnx.ValueInfoProto) -> int | None:
    if not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    if not tt.HasField("shape") or tt.elem_type == onnx.TensorProto.UNDEFINED:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
    if any(d < 0 for d in dims):
        return None
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
    return int(np.prod(dims, dtype=np.int64)) * itemsize


def execution_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Topological order of ``graph``'s nodes: post-order DFS from each leaf, leaves in node order."""
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output if o}
    consumed = {i for n in graph.node for i in n.input}
    leaves = [k for k, n in enumerate(graph.node) if not any(o in consumed for o in n.output)]
    order: list[int] = []
    done: set[int] = set()
    for leaf in leaves:
        stack = [(leaf, False)]
        while stack:
            k, expanded = stack.pop()
            if k in done:
                continue
            if expanded:
                done.add(k)
                order.append(k)
                continue
            stack.append((k, True))
            inputs = [producer[i] for i in graph.node[k].input if i in producer]
            stack.extend((j, False) for j in reversed(inputs) if j not in done)
    if len(order) != len(graph.node):
        raise InternalError("the graph has a cycle; cannot order its nodes")
    return [graph.node[k] for k in order]


def peak_activation_bytes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> int:
    """Largest sum of live intermediate tensors (bytes) for inputs of ``shapes``."""
    graph = infer_for_inputs(model, shapes, "estimating memory").graph
    initializers = {t.name for t in graph.initializer}
    sizes: dict[str, int] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        b = _tensor_bytes(vi)
        if b is not None and vi.name not in initializers:
            sizes[vi.name] = b
    nodes = execution_order(graph)
    end = len(nodes)
    first: dict[str, int] = {i.name: 0 for i in graph.input if i.name not in initializers}
    last: dict[str, int] = {}
    unknown = 0
    for k, node in enumerate(nodes):
        for name in node.input:
            if name in first:
                last[name] = k
        known_inputs = [sizes[n] for n in node.input if n in sizes]
        for name in node.output:
            if not name:
                continue
            first[name] = k
            last.setdefault(name, k)
            if name not in sizes:  # unknown shape: assume it is as large as its largest input
                unknown += 1
                sizes[name] = max(known_inputs, default=0)
    for out in graph.output:
        if out.name in first:
            last[out.name] = end
    if unknown:
        logger.debug("memory estimate: %d tensor(s) of unknown shape", unknown)
    delta = np.zeros(end + 2, dtype=np.int64)
    for name, start in first.items():
        delta[start] += sizes.get(name, 0)
        delta[last.get(name, start) + 1] -= sizes.get(name, 0)
    return int(np.max(np.cumsum(delta)))


def estimate_activation_memory(
    model: onnx.ModelProto, sample_shapes: Mapping[str, Sequence[int]]
) -> ActivationMemory:
    """Per-sample and fixed activation memory; ``sample_shapes`` exclude the batch axis."""
    one = peak_activation_bytes(model, {k: (1, *v) for k, v in sample_shapes.items()})
    two = peak_activation_bytes(model, {k: (2, *v) for k, v in sample_shapes.items()})
    per_sample = max(two - one, 1)
    return ActivationMemory(per_sample=per_sample, fixed=max(one - per_sample, 0))
