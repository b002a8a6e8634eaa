"""Register the NB-SMT operator schemas with the ``onnx`` Python package.

After :func:`register_schemas`, ``onnx.checker`` knows domain ``nbsmt`` version 1
and ``onnx.shape_inference.infer_shapes`` gives the shape of ``Y`` (and ``stats``,
int64 [4]) for both operators. Names, inputs and defaults come from
:mod:`nbsmt_onnx.ops.schema`; the Conv output size follows ONNX Conv, auto_pad
included (:func:`nbsmt_onnx.ops.reference.conv_geometry`).

onnx >= 1.16 lets Python attach a type-and-shape inference function to an
``OpSchema`` (``OpSchema.set_type_and_shape_inference_function``, called with an
``InferenceContext`` whose ``get_input_type`` / ``get_attribute`` return protos
and whose ``set_output_type`` takes a ``TypeProto``); this module relies on it.
With an older onnx the schemas are still registered, only without inference,
and a debug message says so.

Limitation (onnx 1.23): an exception raised by a Python inference function is
not swallowed by ``infer_shapes(strict_mode=False)`` as C++ inference errors
are; it always propagates. Inconsistent shapes (Wq rank differs from X rank,
bad pads, empty output) therefore raise ``onnx.shape_inference.InferenceError``
naming the node; unknown shapes or dims are never an error (the output dims
are left unknown).

The registration is process-global (that is how onnx schemas work) and
idempotent: calling :func:`register_schemas` twice is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import fields

import onnx
import onnx.defs
import onnx.helper
import onnx.shape_inference

from nbsmt_onnx.errors import ModelError
from nbsmt_onnx.ops import schema

logger = logging.getLogger(__name__)

_OpSchema = onnx.defs.OpSchema
_FLOAT = onnx.TensorProto.FLOAT
_INT64 = onnx.TensorProto.INT64

_SMT_DEFAULTS: dict[str, int | str] = {
    f.name: getattr(schema.SmtAttributes(), f.name) for f in fields(schema.SmtAttributes)
}

_SMT_DOCS = {
    "threads": f"number of NB-SMT threads sharing one MAC, one of {schema.THREADS_CHOICES}",
    "mapping": f"how the reduction axis is split among threads, one of {schema.MAPPING_CHOICES}",
    "reduce": f"operand reduced on a 2-thread collision, one of {schema.REDUCE_CHOICES}",
    "act_signed": "1: activations quantized to [-127, 127]; 0: to [0, 255]",
}


def _with_default(name: str, default: int | str, doc: str) -> _OpSchema.Attribute:
    return _OpSchema.Attribute(name, onnx.helper.make_attribute(name, default), doc)


def _smt_attributes() -> list[_OpSchema.Attribute]:
    return [_with_default(name, _SMT_DEFAULTS[name], _SMT_DOCS[name]) for name in _SMT_DOCS]


def _conv_attributes() -> list[_OpSchema.Attribute]:
    ints = _OpSchema.AttrType.INTS
    return [
        _with_default(
            "auto_pad", "NOTSET", f"ONNX Conv auto_pad, one of {schema.AUTO_PAD_CHOICES}"
        ),
        _OpSchema.Attribute("dilations", ints, "ONNX Conv dilations", required=False),
        _with_default("group", 1, "ONNX Conv group"),
        _OpSchema.Attribute("kernel_shape", ints, "ONNX Conv kernel_shape", required=False),
        _OpSchema.Attribute("pads", ints, "ONNX Conv pads [begin..., end...]", required=False),
        _OpSchema.Attribute("strides", ints, "ONNX Conv strides", required=False),
    ]


def _param(name: str, type_str: str, doc: str, optional: bool = False) -> _OpSchema.FormalParameter:
    option = (
        _OpSchema.FormalParameterOption.Optional
        if optional
        else _OpSchema.FormalParameterOption.Single
    )
    return _OpSchema.FormalParameter(name, type_str, doc, param_option=option)


def _outputs() -> list[_OpSchema.FormalParameter]:
    y, stats = schema.OUTPUTS
    return [
        _param(y, "tensor(float)", "output"),
        _param(
            stats, "tensor(int64)", f"int64 [4]: {', '.join(schema.STATS_FIELDS)}", optional=True
        ),
    ]


# --------------------------------------------------------------------------- inference helpers


def _shape(
    ctx: onnx.shape_inference.InferenceContext, index: int
) -> list[onnx.TensorShapeProto.Dimension] | None:
    """The dims of input ``index``, or None when the input or its shape is unknown."""
    if index >= ctx.get_num_inputs() or not ctx.has_input(index):
        return None
    tp = ctx.get_input_type(index)
    if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
        return None
    return list(tp.tensor_type.shape.dim)


def _value(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    return dim.dim_value if dim.HasField("dim_value") else None


def _ints(ctx: onnx.shape_inference.InferenceContext, name: str) -> list[int] | None:
    """An INTS attribute, or None when absent."""
    attr = ctx.get_attribute(name)
    return list(attr.ints) if attr is not None else None


def _tensor_type(
    elem_type: int, dims: list[onnx.TensorShapeProto.Dimension | int | None] | None
) -> onnx.TypeProto:
    """A tensor ``TypeProto``; a None dim is unknown, ``dims=None`` means unknown rank."""
    tp = onnx.TypeProto()
    tp.tensor_type.elem_type = elem_type
    if dims is not None:
        shape = tp.tensor_type.shape
        shape.SetInParent()
        for d in dims:
            new = shape.dim.add()
            if isinstance(d, onnx.TensorShapeProto.Dimension):
                new.CopyFrom(d)
            elif d is not None:
                new.dim_value = d
    return tp


def _set_stats(ctx: onnx.shape_inference.InferenceContext) -> None:
    if ctx.get_num_outputs() > 1 and ctx.has_output(1):
        ctx.set_output_type(1, _tensor_type(_INT64, [len(schema.STATS_FIELDS)]))


def _infer_conv(ctx: onnx.shape_inference.InferenceContext) -> None:
    """Y = [N, M, out...] with ONNX Conv's output size; stats = [4]."""
    # Imported here: reference imports onnx.reference, heavy and not needed to register.
    from nbsmt_onnx.ops.reference import conv_geometry

    _set_stats(ctx)
    x, w = _shape(ctx, 0), _shape(ctx, 1)
    if x is None or w is None or len(x) < 3:
        ctx.set_output_type(0, _tensor_type(_FLOAT, None if x is None else [None] * len(x)))
        return
    if len(w) != len(x):
        raise _error(ctx, f"Wq rank {len(w)} differs from X rank {len(x)}")
    kernel_attr = _ints(ctx, "kernel_shape")
    kernel: list[int | None] = list(kernel_attr) if kernel_attr else [_value(d) for d in w[2:]]
    rank = len(x) - 2
    if len(kernel) != rank:
        raise _error(ctx, f"kernel_shape {kernel} does not fit X of rank {len(x)}")
    attr = ctx.get_attribute("auto_pad")
    auto_pad = attr.s.decode() if attr is not None else "NOTSET"
    strides = _ints(ctx, "strides") or [1] * rank
    dilations = _ints(ctx, "dilations") or [1] * rank
    pads = _ints(ctx, "pads") or [0] * (2 * rank)
    if len(strides) != rank or len(dilations) != rank or len(pads) != 2 * rank:
        raise _error(
            ctx, f"strides {strides}, dilations {dilations}, pads {pads} do not fit rank {rank}"
        )
    spatial: list[int | None] = []
    for i in range(rank):
        size, k = _value(x[2 + i]), kernel[i]
        if size is None or k is None:
            spatial.append(None)
            continue
        try:  # one axis at a time, so unknown dims elsewhere do not matter
            geo = conv_geometry(
                [size],
                [k],
                auto_pad=auto_pad,
                strides=[strides[i]],
                dilations=[dilations[i]],
                pads=[pads[i], pads[rank + i]],
            )
        except ModelError as err:
            raise _error(ctx, str(err)) from err
        if geo.output_shape[0] < 1:
            raise _error(ctx, f"output spatial axis {i} would be empty (input {size}, kernel {k})")
        spatial.append(geo.output_shape[0])
    ctx.set_output_type(0, _tensor_type(_FLOAT, [x[0], w[0], *spatial]))


