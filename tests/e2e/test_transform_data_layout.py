"""Models whose inputs are not all "samples along axis 0": a recurrent state batched along
axis 1, a fixed side input and a scalar — through the CLI and the API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import transform_models as tm
from click.testing import CliRunner
from onnx import helper

from nbsmt_onnx import TransformConfig, transform
from nbsmt_onnx.cli import main
from nbsmt_onnx.config import DataLayout


@pytest.fixture(autouse=True)
def _library(nbsmt_library: str) -> str:
    return nbsmt_library


def _model() -> onnx.ModelProto:
    """y = ((x + c) * s) @ w  and  z = state @ w2, state [2, N, 4] (layers, batch, hidden)."""
    r = np.random.default_rng(0)
    nodes = [
        helper.make_node("Add", ["x", "c"], ["xc"], name="add"),
        helper.make_node("Mul", ["xc", "s"], ["xs"], name="mul"),
        helper.make_node("MatMul", ["xs", "w"], ["y"], name="fc"),
        helper.make_node("MatMul", ["state", "w2"], ["z"], name="fc_state"),
    ]
    return tm.make_model(
        nodes,
        [
            tm.value("x", ["N", 6]),
            tm.value("c", [1, 6]),
            tm.value("s", []),
            tm.value("state", [2, "N", 4]),
        ],
        [tm.value("y", ["N", 5]), tm.value("z", [2, "N", 3])],
        {
            "w": r.standard_normal((6, 5)).astype(np.float32),
            "w2": r.standard_normal((4, 3)).astype(np.float32),
        },
    )


def _arrays(n: int = 20) -> dict[str, np.ndarray]:
    r = np.random.default_rng(1)
    return {
        "x": r.standard_normal((n, 6)).astype(np.float32),
        "c": r.uniform(1, 2, (1, 6)).astype(np.float32),
        "s": np.float32(-1.5),
        "state": r.standard_normal((2, n, 4)).astype(np.float32) * 3,
    }


def _check_ranges(ranges, arrays) -> None:  # type: ignore[no-untyped-def]
    """The float pass saw every sample with the constants applied (ranges are min/max)."""
    xs = (arrays["x"] + arrays["c"]) * arrays["s"]
    assert (ranges["xs"].min, ranges["xs"].max) == (float(xs.min()), float(xs.max()))
    st = arrays["state"]
    assert (ranges["state"].min, ranges["state"].max) == (float(st.min()), float(st.max()))


def test_api_batch_axis_detected_and_scalar_constants(tmp_path: Path) -> None:
    arrays = _arrays()
    result = transform(
        _model(),
        arrays,
        TransformConfig(num_samples=20, batch_size=8, export="both"),
        layout=DataLayout(batch_axes={"state": 1}),
    )
    _check_ranges(result.ranges, arrays)
    assert result.report["summary"]["rewritten"] == 2


def test_cli_batch_axis_and_constant_file(tmp_path: Path) -> None:
    arrays = _arrays()
    onnx.save(_model(), tmp_path / "m.onnx")
    np.save(tmp_path / "c.npy", arrays["c"])
    np.savez(tmp_path / "calib.npz", x=arrays["x"], s=arrays["s"], state=arrays["state"])
    args = ["transform", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib.npz")]
    out = ["-o", str(tmp_path / "out.onnx"), "--num-samples", "20", "--export", "both"]
    report = tmp_path / "r.json"
    # Without the layout: one line that says how to declare it, nothing written.
    res = CliRunner().invoke(main, [*args, *out, "--constant", f"c={tmp_path / 'c.npy'}"])
    assert res.exit_code == 2 and "--batch-axis NAME=AXIS" in res.output, res.output
    assert not (tmp_path / "out.onnx").exists()
    res = CliRunner().invoke(
        main,
        [*args, *out, "--report", str(report), "--batch-axis", "state=1",
         "--constant", f"c={tmp_path / 'c.npy'}"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    layers = {e["node"]: e for e in json.loads(report.read_text())["layers"]}
    st = arrays["state"]
    assert layers["fc_state"]["activation_range"] == [float(st.min()), float(st.max())]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (("--batch-axis", "state"), "--batch-axis takes NAME=AXIS"),
        (("--batch-axis", "state=-1"), "--batch-axis takes NAME=AXIS"),
        (("--batch-axis", "nope=1"), "unknown input(s) nope"),
        (("--constant", "c="), "--constant takes NAME or NAME=FILE.npy"),
        (("--constant", "c=missing.npy"), "is not an .npy file"),
    ],
)
def test_cli_layout_mistakes(tmp_path: Path, option: tuple[str, str], message: str) -> None:
    arrays = _arrays()
    onnx.save(_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **arrays)  # type: ignore[arg-type]
    res = CliRunner().invoke(
        main,
        ["transform", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib.npz"),
         "-o", str(tmp_path / "out.onnx"), *option],
    )  # fmt: skip
    assert res.exit_code == 2 and message in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "out.onnx").exists()
