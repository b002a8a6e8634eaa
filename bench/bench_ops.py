"""Speed of the NB-SMT custom ops against ONNX Runtime's own float32 Conv / MatMul.

Issue #2 item 6: every ratio is measured in the same run, against the float
operator on the same shapes and the same intra-op thread count. Shapes: the
3x3 conv layers of ResNet-18 at 224x224, batch 8 (plus the strided and 1x1
ones with ``--all``) and a 128x768 @ 768x768 MatMul; inputs are ReLU-like
(about half zeros). Targets: T=1 <= 2x float, T=2 <= 3x, T=4 <= 8x, and at least
100x faster than the NumPy reference (``nbsmt_onnx/ops/reference.py``), which
is timed on a reduced problem (batch 1, a few output channels) and scaled
linearly in rows x output channels: its cost is proportional to both.

Run: ``python bench/bench_ops.py`` (``make bench``); ``NBSMT_ONNX_LIBRARY``
selects the library build, ``NBSMT_KERNEL_ISA=scalar|avx2|avx512`` the kernel.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nbsmt_onnx.ops import reference, schema
from nbsmt_onnx.runtime.session import SessionOptions, create_session

TARGETS = {1: 2.0, 2: 3.0, 4: 8.0}
REFERENCE_SPEEDUP_TARGET = 100.0


@dataclass(frozen=True)
class Layer:
    """A Conv (``kind="conv"``: batch, channels, size, outputs, kernel, stride) or a
    MatMul (``kind="matmul"``: rows = batch, K = channels, N = outputs)."""

    name: str
    kind: str
    batch: int
    channels: int
    size: int
    outputs: int
    kernel: int = 3
    stride: int = 1

    @property
    def pad(self) -> int:
        return self.kernel // 2

    def input_shape(self) -> tuple[int, ...]:
        if self.kind == "matmul":
            return (self.batch, self.channels)
        return (self.batch, self.channels, self.size, self.size)

    def macs(self) -> int:
        if self.kind == "matmul":
            return self.batch * self.channels * self.outputs
        out = (self.size + 2 * self.pad - self.kernel) // self.stride + 1
        return self.batch * out * out * self.outputs * self.channels * self.kernel**2


LAYERS = [
    Layer("conv 64->64 3x3 56x56", "conv", 8, 64, 56, 64),
    Layer("conv 128->128 3x3 28x28", "conv", 8, 128, 28, 128),
    Layer("conv 256->256 3x3 14x14", "conv", 8, 256, 14, 256),
    Layer("conv 512->512 3x3 7x7", "conv", 8, 512, 7, 512),
    Layer("matmul 128x768 @ 768x768", "matmul", 128, 768, 0, 768),
]
EXTRA_LAYERS = [
    Layer("conv 64->128 3x3 s2 56x56", "conv", 8, 64, 56, 128, 3, 2),
    Layer("conv 64->128 1x1 s2 56x56", "conv", 8, 64, 56, 128, 1, 2),
    Layer("conv 128->256 3x3 s2 28x28", "conv", 8, 128, 28, 256, 3, 2),
    Layer("conv 256->512 3x3 s2 14x14", "conv", 8, 256, 14, 512, 3, 2),
]


@dataclass(frozen=True)
class SmtCase:
    label: str
    threads: int
    reduce: str


CASES = [
    SmtCase("T1", 1, "activations"),
    SmtCase("T2 act", 2, "activations"),
    SmtCase("T2 wgt", 2, "weights"),
    SmtCase("T4 act", 4, "activations"),
    SmtCase("T4 wgt", 4, "weights"),
]


def _weights(layer: Layer, rng: np.random.Generator) -> np.ndarray:
    if layer.kind == "matmul":
        return rng.standard_normal((layer.channels, layer.outputs)).astype(np.float32)
    shape = (layer.outputs, layer.channels, layer.kernel, layer.kernel)
    return rng.standard_normal(shape).astype(np.float32)


def _model(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    x_shape: tuple[int, ...],
    custom: bool,
) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "bench", [x], [y], inits)
    opsets = [helper.make_opsetid("", 17)]
    if custom:
        opsets.append(helper.make_opsetid(schema.DOMAIN, schema.OPSET_VERSION))
    return helper.make_model(graph, opset_imports=opsets)


def float_model(layer: Layer, w: np.ndarray) -> onnx.ModelProto:
    """ORT's own float operator on the layer's shapes."""
    if layer.kind == "matmul":
        node = helper.make_node("MatMul", ["X", "W"], ["Y"])
    else:
        p = layer.pad
        node = helper.make_node(
            "Conv",
            ["X", "W"],
            ["Y"],
            kernel_shape=[layer.kernel] * 2,
            pads=[p, p, p, p],
            strides=[layer.stride] * 2,
        )
    return _model([node], [numpy_helper.from_array(w, "W")], layer.input_shape(), custom=False)


@dataclass(frozen=True)
class Quantized:
    wq: np.ndarray
    w_scale: np.ndarray
    x_scale: np.float32


def quantize(layer: Layer, w: np.ndarray, x: np.ndarray) -> Quantized:
    """SPEC §2 quantization: per-output-channel weights, unsigned activations (ReLU-like)."""
    axis = 1 if layer.kind == "matmul" else 0
    wq, w_scale = reference.quantize_weights(w, axis=axis)
    return Quantized(wq, w_scale.astype(np.float32), np.float32(float(x.max()) / 255.0))


def smt_model(layer: Layer, q: Quantized, case: SmtCase) -> onnx.ModelProto:
    attrs = schema.SmtAttributes(threads=case.threads, reduce=case.reduce).as_node_attributes()
    inits = [
        numpy_helper.from_array(q.wq, "Wq"),
        numpy_helper.from_array(np.array(q.x_scale, dtype=np.float32), "x_scale"),
        numpy_helper.from_array(q.w_scale, "w_scale"),
    ]
    if layer.kind == "matmul":
        node = helper.make_node(
            schema.MATMUL, ["X", "Wq", "x_scale", "w_scale"], ["Y"], domain=schema.DOMAIN, **attrs
        )
    else:
        p = layer.pad
        node = helper.make_node(
            schema.CONV,
            ["X", "Wq", "x_scale", "w_scale"],
            ["Y"],
            domain=schema.DOMAIN,
            kernel_shape=[layer.kernel] * 2,
            pads=[p, p, p, p],
            strides=[layer.stride] * 2,
            **attrs,
        )
    return _model([node], inits, layer.input_shape(), custom=True)


def relu_like(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    return np.maximum(rng.standard_normal(shape), 0.0).astype(np.float32)


def time_interleaved(
    runs: dict[str, Callable[[], object]], reps: int, stat: Callable[[list[float]], float]
) -> dict[str, float]:
    """Seconds per callable (``stat`` over ``reps`` runs); the callables take turns
    so that load from other processes affects all of them alike."""
    for run in runs.values():
        run()  # warm-up: weight packing, thread pool start
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: stat(ts) for name, ts in times.items()}


def reference_seconds(layer: Layer, q: Quantized, x: np.ndarray, case: SmtCase) -> float:
    """NumPy reference on batch 1 and at most 8 output channels, scaled to the layer."""
    rows = 1 if layer.kind == "conv" else min(layer.batch, 16)
    outs = min(layer.outputs, 8)
    xs = x[:rows]
    t0 = time.perf_counter()
    if layer.kind == "matmul":
        reference.nbsmt_matmul(
            xs,
            q.wq[:, :outs],
            q.x_scale,
            q.w_scale[:outs],
            threads=case.threads,
            reduce=case.reduce,
        )
    else:
        p = layer.pad
        reference.nbsmt_conv(
            xs,
            q.wq[:outs],
            q.x_scale,
            q.w_scale[:outs],
            kernel_shape=[layer.kernel] * 2,
            pads=[p, p, p, p],
            strides=[layer.stride] * 2,
            threads=case.threads,
            reduce=case.reduce,
        )
    seconds = time.perf_counter() - t0
    return seconds * (layer.batch / rows) * (layer.outputs / outs)


def bench_layer(
    layer: Layer,
    threads: int,
    reps: int,
    stat: Callable[[list[float]], float],
    with_reference: bool,
    rng: np.random.Generator,
) -> dict[str, float]:
    w = _weights(layer, rng)
    x = relu_like(layer.input_shape(), rng)
    q = quantize(layer, w, x)
    opts = SessionOptions(intra_op_threads=threads, optimize=True)
    sessions = {"float": create_session(float_model(layer, w), opts)}
    for case in CASES:
        sessions[case.label] = create_session(smt_model(layer, q, case), opts)
    feeds = {"X": x}
    runs = {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}
    result = time_interleaved(runs, reps, stat)
    if with_reference:
        for case in CASES:
            result["ref " + case.label] = reference_seconds(layer, q, x, case)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="intra-op thread counts (default: 1 2)",
    )
    parser.add_argument("--reps", type=int, default=7, help="timed runs per operator")
    parser.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="statistic of the timed runs (min filters out interference from other processes)",
    )
    parser.add_argument("--all", action="store_true", help="also the strided and 1x1 layers")
    parser.add_argument("--no-reference", action="store_true", help="skip the NumPy reference")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    layers = LAYERS + (EXTRA_LAYERS if args.all else [])
    stat: Callable[[list[float]], float] = statistics.median if args.stat == "median" else min
    rng = np.random.default_rng(args.seed)
    print(
        f"NB-SMT ops vs ONNX Runtime float32 (same shapes, same intra-op threads); {args.stat} of",
        args.reps,
        "runs; ratio = NB-SMT time / float time",
    )
    if not args.no_reference:
        print(
            "NumPy reference: timed on batch 1 (MatMul: 16 rows) and 8 output channels,"
            " scaled by rows x output channels; 'vs ref' = reference time / NB-SMT time"
        )
    misses: list[str] = []
    for threads in args.threads:
        header = f"{'threads=' + str(threads):<28}{'float ms':>9}"
        for case in CASES:
            header += f"{case.label + ' ms (x)':>20}"
        if not args.no_reference:
            header += f"{'min vs ref':>12}"
        print()
        print(header)
        for layer in layers:
            res = bench_layer(layer, threads, args.reps, stat, not args.no_reference, rng)
            base = res["float"]
            line = f"{layer.name:<28}{base * 1e3:>9.2f}"
            worst_ref = float("inf")
            for case in CASES:
                t = res[case.label]
                ratio = t / base
                line += f"{t * 1e3:>12.2f} ({ratio:4.1f}x)"
                if ratio > TARGETS[case.threads]:
                    misses.append(
                        f"{layer.name} threads={threads} {case.label}: {ratio:.1f}x "
                        f"> {TARGETS[case.threads]}x"
                    )
                if not args.no_reference:
                    speedup = res["ref " + case.label] / t
                    worst_ref = min(worst_ref, speedup)
                    if speedup < REFERENCE_SPEEDUP_TARGET:
                        misses.append(
                            f"{layer.name} threads={threads} {case.label}: only "
                            f"{speedup:.0f}x faster than the NumPy reference"
                        )
            if not args.no_reference:
                line += f"{worst_ref:>11.0f}x"
            print(line, flush=True)
    print()
    print("targets: T=1 <= 2x, T=2 <= 3x, T=4 <= 8x float; >= 100x faster than the reference")
    if misses:
        print("MISSED:")
        for miss in misses:
            print("  " + miss)
    else:
        print("all targets met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
