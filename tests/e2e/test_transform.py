"""``nbsmt-onnx transform`` end to end on small models, with the custom-op library.

The simulation model runs in ONNX Runtime with the library; its outputs must
equal, bit for bit, the NumPy reference graph run of the same model (tiny
models: every op is an NB-SMT op or exact in float32 on both sides). Bad
inputs must give a one-line message, a non-zero exit code and no output file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import transform_models as tm
from click.testing import CliRunner
from onnx import helper

from nbsmt_onnx import TransformConfig, transform
from nbsmt_onnx.api import METADATA_SETTINGS_KEY, METADATA_VERSION_KEY
from nbsmt_onnx.cli import main
from nbsmt_onnx.report import add_stats_outputs
from nbsmt_onnx.runtime.session import SessionOptions, create_session


@pytest.fixture(autouse=True)
def _library(nbsmt_library: str) -> str:
    return nbsmt_library


def _setup(tmp_path: Path, build=tm.conv_relu_gemm, n: int = 24) -> tuple[Path, Path, np.ndarray]:  # type: ignore[no-untyped-def]
    model = tmp_path / "model.onnx"
    onnx.save(build(), model)
    x = np.random.default_rng(0).standard_normal((n, 3, 8, 8)).astype(np.float32)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x)
    return model, calib, x


def _cli(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, [str(a) for a in args])


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize(
    ("threads", "mapping", "reduce"),
    [(1, "channel", "activations"), (2, "interleave", "weights"), (4, "channel", "activations")],
)
def test_bare_transform_writes_beside_input_and_matches_reference(
    tmp_path: Path, threads: int, mapping: str, reduce: str
) -> None:
    model, calib, x = _setup(tmp_path)
    result = _cli(
        "transform",
        model,
        "--calib",
        calib,
        "--threads",
        threads,
        "--mapping",
        mapping,
        "--reduce",
        reduce,
        "--batch-size",
        5,
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "model.nbsmt.onnx"
    assert f"wrote {out}" in result.output
    sim = onnx.load(out)
    assert [n.op_type for n in sim.graph.node if n.domain == "nbsmt"] == [
        "NbSmtConv",
        "NbSmtConv",
        "NbSmtMatMul",
    ]
    meta = {p.key: p.value for p in sim.metadata_props}
    assert meta[METADATA_VERSION_KEY] == "0.1.0"
    settings = json.loads(meta[METADATA_SETTINGS_KEY])
    assert (settings["threads"], settings["mapping"], settings["reduce"]) == (
        threads,
        mapping,
        reduce,
    )
    got = create_session(sim).run(None, {"x": x})[0]
    want = tm.reference_run(sim, {"x": x})[0]
    np.testing.assert_array_equal(got, want)  # tiny model: bit-exact


def test_export_both_report_and_stats_match_reference(tmp_path: Path) -> None:
    model, calib, x = _setup(tmp_path)
    report_path = tmp_path / "report.json"
    result = _cli(
        "transform",
        model,
        "--calib",
        calib,
        "--export",
        "both",
        "--report",
        report_path,
        "--batch-size",
        8,
    )
    assert result.exit_code == 0, result.output
    assert _names(tmp_path) == [
        "calib.npz",
        "model.nbsmt.onnx",
        "model.nbsmt.qdq.onnx",
        "model.onnx",
        "report.json",
    ]
    sim = onnx.load(tmp_path / "model.nbsmt.onnx")
    qdq = onnx.load(tmp_path / "model.nbsmt.qdq.onnx")
    onnx.checker.check_model(qdq, full_check=True)
    assert {p.key for p in qdq.metadata_props} >= {METADATA_VERSION_KEY, METADATA_SETTINGS_KEY}
    # the QDQ model runs on stock ONNX Runtime without the library
    stock = create_session(qdq, SessionOptions(register_library=False)).run(None, {"x": x})[0]
    assert stock.shape == (24, 5)
    report = json.loads(report_path.read_text())
    assert report["calibration_data"]["samples"] == 24 and report["summary"]["rewritten"] == 3
    layers = {entry["node"]: entry for entry in report["layers"]}
    assert (
        layers["conv1"]["activation_signed"] is True
        and layers["conv2"]["activation_signed"] is False
    )
    # stats: recompute with the reference over the same data (the report runs batch by batch;
    # the counters are sums, so one reference run over all samples must give the same totals)
    probe, names = add_stats_outputs(sim)
    order = list(names)
    values = tm.reference_run(probe, {"x": x}, [names[n] for n in order])
    for node, stats in zip(order, values, strict=True):
        groups, active, collisions, reduced = (int(v) for v in stats)
        entry = layers[node]["nbsmt"]
        assert (
            entry["groups"],
            entry["active_slots"],
            entry["collisions"],
            entry["reduced_operands"],
        ) == (groups, active, collisions, reduced)
        assert entry["mac_utilization"] == active / (groups * 2)
        assert entry["collision_rate"] == collisions / groups
        assert entry["squeezed_operand_fraction"] == reduced / (2 * active)
    diff = report["exports"]["qdq_vs_threads1_simulation"]["y"]
    assert diff["relative_to_peak"] < 1e-5  # float32 rounding only on this 3-layer model
    # With ORT's default optimisations (fused integer kernels) the default u8u8 QDQ model
    # stays within one activation step of the simulation; 1e-2 of the peak is far above
    # float32 rounding and far below the saturation error of u8s8 without VNNI (~5e-2).
    assert report["exports"]["qdq_types"] == "u8u8"
    fused = report["exports"]["qdq_vs_threads1_simulation_ort_defaults"]["y"]
    assert fused["relative_to_peak"] < 1e-2


def test_api_result_save_and_input_untouched(tmp_path: Path) -> None:
    model, calib, _ = _setup(tmp_path)
    before = model.read_bytes()
    result = transform(model, calib, TransformConfig(threads=4, export="qdq", num_samples=10))
    assert result.sim_model is not None and result.qdq_model is not None
    written = result.save()
    assert written == [tmp_path / "model.qdq.onnx"]
    assert model.read_bytes() == before


def test_constant_and_folded_weights_and_dynamic_matmul(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    for build in (tm.reshaped_weight_gemm, tm.shared_weight, tm.matmul_chain):
        model = build()
        feed_x = (
            x
            if build is not tm.matmul_chain
            else np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
        )
        result = transform(model, {"x": feed_x}, TransformConfig(num_samples=3))
        got = create_session(result.sim_model).run(None, {"x": feed_x})
        want = tm.reference_run(result.sim_model, {"x": feed_x})
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    result = transform(tm.shared_weight(), {"x": x}, TransformConfig(num_samples=3))
    skipped = {s["node"]: s["reason"] for s in result.report["skipped"]}
    assert skipped == {"mm_dynamic": "dynamic weights: MatMul of two run-time tensors"}


# --------------------------------------------------------------------------- bad inputs


def test_malformed_model_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x00garbage")
    np.savez(tmp_path / "calib.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    result = _cli("transform", bad, "--calib", tmp_path / "calib.npz")
    assert result.exit_code == 2 and "not a valid ONNX model" in result.output
    assert _names(tmp_path) == ["calib.npz", "model.onnx"]


def test_nan_data_names_input_and_sample(tmp_path: Path) -> None:
    model, calib, x = _setup(tmp_path)
    x[17, 0, 0, 0] = np.nan
    np.savez(calib, x=x)
    result = _cli("transform", model, "--calib", calib)
    assert result.exit_code == 2
    assert "input 'x' sample 17 contains NaN" in result.output
    assert _names(tmp_path) == ["calib.npz", "model.onnx"]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"image": np.zeros((4, 3, 8, 8), np.float32), "mask": np.zeros(4, np.float32)},
            "no array for model input(s) x; the file has image, mask",
        ),
        (
            {"x": np.zeros((4, 3, 7, 8), np.float32)},
            "has shape (3, 7, 8); the model expects (3, 8, 8)\n",
        ),
        ({"x": np.zeros((4, 3, 8, 8), np.int64)}, "has dtype int64; the model expects float32"),
    ],
)
def test_wrong_input_names_shapes_dtypes(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    model, calib, _ = _setup(tmp_path)
    np.savez(calib, **arrays)
    result = _cli("transform", model, "--calib", calib)
    assert result.exit_code == 2
    assert message in result.output
    assert _names(tmp_path) == ["calib.npz", "model.onnx"]


def test_unsupported_attribute_refused_by_checker(tmp_path: Path) -> None:
    model = tm.matmul_chain()
    model.graph.node[0].op_type = "Gemm"
    model.graph.node[0].attribute.append(helper.make_attribute("foo", 1))
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "calib.npz", x=np.zeros((2, 6), np.float32))
    result = _cli("transform", path, "--calib", tmp_path / "calib.npz")
    assert result.exit_code == 2
    assert "fails onnx.checker: Unrecognized attribute: foo for operator Gemm" in result.output
    assert _names(tmp_path) == ["calib.npz", "model.onnx"]


def test_nothing_rewritable(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Transpose", ["a"], ["at"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["a", "at"], ["y"], name="dyn"),
    ]
    model = tm.make_model(nodes, [tm.value("a", [2, 3])], [tm.value("y", [2, 2])])
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "calib.npz", a=np.ones((4, 3), np.float32))
    result = _cli("transform", path, "--calib", tmp_path / "calib.npz")
    assert result.exit_code == 2
    assert (
        "nothing to rewrite" in result.output
        and "dynamic weights: MatMul of two run-time tensors" in result.output
    )
    assert _names(tmp_path) == ["calib.npz", "model.onnx"]


def test_unwritable_output_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, calib, _ = _setup(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real_access = os.access
    # root ignores permission bits, so make the check see what a normal user would see
    monkeypatch.setattr(
        "nbsmt_onnx.io.os.access", lambda p, m: False if Path(p) == out_dir else real_access(p, m)
    )
    result = _cli("transform", model, "--calib", calib, "-o", out_dir / "m.onnx")
    assert result.exit_code == 2 and f"output directory {out_dir} is not writable" in result.output
    assert _names(out_dir) == []
    result = _cli("transform", model, "--calib", calib, "-o", tmp_path / "missing" / "m.onnx")
    assert result.exit_code == 2 and "does not exist; create it first" in result.output


def test_second_output_failure_removes_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--export both: if writing the QDQ model fails, the simulation model is removed again."""
    model, calib, _ = _setup(tmp_path)
    from nbsmt_onnx import io
    from nbsmt_onnx.errors import OutputError

    real_save = io.save_model

    def save(m, path, **kw):  # type: ignore[no-untyped-def]
        if str(path).endswith(".qdq.onnx"):
            raise OutputError(f"cannot write {path}: disk full")
        return real_save(m, path, **kw)

    monkeypatch.setattr(io, "save_model", save)
    result = _cli("transform", model, "--calib", calib, "--export", "both")
    assert result.exit_code == 2 and "disk full" in result.output
    assert _names(tmp_path) == ["calib.npz", "model.onnx"]


