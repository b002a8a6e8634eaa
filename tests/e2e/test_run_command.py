"""``nbsmt-onnx run``: a simulation model on a few samples, compared with its float model.

The outputs are checked against the NumPy reference of the NB-SMT ops and
ONNX Runtime's float run on the very samples drawn, and the comparison
numbers against a direct NumPy computation from those arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import transform_models as tm
from click.testing import CliRunner

import nbsmt_onnx as nb
from nbsmt_onnx.api import run
from nbsmt_onnx.calibration.data import model_inputs, open_calibration_data
from nbsmt_onnx.cli import main


@pytest.fixture()
def models(tmp_path: Path, nbsmt_library: str) -> tuple[Path, Path, Path]:
    float_model = tm.conv_relu_gemm(4)
    rng = np.random.default_rng(5)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.standard_normal((30, 3, 8, 8)).astype(np.float32))
    result = nb.transform(float_model, str(data), nb.TransformConfig(num_samples=30, threads=4))
    float_path, sim_path = tmp_path / "m.onnx", tmp_path / "m.nbsmt.onnx"
    onnx.save(float_model, float_path)
    onnx.save(result.sim_model, sim_path)
    return float_path, sim_path, data


def test_outputs_and_comparison_are_those_of_the_samples_drawn(
    models: tuple[Path, Path, Path],
) -> None:
    float_path, sim_path, data = models
    result = run(sim_path, str(data), reference=float_path, num_samples=12, seed=3)
    drawn = open_calibration_data(
        str(data), model_inputs(onnx.load(float_path)), num_samples=12, batch_size=16, seed=3
    )
    x = np.concatenate([feed["x"] for feed in drawn.batches()])
    assert x.shape[0] == result.samples == 12
    (expected_sim,) = tm.reference_run(onnx.load(sim_path), {"x": x})
    assert np.array_equal(result.outputs["y"], expected_sim)  # bit-exact ops, same samples
    options = ort.SessionOptions()  # the tool's sessions run without graph optimisations
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(float_path), options, providers=["CPUExecutionProvider"])
    (expected_float,) = session.run(None, {"x": x})

    (c,) = result.comparisons
    a, b = expected_sim.astype(np.float64), expected_float.astype(np.float64)
    assert c.max_abs_diff == pytest.approx(np.abs(a - b).max(), rel=1e-12)
    cosine = (a.ravel() @ b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b))
    assert c.cosine == pytest.approx(cosine, rel=1e-12)
    sqnr = 10 * np.log10((b**2).sum() / ((a - b) ** 2).sum())
    assert c.sqnr_db == pytest.approx(sqnr, rel=1e-12)
    assert c.argmax_agreement == np.mean(a.argmax(1) == b.argmax(1))


def test_cli_prints_the_table_and_saves_the_outputs(
    models: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    float_path, sim_path, data = models
    out = tmp_path / "outputs.npz"
    args = ["run", str(sim_path), "--data", str(data), "--reference", str(float_path)]
    res = CliRunner().invoke(main, [*args, "--num-samples", "8", "--save-outputs", str(out)])
    assert res.exit_code == 0, res.output
    assert "8 sample(s)" in res.output and "cosine" in res.output and "y " in res.output
    saved = np.load(out)
    direct = run(sim_path, str(data), num_samples=8)
    assert np.array_equal(saved["y"], direct.outputs["y"])

    res = CliRunner().invoke(main, [*args, "--save-outputs", str(out)])
    assert res.exit_code == 2 and "--force" in res.output  # no overwrite without --force
    res = CliRunner().invoke(main, [*args, "--save-outputs", str(tmp_path / "o.txt")])
    assert res.exit_code == 2 and ".npz" in res.output
    assert not (tmp_path / "o.txt").exists()


def test_reference_without_common_outputs_is_refused(
    models: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, sim_path, data = models
    other = tm.conv_relu_gemm(4)
    other.graph.output[0].name = "z"
    other.graph.node[-1].output[0] = "z"
    onnx.save(other, tmp_path / "other.onnx")
    res = CliRunner().invoke(
        main, ["run", str(sim_path), "--data", str(data), "--reference", str(tmp_path / "other.onnx")]
    )
    assert res.exit_code == 2
    assert "share no name" in res.output
    assert len(res.output.strip().splitlines()) == 1
