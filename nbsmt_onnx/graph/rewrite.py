"""Rewrite Conv / MatMul / Gemm into the NB-SMT operators (docs/spec.md §2-§3).

The pass has the *pattern + check + rewrite* shape:

- pattern: every ``Conv``, ``MatMul`` and ``Gemm`` node of the main graph;
- check (:func:`plan_rewrite`): the weight must be a constant (initializer,
  ``Constant`` node or a foldable chain of them, see
  :mod:`nbsmt_onnx.graph.constants`), float32, of a supported rank; no
  unsupported attribute; a Gemm bias must be per output column; the user's
  selection must allow the node. A node that fails gets a :class:`SkippedNode`
  with the reason; nothing is logged per node, the reasons go to the report;
- rewrite (:func:`rewrite_model`): each planned node is replaced, at the same
  position, by one NB-SMT node:

  ``Conv(X, W, B)``  ->  ``NbSmtConv(X, Wq, x_scale, w_scale, B)`` with the Conv
  attributes copied unchanged;

  ``MatMul(A, W)`` with W of shape [K, N]  ->  ``NbSmtMatMul(A, Wq, a_scale, w_scale)``;

  ``Gemm(A, B, C; alpha, beta, transA, transB)``  ->
  ``NbSmtMatMul(A' , Wq, a_scale, w_scale, bias)`` with
  ``W = alpha * (B^T if transB else B)`` (shape [K, N]) quantized per column,
  ``bias = beta * C`` kept in float32 (C must be a scalar, [N] or [1, N]),
  and ``A' = Transpose(A)`` when ``transA=1``.

Weights are quantized symmetrically per output channel to int8
(``nbsmt_onnx.ops.reference.quantize_weights``, docs/spec.md §2) and the activation
scale comes from the calibrated range (:mod:`nbsmt_onnx.calibration.ranges`).
A weight shared by several nodes is quantized once and the quantized
initializers are shared; one activation scale initializer is shared by all
consumers of the same tensor. Weight chains that become unused are removed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx
import onnx.inliner
from onnx import helper, numpy_helper

from nbsmt_onnx.config import Selection, TransformConfig
from nbsmt_onnx.errors import InternalError
from nbsmt_onnx.graph.constants import ConstantResolver
from nbsmt_onnx.graph.naming import NameGenerator
from nbsmt_onnx.ops import schema

log = logging.getLogger(__name__)

CANDIDATE_OP_TYPES = ("Conv", "MatMul", "Gemm")
#: Matrix ops the NB-SMT operators do not cover; listed in the report so users see them.
UNSUPPORTED_OP_TYPES = (
    "ConvTranspose",
    "ConvInteger",
    "MatMulInteger",
    "QLinearConv",
    "QLinearMatMul",
    "Einsum",
)
_DEFAULT_DOMAINS = ("", "ai.onnx")
_GEMM_ATTRIBUTES = ("alpha", "beta", "transA", "transB")


@dataclass(frozen=True)
class Candidate:
    """A node that passed the checks and will be rewritten."""

    node_name: str
    op_type: str  # the original ONNX op type
    activation: str  # tensor quantized with the per-tensor activation scale
    weight: str
    bias: str | None
    reduction_length: int  # K: the number of products summed per output element
    weight_origin: str  # "initializer" | "Constant" | "folded"


@dataclass(frozen=True)
class SkippedNode:
    """A node left in float, and why."""

    node_name: str
    op_type: str
    reason: str


@dataclass(frozen=True)
class RewritePlan:
    """What the rewrite pass would do; computed on the float model."""

    candidates: tuple[Candidate, ...]
    skipped: tuple[SkippedNode, ...]

    @property
    def activation_tensors(self) -> tuple[str, ...]:
        """The tensors whose range calibration must measure (unique, in graph order)."""
        return tuple(dict.fromkeys(c.activation for c in self.candidates))


@dataclass(frozen=True)
class RewrittenNode:
    """One NB-SMT node of the rewritten model, for the report."""

    node_name: str
    op_type: str  # NbSmtConv | NbSmtMatMul
    source_op_type: str
    activation: str
    act_scale: float
    act_signed: bool
    act_range: tuple[float, float]
    weight_shape: tuple[int, ...]  # the quantized weight's shape
    reduction_length: int
    weight_origin: str
    weight_shared: bool


@dataclass(frozen=True)
class RewriteResult:
    """Outcome of :func:`rewrite_model`: the new model and what happened to every node."""

    model: onnx.ModelProto
    rewritten: tuple[RewrittenNode, ...]
    skipped: tuple[SkippedNode, ...]
    removed_nodes: int = 0

    @property
    def modified(self) -> bool:
        return bool(self.rewritten)


class _RangeLike(Protocol):
    """What the rewrite needs from a calibrated range (calibration.ranges.ActivationRange)."""

    @property
    def min(self) -> float: ...
    @property
    def max(self) -> float: ...
    @property
    def signed(self) -> bool: ...
    def scale(self) -> np.float32: ...


# --------------------------------------------------------------------------- naming


def ensure_node_names(model: onnx.ModelProto) -> int:
    """Give every unnamed node of the main graph a unique name (in place); return how many.

    The report and the user's include/exclude rules refer to nodes by name,
    so every node needs one; exporters often leave them empty. Duplicate
    names are made unique too.
    """
    names = NameGenerator.for_model(model)
    seen: set[str] = set()
    count = 0
    for node in model.graph.node:
        if not node.name or node.name in seen:
            node.name = names.new("", f"{node.op_type}_{len(seen)}")
            count += 1
        seen.add(node.name)
    return count


def prepare_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Bring the model into the form every later step assumes; return it and notes for the log.

    - Model-local functions are inlined (``onnx.inliner``), so a Conv/MatMul/Gemm
      inside one is planned like any other node. When inlining fails the calls
      stay, and :func:`plan_rewrite` lists their Conv/MatMul/Gemm as skipped.
    - Initializers also listed as graph inputs (``keep_initializers_as_inputs``,
      and every IR 3 model) are overridable defaults in ONNX, but every exporter
      that writes them means weights: they are removed from the inputs, so the
      rewrite, BN recalibration, folding and ONNX Runtime all treat them as
      constants. A model of IR version < 4 (where initializers must be inputs)
      is then declared IR 4, the first version without that rule.
    """
    notes: list[str] = []
    if model.functions:
        calls = sum(
            1
            for n in model.graph.node
            if (n.domain, n.op_type) in {(f.domain, f.name) for f in model.functions}
        )
        try:
            inlined = onnx.inliner.inline_local_functions(model)
            onnx.checker.check_model(inlined)
        except Exception as err:  # the inliner raises several types; keep the calls then
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            notes.append(
                f"model-local functions not inlined ({reason}); their Conv/MatMul/Gemm stay in float"
            )
        else:
            notes.append(
                f"inlined {len(model.functions)} model-local function(s) at {calls} call(s)"
            )
            model = inlined
    inits = {t.name for t in model.graph.initializer}
    overridable = [i for i in model.graph.input if i.name in inits]
    if overridable:
        kept = [i for i in model.graph.input if i.name not in inits]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        notes.append(
            f"{len(overridable)} initializer(s) also listed as graph inputs are treated as constants"
        )
        if model.ir_version < 4:
            notes.append(f"IR version {model.ir_version} -> 4 (initializers no longer inputs)")
            model.ir_version = 4
    return model, notes


