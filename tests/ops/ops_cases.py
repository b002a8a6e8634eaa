"""Seeded random cases for the C++-vs-reference tests, and the models that run them.

Every case is a pure function of its seed: ``conv_case(seed)`` / ``matmul_case(seed)``
rebuild it exactly, so a failure report names the seed and the case can be
rerun alone (``python -c "from ops_cases import conv_case; print(conv_case(123))"``
from tests/ops).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nbsmt_onnx.ops import reference as ref
from nbsmt_onnx.ops import schema
from nbsmt_onnx.runtime.session import SessionOptions, create_session

#: Kinds of activation data. Zero-heavy and extreme inputs are where NB-SMT lives.
DATA_KINDS = ("relu", "signed", "zeros", "saturating", "ties", "special")


@dataclass
class Case:
    """One operator call: inputs, node attributes, and whether stats is requested."""

    op: str
    seed: int
    inputs: list[np.ndarray | None]  # in schema order; None = optional input absent
    attributes: dict[str, Any]
    with_stats: bool
    kind: str
    runtime_weights: bool = False  # feed Wq/scales/bias as graph inputs, not initializers
    empty_bias_name: bool = False  # an absent bias written as "" rather than left out
    notes: dict[str, Any] = field(default_factory=dict)

    def expected(self) -> tuple[np.ndarray, np.ndarray]:
        fn = ref.nbsmt_conv if self.op == schema.CONV else ref.nbsmt_matmul
        return fn(*self.inputs, **self.attributes)

    def describe(self) -> str:
        shapes = ", ".join("-" if a is None else f"{a.dtype}{list(a.shape)}" for a in self.inputs)
        return (
            f"{self.op} seed={self.seed} kind={self.kind} inputs=({shapes}) "
            f"attrs={self.attributes} stats={self.with_stats} runtime_weights={self.runtime_weights} "
            f"empty_bias_name={self.empty_bias_name}"
        )

    def __str__(self) -> str:
        return self.describe()


def _activations(
    rng: np.random.Generator, shape: Sequence[int], kind: str, scale: np.float32
) -> np.ndarray:
    """Float activations of the given kind, in units where ``scale`` is the quantization step."""
    if kind == "relu":
        sparsity = rng.uniform(0.5, 0.9)
        x = np.abs(rng.normal(0, 60, shape)) * (rng.random(shape) >= sparsity)
    elif kind == "signed":
        x = rng.normal(0, 50, shape) * (rng.random(shape) >= rng.uniform(0.0, 0.6))
    elif kind == "zeros":
        x = np.zeros(shape)
    elif kind == "saturating":  # far beyond the quantization range, both signs
        x = rng.choice([-1.0, 1.0], shape) * rng.uniform(200, 5000, shape)
    elif kind == "ties":  # exact .5 quotients: round half to even decides
        x = (rng.integers(-260, 260, shape) + 0.5) * (rng.random(shape) < 0.7)
    elif kind == "special":  # NaN -> 0, +-inf saturate
        x = rng.normal(0, 80, shape)
        pick = rng.random(shape)
        x = np.where(
            pick < 0.1, np.nan, np.where(pick < 0.15, np.inf, np.where(pick < 0.2, -np.inf, x))
        )
    else:
        raise ValueError(kind)
    return (x.astype(np.float32) * scale).astype(np.float32)


def _scale(rng: np.random.Generator, kind: str) -> np.float32:
    # "ties" needs an exactly representable division: a power of two
    if kind == "ties":
        return np.float32(2.0 ** int(rng.integers(-6, 2)))
    return np.float32(rng.uniform(0.005, 0.2))


def _weights(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    style = rng.integers(0, 4)
    if style == 0:  # extremes only
        w = rng.choice([-127, 127], shape)
    else:
        w = rng.integers(-127, 128, shape)
    zero_fraction = [0.0, 0.2, 0.5, 0.8][int(rng.integers(0, 4))]
    return (w * (rng.random(shape) >= zero_fraction)).astype(np.int8)


def _smt(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "threads": int(rng.choice(schema.THREADS_CHOICES)),
        "mapping": str(rng.choice(schema.MAPPING_CHOICES)),
        "reduce": str(rng.choice(schema.REDUCE_CHOICES)),
        "act_signed": int(rng.integers(0, 2)),
    }


def _vectors(rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray | None]:
    # negative and zero channel scales appear after folding a BN with gamma < 0 or = 0
    w_scale = rng.uniform(1e-4, 0.05, m) * rng.choice([1.0, -1.0, 0.0], m, p=[0.75, 0.2, 0.05])
    w_scale = w_scale.astype(np.float32)
    bias = rng.normal(0, 3, m).astype(np.float32) if rng.random() < 0.5 else None
    return w_scale, bias


def conv_case(seed: int) -> Case:
    """A random NbSmtConv call: rank 1-3, any ONNX Conv geometry, odd channel counts."""
    rng = np.random.default_rng([seed, 1])
    rank = int(rng.choice([1, 2, 2, 3]))
    kernel = [int(k) for k in rng.integers(1, 4 if rank < 3 else 3, rank)]
    dilations = [int(d) for d in rng.integers(1, 3, rank)]
    strides = [int(s) for s in rng.integers(1, 4, rank)]
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    spatial = [e + int(rng.integers(0, 7 if rank == 1 else 4 if rank == 2 else 2)) for e in extent]
    layout = rng.integers(0, 4)
    if layout == 0:  # depthwise, channel multiplier 1 or 2
        c = int(rng.integers(1, 7))
        group, c_g, m_g = c, 1, int(rng.integers(1, 3))
    elif layout == 1:  # grouped
        group, c_g, m_g = int(rng.integers(2, 4)), int(rng.integers(1, 6)), int(rng.integers(1, 4))
    elif rng.random() < 0.1 and rank < 3:  # medium: wider rows and more columns for the kernels
        group, c_g, m_g = 1, int(rng.integers(10, 40)), int(rng.integers(8, 24))
    else:  # plain, odd channel counts welcome
        group, c_g, m_g = 1, int(rng.integers(1, 10)), int(rng.integers(1, 6))
    attrs: dict[str, Any] = {"strides": strides, "dilations": dilations, "group": group}
    auto_pad = str(rng.choice(schema.AUTO_PAD_CHOICES))
    if auto_pad != "NOTSET" or rng.random() < 0.5:
        attrs["auto_pad"] = auto_pad
    if auto_pad == "NOTSET":
        attrs["pads"] = [int(p) for p in rng.integers(0, 3, 2 * rank)]
    if rng.random() < 0.5:
        attrs["kernel_shape"] = kernel
    if rng.random() < 0.2:  # attributes at their defaults: leave them out
        for name in ("strides", "dilations"):
            if all(v == 1 for v in attrs[name]):
                del attrs[name]
    attrs.update(_smt(rng))
    batch = int(rng.choice([1, 1, 2, 3]))
    kind = str(rng.choice(DATA_KINDS, p=[0.45, 0.2, 0.05, 0.1, 0.1, 0.1]))
    x_scale = _scale(rng, kind)
    x = _activations(rng, [batch, group * c_g, *spatial], kind, x_scale)
    wq = _weights(rng, [group * m_g, c_g, *kernel])
    w_scale, bias = _vectors(rng, group * m_g)
    return Case(
        op=schema.CONV,
        seed=seed,
        inputs=[x, wq, np.array(x_scale, np.float32), w_scale, bias],
        attributes=attrs,
        with_stats=bool(rng.random() < 0.7),
        kind=kind,
        runtime_weights=bool(rng.random() < 0.1),
        empty_bias_name=bias is None and bool(rng.random() < 0.3),
    )


def matmul_case(seed: int) -> Case:
    """A random NbSmtMatMul call: 0-3 leading batch dims (rank-1 A too), odd K."""
    rng = np.random.default_rng([seed, 2])
    lead = [int(d) for d in rng.integers(1, 4, int(rng.integers(0, 4)))]
    k = int(
        rng.choice(
            [int(rng.integers(1, 12)), int(rng.integers(12, 80)), int(rng.integers(80, 300))]
        )
    )
    n = int(rng.integers(1, 9)) if rng.random() < 0.8 else int(rng.integers(9, 40))
    kind = str(rng.choice(DATA_KINDS, p=[0.45, 0.2, 0.05, 0.1, 0.1, 0.1]))
    a_scale = _scale(rng, kind)
    a = _activations(rng, [*lead, k], kind, a_scale)
    bq = _weights(rng, [k, n])
    b_scale, bias = _vectors(rng, n)
    return Case(
        op=schema.MATMUL,
        seed=seed,
        inputs=[a, bq, np.array(a_scale, np.float32), b_scale, bias],
        attributes=_smt(rng),
        with_stats=bool(rng.random() < 0.7),
        kind=kind,
        runtime_weights=bool(rng.random() < 0.1),
        empty_bias_name=bias is None and bool(rng.random() < 0.3),
    )


def large_conv_case(seed: int) -> Case:
    """A wider 2-D conv (tens of channels): exercises the kernels' blocking and tails."""
    rng = np.random.default_rng([seed, 3])
    c, m = int(rng.integers(9, 65)), int(rng.integers(5, 41))
    kernel = [int(rng.choice([1, 3])), int(rng.choice([1, 3]))]
    spatial = [int(s) for s in rng.integers(5, 13, 2)]
    attrs: dict[str, Any] = {
        "pads": [k // 2 for k in kernel] * 2,
        "strides": [int(rng.integers(1, 3))] * 2,
    }
    attrs.update(_smt(rng))
    kind = str(rng.choice(["relu", "relu", "signed", "saturating"]))
    x_scale = _scale(rng, kind)
    x = _activations(rng, [int(rng.integers(1, 3)), c, *spatial], kind, x_scale)
    w_scale, bias = _vectors(rng, m)
    return Case(
        op=schema.CONV,
        seed=seed,
        inputs=[x, _weights(rng, [m, c, *kernel]), np.array(x_scale, np.float32), w_scale, bias],
        attributes=attrs,
        with_stats=bool(rng.random() < 0.7),
        kind=kind,
    )


def large_matmul_case(seed: int) -> Case:
    """Rows, K and N up to a few hundred: exercises the kernels' blocking and tails."""
    rng = np.random.default_rng([seed, 4])
    rows, k, n = int(rng.integers(1, 80)), int(rng.integers(1, 700)), int(rng.integers(1, 80))
    kind = str(rng.choice(["relu", "relu", "signed", "saturating"]))
    a_scale = _scale(rng, kind)
    b_scale, bias = _vectors(rng, n)
    return Case(
        op=schema.MATMUL,
        seed=seed,
        inputs=[
            _activations(rng, [rows, k], kind, a_scale),
            _weights(rng, [k, n]),
            np.array(a_scale, np.float32),
            b_scale,
            bias,
        ],
        attributes=_smt(rng),
        with_stats=bool(rng.random() < 0.7),
        kind=kind,
    )


def grouped_conv_case(seed: int) -> Case:
    """A depthwise or narrow grouped conv (fewer than 16 outputs per group), mostly without
    stats: the shapes the direct kernel (custom_ops/include/nbsmt/direct_conv.h) runs,
    with wide rows (vector tails), strides, dilations and padding of every kind; some
    have 16 or more outputs per group, C/group * kernel size > 512 or ask for stats and
    take the (grouped) GEMM path instead."""
    rng = np.random.default_rng([seed, 5])
    rank = int(rng.choice([1, 2, 2, 2, 3]))
    max_k = {1: 6, 2: 6, 3: 3}[rank]
    kernel = [int(k) for k in rng.integers(1, max_k, rank)]
    dilations = [int(d) for d in rng.choice([1, 1, 2, 3], rank)]
    strides = [int(s) for s in rng.choice([1, 1, 2, 3], rank)]
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    extra = {1: 40, 2: 20, 3: 6}[rank]
    spatial = [e + int(rng.integers(0, extra)) for e in extent]
    group = int(rng.choice([2, 3, 7, 16, 17, 33]))
    c_g = int(rng.choice([1, 1, 1, 2, 3, 5, 8]))
    if rng.random() < 0.05:
        c_g = 60  # K > 512 for 3x3 kernels: GEMM path
    m_g = int(rng.choice([1, 1, 1, 2, 3, 15, 18]))  # 18: grouped GEMM path
    attrs: dict[str, Any] = {"strides": strides, "dilations": dilations, "group": group}
    auto_pad = str(rng.choice(schema.AUTO_PAD_CHOICES))
    if auto_pad != "NOTSET" or rng.random() < 0.5:
        attrs["auto_pad"] = auto_pad
    if auto_pad == "NOTSET":
        attrs["pads"] = [int(p) for p in rng.integers(0, 4, 2 * rank)]
    attrs.update(_smt(rng))
    kind = str(rng.choice(DATA_KINDS, p=[0.45, 0.2, 0.05, 0.1, 0.1, 0.1]))
    x_scale = _scale(rng, kind)
    x = _activations(rng, [int(rng.choice([1, 1, 2, 3])), group * c_g, *spatial], kind, x_scale)
    w_scale, bias = _vectors(rng, group * m_g)
    return Case(
        op=schema.CONV,
        seed=seed,
        inputs=[
            x,
            _weights(rng, [group * m_g, c_g, *kernel]),
            np.array(x_scale, np.float32),
            w_scale,
            bias,
        ],
        attributes=attrs,
        with_stats=bool(rng.random() < 0.15),
        kind=kind,
        runtime_weights=bool(rng.random() < 0.1),
    )


def pointwise_conv_case(seed: int) -> Case:
    """A 1x1 conv with stride 1, no padding and one group, mostly without stats: the
    shapes the pointwise kernel (custom_ops/include/nbsmt/pointwise.h) runs at T = 1
    and 2 on AVX2, with position counts that leave vector tails, channel counts odd
    and even (idle slots), a few images and wide reductions; T = 4 and the cases
    with stats take the GEMM path."""
    rng = np.random.default_rng([seed, 6])
    rank = int(rng.choice([1, 2, 2, 2, 3]))
    max_extent = {1: 300, 2: 24, 3: 7}[rank]
    spatial = [int(rng.integers(1, max_extent + 1)) for _ in range(rank)]
    c = int(
        rng.choice(
            [int(rng.integers(1, 12)), int(rng.integers(12, 100)), int(rng.integers(100, 400))]
        )
    )
    m = int(
        rng.choice([int(rng.integers(1, 8)), int(rng.integers(8, 40)), int(rng.integers(40, 100))])
    )
    attrs: dict[str, Any] = {}
    style = rng.integers(0, 4)
    if style == 0:
        attrs.update(strides=[1] * rank, pads=[0] * (2 * rank), kernel_shape=[1] * rank)
    elif style == 1:
        attrs["auto_pad"] = str(rng.choice(["VALID", "SAME_UPPER", "SAME_LOWER"]))
    elif style == 2:
        attrs["dilations"] = [int(d) for d in rng.integers(1, 4, rank)]
    attrs.update(_smt(rng))
    kind = str(rng.choice(DATA_KINDS, p=[0.45, 0.2, 0.05, 0.1, 0.1, 0.1]))
    x_scale = _scale(rng, kind)
    x = _activations(rng, [int(rng.choice([1, 1, 2, 3])), c, *spatial], kind, x_scale)
    w_scale, bias = _vectors(rng, m)
    return Case(
        op=schema.CONV,
        seed=seed,
        inputs=[
            x,
            _weights(rng, [m, c, *([1] * rank)]),
            np.array(x_scale, np.float32),
            w_scale,
            bias,
        ],
        attributes=attrs,
        with_stats=bool(rng.random() < 0.1),
        kind=kind,
        runtime_weights=bool(rng.random() < 0.1),
        empty_bias_name=bias is None and bool(rng.random() < 0.3),
    )


def gather_runs_conv_case(seed: int) -> Case:
    """A T = 4 conv with a kernel larger than 1x1, the channel mapping and no stats: rows
    are runs of quantized pixels with entry records made once per pixel. Wide reductions
    (up to 200 channels x 9 positions) split the steps into several blocks whose
    boundaries fall inside a kernel position's run; a few images, groups and strides."""
    rng = np.random.default_rng([seed, 7])
    group = int(rng.choice([1, 1, 1, 2]))
    c_g = int(rng.integers(20, 201))
    m_g = int(rng.choice([int(rng.integers(1, 17)), int(rng.integers(17, 140))]))
    kernel = [int(k) for k in rng.choice([2, 3], 2)]
    spatial = [int(v) for v in rng.integers(3, 9, 2)]
    attrs: dict[str, Any] = {
        "pads": [int(p) for p in rng.integers(0, 2, 4)],
        "strides": [int(v) for v in rng.integers(1, 3, 2)],
        "group": group,
        "threads": 4,
        "mapping": "channel",
        "reduce": str(rng.choice(schema.REDUCE_CHOICES)),
        "act_signed": int(rng.integers(0, 2)),
    }
    kind = str(rng.choice(["relu", "relu", "signed", "saturating"]))
    x_scale = _scale(rng, kind)
    x = _activations(rng, [int(rng.integers(1, 3)), group * c_g, *spatial], kind, x_scale)
    w_scale, bias = _vectors(rng, group * m_g)
    return Case(
        op=schema.CONV,
        seed=seed,
        inputs=[
            x,
            _weights(rng, [group * m_g, c_g, *kernel]),
            np.array(x_scale, np.float32),
            w_scale,
            bias,
        ],
        attributes=attrs,
        with_stats=False,
        kind=kind,
    )


# ----------------------------------------------------------------------------- models


def _opsets() -> list[onnx.OperatorSetIdProto]:
    return [helper.make_opsetid("", 17), helper.make_opsetid(schema.DOMAIN, schema.OPSET_VERSION)]


def node_name(case: Case, index: int) -> str:
    return f"case{index}_seed{case.seed}"


def build_model(cases: Sequence[Case]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One model with one independent node per case; returns it and its feeds.

    The activation is always a graph input; the other inputs are initializers
    (constant weights, the normal case) unless ``runtime_weights`` is set.
    """
    nodes, graph_inputs, outputs, inits = [], [], [], []
    feeds: dict[str, np.ndarray] = {}
    for i, case in enumerate(cases):
        names = schema.CONV_INPUTS if case.op == schema.CONV else schema.MATMUL_INPUTS
        node_inputs = []
        for j, (name, value) in enumerate(zip(names, case.inputs, strict=True)):
            if value is None:
                node_inputs.append("")
                continue
            tensor = f"c{i}_{name}"
            node_inputs.append(tensor)
            if j == 0 or case.runtime_weights:
                elem = helper.np_dtype_to_tensor_dtype(value.dtype)
                graph_inputs.append(helper.make_tensor_value_info(tensor, elem, value.shape))
                feeds[tensor] = value
            else:
                inits.append(numpy_helper.from_array(value, tensor))
        while node_inputs and node_inputs[-1] == "" and not case.empty_bias_name:
            node_inputs.pop()
        node_outputs = [f"c{i}_Y"] + ([f"c{i}_stats"] if case.with_stats else [])
        nodes.append(
            helper.make_node(
                case.op,
                node_inputs,
                node_outputs,
                name=node_name(case, i),
                domain=schema.DOMAIN,
                **case.attributes,
            )
        )
        outputs.append(helper.make_tensor_value_info(f"c{i}_Y", TensorProto.FLOAT, None))
        if case.with_stats:
            outputs.append(helper.make_tensor_value_info(f"c{i}_stats", TensorProto.INT64, None))
    graph = helper.make_graph(nodes, "nbsmt_cases", graph_inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=_opsets(), ir_version=8)
    return model, feeds


def run_model(
    model: onnx.ModelProto | bytes | str, feeds: dict[str, np.ndarray], intra_op_threads: int = 1
) -> dict[str, np.ndarray]:
    """Run ``model`` once through the project's session factory (optimisations off)."""
    session = create_session(model, SessionOptions(intra_op_threads=intra_op_threads))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Identical shape, dtype and bit pattern (float32 -0.0 != 0.0, NaN == same NaN)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == np.float32:
        return bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))
    return bool(np.array_equal(a, b))


