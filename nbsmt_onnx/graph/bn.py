"""Find BatchNormalization layers, their producers, and what may be done with them.

Two different questions are asked about every BN of the main graph:

**Can it be recalibrated?** Recalibration measures the BN *input* itself
(``graph.probe``), so any producer is fine -- a Conv, an Add of two branches,
a Relu. What matters is that (a) the BN is in inference form (no
``training_mode=1``, ``spatial=1`` where the attribute exists, extra training
outputs unused), (b) its scale/bias/mean/var are constants we can rewrite,
and (c) it is *affected*: some NbSmt op lies upstream. A BN with no NbSmt
op upstream sees exactly the float activations, so re-estimating it would
only drag its statistics towards the calibration set's domain; it is left
alone and reported.

**Can it be folded into an NbSmt op?** Folding rewrites
``BN(y) = g * y + (beta - mean * g)`` (``g = gamma / sqrt(var + eps)``)
into the op's per-channel output scale and bias, so ``y`` must be exactly
the op's output ``Y``, channel for channel. The only chain we allow between
the op and the BN is ``Identity`` nodes: they are the identity for every
opset and attribute. Not allowed, and why:

- element-wise non-linearities (Relu, Clip, ...): BN(relu(y)) is not an affine
  function of y;
- Add/Mul with constants (e.g. an exported bias): foldable in principle, but
  they belong to the rewrite pass, which should absorb them into ``B`` first;
- Reshape/Flatten/Transpose/Squeeze: foldable only when the channel mapping is
  proven unchanged; not worth the risk -- the BN is kept and still recalibrated;
- any intermediate tensor with other consumers or that is a graph output: the
  other users would see the folded (BN-ed) values instead of the raw ones.

For ``NbSmtMatMul`` (output ``[..., N]``, channel last) a BN normalises axis
1, which is the op's channel axis only when the output has rank 2 (the
``BatchNorm1d`` after a fully connected layer). The rank is read from shape
inference on a copy in which NbSmt ops are replaced by standard ops of the
same output shape; an unknown rank blocks folding (reported).

Initializers shared between BNs, or between NbSmt ops, are not a blocker:
write-back and folding always create fresh initializers (``graph.fold``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nbsmt_onnx.errors import InternalError, ModelError
from nbsmt_onnx.graph.naming import NameGenerator
from nbsmt_onnx.ops import schema

logger = logging.getLogger(__name__)

BATCHNORM = "BatchNormalization"
DEFAULT_EPSILON = 1e-5
#: Ops allowed between an NbSmt op and a BN that is folded into it (see module docstring).
FOLDABLE_CHAIN_OPS = ("Identity",)


def is_nbsmt(node: onnx.NodeProto) -> bool:
    """True for NbSmtConv / NbSmtMatMul nodes of the NB-SMT domain."""
    return node.domain == schema.DOMAIN and node.op_type in schema.OP_TYPES


def nbsmt_channel_axis(node: onnx.NodeProto) -> int:
    """Axis of the output channel of an NbSmt op's ``Y`` (1 for Conv, -1 for MatMul)."""
    return 1 if node.op_type == schema.CONV else -1


class GraphIndex:
    """Producers, consumers and constants of a main graph (read-only snapshot)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer: dict[str, tuple[onnx.NodeProto, int]] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.nodes_by_name: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            if node.name:
                self.nodes_by_name[node.name] = node
            for i, out in enumerate(node.output):
                if out:
                    self.producer[out] = (node, i)
            for inp in set(node_inputs(node)):
                self.consumers[inp].append(node)
        self.graph_outputs = {o.name for o in graph.output}
        self.graph_inputs = {i.name for i in graph.input}
        self.initializers = {t.name: t for t in graph.initializer}

    def constant(self, name: str) -> np.ndarray | None:
        """Value of a tensor that is an initializer (not overridable) or a Constant node.

        ``Identity`` nodes of constants are followed: exporters de-duplicate
        identical initializers that way (the Fashion-MNIST ResNet's two
        down-sampling BNs read their bias through one, docs/models.md).
        """
        for _ in range(len(self.graph.node) + 1):
            if name in self.initializers and name not in self.graph_inputs:
                return numpy_helper.to_array(self.initializers[name])
            prod = self.producer.get(name)
            if prod is None or prod[0].domain not in ("", "ai.onnx"):
                return None
            if prod[0].op_type == "Constant":
                return _constant_node_value(prod[0])
            if prod[0].op_type != "Identity":
                return None
            name = prod[0].input[0]
        return None

    def uses(self, name: str) -> int:
        """Number of consumer nodes plus one if the tensor is a graph output."""
        return len(self.consumers.get(name, [])) + (1 if name in self.graph_outputs else 0)


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Inputs of a node, including outer-scope names read by its subgraphs (If/Loop/Scan)."""
    names = [i for i in node.input if i]
    for attr in node.attribute:
        subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subgraphs:
            names.extend(_outer_references(sub))
    return names