# --------------------------------------------------------------------------- plan (pattern + check)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type is known (after shape inference, if it works)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception as err:  # inference is an aid here, never a requirement
        log.debug("shape inference failed (%s); dtype checks use declared types only", err)
        inferred = model
    types: dict[str, int] = {}
    g = inferred.graph
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    return types


def _attrs(node: onnx.NodeProto) -> dict[str, onnx.AttributeProto]:
    return {a.name: a for a in node.attribute}


def _check_conv(node: onnx.NodeProto, consts: ConstantResolver) -> tuple[Candidate | None, str]:
    if len(node.input) < 2:
        return None, "Conv without a weight input"
    attrs = _attrs(node)
    unknown = sorted(set(attrs) - set(schema.CONV_ATTRIBUTES))
    if unknown:
        return None, f"unsupported attribute {unknown[0]!r}"
    if "auto_pad" in attrs:
        auto_pad = attrs["auto_pad"].s.decode()
        if auto_pad not in schema.AUTO_PAD_CHOICES:
            return None, f"unsupported auto_pad {auto_pad!r}"
    w = consts.lookup(node.input[1])
    if w.value is None:
        return None, f"dynamic weights: {w.reason}"
    if w.value.dtype != np.float32:
        return None, f"weight dtype {w.value.dtype} not supported (float32 only)"
    if w.value.ndim not in (3, 4, 5):
        return None, f"Conv with {w.value.ndim - 2} spatial dimensions not supported (1 to 3)"
    if "kernel_shape" in attrs and tuple(attrs["kernel_shape"].ints) != w.value.shape[2:]:
        return None, (
            f"kernel_shape {list(attrs['kernel_shape'].ints)} disagrees with the weight "
            f"shape {list(w.value.shape)}"
        )
    if not np.all(np.isfinite(w.value)):
        return None, "weight contains NaN or Inf"
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None:
        b = consts.lookup(bias)
        if b.value is None:
            return None, f"dynamic bias: {b.reason}"
        if b.value.dtype != np.float32 or b.value.shape != (w.value.shape[0],):
            return None, f"bias of shape {list(b.value.shape)} / {b.value.dtype} is not float32 [M]"
    k = int(np.prod(w.value.shape[1:]))
    return _finish(node, node.input[0], k, bias, w.origin, consts)


