"""Shape inference with the graph inputs fixed to concrete shapes (NbSmt schemas included).

Used wherever the tool needs the size of every tensor for a given batch
without running the model: the activation-memory estimate and per-layer MACs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

from nbsmt_onnx.errors import InternalError
from nbsmt_onnx.ops.onnx_schema import register_schemas


def with_input_shapes(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]
) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs named in ``shapes`` have those shapes; value_info dropped."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    for vi in out.graph.input:
        if vi.name not in shapes:
            continue
        shape = vi.type.tensor_type.shape
        del shape.dim[:]
        for d in shapes[vi.name]:
            shape.dim.add().dim_value = int(d)
    return out


def infer_for_inputs(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], what: str
) -> onnx.ModelProto:
    """``model`` with inferred shapes for inputs of ``shapes`` (``what`` names the caller in errors)."""
    register_schemas()
    fixed = with_input_shapes(model, shapes)
    try:
        return onnx.shape_inference.infer_shapes(fixed, strict_mode=False, data_prop=True)
    except Exception as err:
        raise InternalError(f"shape inference failed while {what}: {err}") from err


def known_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every tensor of ``model``'s graph whose shape is fully known (initializers included)."""
    out: dict[str, tuple[int, ...]] = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(int(d.dim_value) for d in dims)
    return out