def _error(ctx: onnx.shape_inference.InferenceContext, message: str) -> Exception:
    name = ctx.get_display_name()
    return onnx.shape_inference.InferenceError(f"{schema.DOMAIN}::{name}: {message}")


def _infer_matmul(ctx: onnx.shape_inference.InferenceContext) -> None:
    """Y = A.shape[:-1] + [N]; stats = [4]."""
    _set_stats(ctx)
    a, b = _shape(ctx, 0), _shape(ctx, 1)
    if a is not None and b is not None and len(b) == 2 and a:
        k_a, k_b = _value(a[-1]), _value(b[0])
        if k_a is not None and k_b is not None and k_a != k_b:
            raise _error(ctx, f"A [..., {k_a}] and Bq [{k_b}, N] disagree on K")
    if a is None or not a:
        ctx.set_output_type(0, _tensor_type(_FLOAT, None))
        return
    n_dim = b[1] if b is not None and len(b) == 2 else None
    ctx.set_output_type(0, _tensor_type(_FLOAT, [*a[:-1], n_dim]))


# --------------------------------------------------------------------------- schemas


def build_schemas() -> list[_OpSchema]:
    """The ``OpSchema`` objects of NbSmtConv and NbSmtMatMul (not yet registered)."""
    x, wq, x_scale, w_scale, bias = schema.CONV_INPUTS
    conv = _OpSchema(
        schema.CONV,
        schema.DOMAIN,
        schema.OPSET_VERSION,
        "ONNX Conv on int8 weights executed with NB-SMT arithmetic (nbsmt-onnx docs/spec.md §3.1).",
        inputs=[
            _param(x, "tensor(float)", "input [N, C, D1..Dk], k in 1..3"),
            _param(wq, "tensor(int8)", "quantized weight [M, C/group, k1..kk]"),
            _param(x_scale, "tensor(float)", "activation scale, scalar"),
            _param(w_scale, "tensor(float)", "per-output-channel weight scale [M]"),
            _param(bias, "tensor(float)", "bias [M]", optional=True),
        ],
        outputs=_outputs(),
        attributes=_conv_attributes() + _smt_attributes(),
    )
    a, bq, a_scale, b_scale, mm_bias = schema.MATMUL_INPUTS
    matmul = _OpSchema(
        schema.MATMUL,
        schema.DOMAIN,
        schema.OPSET_VERSION,
        "A [..., K] @ Bq [K, N] executed with NB-SMT arithmetic (nbsmt-onnx docs/spec.md §3.2).",
        inputs=[
            _param(a, "tensor(float)", "input [..., K]"),
            _param(bq, "tensor(int8)", "quantized right operand [K, N]"),
            _param(a_scale, "tensor(float)", "activation scale, scalar"),
            _param(b_scale, "tensor(float)", "per-column weight scale [N]"),
            _param(mm_bias, "tensor(float)", "bias [N]", optional=True),
        ],
        outputs=_outputs(),
        attributes=_smt_attributes(),
    )
    inference: dict[str, Callable[[onnx.shape_inference.InferenceContext], None]] = {
        schema.CONV: _infer_conv,
        schema.MATMUL: _infer_matmul,
    }
    for op in (conv, matmul):
        if hasattr(op, "set_type_and_shape_inference_function"):
            op.set_type_and_shape_inference_function(inference[op.name])
        else:  # onnx < 1.16
            logger.debug(
                "onnx %s cannot attach Python shape inference to %s", onnx.__version__, op.name
            )
    return [conv, matmul]


def register_schemas() -> None:
    """Register both schemas with ``onnx.defs`` once per process (idempotent)."""
    for op in build_schemas():
        if onnx.defs.has(op.name, op.domain):
            continue
        onnx.defs.register_schema(op)
        logger.debug("registered ONNX schema %s::%s v%d", op.domain, op.name, op.since_version)