def _check_matmul(node: onnx.NodeProto, consts: ConstantResolver) -> tuple[Candidate | None, str]:
    w = consts.lookup(node.input[1])
    if w.value is None:
        if consts.is_constant(node.input[0]):
            return (
                None,
                "dynamic weights: the constant operand is on the left (only constant right operands are supported)",
            )
        return None, "dynamic weights: MatMul of two run-time tensors"
    if w.value.dtype != np.float32:
        return None, f"weight dtype {w.value.dtype} not supported (float32 only)"
    if w.value.ndim != 2:
        return None, f"constant right operand of rank {w.value.ndim} not supported (2-D only)"
    if not np.all(np.isfinite(w.value)):
        return None, "weight contains NaN or Inf"
    return _finish(node, node.input[0], int(w.value.shape[0]), None, w.origin, consts)


def _check_gemm(node: onnx.NodeProto, consts: ConstantResolver) -> tuple[Candidate | None, str]:
    attrs = _attrs(node)
    unknown = sorted(set(attrs) - set(_GEMM_ATTRIBUTES))
    if unknown:
        return None, f"unsupported attribute {unknown[0]!r}"
    w = consts.lookup(node.input[1])
    if w.value is None:
        return None, f"dynamic weights: {w.reason}"
    if w.value.dtype != np.float32:
        return None, f"weight dtype {w.value.dtype} not supported (float32 only)"
    if w.value.ndim != 2:
        return None, f"Gemm weight of rank {w.value.ndim}"
    if not np.all(np.isfinite(w.value)):
        return None, "weight contains NaN or Inf"
    trans_b = attrs["transB"].i if "transB" in attrs else 0
    k = int(w.value.shape[1] if trans_b else w.value.shape[0])
    n = int(w.value.shape[0] if trans_b else w.value.shape[1])
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None:
        c = consts.lookup(bias)
        if c.value is None:
            return None, f"dynamic bias C: {c.reason}"
        if c.value.dtype != np.float32:
            return None, f"bias C dtype {c.value.dtype} not supported (float32 only)"
        if c.value.size != 1 and c.value.shape not in ((n,), (1, n)):
            return None, (
                f"bias C of shape {list(c.value.shape)} is not per output column "
                f"(a scalar, [{n}] or [1, {n}]); it cannot be a per-channel bias"
            )
    return _finish(node, node.input[0], k, bias, w.origin, consts)


def _finish(
    node: onnx.NodeProto,
    activation: str,
    k: int,
    bias: str | None,
    origin: str,
    consts: ConstantResolver,
) -> tuple[Candidate | None, str]:
    if consts.is_constant(activation):
        return None, "the activation input is a constant (nothing runs at inference time)"
    if k > schema.MAX_REDUCTION_LENGTH:
        return (
            None,
            f"reduction length {k} exceeds {schema.MAX_REDUCTION_LENGTH} (int32 accumulator)",
        )
    return (
        Candidate(
            node_name=node.name,
            op_type=node.op_type,
            activation=activation,
            weight=node.input[1],
            bias=bias,
            reduction_length=k,
            weight_origin=origin,
        ),
        "",
    )


_CHECKS = {"Conv": _check_conv, "MatMul": _check_matmul, "Gemm": _check_gemm}


def _subgraph_skips(graph: onnx.GraphProto, owner: str) -> list[SkippedNode]:
    out: list[SkippedNode] = []
    for node in graph.node:
        if node.op_type in CANDIDATE_OP_TYPES and node.domain in _DEFAULT_DOMAINS:
            out.append(
                SkippedNode(
                    node.name,
                    node.op_type,
                    f"inside the subgraph of {owner!r} (If/Loop/Scan bodies are not rewritten)",
                )
            )
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                out.extend(_subgraph_skips(sub, owner))
    return out


