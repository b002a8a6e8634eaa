"""Export the simulation model as a standard ONNX QDQ model (docs/spec.md §6).

Every NB-SMT node becomes QuantizeLinear/DequantizeLinear around a stock op,
with the *same* integers and scales, so stock ONNX Runtime and hardware
toolchains run it without the nbsmt library:

  ``NbSmtConv(X, Wq, x_scale, w_scale, B)`` ->
      ``Conv(DQ(Q(X', x_scale, 0), x_scale, 0), DQ(Wq, w_scale, 0, axis=0), B)``

  ``NbSmtMatMul(A, Bq, a_scale, b_scale, bias)`` ->
      ``MatMul(DQ(Q(A', a_scale, 0), a_scale, 0), DQ(Bq, b_scale, 0, axis=1)) [+ bias]``

Signed activations are clipped first, ``X' = Clip(X, -127 s, 127 s)``, because
QuantizeLinear saturates to [-128, 127] while the quantizer clips to
[-127, 127] (``(-127 s) / s`` rounds to -127 in float32 division). Weights sit
behind a per-channel DequantizeLinear (opset >= 13). Whatever was
recalibrated/folded into ``w_scale`` and ``B`` is carried over as is.

How the integers are *typed* (``representation``; the integers and scales are
the same in every one):

- ``u8u8`` (default): activations uint8 — unsigned ones with zero point 0,
  signed ones with zero point 128 (``q + 128``); weights uint8 with zero point
  128 (``Wq + 128``, stored as such).
- ``u8s8``: unsigned activations uint8 (zero point 0), signed ones int8, weights
  int8 (zero point 0) — the textbook form.
- ``s8s8``: activations int8 (unsigned ones with zero point -128), weights int8.

Why ``u8u8``: with its default graph optimisations ONNX Runtime fuses
DQ -> MatMul/Conv(-> Q) into integer kernels (QGemm, MatMulIntegerToFloat,
QLinearConv). For uint8 x int8 (and int8 x int8, which MLAS maps onto it) the
x86 kernels without VNNI multiply with ``vpmaddubsw``, which saturates the sum
of two products to int16 (255 * 127 * 2 > 32767): on an AVX2 CPU an MLP's
QDQ model differed from the T=1 simulation by 5.8 % of the output peak and
changed the argmax of 1.3 % of the samples. uint8 x uint8 runs in kernels that
widen to 16 bits first (``vpmaddwd``) and are exact; what is left is the fused
kernels' own requantization rounding (a one-step flip where a value lands on a
rounding boundary). ``bench/qdq_deploy_check.py`` measures all three;
docs/transform.md has the numbers.

Equivalence with the simulation at ``threads=1``: the quantized operands are
identical; the simulation sums integer products exactly and scales once
(``s_x * s_w[c] * acc + B``), the QDQ model sums float32 products of the
dequantized operands, so the two differ by float32 rounding of the sum
(about ``K * eps32`` relative to the sum of |terms| per layer). Where such a
difference lands on a rounding boundary of the next layer's quantizer it
flips one integer step there; tests quantify both effects.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from nbsmt_onnx.config import QDQ_TYPES_CHOICES
from nbsmt_onnx.errors import UnsupportedModelError
from nbsmt_onnx.graph.naming import NameGenerator
from nbsmt_onnx.ops import schema

log = logging.getLogger(__name__)

MIN_QDQ_OPSET = 13  # per-axis DequantizeLinear
_SMT_ATTRIBUTES = ("threads", "mapping", "reduce", "act_signed")


def _default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


def _initializer(graph: onnx.GraphProto, name: str) -> np.ndarray:
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise UnsupportedModelError(
        f"QDQ export: {name!r} is not an initializer (scales must be constants)"
    )


#: How the integers are typed in the QDQ model (the integers and scales are the same in all):
#: ``u8s8``: unsigned activations uint8 (zero point 0), signed ones int8, weights int8;
#: ``u8u8``: activations uint8 (signed ones with zero point 128), weights uint8 (zero point 128);
#: ``s8s8``: activations int8 (unsigned ones with zero point -128), weights int8.
REPRESENTATIONS = QDQ_TYPES_CHOICES


DEFAULT_REPRESENTATION = QDQ_TYPES_CHOICES[0]


def to_qdq(
    sim_model: onnx.ModelProto, representation: str = DEFAULT_REPRESENTATION
) -> onnx.ModelProto:
    """Return the QDQ equivalent of a simulation model (which is not modified)."""
    if representation not in REPRESENTATIONS:
        raise UnsupportedModelError(
            f"QDQ representation {representation!r} is not one of {', '.join(REPRESENTATIONS)}"
        )
    opset = _default_opset(sim_model)
    if opset < MIN_QDQ_OPSET:
        raise UnsupportedModelError(
            f"QDQ export needs opset >= {MIN_QDQ_OPSET} (per-channel DequantizeLinear); the model has "
            f"opset {opset}: convert it with onnx.version_converter or use --export sim"
        )
    out = onnx.ModelProto()
    out.CopyFrom(sim_model)
    g = out.graph
    names = NameGenerator.for_model(out)
    used = {i for n in g.node for i in n.input}
    new_inits: list[onnx.TensorProto] = []
    act_cache: dict[tuple[str, str, int], str] = {}
    weight_cache: dict[tuple[str, str, int], str] = {}

    def add_init(base: str, purpose: str, value: np.ndarray) -> str:
        name = names.new(base, purpose)
        new_inits.append(numpy_helper.from_array(value, name))
        return name

    def qdq_activation(
        x: str, scale: str, signed: int, prefix: str, nodes: list[onnx.NodeProto]
    ) -> str:
        key = (x, scale, signed)
        if key in act_cache:
            return act_cache[key]
        if representation == "u8u8":
            zp_value = np.array(128 if signed else 0, dtype=np.uint8)
        elif representation == "s8s8":
            zp_value = np.array(0 if signed else -128, dtype=np.int8)
        else:
            zp_value = np.array(0, dtype=np.int8 if signed else np.uint8)
        zp = add_init(x, "zero_point", zp_value)
        src = x
        if signed:
            s = np.float32(_initializer(g, scale))
            lo = add_init(x, "clip_min", np.array(np.float32(-127) * s, dtype=np.float32))
            hi = add_init(x, "clip_max", np.array(np.float32(127) * s, dtype=np.float32))
            src = names.new(x, "clipped")
            nodes.append(
                helper.make_node("Clip", [x, lo, hi], [src], name=names.new(prefix, "clip"))
            )
        q = names.new(x, "quantized")
        dq = names.new(x, "dequantized")
        nodes.append(
            helper.make_node(
                "QuantizeLinear", [src, scale, zp], [q], name=names.new(prefix, "quantize")
            )
        )
        nodes.append(
            helper.make_node(
                "DequantizeLinear", [q, scale, zp], [dq], name=names.new(prefix, "dequantize")
            )
        )
        act_cache[key] = dq
        return dq

    def dq_weight(wq: str, scale: str, axis: int, prefix: str, nodes: list[onnx.NodeProto]) -> str:
        key = (wq, scale, axis)
        if key in weight_cache:
            return weight_cache[key]
        channels = _initializer(g, scale).reshape(-1).shape[0]
        source = wq
        if representation == "u8u8":
            shifted = _initializer(g, wq).astype(np.int16) + 128
            source = add_init(wq, "uint8", shifted.astype(np.uint8))
            zp = add_init(wq, "zero_point", np.full(channels, 128, dtype=np.uint8))
        else:
            zp = add_init(wq, "zero_point", np.zeros(channels, dtype=np.int8))
        dq = names.new(wq, "dequantized")
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [source, scale, zp],
                [dq],
                name=names.new(prefix, "dequantize_weight"),
                axis=axis,
            )
        )
        weight_cache[key] = dq
        return dq

    new_nodes: list[onnx.NodeProto] = []
    converted = 0
    for node in g.node:
        if node.domain != schema.DOMAIN:
            new_nodes.append(node)
            continue
        if (
            len(node.output) > 1
            and node.output[1]
            and node.output[1] in used | {o.name for o in g.output}
        ):
            raise UnsupportedModelError(
                f"QDQ export: the stats output of {node.name!r} is used; remove it first"
            )
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        signed = int(attrs.get("act_signed", 0))
        x, wq, x_scale, w_scale = node.input[:4]
        bias = node.input[4] if len(node.input) > 4 and node.input[4] else None
        xd = qdq_activation(x, x_scale, signed, node.name, new_nodes)
        if node.op_type == schema.CONV:
            wd = dq_weight(wq, w_scale, 0, node.name, new_nodes)
            conv_attrs = {k: v for k, v in attrs.items() if k not in _SMT_ATTRIBUTES}
            inputs = [xd, wd] + ([bias] if bias else [])
            new_nodes.append(
                helper.make_node("Conv", inputs, [node.output[0]], name=node.name, **conv_attrs)
            )
        elif node.op_type == schema.MATMUL:
            wd = dq_weight(wq, w_scale, 1, node.name, new_nodes)
            if bias:
                mm = names.new(node.name, "matmul")
                new_nodes.append(
                    helper.make_node("MatMul", [xd, wd], [mm], name=names.new(node.name, "matmul"))
                )
                new_nodes.append(
                    helper.make_node("Add", [mm, bias], [node.output[0]], name=node.name)
                )
            else:
                new_nodes.append(
                    helper.make_node("MatMul", [xd, wd], [node.output[0]], name=node.name)
                )
        else:
            raise UnsupportedModelError(f"QDQ export: unknown NB-SMT op {node.op_type!r}")
        converted += 1
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    if representation == "u8u8":  # the int8 weights were replaced by their uint8 copies
        still_used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        kept_inits = [t for t in g.initializer if t.name in still_used or t.name not in used]
        del g.initializer[:]
        g.initializer.extend(kept_inits)
    kept = [o for o in out.opset_import if o.domain != schema.DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(kept)
    log.info("QDQ export: converted %d NB-SMT node(s)", converted)
    return out
