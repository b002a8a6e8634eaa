"""``evaluate`` without the library: configuration, rows, overlap refusal, gate, output formats."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from nbsmt_onnx.cli import main
from nbsmt_onnx.errors import ConfigError, DataError
from nbsmt_onnx.evaluate import (
    EXIT_OK,
    EXIT_THRESHOLD,
    EvaluateConfig,
    EvaluationResult,
    EvaluationRow,
    GateResult,
    _gate,
    _sample_digests,
    check_disjoint_paths,
    plan_rows,
    with_nbsmt_settings,
)
from nbsmt_onnx.metrics import paired_proportion_difference, wilson_interval
from nbsmt_onnx.ops import schema


def _row(
    row_id: str,
    kind: str,
    *,
    top1: float | None = None,
    agreement: float | None = None,
    available: bool = True,
    threads: int | None = 2,
) -> EvaluationRow:
    return EvaluationRow(
        id=row_id,
        name=row_id,
        kind=kind,
        threads=None if kind == "float32" else (1 if kind.startswith("int8") else threads),
        mapping=None if kind == "float32" else "channel",
        reduce=None if kind == "float32" else "activations",
        recalibrated=kind.endswith("+recal"),
        available=available,
        note=None if available else "not computed",
        metrics={
            "top1": top1,
            "top5": None,
            "agreement": agreement,
            "kl": 0.01 if agreement is not None else None,
            "cosine": 0.99 if agreement is not None else None,
            "sqnr_db": math.inf if kind == "int8" else (20.0 if agreement is not None else None),
        },
        samples=10,
        prepare_s=1.0,
        inference_s=0.5,
    )


ROWS = (
    _row("float32", "float32", top1=0.90),
    _row("int8", "int8", top1=0.895, agreement=0.99),
    _row("t2", "nbsmt", top1=0.85, agreement=0.90),
    _row("t2r", "nbsmt+recal", top1=0.888, agreement=0.97),
)


def _hits(n: int, correct: int, offset: int = 0) -> np.ndarray:
    v = np.zeros(n, dtype=bool)
    v[offset : offset + correct] = True
    return v


def _with_uncertainty(
    row: EvaluationRow, ref: np.ndarray, hits: np.ndarray, agree: np.ndarray
) -> EvaluationRow:
    """``row`` with the real intervals of per-sample top-1 hits / agreement flags (n = len)."""
    from dataclasses import replace

    n = hits.size
    return replace(
        row,
        metrics={**row.metrics, "top1": hits.mean(), "agreement": agree.mean()},
        intervals={
            "top1": wilson_interval(int(hits.sum()), n),
            "agreement": wilson_interval(int(agree.sum()), n),
        },
        reference="float32",
        difference={
            "top1": paired_proportion_difference(hits, ref),
            "agreement": paired_proportion_difference(agree, np.ones(n, dtype=bool)),
        },
        samples=n,
    )


# 500 samples: float32 right on 450 (90.0 %); the recalibrated row right on 447 (89.4 %),
# 10 samples it gets right and float32 wrong, 13 the other way round; it agrees with
# float32 on 485 (97.0 %).
N_PAIRED = 500
FLOAT_HITS = _hits(N_PAIRED, 450)
ROW_HITS = np.concatenate([_hits(450, 437), _hits(50, 10)])
ROW_AGREE = _hits(N_PAIRED, 485)
PAIRED_ROWS = (
    _row("float32", "float32", top1=0.90),
    _with_uncertainty(_row("t2r", "nbsmt+recal", top1=0.0), FLOAT_HITS, ROW_HITS, ROW_AGREE),
)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threads": (3,)}, "threads must contain only"),
        ({"threads": (2, 2)}, "lists a value twice"),
        ({"mappings": ("rows",)}, "mappings must contain only"),
        ({"rows": ("int8", "nbsmt")}, "must include 'float32'"),
        ({"rows": ("float32", "nbsmt"), "reference": "int8"}, "reference 'int8' is not among"),
        ({"rows": ("float32", "nbsmt"), "gate_rows": ("nbsmt+recal",)}, "not among the rows"),
        ({"min_agreement": 95}, "fraction in"),
        ({"max_drop": -1.0}, "max_drop must be"),
        ({"eval_samples": 0}, "positive integer"),
        ({"output_kind": "softmax"}, "output_kind must be one of"),
        ({"threads": ()}, "must not be empty"),
        ({"gate_bound": "upper"}, "gate_bound must be one of"),
        ({"bootstrap_resamples": 10}, "bootstrap_resamples must be"),
        ({"bootstrap_seed": -1}, "bootstrap_seed must be"),
    ],
)
def test_config_rejects(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        EvaluateConfig(**kwargs)


def test_config_is_frozen_and_rejects_unknown_options() -> None:
    cfg = EvaluateConfig()
    with pytest.raises(AttributeError):
        cfg.threads = (4,)  # type: ignore[misc]
    with pytest.raises(TypeError):
        EvaluateConfig(thread=(2,))  # type: ignore[call-arg]


def test_default_rows_and_gate_kinds() -> None:
    cfg = EvaluateConfig()
    assert [r.id for r in plan_rows(cfg)] == [
        "float32",
        "int8",
        "nbsmt-t2-channel-activations",
        "nbsmt-t2-channel-activations-recal",
        "nbsmt-t4-channel-activations",
        "nbsmt-t4-channel-activations-recal",
    ]
    assert cfg.gated_kinds == ("nbsmt+recal",)
    assert EvaluateConfig(rows=("float32", "nbsmt")).gated_kinds == ("nbsmt",)


def test_sweep_grid_order_and_names() -> None:
    cfg = EvaluateConfig(
        rows=("float32", "nbsmt"),
        threads=(4, 2),
        mappings=("channel", "interleave"),
        reduces=("weights",),
    )
    specs = plan_rows(cfg)
    assert [(s.threads, s.mapping, s.reduce) for s in specs[1:]] == [
        (4, "channel", "weights"),
        (4, "interleave", "weights"),
        (2, "channel", "weights"),
        (2, "interleave", "weights"),
    ]
    swept = {"mapping": True, "reduce": False}
    assert specs[2].name(swept) == "NB-SMT T=4 interleave"


# --------------------------------------------------------------------------- overlap


def test_same_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "d.npz"
    f.write_bytes(b"")
    with pytest.raises(DataError, match="overlap"):
        check_disjoint_paths(f, tmp_path / "." / "d.npz")


def test_nested_folders_are_refused(tmp_path: Path) -> None:
    (tmp_path / "calib").mkdir()
    with pytest.raises(DataError, match="overlap"):
        check_disjoint_paths(tmp_path, tmp_path / "calib")
    with pytest.raises(DataError, match="overlap"):
        check_disjoint_paths(tmp_path / "calib" / "x.npz", tmp_path / "calib")


def test_distinct_paths_and_non_paths_pass(tmp_path: Path) -> None:
    check_disjoint_paths(tmp_path / "a.npz", tmp_path / "b.npz")
    check_disjoint_paths(tmp_path / "a.npz", "random")
    check_disjoint_paths({"x": np.zeros(1)}, tmp_path / "a.npz")


def test_cli_refuses_overlapping_data_before_any_work(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read")
    data = tmp_path / "d.npz"
    data.write_bytes(b"not read either")
    res = CliRunner().invoke(
        main, ["evaluate", str(model), "--data", str(data), "--calib", str(data)]
    )
    assert res.exit_code == 2
    assert "overlap" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_cli_needs_calib(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["evaluate", "m.onnx", "--data", "d.npz"])
    assert res.exit_code == 2
    assert "--calib" in res.output


def test_cli_rejects_bad_lists() -> None:
    res = CliRunner().invoke(
        main, ["evaluate", "m.onnx", "--data", "d", "--calib", "c", "--threads", "2,x"]
    )
    assert res.exit_code == 2
    assert "Invalid value for '--threads'" in res.output
    res = CliRunner().invoke(
        main, ["evaluate", "m.onnx", "--data", "d", "--calib", "c", "--threads", "2,3"]
    )
    assert res.exit_code == 2
    assert "3 not among 1, 2, 4" in res.output
    res = CliRunner().invoke(
        main, ["evaluate", "m.onnx", "--data", "d", "--calib", "c", "--rows", "float32,int9"]
    )
    assert res.exit_code == 2
    assert "'--rows'" in res.output and "int9" in res.output


def test_help_is_in_sections_with_examples() -> None:
    for command in ("transform", "evaluate", "inspect", "search"):
        res = CliRunner().invoke(main, [command, "--help"])
        assert res.exit_code == 0, res.output
        assert "Example" in res.output, command
        assert "Other options" not in res.output, f"{command}: an option has no help section"
    res = CliRunner().invoke(main, ["transform", "--help"])
    sections = [line for line in res.output.splitlines() if line.endswith(":") and not line[0].isspace()]
    assert sections[:3] == ["Inputs and outputs:", "NB-SMT:", "Calibration:"], sections
    assert "[required] Calibration data" in res.output


def test_image_options_are_click_types() -> None:
    for args, flag in (
        (["--resize", "2x3x4"], "--resize"),
        (["--center-crop", "a"], "--center-crop"),
        (["--mean", "0.1,0.2"], "--mean"),
        (["--std", "x"], "--std"),
    ):
        res = CliRunner().invoke(main, ["transform", "m.onnx", "--calib", "c", *args])
        assert res.exit_code == 2
        assert f"Invalid value for '{flag}'" in res.output, res.output


def test_sample_digests_detect_equal_samples() -> None:
    from nbsmt_onnx.calibration.data import InputSpec

    specs = (InputSpec("x", np.dtype(np.float32), (None, 2)),)
    a = {"x": np.array([[1, 2], [3, 4], [1, 2]], dtype=np.float32)}
    d = _sample_digests(a, specs)
    assert d[0] == d[2] and d[0] != d[1]


# --------------------------------------------------------------------------- gate


def test_gate_without_thresholds_passes() -> None:
    assert _gate(ROWS, EvaluateConfig(), labelled=True).checks == ()


def test_gate_max_drop_vs_float_and_int8() -> None:
    # recalibrated row: 0.90 -> 0.888 is 1.2 points vs float; 0.895 -> 0.888 is 0.7 vs int8
    res = _gate(ROWS, EvaluateConfig(max_drop=1.0), labelled=True)
    (check,) = res.checks
    assert check.row == "t2r" and not check.passed
    assert check.value == pytest.approx(1.2, abs=1e-9)
    res = _gate(ROWS, EvaluateConfig(max_drop=1.0, reference="int8"), labelled=True)
    assert res.passed and res.checks[0].value == pytest.approx(0.7, abs=1e-9)


def test_gate_without_labels_uses_agreement_with_float() -> None:
    res = _gate(ROWS, EvaluateConfig(max_drop=2.5, gate_rows=("nbsmt+recal",)), labelled=False)
    # agreement 0.97 -> drop 3 points vs float (agreement 1 by definition)
    assert res.checks[0].value == pytest.approx(3.0, abs=1e-9)
    assert not res.passed


def test_gate_min_agreement_on_several_kinds() -> None:
    cfg = EvaluateConfig(min_agreement=0.95, gate_rows=("nbsmt", "nbsmt+recal"))
    res = _gate(ROWS, cfg, labelled=True)
    assert [(c.row, c.passed) for c in res.checks] == [("t2", False), ("t2r", True)]


def test_gate_pessimistic_bound_fails_where_the_point_estimate_passes() -> None:
    assert PAIRED_ROWS[1].metrics["top1"] == pytest.approx(0.894, abs=1e-12)
    # point: 0.6 points of drop <= 1.0, agreement 0.970 >= 0.96
    point = _gate(PAIRED_ROWS, EvaluateConfig(max_drop=1.0, min_agreement=0.96), labelled=True)
    assert point.passed
    assert [c.bound for c in point.checks] == ["point", "point"]
    assert point.checks[0].value == pytest.approx(0.6, abs=1e-9)
    # pessimistic: the drop's paired upper bound and the agreement's Wilson lower bound
    cfg = EvaluateConfig(max_drop=1.0, min_agreement=0.96, gate_bound="pessimistic")
    pess = _gate(PAIRED_ROWS, cfg, labelled=True)
    drop, agree = pess.checks
    diff = paired_proportion_difference(ROW_HITS, FLOAT_HITS)
    assert drop.value == pytest.approx(-100.0 * diff.interval.lo, abs=1e-12)
    assert drop.estimate == pytest.approx(0.6, abs=1e-9)
    assert 1.0 < drop.value < 3.0 and not drop.passed  # 13 vs 10 discordant: ~ +-1.6 points
    assert agree.value == pytest.approx(wilson_interval(485, 500).lo, abs=1e-15)
    assert agree.value < 0.96 and agree.estimate == 0.97 and not agree.passed
    assert "95% upper bound" in drop.reason and "95% lower bound" in agree.reason
    # a loose enough threshold passes on the pessimistic bound too
    loose = EvaluateConfig(max_drop=3.0, min_agreement=0.9, gate_bound="pessimistic")
    assert _gate(PAIRED_ROWS, loose, labelled=True).passed


def test_gate_pessimistic_without_labels_uses_the_agreement_interval() -> None:
    # vs float32 (agreement 1 on every sample) the drop's upper bound is 1 - Wilson lower bound
    cfg = EvaluateConfig(max_drop=2.0, gate_bound="pessimistic")
    (check,) = _gate(PAIRED_ROWS, cfg, labelled=False).checks
    assert check.estimate == pytest.approx(3.0, abs=1e-9)
    assert check.value == pytest.approx(100 * (1 - wilson_interval(485, 500).lo), abs=1e-9)


def test_gate_pessimistic_fails_rows_without_intervals() -> None:
    # ROWS carry point estimates only: a pessimistic gate cannot pass them silently
    res = _gate(ROWS, EvaluateConfig(max_drop=50.0, gate_bound="pessimistic"), labelled=True)
    assert not res.passed and "no paired interval" in res.checks[0].reason


def test_gate_fails_on_unavailable_rows() -> None:
    rows = (*ROWS[:3], _row("t2r", "nbsmt+recal", available=False))
    res = _gate(rows, EvaluateConfig(min_agreement=0.5), labelled=True)
    assert not res.passed and "cannot be computed" in res.checks[0].reason


# --------------------------------------------------------------------------- output formats


def _result(
    gate: GateResult,
    rows: tuple[EvaluationRow, ...] = ROWS,
    config: EvaluateConfig | None = None,
) -> EvaluationResult:
    return EvaluationResult(
        rows=rows,
        model="m.onnx",
        output="logits",
        output_kind="logits",
        classification=True,
        labels="labels.npy",
        eval_data={"source": "eval.npz", "samples": 10, "seed": 0, "batch_size": 5},
        calib_data={"source": "calib.npz", "samples": 8, "seed": 1, "batch_size": 4},
        duplicates=2,
        gate=gate,
        config=config or EvaluateConfig(),
        warnings=("a warning",),
        wall_time_s=12.5,
    )


def test_json_is_strict_and_complete() -> None:
    gate = _gate(ROWS, EvaluateConfig(max_drop=1.0), labelled=True)
    result = _result(gate)
    text = result.to_json()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert data["format"] == "nbsmt-onnx/evaluation"
    assert data["gate"] == {
        "passed": False,
        "exit_code": EXIT_THRESHOLD,
        "bound": "point",
        "checks": [
            {
                "row": "t2r",
                "check": "max_drop",
                "value": pytest.approx(1.2),
                "threshold": 1.0,
                "passed": False,
                "reason": gate.checks[0].reason,
                "bound": "point",
                "estimate": pytest.approx(1.2),
            }
        ],
    }
    assert data["rows"][1]["metrics"]["sqnr_db"] == "inf"  # JSON has no Infinity
    assert data["calib_data"]["seed"] == 1 and data["eval_data"]["samples"] == 10
    assert data["duplicates_with_calibration"] == 2
    assert result.exit_code == EXIT_THRESHOLD
    assert _result(GateResult()).exit_code == EXIT_OK


def test_csv_has_one_line_per_row() -> None:
    gate = _gate(ROWS, EvaluateConfig(min_agreement=0.95), labelled=True)
    rows = list(csv.DictReader(io.StringIO(_result(gate).to_csv())))
    assert [r["id"] for r in rows] == ["float32", "int8", "t2", "t2r"]
    assert rows[3]["gate"] == "pass" and rows[2]["gate"] == ""
    assert rows[0]["agreement"] == "" and float(rows[3]["top1"]) == 0.888
    assert rows[1]["sqnr_db"] == "inf"


def test_table_shows_rows_counts_and_gate() -> None:
    gate = _gate(ROWS, EvaluateConfig(max_drop=1.0), labelled=True)
    text = _result(gate).format_table()
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["row", "settings", "speed-up"] and "top-5 %" in lines[0]
    assert any(line.startswith("t2r") and "88.80" in line and "FAIL" in line for line in lines)
    assert "8 samples of calib.npz (seed 1)" in text
    assert "2 evaluation sample(s) also occur in the calibration data" in text
    assert "gate: FAILED t2r" in text


# --------------------------------------------------------------------------- attribute edit


def test_with_nbsmt_settings_sets_every_nbsmt_node() -> None:
    conv = helper.make_node(
        schema.CONV,
        ["x", "w", "s", "ws"],
        ["y"],
        name="c",
        domain=schema.DOMAIN,
        threads=1,
        mapping="channel",
        reduce="activations",
    )
    mm = helper.make_node(
        schema.MATMUL, ["y", "b", "s", "bs"], ["z"], name="m", domain=schema.DOMAIN
    )
    relu = helper.make_node("Relu", ["z"], ["out"], name="r")
    graph = helper.make_graph([conv, mm, relu], "g", [], [])
    model = helper.make_model(graph)
    out = with_nbsmt_settings(model, 4, "interleave", "weights")
    for node in out.graph.node[:2]:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["threads"] == 4
        assert attrs["mapping"] == b"interleave" and attrs["reduce"] == b"weights"
    assert not out.graph.node[2].attribute
    # the input is untouched
    before = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    assert before["threads"] == 1
    assert isinstance(out, onnx.ModelProto)


def test_outputs_show_intervals_and_paired_differences() -> None:
    from nbsmt_onnx.html_report import render_html

    cfg = EvaluateConfig(max_drop=1.0, gate_bound="pessimistic")
    result = _result(_gate(PAIRED_ROWS, cfg, labelled=True), PAIRED_ROWS, cfg)
    w = wilson_interval(447, 500)
    diff = paired_proportion_difference(ROW_HITS, FLOAT_HITS)

    data = json.loads(result.to_json())
    row = data["rows"][1]
    assert row["intervals"]["top1"] == {"lo": w.lo, "hi": w.hi, "method": "wilson", "level": 0.95}
    assert row["intervals"]["kl"] is None  # not set on this hand-made row
    d = row["difference"]
    assert d["reference"] == "float32"
    assert d["metrics"]["top1"]["lo"] == diff.interval.lo
    assert d["metrics"]["top1"]["method"] == "newcombe-paired"
    assert d["metrics"]["top1"]["p_method"] == "mcnemar-exact"
    assert (d["metrics"]["top1"]["row_only"], d["metrics"]["top1"]["reference_only"]) == (10, 13)
    assert data["rows"][0]["difference"] is None  # the reference row itself
    assert data["uncertainty"]["level"] == 0.95
    assert data["uncertainty"]["bootstrap_resamples"] == 2000
    assert data["gate"]["bound"] == "pessimistic"

    rows = list(csv.DictReader(io.StringIO(result.to_csv())))
    assert float(rows[1]["top1_lo"]) == w.lo and float(rows[1]["top1_hi"]) == w.hi
    assert rows[1]["reference"] == "float32"
    assert float(rows[1]["diff_top1"]) == pytest.approx(-0.006, abs=1e-12)
    assert float(rows[1]["diff_top1_lo"]) == diff.interval.lo
    assert float(rows[1]["diff_top1_p"]) == diff.p_value
    assert rows[0]["diff_top1"] == "" and rows[1]["diff_kl_lo"] == ""

    text = result.format_table()
    assert f"89.40 [{100 * w.lo:.2f}, {100 * w.hi:.2f}]" in text
    lo, hi = 100 * diff.interval.lo, 100 * diff.interval.hi
    assert f"-0.60 [{lo:+.2f}, {hi:+.2f}]" in text
    assert "difference to float32" in text and f"{diff.p_value:.3f}" in text
    assert "on the pessimistic 95% bounds" not in text  # the gate failed: failures are listed
    assert "95% upper bound" in text

    page = render_html(result.to_dict())
    assert f"[{100 * w.lo:.2f}, {100 * w.hi:.2f}]" in page
    assert f"{lo:+.2f}" in page and f"{diff.p_value:.3f}" in page


def test_print_shows_the_table_and_repr_is_one_line() -> None:
    gate = _gate(ROWS, EvaluateConfig(max_drop=1.0), labelled=True)
    result = _result(gate)
    assert str(result) == result.format_table()
    text = repr(result)
    assert "\n" not in text and len(text) < 200
    assert "m.onnx" in text and "10 samples" in text