def _function_skips(
    functions: dict[tuple[str, str], onnx.FunctionProto], call: onnx.NodeProto, seen: set[str]
) -> list[SkippedNode]:
    """Conv/MatMul/Gemm inside the model-local function that ``call`` calls (and its callees)."""
    func = functions[(call.domain, call.op_type)]
    if func.name in seen:
        return []
    out: list[SkippedNode] = []
    for node in func.node:
        name = f"{call.name}/{node.name or node.op_type}"
        if node.op_type in CANDIDATE_OP_TYPES and node.domain in _DEFAULT_DOMAINS:
            out.append(
                SkippedNode(
                    name,
                    node.op_type,
                    f"inside model-local function {func.name!r} called by {call.name!r} "
                    "(the function could not be inlined)",
                )
            )
        elif (node.domain, node.op_type) in functions:
            out.extend(_function_skips(functions, node, seen | {func.name}))
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                out.extend(_subgraph_skips(sub, call.name))
    return out


def _ends(model: onnx.ModelProto, candidates: list[Candidate]) -> tuple[set[str], set[str]]:
    """Names of the first and last candidates: no candidate upstream / downstream of them.

    One pass in topological order propagates "a candidate is upstream" along
    tensors; one reverse pass propagates "a candidate is downstream".
    """
    names = {c.node_name for c in candidates}
    nodes = list(model.graph.node)
    upstream: set[str] = set()  # tensors that depend on some candidate's output
    first: set[str] = set()
    for node in nodes:
        fed_by_candidate = any(i in upstream for i in node.input)
        if node.name in names and not fed_by_candidate:
            first.add(node.name)
        if fed_by_candidate or node.name in names:
            upstream.update(o for o in node.output if o)
    downstream: set[str] = set()  # tensors some candidate depends on
    last: set[str] = set()
    for node in reversed(nodes):
        feeds_candidate = any(o in downstream for o in node.output)
        if node.name in names and not feeds_candidate:
            last.add(node.name)
        if feeds_candidate or node.name in names:
            downstream.update(i for i in node.input if i)
    return first, last


def plan_rewrite(model: onnx.ModelProto, selection: Selection | None = None) -> RewritePlan:
    """Decide, for every Conv / MatMul / Gemm, whether it becomes an NB-SMT op and why not.

    The model must have unique node names (:func:`ensure_node_names`). It is
    not modified.
    """
    selection = selection or Selection()
    consts = ConstantResolver(model)
    types = _elem_types(model)
    checked: list[Candidate] = []
    skipped: list[SkippedNode] = []
    functions = {(f.domain, f.name): f for f in model.functions}
    for node in model.graph.node:
        if node.domain not in _DEFAULT_DOMAINS:
            pass
        elif node.op_type in _CHECKS:
            candidate, reason = _CHECKS[node.op_type](node, consts)
            act_type = types.get(node.input[0]) if node.input else None
            if candidate is not None and act_type not in (None, onnx.TensorProto.FLOAT):
                candidate, reason = (
                    None,
                    (
                        f"activation dtype {onnx.helper.tensor_dtype_to_np_dtype(act_type)} "
                        "not supported (float32 only)"
                    ),
                )
            if candidate is None:
                skipped.append(SkippedNode(node.name, node.op_type, reason))
            else:
                checked.append(candidate)
        elif node.op_type in UNSUPPORTED_OP_TYPES:
            skipped.append(
                SkippedNode(node.name, node.op_type, f"{node.op_type} has no NB-SMT equivalent")
            )
        if (node.domain, node.op_type) in functions:
            skipped.extend(_function_skips(functions, node, set()))
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                skipped.extend(_subgraph_skips(sub, node.name))
    first, last = _ends(model, checked)
    selected: list[Candidate] = []
    for cand in checked:
        why: str | None = selection.exclusion_reason(cand.node_name, cand.op_type)
        if why is None and selection.keep_first and cand.node_name in first:
            why = "kept in float: first layer (--keep-first)"
        if why is None and selection.keep_last and cand.node_name in last:
            why = "kept in float: last layer (--keep-last)"
        if why is None:
            selected.append(cand)
        else:
            skipped.append(SkippedNode(cand.node_name, cand.op_type, why))
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    skipped.sort(key=lambda s: order.get(s.node_name, len(order)))
    return RewritePlan(tuple(selected), tuple(skipped))


# --------------------------------------------------------------------------- rewrite


