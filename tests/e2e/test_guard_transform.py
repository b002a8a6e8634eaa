"""The recalibration guard inside ``transform``: reject-all gives the --no-recalibrate model.

The decision logic is tested on synthetic models in tests/unit/test_guard.py;
here the plumbing: what is written when the guard keeps nothing, what the
report and the CLI say, ``--no-guard`` and ``--guard-data``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import transform_models as tm
from click.testing import CliRunner

from nbsmt_onnx import TransformConfig, transform
from nbsmt_onnx.calibration import guard as guard_mod
from nbsmt_onnx.cli import main
from nbsmt_onnx.config import RecalibrationConfig
from nbsmt_onnx.html_report import render_html


@pytest.fixture(autouse=True)
def _library(nbsmt_library: str) -> str:
    return nbsmt_library


def _setup(tmp_path: Path, n: int = 64) -> tuple[Path, Path]:
    model = tmp_path / "model.onnx"
    onnx.save(tm.conv_bn_relu(), model)
    x = np.random.default_rng(0).standard_normal((n, 2, 6, 6)).astype(np.float32)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x)
    return model, calib


def _initializers(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: t.SerializeToString() for t in model.graph.initializer}


def test_reject_all_equals_the_no_recalibrate_model(tmp_path, monkeypatch):
    model, calib = _setup(tmp_path)
    plain = transform(
        model, calib, TransformConfig(threads=4, recalibration=RecalibrationConfig(enabled=False))
    )
    monkeypatch.setattr(guard_mod.Comparison, "helps", lambda self, margin: False)
    guarded = transform(model, calib, TransformConfig(threads=4))
    guard = guarded.report["recalibration"]["guard"]
    assert (
        guard["decision"] == "none"
        and guard["kept"] == []
        and guard["rejected"] == ["bn1", "conv2"]
    )
    assert _initializers(guarded.sim_model) == _initializers(plain.sim_model)
    assert [n.SerializeToString() for n in guarded.sim_model.graph.node] == [
        n.SerializeToString() for n in plain.sim_model.graph.node
    ]
    assert guarded.report["recalibration"]["fold"]["folded"] == []


def test_vetoed_prefixes_are_reported(tmp_path, monkeypatch):
    model, calib = _setup(tmp_path)
    monkeypatch.setattr(guard_mod.Comparison, "helps", lambda self, margin: True)
    monkeypatch.setattr(guard_mod.Comparison, "hurts", lambda self, margin: True)
    vetoed = transform(model, calib, TransformConfig(threads=4))
    guard = vetoed.report["recalibration"]["guard"]
    assert guard["decision"] == "none"
    assert all(b["vetoed_by"] == ["rel-error"] for b in guard["blocks"])
    assert "every improvement made rel-error worse" in guard["summary"]
    page = render_html(vetoed.report)
    assert "vetoed: rel-error" in page and "checks: change (SE)" in page


def test_accepting_guard_keeps_and_folds_everything(tmp_path, monkeypatch):
    model, calib = _setup(tmp_path)
    monkeypatch.setattr(guard_mod.Comparison, "helps", lambda self, margin: True)
    monkeypatch.setattr(guard_mod.Comparison, "hurts", lambda self, margin: False)
    kept = transform(model, calib, TransformConfig(threads=4))
    guard = kept.report["recalibration"]["guard"]
    assert guard["decision"] == "all" and guard["kept"] == ["bn1", "conv2"]
    assert guard["samples"] == 16  # a quarter of 64
    # the conv output is a feature map: cosine, with the relative error as the check
    assert guard["metric"] == "1-cosine" and guard["checks"] == ["rel-error"]
    assert all(set(b["checks"]) == {"rel-error"} for b in guard["blocks"])
    assert set(guard["chosen_checks"]) == {"rel-error"}
    assert "rel-error" in guard["summary"]
    # the BN was folded: no BatchNormalization left, the NbSmt op's scale changed
    assert not [n for n in kept.sim_model.graph.node if n.op_type == "BatchNormalization"]


def test_cli_no_guard_and_guard_data(tmp_path):
    model, calib = _setup(tmp_path)
    guard_data = tmp_path / "guard.npz"
    np.savez(
        guard_data, x=np.random.default_rng(5).standard_normal((24, 2, 6, 6)).astype(np.float32)
    )
    runner = CliRunner()
    out = runner.invoke(
        main,
        ["transform", str(model), "--calib", str(calib), "-o", str(tmp_path / "a.onnx"),
         "--report", str(tmp_path / "a.json"), "--no-guard", "--threads", "2"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["recalibration"]["guard"]["decision"] == "off"
    assert "recalibration guard: off" in out.output
    out = runner.invoke(
        main,
        ["transform", str(model), "--calib", str(calib), "-o", str(tmp_path / "b.onnx"),
         "--report", str(tmp_path / "b.json"), "--guard-data", str(guard_data), "--threads", "2"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    guard = json.loads((tmp_path / "b.json").read_text())["recalibration"]["guard"]
    assert guard["samples"] == 24 and "guard.npz" in guard["data"]
    assert guard["decision"] in ("all", "partial", "none")
    assert "recalibration guard:" in out.output and "held-out" in out.output


def test_too_few_samples_to_hold_out_is_said(tmp_path):
    model, calib = _setup(tmp_path, n=12)  # a quarter is 3 < 8 held-out samples
    result = transform(model, calib, TransformConfig(threads=2))
    guard = result.report["recalibration"]["guard"]
    assert guard["decision"] == "off" and "too few" in guard["reason"]


def _scripted_guard(monkeypatch, keeps: list[bool]) -> list[int]:
    """Make the n-th guard call keep everything (True) or nothing (False); returns the calls."""
    calls: list[int] = []
    real = guard_mod.guard

    def scripted(*args, **kwargs):
        keep = keeps[len(calls)]
        calls.append(len(calls))
        with monkeypatch.context() as m:
            m.setattr(guard_mod.Comparison, "helps", lambda self, margin: keep)
            m.setattr(guard_mod.Comparison, "hurts", lambda self, margin: False)
            return real(*args, **kwargs)

    monkeypatch.setattr(guard_mod, "guard", scripted)
    return calls


def test_guard_retries_with_shrinkage_when_nothing_is_kept(tmp_path, monkeypatch):
    model, calib = _setup(tmp_path)
    calls = _scripted_guard(monkeypatch, [False, True])
    result = transform(model, calib, TransformConfig(threads=4))
    recal = result.report["recalibration"]
    assert calls == [0, 1]
    assert recal["guard"]["decision"] == "all"
    assert recal["guard_first_try"]["shrink"] == 0.0
    assert recal["guard_retry"] == {
        "shrink": 2.0,
        "kept": True,
        "summary": recal["guard"]["summary"],
    }
    # the kept corrections are the shrunk ones: their report carries shrinkage factors
    assert all("shrink_factor_mean" in b for b in recal["batchnorms"])


def test_no_retry_when_turned_off_or_when_the_first_try_keeps_something(tmp_path, monkeypatch):
    model, calib = _setup(tmp_path)
    calls = _scripted_guard(monkeypatch, [False, True])
    off = RecalibrationConfig(guard_retry_shrink=0.0)
    result = transform(model, calib, TransformConfig(threads=4, recalibration=off))
    assert calls == [0] and "guard_retry" not in result.report["recalibration"]
    assert result.report["recalibration"]["guard"]["decision"] == "none"
    calls = _scripted_guard(monkeypatch, [True, True])
    kept = transform(model, calib, TransformConfig(threads=4))
    assert calls == [0] and kept.report["recalibration"]["guard"]["decision"] == "all"
    assert not any("shrink_factor_mean" in b for b in kept.report["recalibration"]["batchnorms"])


def test_cli_says_when_the_kept_corrections_come_from_the_retry(tmp_path, monkeypatch):
    model, calib = _setup(tmp_path)
    _scripted_guard(monkeypatch, [False, True])
    out = CliRunner().invoke(
        main,
        ["transform", str(model), "--calib", str(calib), "-o", str(tmp_path / "a.onnx"),
         "--threads", "4", "--guard-retry-shrink", "3"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    line = next(x for x in out.output.splitlines() if x.startswith("recalibration guard:"))
    assert "kept all 2 correction(s)" in line
    assert line.endswith("[estimated with --shrink 3 after the unshrunk corrections kept nothing]")
