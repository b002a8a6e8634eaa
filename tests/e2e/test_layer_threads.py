"""``transform --layer-threads``: per-layer threads reach the model, the report and the speed-up."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import transform_models as tm
from click.testing import CliRunner

from nbsmt_onnx.cli import main
from nbsmt_onnx.graph.threads import nbsmt_nodes, node_threads
from nbsmt_onnx.ops import reference
from nbsmt_onnx.runtime.session import create_session

# conv_relu_gemm(channels=4, size=8, classes=5) per sample, by hand (see tests/unit/test_threads.py)
MACS = {"conv1": 4 * 8 * 8 * 27, "conv2": 4 * 4 * 4 * 18, "fc": 5 * 4}


@pytest.fixture(autouse=True)
def _library(nbsmt_library: str) -> str:
    return nbsmt_library


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "model.onnx"
    onnx.save(tm.conv_relu_gemm(0), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((24, 3, 8, 8)).astype(np.float32))
    return model, calib


def test_layer_threads_reach_model_report_and_speedup(tmp_path: Path) -> None:
    model, calib = _setup(tmp_path)
    plan = tmp_path / "threads.json"
    plan.write_text(json.dumps({"conv1": 4, "conv.*": 1}))
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        ["transform", str(model), "--calib", str(calib), "-o", str(out),
         "--layer-threads", str(plan), "--report", str(report)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = onnx.load(out)
    assert {n.name: node_threads(n) for n in nbsmt_nodes(saved)} == {
        "conv1": 4,
        "conv2": 1,
        "fc": 2,
    }
    rep = json.loads(report.read_text())
    layers = {layer["node"]: layer for layer in rep["layers"]}
    assert {n: layers[n]["threads"] for n in MACS} == {"conv1": 4, "conv2": 1, "fc": 2}
    assert {n: layers[n]["macs_per_sample"] for n in MACS} == MACS
    expected = sum(MACS.values()) / (MACS["conv1"] / 4 + MACS["conv2"] / 1 + MACS["fc"] / 2)
    assert rep["summary"]["speedup"]["speedup"] == pytest.approx(expected, rel=1e-12)
    assert f"{expected:.2f}x" in result.output
    assert "T=1/2/4 per layer (1/1/1 layers)" in result.output
    # utilization of each layer is measured against its own thread count
    for n in MACS:
        st = layers[n]["nbsmt"]
        assert st["mac_utilization"] == pytest.approx(
            st["active_slots"] / (st["groups"] * layers[n]["threads"])
        )
    # the saved model computes with those threads: bit-exact against the NumPy reference
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    got = create_session(str(out)).run(None, {"x": x})[0]
    want = reference.reference_evaluator(saved).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)


def test_a_key_matching_no_layer_fails_before_any_pass(tmp_path: Path) -> None:
    model, calib = _setup(tmp_path)
    plan = tmp_path / "threads.json"
    plan.write_text(json.dumps({"conv9": 4}))
    before = model.read_bytes()
    result = CliRunner().invoke(
        main, ["transform", str(model), "--calib", str(calib), "--layer-threads", str(plan)]
    )
    assert result.exit_code == 2
    assert "'conv9' match no NB-SMT layer" in result.output
    assert result.output.count("\n") <= 2  # one error line (plus at most one warning)
    assert not (tmp_path / "model.nbsmt.onnx").exists()
    assert model.read_bytes() == before


def test_inspect_shows_each_layers_threads(tmp_path: Path) -> None:
    model, _ = _setup(tmp_path)
    plan = tmp_path / "threads.json"
    plan.write_text(json.dumps({"conv2": 4}))
    result = CliRunner().invoke(
        main, ["inspect", str(model), "--threads", "1", "--layer-threads", str(plan), "--json"]
    )
    assert result.exit_code == 0, result.output
    rows = {r["node"]: r["threads"] for r in json.loads(result.output)["rewritten"]}
    assert rows == {"conv1": 1, "conv2": 4, "fc": 1}
    text = CliRunner().invoke(main, ["inspect", str(model), "--layer-threads", str(plan)]).output
    assert "conv2  Conv -> NB-SMT T=4" in text and "conv1  Conv -> NB-SMT T=2" in text