@dataclass
class _Builder:
    """Mutable state of one rewrite: new initializers, caches for shared tensors."""

    names: NameGenerator
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    weight_cache: dict[tuple[object, ...], tuple[str, str, tuple[int, ...]]] = field(
        default_factory=dict
    )
    weight_uses: dict[tuple[object, ...], int] = field(default_factory=dict)
    scale_cache: dict[str, str] = field(default_factory=dict)

    def add(self, base: str, purpose: str, value: np.ndarray) -> str:
        name = self.names.new(base, purpose)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name


def _quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    from nbsmt_onnx.ops.reference import quantize_weights

    return quantize_weights(w, axis=axis)


def _weight_inputs(
    b: _Builder, key: tuple[object, ...], base: str, make: object, axis: int
) -> tuple[str, str, tuple[int, ...], bool]:
    """(Wq name, w_scale name, Wq shape, shared?) for a weight, quantized once per key."""
    b.weight_uses[key] = b.weight_uses.get(key, 0) + 1
    if key not in b.weight_cache:
        w = make() if callable(make) else make
        wq, scale = _quantize_weight(np.asarray(w), axis)
        b.weight_cache[key] = (
            b.add(base, "weight_q", wq),
            b.add(base, "weight_scale", scale.astype(np.float32)),
            tuple(wq.shape),
        )
    wq_name, scale_name, shape = b.weight_cache[key]
    return wq_name, scale_name, shape, b.weight_uses[key] > 1


def _act_scale(b: _Builder, tensor: str, rng: _RangeLike) -> str:
    if tensor not in b.scale_cache:
        b.scale_cache[tensor] = b.add(
            tensor, "act_scale", np.asarray(rng.scale(), dtype=np.float32)
        )
    return b.scale_cache[tensor]