def _outer_references(graph: onnx.GraphProto) -> set[str]:
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(node_inputs(node))
        local.update(o for o in node.output if o)
    used.update(o.name for o in graph.output)
    return used - local


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.asarray(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.asarray(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.asarray(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.asarray(list(attr.ints), dtype=np.int64)
    return None


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


@dataclass(frozen=True)
class BatchNormStatistics:
    """Running statistics of one BN (float64 copies; written back in the BN's own dtype)."""

    mean: np.ndarray
    var: np.ndarray

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float64).reshape(-1)
        var = np.asarray(self.var, dtype=np.float64).reshape(-1)
        if mean.shape != var.shape:
            raise InternalError(f"BN mean {mean.shape} and var {var.shape} differ in shape")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var)) and np.all(var >= 0)):
            raise InternalError("BN statistics must be finite with var >= 0")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "var", var)


def read_batchnorm_statistics(model: onnx.ModelProto, name: str) -> BatchNormStatistics:
    """Current running mean/var of the BN node ``name``."""
    index = GraphIndex(model.graph)
    node = index.nodes_by_name.get(name)
    if node is None or node.op_type != BATCHNORM:
        raise InternalError(f"no BatchNormalization node named {name!r}")
    mean, var = index.constant(node.input[3]), index.constant(node.input[4])
    if mean is None or var is None:
        raise InternalError(f"BN {name!r} statistics are not constants")
    return BatchNormStatistics(mean, var)


def batchnorm_epsilon(node: onnx.NodeProto) -> float:
    """The node's epsilon attribute, or the ONNX default 1e-5."""
    return float(_attr(node, "epsilon", DEFAULT_EPSILON))  # type: ignore[arg-type]


@dataclass(frozen=True)
class BatchNormInfo:
    """One BatchNormalization node of the main graph and what can be done with it."""

    name: str
    input: str
    output: str
    scale: str
    bias: str
    mean: str
    var: str
    epsilon: float
    channels: int | None
    producer: str | None  # name of the node producing the BN input (None: graph input)
    producer_op: str | None
    #: NbSmt node the BN folds into, and the Identity nodes between them
    fold_target: str | None
    chain: tuple[str, ...]
    #: why it cannot be folded (None when fold_target is set)
    fold_blocker: str | None
    #: why it cannot be recalibrated at all (None when it can)
    recalibration_blocker: str | None
    #: True when an NbSmt op lies upstream (its input is perturbed by NB-SMT)
    affected: bool

    @property
    def recalibratable(self) -> bool:
        return self.recalibration_blocker is None and self.affected


@dataclass(frozen=True)
class NbSmtLayer:
    """An NbSmt op and the per-channel output it produces."""

    name: str
    op_type: str
    output: str
    channel_axis: int
    #: BN fed directly (through Identity nodes only) by this op's output, if any
    batchnorm: str | None = None


def find_nbsmt_layers(model: onnx.ModelProto) -> list[NbSmtLayer]:
    """NbSmt ops of the main graph, in graph order, with the BN that directly follows each."""
    index = GraphIndex(model.graph)
    layers = []
    for node in model.graph.node:
        if not is_nbsmt(node):
            continue
        follower = _direct_batchnorm(index, node.output[0])
        layers.append(
            NbSmtLayer(node.name, node.op_type, node.output[0], nbsmt_channel_axis(node), follower)
        )
    return layers


def _direct_batchnorm(index: GraphIndex, tensor: str) -> str | None:
    """Name of a BN consuming ``tensor`` directly or through a chain of Identity nodes."""
    frontier = [tensor]
    seen: set[str] = set()
    while frontier:
        current = frontier.pop()
        if current in seen:
            continue
        seen.add(current)
        for consumer in index.consumers.get(current, []):
            if consumer.op_type == BATCHNORM and consumer.input[0] == current:
                return consumer.name
            if consumer.op_type in FOLDABLE_CHAIN_OPS:
                frontier.extend(o for o in consumer.output if o)
    return None


def layers_without_batchnorm(model: onnx.ModelProto) -> list[str]:
    """NbSmt ops not followed (directly or through Identity) by a BN: the docs/spec.md §5.2 targets."""
    return [layer.name for layer in find_nbsmt_layers(model) if layer.batchnorm is None]


