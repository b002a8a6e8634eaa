"""``inspect`` is transform's preflight: it accepts a model exactly when transform's model checks pass.

For each model, ``inspect`` and ``transform`` (on 2 seeded samples of the
right shape: the model checks do not depend on the data) are run with the
same options; both succeed, or both fail with exit 2 and the same one-line
reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import transform_models as tm
from click.testing import CliRunner
from onnx import helper

from nbsmt_onnx.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _library(nbsmt_library: str) -> str:
    return nbsmt_library


def _relu_only() -> onnx.ModelProto:
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    return tm.make_model([node], [tm.value("x", ["N", 4])], [tm.value("y", ["N", 4])])


def _weights_as_input() -> onnx.ModelProto:
    """The only Conv's weight is a graph input: nothing can be rewritten."""
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    return tm.make_model(
        [node],
        [tm.value("x", ["N", 2, 5, 5]), tm.value("w", [3, 2, 3, 3])],
        [tm.value("y", ["N", 3, 3, 3])],
    )


def _opset9_conv() -> onnx.ModelProto:
    w = np.random.default_rng(0).normal(size=(3, 2, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    return tm.make_model(
        [node], [tm.value("x", ["N", 2, 5, 5])], [tm.value("y", ["N", 3, 3, 3])], {"w": w},
        opset=9, ir_version=4,
    )  # fmt: skip


def _bad_conv_attribute() -> onnx.ModelProto:
    model = tm.conv_relu_gemm(0)
    model.graph.node[0].attribute.append(helper.make_attribute("kernel_shape", [5, 5]))
    return model  # kernel_shape disagrees with the weight: ORT and the checker refuse it


MODELS = {
    "fmnist_resnet": lambda: onnx.load(ROOT / "models/fashion_mnist/fmnist_resnet.onnx"),
    "fmnist_resnet_fused": lambda: onnx.load(
        ROOT / "models/fashion_mnist/fmnist_resnet_fused.onnx"
    ),
    "paddle_cls": lambda: onnx.load(ROOT / "models/thirdparty/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "conv_relu_gemm": lambda: tm.conv_relu_gemm(0),
    "matmul_chain": lambda: tm.matmul_chain(0),
    "relu_only": _relu_only,
    "weights_as_input": _weights_as_input,
    "opset9_conv": _opset9_conv,
    "bad_conv_attribute": _bad_conv_attribute,
}


#: Sizes of dynamic dimensions (other than the batch) for the data of a model.
DYNAMIC_DIMS = {"paddle_cls": (48, 192)}


def _calib(model: onnx.ModelProto, name: str, path: Path) -> Path:
    """Two seeded samples per input, dynamic dims from DYNAMIC_DIMS (else 8)."""
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(0)
    arrays = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        fill = iter(DYNAMIC_DIMS.get(name, ()))
        dims = [
            d.dim_value if d.dim_value > 0 else next(fill, 8)
            for d in vi.type.tensor_type.shape.dim[1:]
        ]
        arrays[vi.name] = rng.random((2, *dims), dtype=np.float32)
    np.savez(path, **arrays)
    return path


def _error_line(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("error:"))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("options", [[], ["--export", "both"], ["--no-recalibrate"]])
def test_inspect_accepts_exactly_what_transform_accepts(
    tmp_path: Path, name: str, options: list[str]
) -> None:
    path = tmp_path / f"{name}.onnx"
    model = MODELS[name]()
    onnx.save(model, path)
    calib = _calib(model, name, tmp_path / "calib.npz")
    runner = CliRunner()
    inspected = runner.invoke(main, ["inspect", str(path), *options])
    transformed = runner.invoke(
        main,
        ["transform", str(path), "--calib", str(calib), "--num-samples", "2", "--batch-size", "2",
         "-o", str(tmp_path / "out.onnx"), *options],
    )  # fmt: skip
    assert inspected.exit_code in (0, 2), inspected.output
    assert transformed.exit_code in (0, 2), transformed.output
    assert (inspected.exit_code == 0) == (transformed.exit_code == 0), (
        f"inspect exit {inspected.exit_code}: {inspected.output[-300:]}\n"
        f"transform exit {transformed.exit_code}: {transformed.output[-300:]}"
    )
    if inspected.exit_code == 2:
        assert _error_line(inspected.output) == _error_line(transformed.output)
        assert not (tmp_path / "out.onnx").exists()


def test_the_expected_models_are_refused() -> None:
    """Guard against a vacuous equivalence: some models must fail, others pass."""
    runner = CliRunner()
    results = {}
    for name in ("relu_only", "weights_as_input", "conv_relu_gemm"):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            onnx.save(MODELS[name](), path)
            results[name] = runner.invoke(main, ["inspect", str(path)]).exit_code
    assert results == {"relu_only": 2, "weights_as_input": 2, "conv_relu_gemm": 0}


def test_inspect_prints_inputs_outputs_and_layout(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(tm.conv_relu_gemm(0), path)
    out = CliRunner().invoke(main, ["inspect", str(path)]).output
    assert "  x: float32 (N, 3, 8, 8), samples along axis 0" in out
    assert "  y: float32 (N, 5)" in out
