"""Small synthetic models for the BN statistics / recalibration / fold tests.

Everything is built from explicit NumPy arrays so tests can compute expected
values independently (NumPy over all data at once, or brute-force runs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nbsmt_onnx.graph.bn import infer_ranks
from nbsmt_onnx.ops import schema
from nbsmt_onnx.ops.reference import quantize_weights
from nbsmt_onnx.runtime.session import SessionOptions, create_session


class Builder:
    """Accumulates nodes and initializers of one graph."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.params: dict[str, np.ndarray] = {}

    def init(self, name: str, value: np.ndarray) -> str:
        if name not in self.params:
            self.params[name] = value
            self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(
        self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs: object
    ) -> str:
        domain = schema.DOMAIN if op in schema.OP_TYPES else ""
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs[0]

    def conv(
        self, name: str, x: str, cin: int, cout: int, k: int = 3, bias: bool = True, group: int = 1
    ) -> str:
        w = (
            self.rng.normal(size=(cout, cin // group, k, k)) / np.sqrt(cin * k * k / group)
        ).astype(np.float32)
        inputs = [x, self.init(f"{name}.W", w)]
        if bias:
            inputs.append(
                self.init(f"{name}.B", self.rng.normal(size=cout).astype(np.float32) * 0.1)
            )
        pads = [k // 2] * 4
        return self.node("Conv", inputs, [f"{name}.out"], name, pads=pads, group=group)

    def nbsmt_conv(
        self,
        name: str,
        x: str,
        cin: int,
        cout: int,
        x_scale: float,
        k: int = 3,
        bias: bool = True,
        group: int = 1,
        threads: int = 2,
    ) -> str:
        w = (
            self.rng.normal(size=(cout, cin // group, k, k)) / np.sqrt(cin * k * k / group)
        ).astype(np.float32)
        wq, sw = quantize_weights(w, axis=0)
        inputs = [
            x,
            self.init(f"{name}.Wq", wq),
            self.init(f"{name}.x_scale", np.asarray(x_scale, dtype=np.float32)),
            self.init(f"{name}.w_scale", sw),
        ]
        if bias:
            inputs.append(
                self.init(f"{name}.B", self.rng.normal(size=cout).astype(np.float32) * 0.1)
            )
        pads = [k // 2] * 4
        return self.node(
            schema.CONV,
            inputs,
            [f"{name}.out"],
            name,
            pads=pads,
            group=group,
            kernel_shape=[k, k],
            threads=threads,
            act_signed=0,
        )

    def nbsmt_matmul(
        self, name: str, a: str, k: int, n: int, a_scale: float, bias: bool = True, threads: int = 2
    ) -> str:
        w = (self.rng.normal(size=(k, n)) / np.sqrt(k)).astype(np.float32)
        wq, sw = quantize_weights(w, axis=1)
        inputs = [
            a,
            self.init(f"{name}.Bq", wq),
            self.init(f"{name}.a_scale", np.asarray(a_scale, dtype=np.float32)),
            self.init(f"{name}.b_scale", sw),
        ]
        if bias:
            inputs.append(
                self.init(f"{name}.bias", self.rng.normal(size=n).astype(np.float32) * 0.1)
            )
        return self.node(
            schema.MATMUL, inputs, [f"{name}.out"], name, threads=threads, act_signed=0
        )

    def bn(
        self,
        name: str,
        x: str,
        c: int,
        epsilon: float | None = 1e-3,
        param_names: Sequence[str] | None = None,
    ) -> str:
        values = [
            (1.0 + 0.3 * self.rng.normal(size=c)).astype(np.float32),  # gamma
            (0.2 * self.rng.normal(size=c)).astype(np.float32),  # beta
            (0.5 * self.rng.normal(size=c)).astype(np.float32),  # running mean
            (0.5 + self.rng.random(size=c)).astype(np.float32),  # running var
        ]
        labels = ("scale", "B", "mean", "var")
        names = param_names or [f"{name}.{label}" for label in labels]
        inputs = [x] + [self.init(n, v) for n, v in zip(names, values, strict=True)]
        attrs = {} if epsilon is None else {"epsilon": epsilon}
        return self.node("BatchNormalization", inputs, [f"{name}.out"], name, **attrs)

    def affine(self, name: str, x: str, a: np.ndarray, b: np.ndarray) -> str:
        """Per-channel y = a*x + b on axis 1 (emulates an NB-SMT-induced shift with standard ops)."""
        shape = (1, -1, 1, 1)
        mul = self.node(
            "Mul",
            [x, self.init(f"{name}.a", a.astype(np.float32).reshape(shape))],
            [f"{name}.mul"],
            f"{name}.Mul",
        )
        return self.node(
            "Add",
            [mul, self.init(f"{name}.b", b.astype(np.float32).reshape(shape))],
            [f"{name}.out"],
            f"{name}.Add",
        )

    def model(
        self,
        inputs: list[onnx.ValueInfoProto],
        outputs: Sequence[str],
        opset: int = 17,
        rank: int = 4,
    ) -> onnx.ModelProto:
        # onnx.checker wants a shape (rank) on graph outputs; dims are left unknown
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * rank) for o in outputs]
        graph = helper.make_graph(self.nodes, "g", inputs, outs, self.inits)
        imports = [helper.make_opsetid("", opset)]
        if any(n.domain == schema.DOMAIN for n in self.nodes):
            imports.append(helper.make_opsetid(schema.DOMAIN, schema.OPSET_VERSION))
        model = helper.make_model(graph, opset_imports=imports)
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def image_input(c: int = 3) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, "H", "W"])


def image_batches(
    seed: int, c: int = 3, sizes: Sequence[tuple[int, int]] = ((3, 6), (5, 4), (2, 7), (4, 5))
) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
    """A re-iterable data source with varying batch and spatial sizes (x >= 0, like post-ReLU)."""
    rng = np.random.default_rng(seed)
    batches = [np.abs(rng.normal(size=(n, c, hw, hw)) + 0.3).astype(np.float32) for n, hw in sizes]

    def source() -> Iterator[dict[str, np.ndarray]]:
        for b in batches:
            yield {"x": b}

    return source


def plain_session(model: onnx.ModelProto):  # type: ignore[no-untyped-def]
    """ORT session for models without NbSmt ops (no library needed), optimisations off."""
    return create_session(model, SessionOptions(register_library=False))


def with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """Copy of ``model`` that also outputs ``tensors`` (test-only brute force: exports activations)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    ranks = infer_ranks(model)
    for t in tensors:
        if t not in existing:
            out.graph.output.append(
                helper.make_tensor_value_info(t, TensorProto.FLOAT, [None] * ranks[t])
            )
    return out


def collect(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    data: Callable[[], Iterator[dict[str, np.ndarray]]],
    session_factory: Callable[[onnx.ModelProto], object] = plain_session,
) -> dict[str, list[np.ndarray]]:
    """Run ``model`` over all data and return the batches of ``tensors`` (brute force)."""
    inputs = {i.name for i in model.graph.input}
    computed = [t for t in tensors if t not in inputs]
    session = session_factory(with_outputs(model, computed))
    got: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    for feed in data():
        values = dict(zip(computed, session.run(computed, feed), strict=True))  # type: ignore[attr-defined]
        for t in tensors:
            got[t].append(feed[t] if t in inputs else values[t])
    return got


def channel_moments(batches: list[np.ndarray], axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population variance per channel of all batches together, in float64."""
    flat = np.concatenate(
        [np.moveaxis(b.astype(np.float64), axis, 0).reshape(b.shape[axis], -1) for b in batches],
        axis=1,
    )
    return flat.mean(axis=1), flat.var(axis=1)


def set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(value.astype(np.float32), name)
            )
            return
    raise KeyError(name)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def to_nbsmt(
    float_model: onnx.ModelProto, x_scales: dict[str, float], threads: int = 2
) -> onnx.ModelProto:
    """Test-side mini rewrite: each Conv named in ``x_scales`` becomes an NbSmtConv (same names).

    Independent of ``graph.rewrite`` on purpose, so these tests exercise only the
    recalibration code. Weights are quantized per output channel (docs/spec.md §2).
    """
    out = onnx.ModelProto()
    out.CopyFrom(float_model)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    nodes = []
    for node in out.graph.node:
        if node.op_type != "Conv" or node.name not in x_scales:
            nodes.append(node)
            continue
        wq, sw = quantize_weights(inits[node.input[1]], axis=0)
        new = [
            numpy_helper.from_array(wq, f"{node.name}.Wq"),
            numpy_helper.from_array(
                np.asarray(x_scales[node.name], np.float32), f"{node.name}.x_scale"
            ),
            numpy_helper.from_array(sw, f"{node.name}.w_scale"),
        ]
        out.graph.initializer.extend(new)
        inputs = [node.input[0]] + [t.name for t in new] + list(node.input[2:3])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs.setdefault("kernel_shape", list(wq.shape[2:]))
        nodes.append(
            helper.make_node(
                schema.CONV,
                inputs,
                list(node.output),
                name=node.name,
                domain=schema.DOMAIN,
                threads=threads,
                act_signed=0,
                **attrs,
            )
        )
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.opset_import.append(helper.make_opsetid(schema.DOMAIN, schema.OPSET_VERSION))
    onnx.checker.check_model(out)
    return out


def activation_scales(
    float_model: onnx.ModelProto, data: Callable[[], Iterator[dict[str, np.ndarray]]]
) -> dict[str, float]:
    """Per Conv, max of its (non-negative) input over the data / 255 (docs/spec.md §2, unsigned)."""
    convs = [n for n in float_model.graph.node if n.op_type == "Conv"]
    tensors = sorted({n.input[0] for n in convs})
    got = collect(float_model, tensors, data)
    top = {t: max(float(np.max(b)) for b in got[t]) for t in tensors}
    return {n.name: top[n.input[0]] / 255 for n in convs}