def _console_script() -> str:
    found = shutil.which("nbsmt-onnx", path=str(Path(sys.executable).parent)) or shutil.which(
        "nbsmt-onnx"
    )
    if found is None:
        pytest.fail("console script nbsmt-onnx is not installed (pip install -e .)", pytrace=False)
    return found


def test_console_script_subprocess(tmp_path: Path, nbsmt_library: str) -> None:
    model, _, _ = _setup(tmp_path)
    env = {**os.environ, "NBSMT_ONNX_LIBRARY": nbsmt_library}
    done = subprocess.run(
        [_console_script(), "transform", str(model), "--calib", "random", "--num-samples", "4"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "WARNING: --calib random" in done.stderr
    assert (tmp_path / "model.nbsmt.onnx").is_file()
    # missing library: one line on stderr, exit code 2, nothing written
    env["NBSMT_ONNX_LIBRARY"] = str(tmp_path / "missing.so")
    done = subprocess.run(
        [
            _console_script(),
            "transform",
            str(model),
            "-o",
            str(tmp_path / "o.onnx"),
            "--calib",
            "random",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "NBSMT_ONNX_LIBRARY" in errors[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_image_folder_with_preprocessing_flags(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    model, _, _ = _setup(tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "img.onnx"
    args = [
        "transform",
        model,
        "-o",
        out,
        "--calib",
        folder,
        "--resize",
        "9",
        "--center-crop",
        "8x8",
    ]
    args += [
        "--mean",
        "0.5,0.5,0.5",
        "--std",
        "0.25",
        "--channel-order",
        "BGR",
        "--report",
        tmp_path / "r.json",
    ]
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["calibration_data"]["samples"] == 6
    # (x/255 - 0.5) / 0.25 spans [-2, 2]: the first layer's input is signed, range within it
    first = report["layers"][0]
    assert (
        first["activation_signed"] is True
        and -2.0 <= first["activation_range"][0] < 0 < first["activation_range"][1] <= 2.0
    )
    result = _cli("transform", model, "-o", tmp_path / "bad.onnx", "--calib", folder)
    assert result.exit_code == 2 and "(resize images with --resize/--center-crop)" in result.output
    assert not (tmp_path / "bad.onnx").exists()


def test_percentile_estimator_and_random_skips_recalibration(tmp_path: Path) -> None:
    model, _, _ = _setup(tmp_path, tm.conv_bn_relu_input3)
    result = _cli(
        "transform",
        model,
        "--calib",
        "random",
        "--recalibrate",
        "--range-estimator",
        "percentile",
        "--percentile",
        "99.9",
        "--report",
        tmp_path / "r.json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["ranges"]["estimator"] == "percentile"
    assert report["recalibration"] == {"skipped": "random calibration data"}
    assert report["calibration_data"]["random"] is True and report["warnings"]


def test_recal_samples_and_memory_options_reach_the_plan(tmp_path: Path) -> None:
    """CLI wiring of --recal-samples / --recal-memory (the planning itself: test_memory.py)."""
    model, calib, _ = _setup(tmp_path, tm.conv_bn_relu_input3, n=24)
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    result = _cli(
        "transform", model, "-o", out, "--calib", calib, "--batch-size", "4",
        "--recal-samples", "10", "--report", rep,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("recalibration:"))
    assert "one batch of 10 samples" in line, line
    batches = json.loads(rep.read_text())["recalibration"]["batches"]
    assert (batches["samples"], batches["batch_size"], batches["available"]) == (10, 10, 24)
    assert batches["memory_mb"] == 4096
    fit_default = batches["fit_in_one_batch"]
    result = _cli(
        "transform", model, "-o", out, "--calib", calib, "--force", "--recal-memory", "1",
        "--report", rep,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    batches = json.loads(rep.read_text())["recalibration"]["batches"]
    assert batches["memory_mb"] == 1 and batches["fit_in_one_batch"] < fit_default
    assert batches["samples"] == batches["batch_size"] == min(24, batches["fit_in_one_batch"])
    result = _cli(
        "transform", model, "-o", tmp_path / "x.onnx", "--calib", calib, "--recal-memory", "0"
    )
    assert result.exit_code == 2 and "--recal-memory" in result.output
    assert not (tmp_path / "x.onnx").exists()


def test_variance_bound_option_reaches_settings_and_is_checked(tmp_path: Path) -> None:
    model, calib, _ = _setup(tmp_path, tm.conv_bn_relu_input3, n=12)
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    result = _cli("transform", model, "-o", out, "--calib", calib, "--variance-bound", "4",
                  "--report", rep)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(rep.read_text())["settings"]["recalibration"]["variance_bound"] == 4.0
    result = _cli("transform", model, "-o", tmp_path / "x.onnx", "--calib", calib,
                  "--variance-bound", "0.5")  # fmt: skip
    assert result.exit_code == 2 and "--variance-bound" in result.output
    assert not (tmp_path / "x.onnx").exists()


def test_few_calibration_samples_warn_when_recalibrating(
    tmp_path: Path, nbsmt_library: str
) -> None:
    import nbsmt_onnx as nb

    model = tm.conv_bn_relu(0)
    x = np.random.default_rng(0).standard_normal((40, 2, 6, 6)).astype(np.float32)
    few = nb.transform(model, {"x": x[:3]}, nb.TransformConfig(num_samples=3))
    assert any("from 3 calibration sample(s)" in w for w in few.report["warnings"])
    plenty = nb.transform(model, {"x": x}, nb.TransformConfig(num_samples=40))
    assert not any("calibration sample(s)" in w for w in plenty.report["warnings"])
    off = nb.transform(
        model,
        {"x": x[:3]},
        nb.TransformConfig(num_samples=3, recalibration=nb.RecalibrationConfig(enabled=False)),
    )
    assert not any("calibration sample(s)" in w for w in off.report["warnings"])
