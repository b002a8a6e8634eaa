"""``transform`` hooks and the pipeline gate on transform, with the library.

- ``ranges=`` / ``TransformResult.ranges``: passing the ranges of an earlier
  transform skips the float calibration pass and builds the same model; ``evaluate``
  runs that pass once for the whole table;
- ``transform --report out.html`` writes the HTML report (rendered in headless
  Chromium with the checks of test_html_render.py), any other suffix JSON;
- ``transform --eval-data ... --max-drop X --min-agreement Y``: the produced model
  is scored on held-out data with ``evaluate``'s metric code (the numbers equal
  those ``evaluate`` reports for the same model), the numbers go into the report,
  and a missed threshold exits with 3 after writing every output.

Data: the Fashion-MNIST ResNet of models/fashion_mnist with real images
(Debian dataset-fashion-mnist, via the project's data script), 64 calibration
images from the training split and 64 test images.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from test_html_render import check_renders

import nbsmt_onnx.api as api
from nbsmt_onnx import RecalibrationConfig, TransformConfig, transform
from nbsmt_onnx.api import evaluate
from nbsmt_onnx.calibration.ranges import ActivationRange
from nbsmt_onnx.cli import main
from nbsmt_onnx.config import EvaluateConfig
from nbsmt_onnx.errors import ConfigError
from nbsmt_onnx.evaluate import EXIT_THRESHOLD

REPO = Path(__file__).resolve().parents[2]
FMNIST = REPO / "models" / "fashion_mnist" / "fmnist_resnet.onnx"
NUM = 64

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _library(nbsmt_library: str) -> str:
    return nbsmt_library


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("fmnist")
    done = subprocess.run(
        [sys.executable, str(REPO / "models" / "fashion_mnist" / "data.py"), "--out", str(out),
         "--num-calib", str(NUM), "--num-eval", str(NUM)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, (
        f"Fashion-MNIST data (apt-get install dataset-fashion-mnist): {done.stderr}"
    )
    return {
        "calib": out / "calib.npz",
        "eval": out / "eval.npz",
        "labels": out / "eval_labels.npy",
    }


def _config(threads: int = 4, recal: bool = True) -> TransformConfig:
    return TransformConfig(
        threads=threads,
        num_samples=NUM,
        batch_size=16,
        recalibration=RecalibrationConfig(enabled=recal),
    )


SMALL = ("--num-samples", NUM)


def _cli(*args: object) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


# --------------------------------------------------------------------------- ranges hook


def test_given_ranges_skip_the_float_pass_and_build_the_same_model(
    fm: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = transform(FMNIST, fm["calib"], _config())
    assert first.report["calibration_data"]["activation_ranges"] == "calibrated"
    layers = first.report["layers"]
    assert set(first.ranges) == {entry["activation"] for entry in layers}
    for entry in layers:
        r = first.ranges[entry["activation"]]
        assert isinstance(r, ActivationRange)
        assert [r.min, r.max] == entry["activation_range"]

    def no_float_pass(*args: object, **kwargs: object) -> None:
        raise AssertionError("collect_ranges ran although ranges were given")

    monkeypatch.setattr(api, "collect_ranges", no_float_pass)
    again = transform(FMNIST, fm["calib"], _config(), ranges=first.ranges)
    assert again.report["calibration_data"]["activation_ranges"] == "given by the caller"
    assert again.sim_model.SerializeToString() == first.sim_model.SerializeToString()
    assert again.report["layers"] == first.report["layers"]

    with pytest.raises(ConfigError, match=r"ranges has no range for 1 activation tensor"):
        missing = dict(first.ranges)
        missing.pop(layers[3]["activation"])
        transform(FMNIST, fm["calib"], _config(), ranges=missing)
    with pytest.raises(ConfigError, match=r"must be an ActivationRange; got tuple"):
        transform(FMNIST, fm["calib"], _config(), ranges={k: (0.0, 1.0) for k in first.ranges})


def test_evaluate_runs_the_float_ranges_pass_once(
    fm: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = api.collect_ranges

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "collect_ranges", counting)
    result = evaluate(
        FMNIST,
        fm["eval"],
        fm["calib"],
        EvaluateConfig(threads=(2, 4), transform=TransformConfig(num_samples=NUM), layer_samples=0),
        labels=fm["labels"],
    )
    assert [r.id for r in result.rows if r.recalibrated and r.available] == [
        "nbsmt-t2-channel-activations-recal",
        "nbsmt-t4-channel-activations-recal",
    ]
    assert len(calls) == 1  # the int8 transform; both recalibrated rows reuse its ranges


# --------------------------------------------------------------------------- HTML report


def test_transform_report_html_and_json(fm: dict[str, Path], tmp_path: Path) -> None:
    html_path = tmp_path / "report.html"
    res = _cli(
        "transform",
        FMNIST,
        "-o",
        tmp_path / "m.onnx",
        "--calib",
        fm["calib"],
        *SMALL,
        "--recalibrate",
        "--report",
        html_path,
    )
    assert res.exit_code == 0, res.output
    page = html_path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "nbsmt-onnx transform report" in page
    assert "the transform ran without an evaluation set" in page
    probe = check_renders(page, tmp_path, "transform-cli")
    assert probe["images"] >= 2  # per-layer statistics and BN shift

    json_path = tmp_path / "report.json"
    res = _cli(
        "transform",
        FMNIST,
        "-o",
        tmp_path / "m2.onnx",
        "--calib",
        fm["calib"],
        *SMALL,
        "--report",
        json_path,
    )
    assert res.exit_code == 0, res.output
    assert json.loads(json_path.read_text())["format"] == "nbsmt-onnx/transform-report"

    # .HTM in upper case is HTML too; an existing report is refused without --force
    htm = tmp_path / "r.HTM"
    htm.write_text("old")
    res = _cli(
        "transform",
        FMNIST,
        "-o",
        tmp_path / "m3.onnx",
        "--calib",
        fm["calib"],
        *SMALL,
        "--report",
        htm,
    )
    assert res.exit_code == 2 and "exists" in res.output and not (tmp_path / "m3.onnx").exists()
    res = _cli(
        "transform",
        FMNIST,
        "-o",
        tmp_path / "m3.onnx",
        "--calib",
        fm["calib"],
        *SMALL,
        "--report",
        htm,
        "--force",
    )
    assert res.exit_code == 0, res.output
    assert htm.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


# --------------------------------------------------------------------------- pipeline gate


def _gate_args(fm: dict[str, Path], out: Path, *extra: object) -> list[object]:
    return [
        "transform", FMNIST, "-o", out, "--calib", fm["calib"], "--num-samples", NUM,
        "--threads", "4", "--recalibrate", "--eval-data", fm["eval"], *extra,
    ]  # fmt: skip


def test_gate_numbers_are_evaluates_and_pass_exits_0(fm: dict[str, Path], tmp_path: Path) -> None:
    report_path = tmp_path / "r.json"
    res = CliRunner().invoke(
        main,
        [str(a) for a in _gate_args(
            fm, tmp_path / "m.onnx", "--eval-labels", fm["labels"], "--max-drop", "100",
            "--min-agreement", "0", "--report", report_path,
        )],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "NB-SMT T=4 +recal" in res.output and "gate: passed (2 check(s))" in res.output
    ev = json.loads(report_path.read_text())["evaluation"]
    assert [r["id"] for r in ev["rows"]] == ["float32", "nbsmt-t4-channel-activations-recal"]
    assert ev["gate"]["passed"] and ev["gate"]["exit_code"] == 0
    assert ev["eval_data"]["samples"] == NUM
    produced = ev["rows"][1]
    assert produced["recalibrated"] and produced["recalibration"]["strategy"]

    # The same numbers as `evaluate` gives for the same (deterministically built) model.
    reference = evaluate(
        FMNIST,
        fm["eval"],
        fm["calib"],
        EvaluateConfig(
            rows=("float32", "nbsmt+recal"),
            threads=(4,),
            transform=TransformConfig(num_samples=NUM),
        ),
        labels=fm["labels"],
    ).to_dict()
    for got, want in zip(ev["rows"], reference["rows"], strict=True):
        assert got["id"] == want["id"]
        assert got["metrics"] == want["metrics"]
        # the same per-sample values, the same seeded bootstrap: identical intervals
        assert got["intervals"] == want["intervals"]
        assert got["difference"] == want["difference"]
        assert got["samples"] == want["samples"] == NUM
        assert [(e["node"], e["sqnr_vs_int8_db"]) for e in got["layers"]] == [
            (e["node"], e["sqnr_vs_int8_db"]) for e in want["layers"]
        ]
    top1 = ev["rows"][0]["metrics"]["top1"]
    checks = {c["check"]: c for c in ev["gate"]["checks"]}
    assert checks["max_drop"]["value"] == pytest.approx(
        100 * (top1 - produced["metrics"]["top1"]), abs=1e-9
    )
    assert checks["min_agreement"]["value"] == produced["metrics"]["agreement"]


def test_missed_gate_exits_3_and_writes_every_output(fm: dict[str, Path], tmp_path: Path) -> None:
    out, report_path = tmp_path / "m.onnx", tmp_path / "r.html"
    # Agreement 1.0 at T=4 would mean NB-SMT changed no decision (measured: 0.94 here).
    res = _cli(*_gate_args(fm, out, "--export", "both", "--min-agreement", "1.0",
                           "--report", report_path))  # fmt: skip
    assert res.exit_code == EXIT_THRESHOLD == 3, res.output
    assert "gate: FAILED nbsmt-t4-channel-activations-recal" in res.output
    assert out.is_file() and (tmp_path / "m.qdq.onnx").is_file() and report_path.is_file()
    page = report_path.read_text(encoding="utf-8")
    assert "Thresholds missed (exit code 3)" in page and "Pipeline gate" in page
    assert "Not available" not in page.split("<h2>Pipeline gate</h2>")[0]
    check_renders(page, tmp_path, "transform-gate")


def test_reference_int8_and_api(fm: dict[str, Path]) -> None:
    result = transform(
        FMNIST,
        fm["calib"],
        _config(threads=2, recal=False),
        eval_data=fm["eval"],
        eval_labels=fm["labels"],
        eval_config=EvaluateConfig(reference="int8", max_drop=0.0, layer_samples=16),
    )
    assert result.evaluation is not None
    rows = {r.id: r for r in result.evaluation.rows}
    assert list(rows) == ["float32", "int8", "nbsmt-t2-channel-activations"]
    (check,) = result.evaluation.gate.checks
    int8_top1, t2_top1 = (
        rows["int8"].metrics["top1"],
        rows["nbsmt-t2-channel-activations"].metrics["top1"],
    )
    assert int8_top1 is not None and t2_top1 is not None
    assert check.row == "nbsmt-t2-channel-activations" and check.value == pytest.approx(
        100 * (int8_top1 - t2_top1), abs=1e-9
    )
    assert result.passed == (check.value <= 0.0)
    assert result.exit_code == (0 if result.passed else 3)
    # per-layer SQNR vs int8 of the produced row, on the first 16 samples
    layers = rows["nbsmt-t2-channel-activations"].layers
    assert len(layers) == 16 and all(e["sqnr_samples"] == 16 for e in layers)
    settings = result.report["evaluation"]["settings"]
    assert settings["reference"] == "int8" and settings["rows"] == ["float32", "int8", "nbsmt"]
    assert not {"transform", "threads", "mappings", "reduces"} & set(settings)  # unused here

    # threads=1: the produced model is the int8 row itself
    t1 = transform(
        FMNIST, fm["calib"], _config(threads=1, recal=False), eval_data=fm["eval"],
        eval_config=EvaluateConfig(reference="int8", max_drop=0.0),
    )  # fmt: skip
    assert t1.evaluation is not None
    assert [r.id for r in t1.evaluation.rows] == ["float32", "int8"]
    assert t1.passed and t1.evaluation.gate.checks[0].value == 0.0


def test_pessimistic_gate_bound_on_transform(fm: dict[str, Path], tmp_path: Path) -> None:
    """``--gate-bound pessimistic``: the same semantics as ``evaluate``'s gate.

    A --min-agreement between the agreement's Wilson lower bound and its point
    estimate passes on the point estimate and fails on the pessimistic bound.
    """
    args = _gate_args(fm, tmp_path / "m.onnx", "--no-recalibrate", "--eval-labels", fm["labels"])
    report_path = tmp_path / "r.json"
    res = _cli(*args, "--report", report_path, "--force")
    assert res.exit_code == 0, res.output
    row = json.loads(report_path.read_text())["evaluation"]["rows"][1]
    agree, lo = row["metrics"]["agreement"], row["intervals"]["agreement"]["lo"]
    assert lo < agree, "64 samples cannot pin the agreement down to a point"
    threshold = f"{(agree + lo) / 2:.6f}"
    res = _cli(*args, "--min-agreement", threshold, "--force")
    assert res.exit_code == 0 and "gate: passed (1 check(s))" in res.output, res.output
    res = _cli(*args, "--min-agreement", threshold, "--gate-bound", "pessimistic", "--force")
    assert res.exit_code == EXIT_THRESHOLD, res.output
    assert "95% lower bound" in res.output and "gate: FAILED" in res.output
    # the bound needs an evaluation set like the thresholds
    res = _cli("transform", FMNIST, "-o", tmp_path / "x.onnx", "--calib", fm["calib"],
               "--gate-bound", "pessimistic")  # fmt: skip
    assert res.exit_code == 2 and "--gate-bound need(s) held-out data" in res.output

    # API, reference int8: the drop's bound is the paired interval vs the int8 row
    result = transform(
        FMNIST, fm["calib"], _config(threads=4, recal=False), eval_data=fm["eval"],
        eval_labels=fm["labels"],
        eval_config=EvaluateConfig(reference="int8", max_drop=100.0, gate_bound="pessimistic",
                                   layer_samples=0),
    )  # fmt: skip
    assert result.evaluation is not None
    produced = result.evaluation.row("nbsmt-t4-channel-activations")
    diff = produced.difference["top1"]
    assert produced.reference == "int8" and diff is not None
    (check,) = result.evaluation.gate.checks
    assert check.bound == "pessimistic" and check.passed
    assert check.value == pytest.approx(-100.0 * diff.interval.lo, abs=1e-12)
    assert check.estimate == pytest.approx(-100.0 * diff.estimate, abs=1e-9)


def test_gate_user_errors_leave_nothing(fm: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    res = _cli("transform", FMNIST, "-o", out, "--calib", fm["calib"], "--max-drop", "1",
               "--eval-labels", fm["labels"])  # fmt: skip
    assert res.exit_code == 2
    assert "--eval-labels, --max-drop need(s) held-out data: add --eval-data DATA" in res.output
    res = _cli("transform", FMNIST, "-o", out, "--calib", fm["calib"], "--eval-data", fm["calib"])
    assert res.exit_code == 2 and "overlap" in res.output
    bad_labels = tmp_path / "labels.npy"
    np.save(bad_labels, np.zeros(3, dtype=np.int64))
    res = _cli(*_gate_args(fm, out, "--eval-labels", bad_labels))
    assert res.exit_code == 2 and "label" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.npy"]
    with pytest.raises(ConfigError, match="need held-out evaluation data"):
        transform(FMNIST, fm["calib"], _config(), eval_config=EvaluateConfig(max_drop=1.0))


def test_report_json_of_gate_is_strict(fm: dict[str, Path], tmp_path: Path) -> None:
    """The transform report with an evaluation stays strict JSON (no Infinity/NaN)."""
    report_path = tmp_path / "r.json"
    res = _cli(*_gate_args(fm, tmp_path / "m.onnx", "--threads", "1", "--no-recalibrate",
                           "--report", report_path))  # fmt: skip
    assert res.exit_code == 0, res.output

    def strict(token: str) -> None:
        raise ValueError(f"non-standard JSON number {token}")

    report = json.loads(report_path.read_text(), parse_constant=strict)
    assert report["evaluation"]["format"] == "nbsmt-onnx/evaluation"
    assert onnx.load(tmp_path / "m.onnx").graph.node
