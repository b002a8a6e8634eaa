"""Does the QDQ export equal the threads=1 simulation in stock ONNX Runtime *with its defaults*?

Users deploy QDQ models with ONNX Runtime's default graph optimisations
(``ORT_ENABLE_ALL``), under which ORT fuses DequantizeLinear -> MatMul / Conv
into integer kernels (MatMulIntegerToFloat, QGemm, QLinearConv). Which integer
kernel runs depends on how the QDQ model types its integers: uint8 x int8 pairs
use ``vpmaddubsw`` on AVX2 CPUs without VNNI, which saturates the sum of two
products to int16 (255 * 127 * 2 > 32767). The same integers and scales can be
written as uint8 x int8 (``u8s8``), uint8 x uint8 (``u8u8``: weights shifted by a
zero point of 128, signed activations too) or int8 x int8 (``s8s8``: unsigned
activations with a zero point of -128); see ``nbsmt_onnx/graph/qdq.py``.

For each model (two MLPs on flattened Fashion-MNIST images and the example
Fashion-MNIST ResNet, all calibrated on training images) and each
representation, this prints, over ``--samples`` test images: the largest
|QDQ - simulation(T=1)| relative to the output's peak, and the fraction of
samples whose argmax differs, with ORT's optimisations off and with its
defaults. Also the fused op types ORT chose (from an optimised-model dump).

Run: ``python bench/qdq_deploy_check.py`` (needs Debian's dataset-fashion-mnist).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.fashion_mnist import data as fmnist  # noqa: E402
from nbsmt_onnx import TransformConfig, transform  # noqa: E402
from nbsmt_onnx.api import _set_threads  # noqa: E402
from nbsmt_onnx.graph.qdq import REPRESENTATIONS, to_qdq  # noqa: E402
from nbsmt_onnx.runtime.session import SessionOptions, create_session  # noqa: E402


def mlp(seed: int = 0, *, bias: bool = True) -> onnx.ModelProto:
    """784 -> 256 -> ReLU -> 256 -> ReLU -> 10, He-initialised weights (biases ~0.1 when ``bias``)."""
    r = np.random.default_rng(seed)
    dims = [784, 256, 256, 10]
    nodes, inits = [], []
    x = "input"
    for i, (k, n) in enumerate(itertools.pairwise(dims)):
        w = (r.standard_normal((k, n)) * np.sqrt(2.0 / k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        last = i == len(dims) - 2
        out = "logits" if last else f"a{i}"
        pre = out if last else f"z{i}"
        if bias:
            b = (r.standard_normal(n) * 0.1).astype(np.float32)
            inits.append(numpy_helper.from_array(b, f"b{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"fc{i}"))
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [pre], name=f"add{i}"))
        else:
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [pre], name=f"fc{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [pre], [out], name=f"relu{i}"))
        x = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 784])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def fused_ops(model: onnx.ModelProto) -> dict[str, int]:
    """The op types of the model as ORT runs it with default optimisations."""
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.log_severity_level = 4
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(so.optimized_model_filepath)
    counts = collections.Counter(n.op_type for n in opt.graph.node)
    keep = ("Conv", "MatMul", "Gemm", "QLinear", "Integer", "QGemm", "FusedConv", "FusedMatMul")
    return {k: v for k, v in sorted(counts.items()) if any(s in k for s in keep)}


def compare(sim_t1: onnx.ModelProto, qdq: onnx.ModelProto, x: np.ndarray, batch: int) -> None:
    sim = create_session(sim_t1, SessionOptions(), what="simulation")
    name = sim.get_inputs()[0].name
    ref = np.concatenate(
        [sim.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )
    peak = float(np.max(np.abs(ref)))
    for optimize in (False, True):
        s = create_session(qdq, SessionOptions(register_library=False, optimize=optimize))
        out = np.concatenate(
            [s.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
        )
        diff = np.abs(out.astype(np.float64) - ref)
        flips = float(np.mean(np.argmax(out, 1) != np.argmax(ref, 1)))
        print(
            f"    ORT {'defaults (ENABLE_ALL)' if optimize else 'optimisations off   '}: "
            f"max|diff|/peak {float(diff.max()) / peak:.2e}, argmax changed on {flips:.2%} "
            f"({round(flips * len(x))}/{len(x)})"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000, help="test images compared")
    ap.add_argument("--calib", type=int, default=500, help="training images for calibration")
    args = ap.parse_args()
    print(
        f"onnxruntime {ort.__version__}; CPU flags:",
        " ".join(
            f
            for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni")
            if f in Path("/proc/cpuinfo").read_text()
        ),
    )
    train, _ = fmnist.load_split("train")
    test, _ = fmnist.load_split("test")
    calib = fmnist.normalise(train[: args.calib])
    held = fmnist.normalise(test[: args.samples])
    flat_c, flat_h = calib.reshape(len(calib), -1), held.reshape(len(held), -1)
    pixels_c = (train[: args.calib].reshape(len(calib), -1) / 255.0).astype(np.float32)
    pixels_h = (test[: args.samples].reshape(len(held), -1) / 255.0).astype(np.float32)
    models = {
        "MLP 784-256-256-10 without biases, pixels in [0, 1] (unsigned input)": (
            mlp(bias=False), pixels_c, pixels_h,
        ),
        "MLP 784-256-256-10 with biases, normalised pixels (signed input)": (
            mlp(bias=True), flat_c, flat_h,
        ),
        "Fashion-MNIST ResNet (models/fashion_mnist), normalised images": (
            onnx.load(REPO / "models" / "fashion_mnist" / "fmnist_resnet.onnx"), calib, held,
        ),
    }  # fmt: skip
    for label, (model, c, h) in models.items():
        name = model.graph.input[0].name
        result = transform(
            model, {name: c}, TransformConfig(threads=1, num_samples=len(c), progress=False)
        )
        sim_t1 = _set_threads(result.sim_model, 1)
        print(label)
        for rep in REPRESENTATIONS:
            qdq = to_qdq(result.sim_model, rep)
            print(f"  {rep}: ORT fuses into {fused_ops(qdq)}")
            compare(sim_t1, qdq, h, 100)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