def upstream_nodes(model: onnx.ModelProto, tensors: Iterable[str]) -> set[str]:
    """Names of the main-graph nodes that ``tensors`` depend on (their ancestors)."""
    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    seen: set[int] = set()
    stack = list(tensors)
    visited: set[str] = set()
    while stack:
        t = stack.pop()
        if t in visited:
            continue
        visited.add(t)
        i = producer.get(t)
        if i is not None and i not in seen:
            seen.add(i)
            stack.extend(node_inputs(nodes[i]))
    return {nodes[i].name for i in seen}


def _affected_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors with an NbSmt op upstream (graph order is topological: checker-enforced)."""
    tainted: set[str] = set()
    for node in graph.node:
        if is_nbsmt(node) or any(i in tainted for i in node_inputs(node)):
            tainted.update(o for o in node.output if o)
    return tainted


def find_batchnorms(model: onnx.ModelProto) -> list[BatchNormInfo]:
    """All BatchNormalization nodes of the main graph, in graph order, with diagnostics."""
    graph = model.graph
    index = GraphIndex(graph)
    affected = _affected_tensors(graph)
    ranks: dict[str, int] | None = None
    infos: list[BatchNormInfo] = []
    for node in graph.node:
        if node.op_type != BATCHNORM or node.domain not in ("", "ai.onnx"):
            continue
        if not node.name:
            raise ModelError(
                "a BatchNormalization node has no name; BN layers are matched between the float "
                "and NB-SMT models by name, so give every node a unique name (nbsmt-onnx's "
                "loader does)"
            )
        x = node.input[0]
        recal_blocker = _recalibration_blocker(index, node)
        scale = index.constant(node.input[1])
        channels = int(scale.size) if scale is not None else None
        prod = index.producer.get(x)
        target: str | None = None
        chain: tuple[str, ...] = ()
        fold_blocker: str | None = None
        if recal_blocker is not None:
            fold_blocker = recal_blocker
        else:
            target, chain, fold_blocker = _fold_target(index, node, channels)
            if target is not None and index.nodes_by_name[target].op_type == schema.MATMUL:
                if ranks is None:
                    ranks = infer_ranks(model)
                rank = ranks.get(x)
                if rank is None:
                    target, chain = None, ()
                    fold_blocker = (
                        "rank of the NbSmtMatMul output is unknown, so BN's channel axis 1 cannot "
                        "be matched to the op's last (output-channel) axis"
                    )
                elif rank != 2:
                    target, chain = None, ()
                    fold_blocker = (
                        f"NbSmtMatMul output has rank {rank}: BN normalises axis 1, the op's "
                        "channels are the last axis (only rank 2 matches)"
                    )
        infos.append(
            BatchNormInfo(
                name=node.name,
                input=x,
                output=node.output[0],
                scale=node.input[1],
                bias=node.input[2],
                mean=node.input[3],
                var=node.input[4],
                epsilon=batchnorm_epsilon(node),
                channels=channels,
                producer=(prod[0].name or None) if prod else None,
                producer_op=prod[0].op_type if prod else None,
                fold_target=target,
                chain=chain,
                fold_blocker=fold_blocker,
                recalibration_blocker=recal_blocker,
                affected=x in affected,
            )
        )
    return infos


def _recalibration_blocker(index: GraphIndex, node: onnx.NodeProto) -> str | None:
    if int(_attr(node, "training_mode", 0)) != 0:  # type: ignore[call-overload]
        return "BN is in training mode (training_mode=1); export the model in eval mode"
    if int(_attr(node, "spatial", 1)) != 1:  # type: ignore[call-overload]
        return "BN has spatial=0 (per-activation statistics), which is not supported"
    if len(node.input) < 5:
        return "BN has fewer than 5 inputs"
    for extra in node.output[1:]:
        if extra and index.uses(extra):
            return f"BN training output {extra!r} is used by the graph"
    names = ("scale", "B", "mean", "var")
    values = [index.constant(node.input[i]) for i in range(1, 5)]
    for label, inp, value in zip(names, node.input[1:5], values, strict=True):
        if value is None:
            return f"BN {label} {inp!r} is not a constant (initializer or Constant node)"
    sizes = {int(v.size) for v in values if v is not None}
    if len(sizes) != 1:
        return f"BN parameters have different lengths {sorted(sizes)}"
    return None


def _fold_target(
    index: GraphIndex, bn: onnx.NodeProto, channels: int | None
) -> tuple[str | None, tuple[str, ...], str | None]:
    """Walk up from the BN input through allowed chain ops to an NbSmt op."""
    tensor = bn.input[0]
    chain: list[str] = []
    while True:
        uses = index.uses(tensor)
        if tensor in index.graph_outputs:
            return None, (), f"BN input {tensor!r} (or a tensor on its chain) is a graph output"
        if uses != 1:
            others = sorted(
                c.name or c.op_type for c in index.consumers.get(tensor, []) if c is not bn
            )
            return (
                None,
                (),
                f"tensor {tensor!r} has other consumers {others}; folding would change them",
            )
        prod = index.producer.get(tensor)
        if prod is None:
            return (
                None,
                (),
                f"BN input {tensor!r} is a graph input or initializer, not an op output",
            )
        node, out_index = prod
        if node.op_type in FOLDABLE_CHAIN_OPS and node.domain in ("", "ai.onnx"):
            chain.append(node.name or node.output[0])
            tensor = node.input[0]
            bn = node
            continue
        if not is_nbsmt(node):
            hops = f" (through {len(chain)} Identity nodes)" if chain else ""
            return None, (), f"producer{hops} is {node.op_type} {node.name!r}, not an NbSmt op"
        if out_index != 0:
            return None, (), f"BN reads output {out_index} of {node.name!r}, not its Y output"
        if not node.name:
            return None, (), "producing NbSmt node has no name"
        w_scale = index.constant(node.input[3]) if len(node.input) > 3 else None
        if w_scale is None:
            return None, (), f"{node.name!r} w_scale is not a constant"
        if len(node.input) > 4 and node.input[4] and index.constant(node.input[4]) is None:
            return None, (), f"{node.name!r} bias is not a constant"
        if w_scale.ndim != 1 or (channels is not None and w_scale.size != channels):
            return (
                None,
                (),
                (f"{node.name!r} has {w_scale.size} output channels, BN has {channels}"),
            )
        return node.name, tuple(reversed(chain)), None


def dependency_levels(model: onnx.ModelProto, node_names: Iterable[str]) -> dict[str, int]:
    """For selected nodes, the largest number of *selected* nodes on any path upstream.

    Nodes of the same level never depend on each other, so they can be
    measured in the same pass of a sequential procedure: level-0 nodes first,
    then level-1 nodes with level-0 nodes already updated, and so on. The
    number of passes is ``max(level) + 1``.
    """
    selected = set(node_names)
    depth: dict[str, int] = {}  # tensor -> number of selected nodes upstream (max over paths)
    levels: dict[str, int] = {}
    for node in model.graph.node:
        upstream = max((depth.get(i, 0) for i in node_inputs(node)), default=0)
        if node.name in selected:
            levels[node.name] = upstream
            upstream += 1
        for out in node.output:
            if out:
                depth[out] = upstream
    missing = selected - levels.keys()
    if missing:
        raise InternalError(f"nodes not found in the main graph: {sorted(missing)}")
    return levels


def group_by_level(levels: dict[str, int]) -> list[list[str]]:
    """Node names grouped by level, level 0 first (order inside a level: input order)."""
    if not levels:
        return []
    groups: list[list[str]] = [[] for _ in range(max(levels.values()) + 1)]
    for name, level in levels.items():
        groups[level].append(name)
    return [g for g in groups if g]


def infer_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Ranks of main-graph tensors from ONNX shape inference (NbSmt ops made transparent).

    ONNX cannot infer the output shape of a custom op, which would leave every
    tensor downstream of the first NbSmt op unknown. On a copy, each NbSmt op
    is replaced by the standard op it simulates (Conv / MatMul on the
    float-cast integer weight) -- same output shape -- and the copy is inferred.
    """
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    names = NameGenerator.for_model(twin)
    nodes = []
    for node in twin.graph.node:
        if not is_nbsmt(node):
            nodes.append(node)
            continue
        w_float = names.new(node.name, "shape_twin_weight")
        nodes.append(helper.make_node("Cast", [node.input[1]], [w_float], to=TensorProto.FLOAT))
        if node.op_type == schema.CONV:
            attrs = {
                a.name: helper.get_attribute_value(a)
                for a in node.attribute
                if a.name in schema.CONV_ATTRIBUTES
            }
            nodes.append(
                helper.make_node("Conv", [node.input[0], w_float], [node.output[0]], **attrs)
            )
        else:
            nodes.append(helper.make_node("MatMul", [node.input[0], w_float], [node.output[0]]))
    del twin.graph.node[:]
    twin.graph.node.extend(nodes)
    try:
        inferred = onnx.shape_inference.infer_shapes(twin, strict_mode=False)
    except Exception as err:  # inference is best effort: unknown ranks only block folding
        logger.debug("shape inference failed: %s", err)
        return {}
    ranks: dict[str, int] = {}
    for vi in (
        list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
    ):
        tensor_type = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tensor_type.HasField("shape"):
            ranks[vi.name] = len(tensor_type.shape.dim)
    return ranks
