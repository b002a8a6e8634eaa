"""CLI argument handling that needs no custom-op library: messages, exit codes, no files left."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import transform_models as tm
from click.testing import CliRunner

from nbsmt_onnx.cli import main


def _model(tmp_path: Path, build=tm.conv_relu_gemm) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path / "model.onnx"
    onnx.save(build(), path)
    return path


def _run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, [str(a) for a in args])


def test_transform_without_calib_explains_why_and_how(tmp_path: Path) -> None:
    model = _model(tmp_path)
    result = _run("transform", model)
    assert result.exit_code == 2
    assert "calibration data is needed" in result.output and "--calib DATA" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_invalid_choice_lists_choices(tmp_path: Path) -> None:
    result = _run("transform", _model(tmp_path), "--calib", "random", "--threads", "3")
    assert result.exit_code == 2 and "'1', '2', '4'" in result.output


def test_existing_output_refused_before_any_work(tmp_path: Path) -> None:
    model = _model(tmp_path)
    out = tmp_path / "model.nbsmt.onnx"
    out.write_bytes(b"keep me")
    result = _run("transform", model, "--calib", "random")
    assert result.exit_code == 2
    assert f"output file {out} exists; pass --force" in result.output
    assert out.read_bytes() == b"keep me"


def test_output_equal_to_input_refused_even_with_force(tmp_path: Path) -> None:
    model = _model(tmp_path)
    before = model.read_bytes()
    result = _run("transform", model, "-o", model, "--calib", "random", "--force")
    assert result.exit_code == 2 and "refusing to overwrite the input model" in result.output
    assert model.read_bytes() == before


def test_missing_library_is_one_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBSMT_ONNX_LIBRARY", str(tmp_path / "no" / "libnbsmt_ops.so"))
    model = _model(tmp_path)
    np.savez(tmp_path / "calib.npz", x=np.zeros((4, 3, 8, 8), np.float32))
    result = _run("transform", model, "--calib", tmp_path / "calib.npz")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "NBSMT_ONNX_LIBRARY" in lines[0] and "does not exist" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "model.onnx"]


def test_inspect_lists_rewritten_skipped_and_why(tmp_path: Path) -> None:
    model = _model(tmp_path, tm.shared_weight)
    result = _run("inspect", model)
    assert result.exit_code == 0, result.output
    assert "rewritten (2):" in result.output and "mm_a  MatMul -> NB-SMT" in result.output
    assert "mm_dynamic  MatMul: dynamic weights: MatMul of two run-time tensors" in result.output
    result = _run("inspect", model, "--json", "--exclude", "mm_b")
    info = json.loads(result.output)
    assert [r["node"] for r in info["rewritten"]] == ["mm_a"]
    assert {s["node"] for s in info["skipped"]} == {"mm_b", "mm_dynamic"}


def test_inspect_shows_batchnorm_layers(tmp_path: Path) -> None:
    result = _run("inspect", _model(tmp_path, tm.conv_bn_relu))
    assert result.exit_code == 0, result.output
    assert "BatchNormalization layers (1):" in result.output
    assert "bn1  after conv1 (NbSmtConv): folds into conv1" in result.output


def test_inspect_malformed_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    result = _run("inspect", bad)
    assert (
        result.exit_code == 2
        and result.output.startswith("error: ")
        and "not a valid ONNX model" in result.output
    )


@pytest.mark.parametrize("command", ["transform", "evaluate"])
def test_report_format_follows_the_extension_and_unknown_ones_are_refused(
    tmp_path: Path, command: str
) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(tm.conv_relu_gemm(0), model)
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    args = [command, str(model), "--calib", str(tmp_path / "c.npz")]
    if command == "evaluate":
        args += ["--data", str(tmp_path / "c.npz")]
    result = CliRunner().invoke(main, [*args, "--report", str(tmp_path / "report.txt")])
    assert result.exit_code == 2
    assert "unknown report format '.txt'" in result.output
    assert "end the path in .html" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "m.onnx"]
