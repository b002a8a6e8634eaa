"""HTML report: sections present or marked "not available", self-contained, escaped."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest

from nbsmt_onnx.errors import ConfigError, OutputError
from nbsmt_onnx.html_report import render_html, write_html

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = ["/conv1/Conv", "/layer1/conv1/Conv", "/fc/Gemm"]


def _layers(threads: int, sqnr: list[float | str | None]) -> list[dict[str, Any]]:
    return [
        {
            "node": name,
            "op_type": "NbSmtConv",
            "nbsmt": {
                "mac_utilization": 0.3 + 0.1 * i,
                "collision_rate": 0.0 if threads == 1 else 0.1 * i,
                "squeezed_operand_fraction": 0.0 if threads == 1 else 0.05 * i,
            },
            "sqnr_vs_int8_db": sqnr[i],
            "sqnr_samples": 16,
        }
        for i, name in enumerate(LAYERS)
    ]


def _recal() -> dict[str, Any]:
    bn = [
        {
            "name": f"/bn{i}/BatchNormalization",
            "level": i,
            "mean_shift": 0.02 * (i + 1),
            "std_ratio": 1.0 + 0.01 * i,
            "old": {"mean": 0.1, "std": 1.0},
            "new": {"mean": 0.12, "std": 1.01},
            "measured": {"mean": 0.1, "std": 1.0},
            "clean": {"mean": 0.09, "std": 1.0},
        }
        for i in range(3)
    ]
    return {
        "strategy": "relative",
        "passes": 3,
        "model_runs": 4,
        "batchnorms": bn,
        "skipped": [],
        "correction": {
            "variant": "mean+var",
            "passes": 1,
            "model_runs": 2,
            "layers": [
                {
                    "name": "/fc/Gemm",
                    "level": 0,
                    "mean_shift": 0.1,
                    "std_ratio": 1.1,
                    "measured": {"mean": 0.0, "std": 1.0},
                    "clean": {"mean": 0.0, "std": 1.0},
                }
            ],
        },
    }


def _row(row_id: str, name: str, kind: str, threads: int | None, **extra: Any) -> dict[str, Any]:
    row = {
        "id": row_id,
        "name": name,
        "kind": kind,
        "threads": threads,
        "mapping": None if threads is None else "channel",
        "reduce": None if threads is None else "activations",
        "recalibrated": kind.endswith("+recal"),
        "available": True,
        "note": None,
        "metrics": {
            "top1": 0.9,
            "top5": 0.99,
            "agreement": None if threads is None else 0.95,
            "kl": None if threads is None else 0.02,
            "cosine": None if threads is None else 0.99,
            "sqnr_db": None if threads is None else 21.0,
        },
        "samples": 16,
        "prepare_s": 1.0,
        "inference_s": 0.5,
        "wall_s": 1.5,
        "layers": [],
    }
    row.update(extra)
    return row


def evaluation_dict() -> dict[str, Any]:
    return {
        "format": "nbsmt-onnx/evaluation",
        "format_version": 1,
        "tool_version": "0.1.0",
        "model": "m.onnx",
        "output": "logits",
        "output_kind": "logits",
        "classification": True,
        "labels": "labels.npy",
        "eval_data": {"source": "eval.npz", "samples": 16, "seed": 0, "batch_size": 8},
        "calib_data": {"source": "calib.npz", "samples": 8, "seed": 0, "batch_size": 8},
        "duplicates_with_calibration": 0,
        "rows": [
            _row("float32", "float32", "float32", None),
            _row("int8", "int8 (T=1)", "int8", 1, layers=_layers(1, [None] * 3)),
            _row("t2", "NB-SMT T=2", "nbsmt", 2, layers=_layers(2, ["inf", 25.0, 18.0])),
            _row(
                "t2r",
                "NB-SMT T=2 +recal",
                "nbsmt+recal",
                2,
                layers=_layers(2, ["inf", 26.0, 20.0]),
                recalibration=_recal(),
            ),
        ],
        "gate": {
            "passed": False,
            "exit_code": 3,
            "checks": [
                {
                    "row": "t2r",
                    "check": "max_drop",
                    "value": 1.2,
                    "threshold": 1.0,
                    "passed": False,
                    "reason": "top-1 accuracy drop vs float32 is 1.20 points (> 1)",
                }
            ],
        },
        "warnings": ["calibration with <b>care</b>"],
        "wall_time_s": 3.0,
        "transform": {},
    }


def _images(page: str) -> list[bytes]:
    return [
        base64.b64decode(m)
        for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    ]


def assert_self_contained(page: str) -> None:
    """Every src/href is a data: URI or a fragment; no url(...) in CSS; no scripts."""
    for attr in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page):
        assert attr.startswith(("data:", "#")), attr
    assert "url(" not in page
    assert "<script" not in page.lower()
    assert "@import" not in page


def test_evaluation_page_has_every_section() -> None:
    page = render_html(evaluation_dict())
    assert page.startswith("<!DOCTYPE html>")
    assert_self_contained(page)
    for text in (
        "NB-SMT T=2 +recal",
        "90.00%",  # top-1 cell
        "Per-layer NB-SMT statistics",
        "Per-layer output SQNR vs int8",
        "BatchNorm statistics before / after recalibration",
        "/bn2/BatchNormalization",
        "Fused-layer correction",
        "Thresholds missed (exit code 3)",
    ):
        assert text in page, text
    assert "Not available" not in page
    images = _images(page)
    # accuracy bars, layer statistics, SQNR, BN shift, fused correction
    assert len(images) == 5
    assert all(img.startswith(PNG_MAGIC) and len(img) > 2000 for img in images)


def test_missing_data_is_marked_not_available() -> None:
    result = evaluation_dict()
    result["rows"] = result["rows"][:3]  # no recalibrated row
    for row in result["rows"]:
        for layer in row["layers"]:
            layer["sqnr_vs_int8_db"] = None
    page = render_html(result)
    assert page.count("Not available") == 2
    assert "no per-layer SQNR" in page and "no recalibrated rows" in page


def test_unavailable_rows_are_listed() -> None:
    result = evaluation_dict()
    result["rows"][3].update(available=False, note="recalibration unavailable", layers=[])
    page = render_html(result)
    assert "unavailable: recalibration unavailable" in page


def test_text_is_escaped() -> None:
    result = evaluation_dict()
    result["rows"][2]["name"] = "<script>alert(1)</script>"
    page = render_html(result)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "&lt;b&gt;care&lt;/b&gt;" in page


def transform_dict() -> dict[str, Any]:
    layers = [
        {
            "node": name,
            "op_type": "NbSmtConv",
            "source_op_type": "Conv",
            "activation": "x",
            "activation_scale": 0.01,
            "activation_signed": False,
            "activation_range": [0.0, 2.55],
            "weight_shape": [4, 1, 3, 3],
            "reduction_length": 9,
            "weight_origin": "initializer",
            "weight_shared": False,
            "nbsmt": {
                "mac_utilization": 0.4,
                "collision_rate": 0.1,
                "squeezed_operand_fraction": 0.05,
            },
        }
        for name in LAYERS
    ]
    return {
        "format": "nbsmt-onnx/transform-report",
        "format_version": 1,
        "tool_version": "0.1.0",
        "source_model": "m.onnx",
        "settings": {"threads": 2, "mapping": "channel", "reduce": "activations"},
        "calibration_data": {"source": "calib.npz", "samples": 8, "seed": 0},
        "summary": {"rewritten": 3, "skipped": 1, "nbsmt": layers[0]["nbsmt"]},
        "layers": layers,
        "skipped": [{"node": "mm", "op_type": "MatMul", "reason": "dynamic weights"}],
        "warnings": [],
        "recalibration": _recal(),
    }


def test_transform_page() -> None:
    page = render_html(transform_dict())
    assert_self_contained(page)
    assert "Calibration batches" not in page  # no plan in the report: no line
    report = transform_dict()
    report["recalibration"]["batches"] = {"note": "one batch of 8 samples <&>"}
    assert "Calibration batches: transform: one batch of 8 samples &lt;&amp;&gt;." in render_html(
        report
    )
    assert "nbsmt-onnx transform report" in page and "dynamic weights" in page
    # accuracy and per-layer SQNR are not in a transform report
    assert page.count("Not available") == 2
    assert len(_images(page)) == 3  # layer statistics, BN shift, fused correction


def test_transform_page_with_evaluation_shows_table_and_gate() -> None:
    """``transform --eval-data``: the report's ``evaluation`` fills the accuracy section."""
    report = transform_dict()
    evaluation = evaluation_dict()
    evaluation.pop("transform", None)
    evaluation["rows"] = [evaluation["rows"][0], evaluation["rows"][3]]
    evaluation["gate"] = {
        "passed": False,
        "exit_code": 3,
        "checks": [
            {
                "row": evaluation["rows"][1]["id"],
                "check": "min_agreement",
                "value": 0.9,
                "threshold": 0.95,
                "passed": False,
                "reason": "top-1 agreement with float32 is 0.9000 (< 0.95)",
            }
        ],
    }
    report["evaluation"] = evaluation
    page = render_html(report)
    assert_self_contained(page)
    assert "the transform ran without an evaluation set" not in page
    assert "Thresholds missed (exit code 3)" in page and "(&lt; 0.95)" in page
    assert evaluation["rows"][1]["name"] in page
    assert page.count("Not available") == 1  # only the per-layer SQNR plot
    without = render_html(transform_dict())
    assert "the transform ran without an evaluation set" in without


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot render a report of format"):
        render_html({"format": "something"})


def test_write_html_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    write_html(transform_dict(), out)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    with pytest.raises(OutputError, match="exists"):
        write_html(transform_dict(), out)
    write_html(transform_dict(), out, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temp files left


@pytest.mark.parametrize("std_ratio", [1.0, 1.3])
def test_shift_plot_lists_layers_top_down_and_drops_an_empty_std_panel(
    monkeypatch: pytest.MonkeyPatch, std_ratio: float
) -> None:
    """First BatchNorm at the top (as in the per-layer charts); no empty std panel."""
    from nbsmt_onnx import html_report

    figures: list[Any] = []
    monkeypatch.setattr(html_report, "_png", lambda fig, alt: figures.append(fig) or "")
    names = ["bn_first", "bn_middle", "bn_last"]
    series = {"T=2": ([0.1, 0.2, 0.3], [std_ratio] * 3), "T=4": ([0.2, 0.3, 0.4], [None] * 3)}
    html_report._shift_plot(names, series)
    (fig,) = figures
    axes = [ax for ax in fig.axes if ax.get_yticklabels()]
    assert len(fig.axes) == (2 if std_ratio != 1.0 else 1)
    ax = axes[0]
    assert ax.yaxis_inverted(), "the first layer must be drawn at the top"
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == names