def rewrite_model(
    model: onnx.ModelProto,
    plan: RewritePlan,
    ranges: Mapping[str, _RangeLike],
    config: TransformConfig,
) -> RewriteResult:
    """Return a copy of ``model`` with every planned node replaced by its NB-SMT op.

    ``ranges`` maps each activation tensor of the plan to its calibrated range.
    ``model`` is not modified.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    consts = ConstantResolver(model)
    b = _Builder(NameGenerator.for_model(out))
    by_name = {n.name: i for i, n in enumerate(graph.node)}
    replacement: dict[int, list[onnx.NodeProto]] = {}
    rewritten: list[RewrittenNode] = []
    dropped_inputs: set[str] = set()
    weight_tensors: list[str] = []  # the Wq initializer of each rewritten node

    for cand in plan.candidates:
        if cand.node_name not in by_name:
            raise InternalError(f"planned node {cand.node_name!r} is not in the model")
        index = by_name[cand.node_name]
        node = graph.node[index]
        if cand.activation not in ranges:
            raise InternalError(f"no calibrated range for {cand.activation!r}")
        rng = ranges[cand.activation]
        signed = bool(rng.signed)
        x_scale = _act_scale(b, cand.activation, rng)
        smt: dict[str, Any] = dict(config.smt_attributes(act_signed=signed).as_node_attributes())
        new_nodes: list[onnx.NodeProto] = []
        attrs: dict[str, Any]
        weight_value = lambda name=cand.weight: consts.lookup(name).value  # noqa: E731
        if cand.op_type == "Conv":
            wq, ws, shape, shared = _weight_inputs(
                b, ("conv", cand.weight), cand.weight, weight_value, 0
            )
            inputs = [node.input[0], wq, x_scale, ws]
            if cand.bias:
                inputs.append(_float_input(b, consts, cand.bias))
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            new = helper.make_node(
                schema.CONV,
                inputs,
                [node.output[0]],
                name=node.name,
                domain=schema.DOMAIN,
                **attrs,
                **smt,
            )
        else:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            alpha = float(attrs.get("alpha", 1.0))
            beta = float(attrs.get("beta", 1.0))
            trans_a = int(attrs.get("transA", 0))
            trans_b = int(attrs.get("transB", 0))
            if cand.op_type == "MatMul":
                alpha, beta, trans_a, trans_b = 1.0, 1.0, 0, 0

            def make_weight(
                name: str = cand.weight, tb: int = trans_b, al: float = alpha
            ) -> np.ndarray:
                w = np.asarray(consts.lookup(name).value, dtype=np.float32)
                w = w.T if tb else w
                return (
                    (w * np.float32(al)).astype(np.float32)
                    if al != 1.0
                    else np.ascontiguousarray(w)
                )

            key = ("matmul", cand.weight, trans_b, alpha)
            wq, ws, shape, shared = _weight_inputs(b, key, cand.weight, make_weight, 1)
            a_input = node.input[0]
            if trans_a:
                a_input = b.names.new(node.name, "A_transposed")
                new_nodes.append(
                    helper.make_node(
                        "Transpose",
                        [node.input[0]],
                        [a_input],
                        name=b.names.new(node.name, "transpose_A"),
                        perm=[1, 0],
                    )
                )
            inputs = [a_input, wq, x_scale, ws]
            if cand.bias:
                c = np.asarray(consts.lookup(cand.bias).value, dtype=np.float32)
                bias = np.broadcast_to(c.reshape(-1), (shape[1],)) * np.float32(beta)
                inputs.append(
                    b.add(node.name, "bias", np.ascontiguousarray(bias, dtype=np.float32))
                )
            new = helper.make_node(
                schema.MATMUL, inputs, [node.output[0]], name=node.name, domain=schema.DOMAIN, **smt
            )
        new_nodes.append(new)
        replacement[index] = new_nodes
        dropped_inputs.update(i for i in node.input[1:] if i)
        rewritten.append(
            RewrittenNode(
                node_name=node.name,
                op_type=new.op_type,
                source_op_type=cand.op_type,
                activation=cand.activation,
                act_scale=float(rng.scale()),
                act_signed=signed,
                act_range=(float(rng.min), float(rng.max)),
                weight_shape=shape,
                reduction_length=cand.reduction_length,
                weight_origin=cand.weight_origin,
                weight_shared=shared,
            )
        )
        weight_tensors.append(wq)

    uses = {w: weight_tensors.count(w) for w in weight_tensors}
    rewritten = [
        dataclasses.replace(r, weight_shared=uses[w] > 1)
        for r, w in zip(rewritten, weight_tensors, strict=True)
    ]
    if replacement:
        nodes: list[onnx.NodeProto] = []
        for i, node in enumerate(graph.node):
            nodes.extend(replacement.get(i, [node]))
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(b.initializers)
        removed = _remove_dead(graph, dropped_inputs)
        if not any(o.domain == schema.DOMAIN for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid(schema.DOMAIN, schema.OPSET_VERSION))
    else:
        removed = 0
    log.info(
        "rewrote %d node(s), skipped %d, removed %d dead node(s)",
        len(rewritten),
        len(plan.skipped),
        removed,
    )
    return RewriteResult(out, tuple(rewritten), plan.skipped, removed)


def _float_input(b: _Builder, consts: ConstantResolver, name: str) -> str:
    """A tensor usable as a node input holding ``name``'s constant value.

    An initializer is used as is; a value from a Constant node or a chain
    becomes a new initializer (the chain may be removed as dead).
    """
    lookup = consts.lookup(name)
    if lookup.origin == "initializer":
        return name
    return b.add(name, "const", np.asarray(lookup.value, dtype=np.float32))


def _referenced(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node of ``graph`` or of its subgraphs (implicit inputs)."""
    used: set[str] = set()
    for node in graph.node:
        used.update(i for i in node.input if i)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                used |= _referenced(sub)
    return used


def _remove_dead(graph: onnx.GraphProto, roots: set[str]) -> int:
    """Remove nodes and initializers that only computed the replaced weights (``roots``).

    Only the producers of ``roots`` and, transitively, of their inputs are
    candidates for removal, so unrelated dangling nodes of the input model
    are left alone. Returns the number of nodes removed.
    """
    outputs = {o.name for o in graph.output}
    chain = set(roots)
    removed = 0
    changed = True
    while changed:
        changed = False
        used = _referenced(graph) | outputs
        for node in list(graph.node):
            outs = [o for o in node.output if o]
            if outs and any(o in chain for o in outs) and not any(o in used for o in outs):
                graph.node.remove(node)
                chain.update(i for i in node.input if i)
                removed += 1
                changed = True
    used = _referenced(graph) | outputs
    dead = {t.name for t in graph.initializer if t.name in chain and t.name not in used}
    for t in [t for t in graph.initializer if t.name in dead]:
        graph.initializer.remove(t)
    # IR < 4 models list initializers as graph inputs too; drop those inputs with them.
    for inp in [i for i in graph.input if i.name in dead]:
        graph.input.remove(inp)
    for vi in [v for v in graph.value_info if v.name in chain and v.name not in used]:
        graph.value_info.remove(vi)
    return removed
