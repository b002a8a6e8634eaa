"""Speed of the NB-SMT custom ops against ONNX Runtime's own float32 Conv / MatMul.

Every ratio is measured in the same run, against the float
operator on the same shapes and the same intra-op thread count. Shapes: the
3x3 conv layers of ResNet-18 at 224x224, batch 8 (plus the strided and 1x1
ones with ``--all``) and a 128x768 @ 768x768 MatMul; inputs are ReLU-like
(about half zeros). Targets: T=1 <= 2x float, T=2 <= 3x, T=4 <= 8x, and at least
100x faster than the NumPy reference (``nbsmt_onnx/ops/reference.py``), which
is timed on a reduced problem (batch 1, a few output channels) and scaled
linearly in rows x output channels: its cost is proportional to both.

Output: per thread count the milliseconds (median [min] of ``--reps`` runs,
interleaved), then one table of ratios NB-SMT / float for every layer, thread
count and case, the targets, and how noisy the runs were (other processes on
the machine); the kernel instruction set in use is printed first.

Run: ``python bench/bench_ops.py`` (``make bench``); ``NBSMT_ONNX_LIBRARY``
selects the library build, ``NBSMT_KERNEL_ISA=scalar|avx2|avx512`` the kernel.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
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
    """docs/spec.md §2 quantization: per-output-channel weights, unsigned activations (ReLU-like)."""
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


def time_interleaved(runs: Mapping[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds of each of ``reps`` runs per callable; the callables take turns so that
    load from other processes affects all of them alike."""
    for run in runs.values():
        run()  # warm-up: weight preparation, thread pool start
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return times


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


@dataclass(frozen=True)
class LayerResult:
    """Timings of one layer at one intra-op thread count: every run (seconds) of the
    float baseline and of each case, and the scaled NumPy reference time per case."""

    layer: Layer
    threads: int
    runs: dict[str, list[float]]  # "float" and case labels
    reference: dict[str, float]  # case label -> seconds (empty with --no-reference)

    def time(self, name: str, stat: str) -> float:
        ts = self.runs[name]
        return statistics.median(ts) if stat == "median" else min(ts)

    def ratio(self, label: str, stat: str) -> float:
        return self.time(label, stat) / self.time("float", stat)

    def spread(self, name: str) -> float:
        """max / min - 1 of the runs: how much other load moved this operator."""
        ts = self.runs[name]
        return max(ts) / min(ts) - 1.0


def bench_layer(
    layer: Layer, threads: int, reps: int, with_reference: bool, rng: np.random.Generator
) -> LayerResult:
    w = _weights(layer, rng)
    x = relu_like(layer.input_shape(), rng)
    q = quantize(layer, w, x)
    opts = SessionOptions(intra_op_threads=threads, optimize=True)
    sessions = {"float": create_session(float_model(layer, w), opts)}
    for case in CASES:
        sessions[case.label] = create_session(smt_model(layer, q, case), opts)
    feeds = {"X": x}
    runs = {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}
    times = time_interleaved(runs, reps)
    ref = {c.label: reference_seconds(layer, q, x, c) for c in CASES} if with_reference else {}
    return LayerResult(layer, threads, times, ref)