def compare(case: Case, index: int, got: dict[str, np.ndarray]) -> str | None:
    """None if the C++ outputs of ``case`` equal the reference; else a description."""
    want_y, want_stats = case.expected()
    y = got[f"c{index}_Y"]
    problems = []
    if not same_bits(y, want_y):
        if y.shape != want_y.shape or y.dtype != want_y.dtype:
            problems.append(
                f"Y {y.dtype}{list(y.shape)} != expected {want_y.dtype}{list(want_y.shape)}"
            )
        else:
            bad = np.flatnonzero(y.view(np.uint32).ravel() != want_y.view(np.uint32).ravel())
            first = [
                f"at {np.unravel_index(i, y.shape)}: got {y.ravel()[i]!r} want {want_y.ravel()[i]!r}"
                for i in bad[:3]
            ]
            problems.append(f"Y differs in {bad.size}/{y.size} elements; " + "; ".join(first))
    if case.with_stats and not same_bits(got[f"c{index}_stats"], want_stats):
        problems.append(
            f"stats {got[f'c{index}_stats'].tolist()} != expected {want_stats.tolist()}"
        )
    if not problems:
        return None
    return f"{case.describe()}\n    " + "\n    ".join(problems)


def check_cases(cases: Sequence[Case], intra_op_threads: int = 1) -> None:
    """Run all cases in one session and assert each equals the reference bit for bit."""
    model, feeds = build_model(cases)
    got = run_model(model, feeds, intra_op_threads)
    failures = [f for i, c in enumerate(cases) if (f := compare(c, i, got)) is not None]
    assert not failures, (
        f"{len(failures)}/{len(cases)} cases differ from the reference:\n" + "\n".join(failures)
    )


def chunks(start: int, count: int, size: int) -> list[range]:
    """Seed ranges of ``size`` cases covering ``[start, start + count)``."""
    return [range(s, min(s + size, start + count)) for s in range(start, start + count, size)]


def all_settings() -> list[dict[str, Any]]:
    """Every combination of the NB-SMT attributes."""
    return [
        {"threads": t, "mapping": m, "reduce": r, "act_signed": s}
        for t, m, r, s in itertools.product(
            schema.THREADS_CHOICES, schema.MAPPING_CHOICES, schema.REDUCE_CHOICES, (0, 1)
        )
    ]
