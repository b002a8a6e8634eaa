"""``evaluate`` and ``transform --eval-data``: every NB-SMT row carries the model's speed-up."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import transform_models as tm
from click.testing import CliRunner

from nbsmt_onnx.cli import main

# conv_relu_gemm(channels=4, size=8, classes=5) per sample, by hand (see tests/unit/test_threads.py)
MACS = {"conv1": 4 * 8 * 8 * 27, "conv2": 4 * 4 * 4 * 18, "fc": 5 * 4}


@pytest.fixture(autouse=True)
def _library(nbsmt_library: str) -> str:
    return nbsmt_library


def _setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    model = tmp_path / "model.onnx"
    onnx.save(tm.conv_relu_gemm(0), model)
    rng = np.random.default_rng(0)
    calib, data = tmp_path / "calib.npz", tmp_path / "data.npz"
    np.savez(calib, x=rng.standard_normal((24, 3, 8, 8)).astype(np.float32))
    np.savez(data, x=rng.standard_normal((20, 3, 8, 8)).astype(np.float32))
    return model, calib, data


def test_evaluate_rows_show_the_speedup_of_their_threads(tmp_path: Path) -> None:
    model, calib, data = _setup(tmp_path)
    report, table = tmp_path / "report.json", tmp_path / "rows.csv"
    html = tmp_path / "report.html"
    result = CliRunner().invoke(
        main,
        ["evaluate", str(model), "--calib", str(calib), "--data", str(data),
         "--threads", "2,4", "--report", str(report), "--csv", str(table)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(report.read_text())["rows"]
    # every MAC layer is an NbSmt layer here, so uniform T gives exactly T
    assert {r["threads"] for r in rows} == {None, 1, 2, 4}
    for r in rows:
        assert r["speedup"] == (None if r["threads"] is None else float(r["threads"])), r["id"]
    assert "speed-up" in result.output and "4.00x" in result.output
    with table.open() as f:
        csv_rows = {r["id"]: r["speedup"] for r in csv.DictReader(f)}
    assert csv_rows == {r["id"]: "" if r["speedup"] is None else str(r["speedup"]) for r in rows}
    again = CliRunner().invoke(
        main,
        ["evaluate", str(model), "--calib", str(calib), "--data", str(data),
         "--threads", "4", "--report", str(html)],
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    assert "speed-up" in html.read_text() and "4.00&times;" in html.read_text()


def test_per_layer_threads_are_read_from_the_model(tmp_path: Path) -> None:
    model, calib, data = _setup(tmp_path)
    plan = tmp_path / "threads.json"
    plan.write_text(json.dumps({"conv1": 4, "fc": 2}))
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        ["transform", str(model), "--calib", str(calib), "-o", str(tmp_path / "out.onnx"),
         "--threads", "1", "--layer-threads", str(plan), "--eval-data", str(data),
         "--report", str(report)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = sum(MACS.values()) / (MACS["conv1"] / 4 + MACS["conv2"] + MACS["fc"] / 2)
    rep = json.loads(report.read_text())
    rows = rep["evaluation"]["rows"]
    produced = [r for r in rows if r["speedup"] not in (None, 1.0)]
    assert len(produced) == 1
    assert produced[0]["speedup"] == pytest.approx(expected, rel=1e-12)