def kernel_isa() -> str:
    """The instruction set the library's kernels use on this machine: the rule of
    custom_ops/src/kernels/dispatch.cc (NBSMT_KERNEL_ISA if this CPU can run it, else
    the best of avx512 / avx2 / generic) applied to the CPU flags of /proc/cpuinfo.
    The library exports nothing but RegisterCustomOps, so it cannot be asked."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    can = {
        "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= set(flags),
        "avx2": {"avx2", "fma", "bmi1", "bmi2", "popcnt"} <= set(flags),
        "generic": True,
    }
    wanted = os.environ.get("NBSMT_KERNEL_ISA", "")
    wanted = "generic" if wanted == "scalar" else wanted
    if can.get(wanted, False):
        return f"{wanted} (NBSMT_KERNEL_ISA)"
    best = next(isa for isa in ("avx512", "avx2", "generic") if can[isa])
    return f"{best} (best this CPU runs)" + (
        f"; NBSMT_KERNEL_ISA={wanted!r} ignored" if wanted else ""
    )


def print_times(results: list[LayerResult], threads: int) -> None:
    """Milliseconds per operator (median [min]) for one thread count."""
    header = f"{'threads=' + str(threads) + ', ms: median [min]':<34}{'float':>16}"
    header += "".join(f"{case.label:>16}" for case in CASES)
    print()
    print(header)
    for r in results:
        line = f"{r.layer.name:<34}"
        for name in ["float"] + [case.label for case in CASES]:
            line += f"{r.time(name, 'median') * 1e3:>8.2f} [{r.time(name, 'min') * 1e3:5.2f}]"
        print(line, flush=True)


def print_ratios(results: list[LayerResult], stat: str, with_reference: bool) -> list[str]:
    """The final table: NB-SMT time / float time per layer, thread count and case
    (by ``stat``, the other statistic in parentheses); returns the missed targets."""
    other = "min" if stat == "median" else "median"
    misses: list[str] = []
    print()
    print(f"Ratio NB-SMT / float32 ORT, {stat} of the runs ({other} in parentheses)")
    header = f"{'layer':<28}{'thr':>4}" + "".join(f"{c.label:>14}" for c in CASES)
    if with_reference:
        header += f"{'vs ref':>9}"
    print(header)
    for r in results:
        line = f"{r.layer.name:<28}{r.threads:>4}"
        for case in CASES:
            ratio = r.ratio(case.label, stat)
            line += f"{ratio:>7.2f} ({r.ratio(case.label, other):4.2f})"
            if ratio > TARGETS[case.threads]:
                misses.append(
                    f"{r.layer.name} threads={r.threads} {case.label}: {ratio:.2f}x "
                    f"> {TARGETS[case.threads]}x"
                )
        if with_reference:
            speedups = {c.label: r.reference[c.label] / r.time(c.label, stat) for c in CASES}
            line += f"{min(speedups.values()):>8.0f}x"
            misses += [
                f"{r.layer.name} threads={r.threads} {label}: only {v:.0f}x faster than the "
                "NumPy reference"
                for label, v in speedups.items()
                if v < REFERENCE_SPEEDUP_TARGET
            ]
        print(line)
    targets = "".join(f"{'<= ' + str(TARGETS[c.threads]) + 'x':>14}" for c in CASES)
    print(f"{'target':<32}{targets}" + (f"{'>= 100x':>9}" if with_reference else ""))
    return misses


def print_noise(results: list[LayerResult]) -> None:
    """How much the runs of one operator varied (other processes share the CPU)."""
    spreads = sorted(
        (r.spread(name), f"{r.layer.name} threads={r.threads} {name}")
        for r in results
        for name in r.runs
    )
    median = statistics.median(s for s, _ in spreads)
    worst, where = spreads[-1]
    print(
        f"noise: spread of an operator's runs (max/min - 1): median {median:.0%}, "
        f"worst {worst:.0%} ({where})"
    )


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
        help="statistic the targets are checked on (both are printed; min filters out "
        "interference from other processes)",
    )
    parser.add_argument("--all", action="store_true", help="also the strided and 1x1 layers")
    parser.add_argument("--no-reference", action="store_true", help="skip the NumPy reference")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    layers = LAYERS + (EXTRA_LAYERS if args.all else [])
    rng = np.random.default_rng(args.seed)
    with_reference = not args.no_reference
    print(
        "NB-SMT ops vs ONNX Runtime float32 (same shapes, same intra-op threads),",
        args.reps,
        "runs each, interleaved",
    )
    print(f"NB-SMT kernel ISA: {kernel_isa()}; onnxruntime {ort.__version__}")
    if with_reference:
        print(
            "NumPy reference: timed on batch 1 (MatMul: 16 rows) and 8 output channels,"
            " scaled by rows x output channels; 'vs ref' = reference time / NB-SMT time,"
            " worst case of the row"
        )
    results: list[LayerResult] = []
    for threads in args.threads:
        per_threads = [
            bench_layer(layer, threads, args.reps, with_reference, rng) for layer in layers
        ]
        print_times(per_threads, threads)
        results += per_threads
    misses = print_ratios(results, args.stat, with_reference)
    print_noise(results)
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
