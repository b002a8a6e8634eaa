"""Scoring: the paper's table for any model — float32, int8, NB-SMT with and without recalibration.

This module sits below ``api``: it plans the rows, runs models over held-out
data and turns the outputs into metrics, intervals, the gate and the
table/CSV/JSON output. It never calls ``transform``; ``api.evaluate`` (the
CLI's ``nbsmt-onnx evaluate`` is a thin layer over it) orders the steps:

1. load the model once; refuse when the evaluation and calibration data are
   the same files (or one folder holds the other);
2. open both data sets (the sources of ``calibration.data``: .npz/.npy,
   folders of arrays or images, mappings, feed iterables) and the labels
   (``calibration.labels``); hash every calibration sample (BLAKE2b of its
   bytes after validation, streamed) to warn later about evaluation samples
   that also occur in the calibration set;
3. build the variants with ``nbsmt_onnx.transform``:

   - one transform at ``threads=1`` without recalibration: the int8 model.
     Activation ranges, weight quantization and the rewrite do not depend on
     threads / mapping / reduce (they are node attributes), so every
     NB-SMT variant *without* recalibration is that model with its NB-SMT
     attributes set — calibration work shared by the whole sweep;
   - one transform per variant *with* recalibration (the recalibrated
     statistics depend on the NB-SMT noise, i.e. on every swept setting);

4. run all models over the evaluation data batch by batch in lockstep: the
   float model's batch output is the reference for every variant's metrics
   (``metrics``), and only running sums are kept. Every NB-SMT model
   also exposes its ``stats`` outputs (per-layer MAC utilization, collision
   rate, squeezed operands on the evaluation data) and, for the first
   ``layer_samples`` samples, its NB-SMT layer outputs, compared with the
   same tensors of the int8 model (per-layer output SQNR vs int8);
5. uncertainty: 95 % Wilson intervals of every proportion, seeded paired
   bootstrap intervals of KL / cosine / SQNR, and each row's paired
   difference to the reference row (``metrics``: Newcombe's paired interval
   and McNemar's exact p for proportions, the bootstrap for the rest);
6. check the thresholds (``max_drop``, ``min_agreement``) on the point
   estimates or on the pessimistic ends of those intervals: the pipeline gate.

Nothing is written to disk here: :class:`EvaluationResult` renders itself as
a terminal table, JSON and CSV; ``html_report`` turns ``to_dict()`` into HTML.
"""

from __future__ import annotations

import csv
import hashlib
import io as _stdio
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from nbsmt_onnx import io
from nbsmt_onnx._version import __version__
from nbsmt_onnx.calibration.data import (
    ARRAY_SUFFIXES,
    IMAGE_SUFFIXES,
    CalibrationData,
    Feed,
    InputSpec,
    model_inputs,
    open_calibration_data,
)
from nbsmt_onnx.calibration.labels import Labels, load_labels
from nbsmt_onnx.compare import OutputCollector
from nbsmt_onnx.config import (
    DEFAULT_ROWS,
    GATE_BOUNDS,
    REFERENCE_CHOICES,
    ROW_KINDS,
    EvaluateConfig,
    ImagePreprocessing,
    TransformConfig,
)
from nbsmt_onnx.errors import (
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_THRESHOLD,
    EXIT_USER_ERROR,
    ConfigError,
    DataError,
    InternalError,
    NbsmtError,
)
from nbsmt_onnx.graph.threads import MacCount, layer_macs, nbsmt_nodes, node_threads, speedup
from nbsmt_onnx.metrics import (
    BOOTSTRAP_PERCENTILE,
    LEVEL,
    MCNEMAR_EXACT,
    NEWCOMBE_PAIRED,
    WILSON,
    Agreement,
    Interval,
    PairedDifference,
    SqnrAccumulator,
    TopKAccuracy,
    as_classification,
    detect_output_kind,
    paired_proportion_difference,
    percentile_interval,
    resample_means,
    wilson_interval,
)
from nbsmt_onnx.ops import schema
from nbsmt_onnx.progress import Progress
from nbsmt_onnx.report import add_stats_outputs, layer_metrics
from nbsmt_onnx.runtime.executor import Executor, Job, LocalExecutor, ModelRun
from nbsmt_onnx.runtime.session import SessionOptions

log = logging.getLogger(__name__)

RESULT_FORMAT = "nbsmt-onnx/evaluation"
#: 2: intervals, paired differences to the reference row, gate bound.
RESULT_VERSION = 2

#: Exit codes of ``nbsmt-onnx evaluate`` (docs/evaluate.md).

_METRIC_KEYS = ("top1", "top5", "agreement", "kl", "cosine", "sqnr_db")
_PROPORTIONS = ("top1", "top5", "agreement")
_CONTINUOUS = ("kl", "cosine", "sqnr_db")


@dataclass(frozen=True)
class RowSpec:
    """One row of the table: which model and settings."""

    kind: str
    threads: int | None = None
    mapping: str | None = None
    reduce: str | None = None

    @property
    def recalibrated(self) -> bool:
        return self.kind.endswith("+recal")

    @property
    def is_float(self) -> bool:
        return self.kind == "float32"

    @property
    def id(self) -> str:
        if self.is_float:
            return "float32"
        base = (
            "int8"
            if self.threads == 1 and self.kind.startswith("int8")
            else (f"nbsmt-t{self.threads}-{self.mapping}-{self.reduce}")
        )
        return base + ("-recal" if self.recalibrated else "")

    def name(self, swept: Mapping[str, bool]) -> str:
        if self.is_float:
            return "float32"
        if self.kind.startswith("int8"):
            base = "int8 (T=1)"
        else:
            base = f"NB-SMT T={self.threads}"
            extra = [
                v
                for key, v in (("mapping", self.mapping), ("reduce", self.reduce))
                if swept.get(key)
            ]
            if extra:
                base += " " + "/".join(str(e) for e in extra)
        return base + (" +recal" if self.recalibrated else "")


def plan_rows(config: EvaluateConfig) -> list[RowSpec]:
    """The table's rows in order: each kind of ``config.rows``, NB-SMT kinds over the sweep grid.

    The grid is ordered threads, then mapping, then reduce; for each setting
    the ``nbsmt`` row comes before its ``nbsmt+recal`` row.
    """
    rows: list[RowSpec] = []
    kinds = config.row_kinds
    for kind in kinds:
        if kind == "float32":
            rows.append(RowSpec("float32"))
        elif kind in ("int8", "int8+recal"):
            rows.append(RowSpec(kind, 1, "channel", "activations"))
    grid = [(t, m, r) for t in config.threads for m in config.mappings for r in config.reduces]
    for t, m, r in grid:
        for kind in ("nbsmt", "nbsmt+recal"):
            if kind in kinds:
                rows.append(RowSpec(kind, t, m, r))
    return rows


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class GateCheck:
    """One threshold applied to one row."""

    row: str
    check: str  # "max_drop" | "min_agreement"
    #: the value compared with the threshold (drop in points, or agreement): the point
    #: estimate, or with ``bound="pessimistic"`` the pessimistic end of its 95 % interval;
    #: None = not computable
    value: float | None
    threshold: float
    passed: bool
    reason: str
    bound: str = "point"
    #: the point estimate (equal to ``value`` with ``bound="point"``)
    estimate: float | None = None


@dataclass(frozen=True)
class GateResult:
    """The pipeline gate: every check, and whether all passed (True when no threshold was set)."""

    checks: tuple[GateCheck, ...] = ()

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> tuple[GateCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)


@dataclass(frozen=True)
class EvaluationRow:
    """One row of the table. ``metrics`` keys: top1, top5, agreement, kl, cosine, sqnr_db."""

    id: str
    name: str
    kind: str
    threads: int | None
    mapping: str | None
    reduce: str | None
    recalibrated: bool
    available: bool
    note: str | None
    metrics: Mapping[str, float | None]
    samples: int
    prepare_s: float
    inference_s: float
    #: per NB-SMT layer: node, op_type, NB-SMT statistics on the evaluation data, output SQNR vs int8
    layers: tuple[Mapping[str, Any], ...] = ()
    #: the transform report's recalibration section (recalibrated rows)
    recalibration: Mapping[str, Any] | None = None
    #: 95 % interval of each metric (None = not applicable): Wilson for top1 / top5 /
    #: agreement, paired bootstrap percentile for kl / cosine / sqnr_db
    intervals: Mapping[str, Interval | None] = field(default_factory=dict)
    #: id of the row ``difference`` is measured against (None for that row itself)
    reference: str | None = None
    #: per metric, ``this row - reference row`` on the same samples (None = not applicable)
    difference: Mapping[str, PairedDifference | None] = field(default_factory=dict)
    #: recalibrated rows: id of the same settings' row without recalibration, if in the table
    unrecalibrated: str | None = None
    #: per metric, ``this row - unrecalibrated row`` on the same samples: what recalibration did
    recalibration_effect: Mapping[str, PairedDifference | None] = field(default_factory=dict)
    #: NB-SMT rows: MAC-weighted speed-up over an 8-bit array without NB-SMT, from the
    #: threads of the row model's NbSmt nodes (layers left in float count at T = 1);
    #: None for the float row or when some layer's MACs are unknown
    speedup: float | None = None

    @property
    def wall_s(self) -> float:
        return self.prepare_s + self.inference_s

    def to_dict(self) -> dict[str, Any]:
        out = {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "threads": self.threads,
            "mapping": self.mapping,
            "reduce": self.reduce,
            "recalibrated": self.recalibrated,
            "available": self.available,
            "note": self.note,
            "metrics": dict(self.metrics),
            "intervals": {
                k: (iv.to_dict() if iv is not None else None)
                for k, iv in ((k, self.intervals.get(k)) for k in _METRIC_KEYS)
            },
            "difference": (
                None
                if self.reference is None
                else {
                    "reference": self.reference,
                    "metrics": {
                        k: (d.to_dict() if d is not None else None)
                        for k, d in ((k, self.difference.get(k)) for k in _METRIC_KEYS)
                    },
                }
            ),
            "recalibration_effect": (
                None
                if self.unrecalibrated is None
                else {
                    "reference": self.unrecalibrated,
                    "metrics": {
                        k: (d.to_dict() if d is not None else None)
                        for k, d in ((k, self.recalibration_effect.get(k)) for k in _METRIC_KEYS)
                    },
                }
            ),
            "speedup": self.speedup,
            "samples": self.samples,
            "prepare_s": round(self.prepare_s, 3),
            "inference_s": round(self.inference_s, 3),
            "wall_s": round(self.wall_s, 3),
            "layers": [dict(entry) for entry in self.layers],
        }
        if self.recalibration is not None:
            out["recalibration"] = dict(self.recalibration)
        return out


def _json_safe(value: Any) -> Any:
    """Non-finite floats become the strings "inf" / "-inf" / "nan" (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


@dataclass(frozen=True, repr=False)
class EvaluationResult:
    """The table and everything needed to reproduce it.

    ``print(result)`` prints the table (:meth:`format_table`); ``repr`` is one line.
    """

    rows: tuple[EvaluationRow, ...]
    model: str
    output: str
    output_kind: str
    classification: bool
    labels: str | None
    eval_data: Mapping[str, Any]
    calib_data: Mapping[str, Any]
    duplicates: int
    gate: GateResult
    config: EvaluateConfig
    warnings: tuple[str, ...]
    wall_time_s: float
    #: the int8 transform's report (per-layer activation scales, skipped nodes, ...)
    transform_report: Mapping[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.gate.passed

    def __str__(self) -> str:
        return self.format_table()

    def __repr__(self) -> str:
        rows = ", ".join(r.id for r in self.rows)
        samples = self.eval_data.get("samples")
        verdict = "passed" if self.gate.passed else "missed"
        return f"<EvaluationResult {self.model!r}: rows [{rows}], {samples} samples, gate {verdict}>"

    @property
    def exit_code(self) -> int:
        """:data:`EXIT_OK` or :data:`EXIT_THRESHOLD` (the CLI's exit code after a completed run)."""
        return EXIT_OK if self.gate.passed else EXIT_THRESHOLD

    def row(self, row_id: str) -> EvaluationRow:
        for r in self.rows:
            if r.id == row_id:
                return r
        raise KeyError(row_id)

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(
            {
                "format": RESULT_FORMAT,
                "format_version": RESULT_VERSION,
                "tool_version": _version(),
                "model": self.model,
                "output": self.output,
                "output_kind": self.output_kind,
                "classification": self.classification,
                "labels": self.labels,
                "eval_data": dict(self.eval_data),
                "calib_data": dict(self.calib_data),
                "duplicates_with_calibration": self.duplicates,
                "settings": self.config.to_dict(),
                "rows": [r.to_dict() for r in self.rows],
                "uncertainty": {
                    "level": LEVEL,
                    "proportion_interval": WILSON,
                    "paired_proportion_interval": NEWCOMBE_PAIRED,
                    "paired_proportion_p_value": MCNEMAR_EXACT,
                    "continuous_interval": BOOTSTRAP_PERCENTILE,
                    "bootstrap_resamples": self.config.bootstrap_resamples,
                    "bootstrap_seed": self.config.bootstrap_seed,
                    "reference": self.config.reference,
                },
                "gate": {
                    "passed": self.gate.passed,
                    "exit_code": self.exit_code,
                    "bound": self.config.gate_bound,
                    "checks": [asdict(c) for c in self.gate.checks],
                },
                "warnings": list(self.warnings),
                "wall_time_s": round(self.wall_time_s, 3),
                "transform": dict(self.transform_report),
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_csv(self) -> str:
        """One line per row: settings, metrics, samples, times, gate verdict, then uncertainty.

        The uncertainty columns: ``<metric>_lo`` / ``<metric>_hi`` (95 % interval),
        ``reference`` (row id), ``diff_<metric>`` / ``diff_<metric>_lo`` /
        ``diff_<metric>_hi`` (row - reference, paired 95 % interval) and, for
        proportions, ``diff_<metric>_p`` (McNemar's exact p); then the same for the
        recalibration effect: ``unrecalibrated`` (row id) and ``recal_<metric>...``.
        """
        buf = _stdio.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        interval_cols = [f"{k}_{end}" for k in _METRIC_KEYS for end in ("lo", "hi")]
        diff_cols = [
            f"{{}}_{k}{suffix}"
            for k in _METRIC_KEYS
            for suffix in (("", "_lo", "_hi", "_p") if k in _PROPORTIONS else ("", "_lo", "_hi"))
        ]
        writer.writerow(
            [
                "id", "name", "kind", "threads", "mapping", "reduce", "recalibrated",
                "available", "speedup", *_METRIC_KEYS, "samples", "prepare_s", "inference_s",
                "gate",
                *interval_cols, "reference", *[c.format("diff") for c in diff_cols],
                "unrecalibrated", *[c.format("recal") for c in diff_cols],
            ]
        )  # fmt: skip
        verdicts = _row_verdicts(self.gate)
        for r in self.rows:
            intervals: list[object] = []
            for k in _METRIC_KEYS:
                iv = r.intervals.get(k)
                intervals += ["", ""] if iv is None else [_blank(iv.lo), _blank(iv.hi)]
            diffs = _diff_cells(r.difference)
            effects = _diff_cells(r.recalibration_effect)
            writer.writerow(
                [
                    r.id, r.name, r.kind, _blank(r.threads), _blank(r.mapping), _blank(r.reduce),
                    int(r.recalibrated), int(r.available), _blank(r.speedup),
                    *[_blank(r.metrics.get(k)) for k in _METRIC_KEYS],
                    r.samples, f"{r.prepare_s:.3f}", f"{r.inference_s:.3f}", verdicts.get(r.id, ""),
                    *intervals, _blank(r.reference), *diffs, _blank(r.unrecalibrated), *effects,
                ]
            )  # fmt: skip
        return buf.getvalue()

    def format_table(self) -> str:
        """The terminal table (plain text) with a footer of counts, seeds and the gate verdict."""
        return format_table(self.to_dict())


def _diff_cells(differences: Mapping[str, PairedDifference | None]) -> list[object]:
    """CSV cells of paired differences: estimate, lo, hi (and p for proportions) per metric."""
    cells: list[object] = []
    for k in _METRIC_KEYS:
        d = differences.get(k)
        width = 4 if k in _PROPORTIONS else 3
        if d is None:
            cells += [""] * width
            continue
        cells += [_blank(d.estimate), _blank(d.interval.lo), _blank(d.interval.hi)]
        if k in _PROPORTIONS:
            cells.append(_blank(d.p_value))
    return cells


def _blank(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    return value


def _row_verdicts(gate: GateResult) -> dict[str, str]:
    out: dict[str, str] = {}
    for c in gate.checks:
        out[c.row] = "fail" if (not c.passed or out.get(c.row) == "fail") else "pass"
    return out


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):  # "inf" from JSON
        return value
    if kind == "pct":
        return f"{100.0 * value:.2f}%"
    if kind == "db":
        return f"{value:.1f}" if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    return f"{value:.4f}"


def _num(value: Any) -> float:
    """A float from a JSON value (the strings "inf" / "-inf" / "nan" included)."""
    return float(value)


def _fmt_interval(value: Any, interval: Mapping[str, Any] | None, kind: str) -> str:
    """``92.75 [91.53, 93.80]`` (percent), ``0.0117 [0.0101, 0.0135]``; "-" without a value."""
    if value is None:
        return "-"
    if kind == "pct":
        text = f"{100.0 * _num(value):.2f}"
        if interval is not None:
            text += f" [{100.0 * _num(interval['lo']):.2f}, {100.0 * _num(interval['hi']):.2f}]"
        return text
    text = _fmt(value, kind)
    if interval is not None:
        text += f" [{_fmt(_num(interval['lo']), kind)}, {_fmt(_num(interval['hi']), kind)}]"
    return text


def _fmt_diff(diff: Mapping[str, Any] | None, kind: str) -> str:
    """A difference and its interval with signs: ``-0.25 [-0.71, +0.20]`` (points for proportions)."""
    if diff is None:
        return "-"
    scale, spec = {"pct": (100.0, "+.2f"), "db": (1.0, "+.1f")}.get(kind, (1.0, "+.4f"))

    def one(v: Any) -> str:
        x = _num(v)
        return format(scale * x, spec) if math.isfinite(x) else str(v)

    return f"{one(diff['estimate'])} [{one(diff['lo'])}, {one(diff['hi'])}]"


def _fmt_p(diff: Mapping[str, Any] | None) -> str:
    if diff is None or diff.get("p_value") is None:
        return "-"
    p = float(diff["p_value"])
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _render_rows(header: list[str], lines: list[list[str]], left: int = 2) -> list[str]:
    """Aligned text table; a row of 3 cells whose last starts with "unavailable" spans the rest."""
    widths = [len(h) for h in header]
    for cells in lines:
        if not (len(cells) == 3 and cells[2].startswith("unavailable")):
            for i, c in enumerate(cells):
                widths[i] = max(widths[i], len(c))

    def render(cells: list[str]) -> str:
        if len(cells) == 3 and cells[2].startswith("unavailable"):
            return f"{cells[0]:<{widths[0]}}  {cells[1]:<{widths[1]}}  {cells[2]}"
        parts = [
            f"{c:<{widths[i]}}" if i < left else f"{c:>{widths[i]}}" for i, c in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    return [render(header), "  ".join("-" * w for w in widths), *[render(c) for c in lines]]


def _difference_lines(
    rows: Sequence[Mapping[str, Any]], field_name: str, labelled: bool, classification: bool
) -> list[str]:
    """The text table of one kind of paired difference (``difference`` / ``recalibration_effect``)."""
    diffed = [r for r in rows if r.get("available") and r.get(field_name)]
    if not diffed:
        return []
    gate_key = "top1" if labelled else "agreement"
    against_float = field_name == "difference" and diffed[0][field_name]["reference"] == "float32"
    dcols: list[tuple[str, str, str]] = []
    if labelled:
        dcols += [
            ("top-1 diff pts", "top1", "pct"),
            ("p", "top1", "p"),
            ("top-5 diff pts", "top5", "pct"),
        ]
    if classification:
        dcols.append(("agree diff pts", "agreement", "pct"))
        if not labelled:
            dcols.append(("p", "agreement", "p"))
        dcols.append(("KL diff", "kl", "num"))
    dcols.append(("cosine diff", "cosine", "num"))
    if not against_float:
        dcols.append(("SQNR diff dB", "sqnr_db", "db"))
    lines = []
    for r in diffed:
        metrics = r[field_name]["metrics"]
        cells = [r["name"]]
        for _, key, kind in dcols:
            d = metrics.get(key)
            cells.append(_fmt_p(d) if kind == "p" else _fmt_diff(d, kind))
        lines.append(cells)
    if field_name == "difference":
        ref_id = diffed[0][field_name]["reference"]
        ref_name = next((r["name"] for r in rows if r["id"] == ref_id), ref_id)
        title = (
            f"difference to {ref_name} (row - {ref_name} on the same samples, paired 95% "
            f"intervals; p: McNemar exact, {gate_key})"
        )
    else:
        title = (
            "recalibration effect (+recal row - the same row without recalibration, same "
            f"samples, paired 95% intervals; p: McNemar exact, {gate_key})"
        )
    return ["", title, *_render_rows(["row", *[c[0] for c in dcols]], lines, left=1)]


def format_table(result: Mapping[str, Any]) -> str:
    """Plain-text tables of an evaluation result dict (``EvaluationResult.to_dict()``).

    The first table: every metric, proportions in percent with their 95 %
    Wilson interval. The second: each row minus the reference row on the same
    samples, with paired 95 % intervals (and McNemar's p of the gate's metric).
    Then a footer of counts, seeds and the gate verdict.
    """
    rows = result["rows"]
    labelled = bool(result.get("labels"))
    classification = result.get("classification", True)
    columns: list[tuple[str, str, str]] = []  # header, metric key, format
    if labelled:
        columns += [("top-1 % [95% CI]", "top1", "pct"), ("top-5 % [95% CI]", "top5", "pct")]
    if classification:
        columns += [("agree % [95% CI]", "agreement", "pct"), ("KL", "kl", "num")]
    columns += [("cosine", "cosine", "num"), ("SQNR dB", "sqnr_db", "db")]
    header = ["row", "settings", "speed-up", *[c[0] for c in columns], "time s"]
    verdicts: dict[str, str] = {}
    for c in result.get("gate", {}).get("checks", []):
        verdicts[c["row"]] = (
            "FAIL" if (not c["passed"] or verdicts.get(c["row"]) == "FAIL") else "ok"
        )
    if verdicts:
        header.append("gate")
    lines = []
    for r in rows:
        settings = "-" if r["threads"] in (None, 1) else f"{r['mapping']}/{r['reduce']}"
        if not r["available"]:
            lines.append([r["name"], settings, "-", f"unavailable: {r['note']}"])
            continue
        intervals = r.get("intervals") or {}
        speed = r.get("speedup")
        cells = [r["name"], settings, "-" if speed is None else f"{speed:.2f}x"]
        for _, key, kind in columns:
            value = r["metrics"].get(key)
            cells.append(
                _fmt_interval(value, intervals.get(key), kind)
                if key in _PROPORTIONS
                else _fmt(value, kind)
            )
        cells.append(f"{r['wall_s']:.1f}")
        if verdicts:
            cells.append(verdicts.get(r["id"], ""))
        lines.append(cells)
    out = _render_rows(header, lines)

    # Paired differences to the reference row, and what recalibration did.
    unc = result.get("uncertainty") or {}
    for field_name in ("difference", "recalibration_effect"):
        out += _difference_lines(rows, field_name, labelled, classification)
    if unc:
        out.append(
            f"intervals: proportions Wilson, paired differences of proportions Newcombe; KL, cosine, "
            f"SQNR paired bootstrap ({unc.get('bootstrap_resamples')} resamples, seed "
            f"{unc.get('bootstrap_seed')}, percentile)"
        )
    ev, cal = result["eval_data"], result["calib_data"]
    out.append("")
    out.append(
        f"evaluation: {ev['samples']} samples of {ev['source']} (seed {ev['seed']}); "
        f"calibration: {cal['samples']} samples of {cal['source']} (seed {cal['seed']})"
    )
    label_text = (
        f"labels: {result['labels']}"
        if result.get("labels")
        else "no labels: agreement with float32"
    )
    out.append(
        f"{label_text}; output {result['output']!r} read as {result['output_kind']}; "
        f"wall time {result['wall_time_s']:.1f} s"
    )
    if result.get("duplicates_with_calibration"):
        out.append(
            f"WARNING: {result['duplicates_with_calibration']} evaluation sample(s) also occur in the calibration data"
        )
    gate = result.get("gate", {})
    if gate.get("checks"):
        bound = gate.get("bound", "point")
        on = " on the pessimistic 95% bounds" if bound == "pessimistic" else ""
        if gate["passed"]:
            out.append(f"gate: passed ({len(gate['checks'])} check(s){on})")
        else:
            for c in gate["checks"]:
                if not c["passed"]:
                    out.append(f"gate: FAILED {c['row']}: {c['reason']}")
    return "\n".join(out)


def _version() -> str:
    return __version__


# --------------------------------------------------------------------------- data


def _paths_of(data: Any) -> Path | None:
    return Path(data).resolve() if isinstance(data, (str, Path)) and str(data) != "random" else None


def check_disjoint_paths(eval_data: Any, calib_data: Any) -> None:
    """Refuse evaluation and calibration data given as the same file or nested folders."""
    e, c = _paths_of(eval_data), _paths_of(calib_data)
    if e is None or c is None:
        return
    if e == c or e in c.parents or c in e.parents:
        raise DataError(
            f"evaluation data {eval_data} and calibration data {calib_data} overlap (the same file, "
            "or one folder holds the other); pass held-out calibration data"
        )


def _folder_files(path: Path, count: int) -> list[Path] | None:
    """The data folder's files in the order ``calibration.data`` indexes them (one sample per file)."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    arrays = [p for p in files if p.suffix.lower() in ARRAY_SUFFIXES]
    chosen = images or arrays
    return chosen if len(chosen) == count else None


@dataclass
class _EvalStream:
    data: CalibrationData
    order: list[int] | None  # source index per sample, batch order
    labels: np.ndarray | None  # per sample in batch order


def _open_eval_data(
    eval_data: Any,
    labels: Any,
    specs: tuple[InputSpec, ...],
    config: EvaluateConfig,
    images: ImagePreprocessing | None,
) -> tuple[_EvalStream, Labels | None]:
    common: dict[str, Any] = {
        "batch_size": config.eval_batch_size,
        "seed": config.eval_seed,
        "images": images,
    }
    if isinstance(eval_data, CalibrationData):
        # Already opened (API): keep its draw; labels index its source when it has one.
        source, indices = eval_data.source, eval_data.indices
        if source is not None and indices is not None:
            order = list(indices)
            resolved = None if labels is None else load_labels(labels, count=len(source))
            per_sample = None if resolved is None else resolved.values[np.asarray(order)]
            return _EvalStream(eval_data, order, per_sample), resolved
    if not isinstance(eval_data, (str, Path, Mapping)):
        # Feeds (an iterable or a callable): taken in order, labels in the same order.
        data = open_calibration_data(
            eval_data, specs, num_samples=config.eval_samples or sys.maxsize, **common
        )
        resolved = None
        if labels is not None:
            count = sum(int(next(iter(b.values())).shape[0]) for b in data.batches())
            resolved = load_labels(labels, count=count)
        return _EvalStream(data, None, resolved.values if resolved else None), resolved
    # Open with one sample first to learn the source's size (asking for more than
    # it holds would log a calibration warning), then draw the real selection.
    probe = open_calibration_data(eval_data, specs, num_samples=1, **common)
    source = probe.source
    if source is None:
        raise DataError(f"evaluation data {probe.description} is not an indexed source")
    total = len(source)
    wanted = total if config.eval_samples is None else min(config.eval_samples, total)
    if config.eval_samples is not None and config.eval_samples > total:
        log.warning(
            "evaluation data has %d samples, fewer than --eval-samples %d: using all %d",
            total,
            config.eval_samples,
            total,
        )
    data = CalibrationData(
        specs,
        source=source,
        num_samples=wanted,
        batch_size=config.eval_batch_size,
        seed=config.eval_seed,
        description=probe.description,
    )
    if data.indices is None or len(data.indices) != data.num_samples:
        raise DataError(f"evaluation data {probe.description}: cannot map samples to labels")
    order = list(data.indices)
    resolved = None
    per_sample = None
    if labels is not None:
        path = Path(eval_data) if isinstance(eval_data, (str, Path)) else None
        files = root = None
        if path is not None and path.is_dir():
            files, root = _folder_files(path, total), path
        resolved = load_labels(labels, count=total, files=files, root=root)
        per_sample = resolved.values[np.asarray(order, dtype=np.int64)]
    return _EvalStream(data, order, per_sample), resolved


def _sample_digests(feed: Feed, specs: tuple[InputSpec, ...]) -> list[bytes]:
    """BLAKE2b-128 of each sample's bytes (all inputs, in model-input order)."""
    first = feed[specs[0].name]
    n = int(first.shape[0]) if first.ndim else 1
    out = []
    for i in range(n):
        h = hashlib.blake2b(digest_size=16)
        for s in specs:
            h.update(np.ascontiguousarray(feed[s.name][i]).tobytes())
        out.append(h.digest())
    return out


# --------------------------------------------------------------------------- models


def with_nbsmt_settings(
    model: onnx.ModelProto, threads: int, mapping: str, reduce: str
) -> onnx.ModelProto:
    """A copy of ``model`` with every NB-SMT node's threads / mapping / reduce set.

    This is exactly what ``transform`` would build with those settings (the
    rewrite writes them as node attributes only), without a second
    calibration pass; ``tests/e2e/test_evaluate_fmnist.py`` checks the equivalence.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    values = {"threads": threads, "mapping": mapping, "reduce": reduce}
    for node in out.graph.node:
        if node.domain != schema.DOMAIN:
            continue
        seen = set()
        for attr in node.attribute:
            if attr.name in values:
                seen.add(attr.name)
                if attr.name == "threads":
                    attr.i = int(values["threads"])  # type: ignore[call-overload]
                else:
                    attr.s = str(values[attr.name]).encode()
        for name in set(values) - seen:
            node.attribute.append(helper.make_attribute(name, values[name]))
    return out


def _nbsmt_outputs(model: onnx.ModelProto) -> dict[str, str]:
    """``{NB-SMT node name: its Y output tensor}``."""
    return {
        n.name: n.output[0]
        for n in model.graph.node
        if n.domain == schema.DOMAIN and n.output and n.output[0]
    }


def _expose(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """``model`` (in place) with ``tensors`` added as graph outputs (dtype float32, shape open)."""
    present = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in present:
            model.graph.output.append(
                helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
            )
            present.add(t)
    return model


def _produced(model: onnx.ModelProto) -> set[str]:
    return {o for n in model.graph.node for o in n.output if o}


@dataclass
class _Runner:
    """One row's model and, after the scoring pass, its sums."""

    spec: RowSpec
    row_id: str
    name: str
    model: onnx.ModelProto | None = None
    stats_outputs: dict[str, str] = field(default_factory=dict)  # node -> stats tensor
    layer_outputs: dict[str, str] = field(default_factory=dict)  # node -> Y tensor (also in int8)
    op_types: dict[str, str] = field(default_factory=dict)
    available: bool = True
    note: str | None = None
    prepare_s: float = 0.0
    inference_s: float = 0.0
    samples: int = 0
    accuracy: TopKAccuracy | None = None
    agreement: Agreement | None = None
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    layer_sqnr: dict[str, SqnrAccumulator] = field(default_factory=dict)
    recalibration: Mapping[str, Any] | None = None


def variant_config(base: TransformConfig, spec: RowSpec) -> TransformConfig:
    recal = replace(base.recalibration, enabled=spec.recalibrated)
    return replace(
        base,
        threads=int(spec.threads or 1),
        mapping=spec.mapping or "channel",
        reduce=spec.reduce or "activations",
        export="sim",
        collect_stats=False,
        recalibration=recal,
    )


# --------------------------------------------------------------------------- gate


def _gate(rows: Sequence[EvaluationRow], config: EvaluateConfig, labelled: bool) -> GateResult:
    """Apply ``max_drop`` / ``min_agreement`` to the gated rows.

    ``gate_bound="point"``: the point estimates. ``"pessimistic"``: the drop's
    upper 95 % bound (``-lo`` of the row's paired difference to the reference
    row) and the agreement's lower Wilson bound; a row without the interval
    fails (a gate never passes silently).
    """
    if config.max_drop is None and config.min_agreement is None:
        return GateResult()
    metric = "top1" if labelled else "agreement"
    pessimistic = config.gate_bound == "pessimistic"
    by_kind = {r.kind for r in rows}
    ref = next((r for r in rows if r.kind == config.reference), None)
    ref_value = None
    if ref is not None and ref.available:
        ref_value = 1.0 if (ref.kind == "float32" and not labelled) else ref.metrics.get(metric)
    checks = []
    gated = [r for r in rows if r.kind in config.gated_kinds]
    if not gated:
        raise ConfigError(
            f"no row to gate: kinds {list(config.gated_kinds)} are not among {sorted(by_kind)}"
        )
    for r in gated:
        value = r.metrics.get(metric) if r.available else None
        if config.max_drop is not None:
            what = f"top-1 {'accuracy' if labelled else 'agreement'} drop vs {config.reference}"
            diff = r.difference.get(metric) if r.available else None
            if value is None or ref_value is None or (pessimistic and diff is None):
                reason = r.note or ("no paired interval" if pessimistic else "metric unavailable")
                checks.append(
                    GateCheck(r.id, "max_drop", None, float(config.max_drop), False,
                              f"{what} cannot be computed ({reason})", config.gate_bound)
                )  # fmt: skip
            else:
                drop = 100.0 * (ref_value - value)
                compared = -100.0 * diff.interval.lo if (pessimistic and diff) else drop
                ok = compared <= config.max_drop
                verdict = f"({'<=' if ok else '>'} {config.max_drop:g})"
                text = (
                    f"{what} is {drop:.2f} points, its 95% upper bound {compared:.2f} {verdict}"
                    if pessimistic
                    else f"{what} is {drop:.2f} points {verdict}"
                )
                checks.append(
                    GateCheck(
                        r.id, "max_drop", compared, float(config.max_drop), ok, text,
                        config.gate_bound, drop,
                    )
                )  # fmt: skip
        if config.min_agreement is not None:
            agree = r.metrics.get("agreement") if r.available else None
            interval = r.intervals.get("agreement") if r.available else None
            if agree is None or (pessimistic and interval is None):
                checks.append(
                    GateCheck(r.id, "min_agreement", None, float(config.min_agreement), False,
                              f"top-1 agreement cannot be computed ({r.note or 'not a classification output'})",
                              config.gate_bound)
                )  # fmt: skip
            else:
                compared = interval.lo if (pessimistic and interval) else agree
                ok = compared >= config.min_agreement
                verdict = f"({'>=' if ok else '<'} {config.min_agreement:g})"
                text = (
                    f"top-1 agreement with float32 is {agree:.4f}, its 95% lower bound "
                    f"{compared:.4f} {verdict}"
                    if pessimistic
                    else f"top-1 agreement with float32 is {agree:.4f} {verdict}"
                )
                checks.append(
                    GateCheck(
                        r.id, "min_agreement", compared, float(config.min_agreement), ok, text,
                        config.gate_bound, agree,
                    )
                )  # fmt: skip
    return GateResult(tuple(checks))


# --------------------------------------------------------------------------- evaluate


@dataclass
class _RowScore:
    """One row's running sums over a run of batches (part of a :class:`_ScorePartial`)."""

    samples: int = 0
    inference_s: float = 0.0
    accuracy: TopKAccuracy | None = None
    agreement: Agreement | None = None
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    layer_sqnr: dict[str, SqnrAccumulator] = field(default_factory=dict)

    def merge(self, other: _RowScore) -> _RowScore:
        """``other``'s batches after this one's."""
        self.samples += other.samples
        self.inference_s += other.inference_s
        if self.accuracy is not None and other.accuracy is not None:
            self.accuracy.merge(other.accuracy)
        if self.agreement is not None and other.agreement is not None:
            self.agreement.merge(other.agreement)
        for node, value in other.stats.items():
            self.stats[node] = self.stats.get(node, 0) + value
        for node, acc in other.layer_sqnr.items():
            if node in self.layer_sqnr:
                self.layer_sqnr[node].merge(acc)
            else:
                self.layer_sqnr[node] = acc
        return self


@dataclass
class _ScorePartial:
    """Every row's sums over a run of batches, and the digests of its samples (per batch)."""

    rows: dict[str, _RowScore]
    digests: list[list[bytes]]


@dataclass(frozen=True)
class _ModelSlot:
    """One model of the scoring pass and what is fetched from it on every batch."""

    row_id: str
    is_float: bool
    #: node -> its ``stats`` output
    stats_outputs: tuple[tuple[str, str], ...] = ()
    #: node -> its output tensor compared with the int8 reference (per-layer SQNR)
    layer_outputs: tuple[tuple[str, str], ...] = ()
    #: this model gives the int8 reference tensors of the per-layer SQNR
    layer_reference: bool = False
    #: the int8 reference model added only for those tensors (not a row of the table)
    reference_only: bool = False


@dataclass(frozen=True)
class ScoringReducer:
    """Executor reducer of the scoring pass: every row's model in lockstep on each batch.

    The job runs the float model first (the reference), then (when no int8
    row gives them) an int8 model for the per-layer reference tensors, then
    the rows; per batch, each row's accuracy, agreement with the float
    outputs, ``stats`` sums and per-layer SQNR (first ``layer_samples``
    samples) are computed and the outputs dropped, so memory does not grow
    with the data. Per-sample values are kept in order for the intervals.
    """

    slots: tuple[_ModelSlot, ...]
    output: str
    output_kind: str
    specs: tuple[InputSpec, ...]
    labels: np.ndarray | None
    reference_tensors: tuple[str, ...]
    layer_samples: int

    @property
    def outputs(self) -> tuple[tuple[str, ...], ...]:
        return tuple(self._names(slot) for slot in self.slots)

    def _names(self, slot: _ModelSlot) -> tuple[str, ...]:
        layers = (
            self.reference_tensors
            if slot.layer_reference
            else tuple(t for _, t in slot.layer_outputs)
        )
        if slot.reference_only:
            return layers
        return (self.output, *(t for _, t in slot.stats_outputs), *layers)

    def reduce(self, outputs: Sequence[ModelRun], batch: Feed, first_sample: int) -> _ScorePartial:
        digests = _sample_digests(batch, self.specs)
        n = len(digests)
        labels = None if self.labels is None else self.labels[first_sample : first_sample + n]
        layers_now = bool(self.reference_tensors) and first_sample < self.layer_samples
        reference_out: np.ndarray | None = None
        reference_layers: dict[str, np.ndarray] = {}
        rows: dict[str, _RowScore] = {}
        for slot, run in zip(self.slots, outputs, strict=True):
            values = dict(zip(self._names(slot), run.values, strict=True))
            if slot.layer_reference:
                reference_layers = {t: values[t] for t in self.reference_tensors}
            if slot.reference_only:
                continue
            score = rows[slot.row_id] = _RowScore(samples=n, inference_s=run.seconds)
            out = np.asarray(values[self.output])
            if labels is not None:
                score.accuracy = TopKAccuracy()
                score.accuracy.update(out, labels)
            if slot.is_float:
                reference_out = out
                continue
            assert reference_out is not None
            score.agreement = Agreement(kind=self.output_kind)
            score.agreement.update(reference_out, out)
            score.stats = {
                node: np.asarray(values[t], dtype=np.int64) for node, t in slot.stats_outputs
            }
            if not layers_now or slot.layer_reference:
                continue
            for node, t in slot.layer_outputs:
                if t in reference_layers:
                    acc = score.layer_sqnr[node] = SqnrAccumulator()
                    acc.update(reference_layers[t], values[t])
        return _ScorePartial(rows, [digests])

    def merge(self, left: _ScorePartial, right: _ScorePartial) -> _ScorePartial:
        for row_id, score in right.rows.items():
            left.rows[row_id] = left.rows[row_id].merge(score) if row_id in left.rows else score
        left.digests.extend(right.digests)
        return left


@dataclass(frozen=True)
class ModelRow:
    """One row to score with :func:`evaluate_models`: its settings and its model.

    ``model`` is None for the float32 row (the evaluation set's float model)
    and for rows that could not be built (``available=False``, with a ``note``
    saying why). ``prepare_s``: time spent building the model (shown in the
    table); ``recalibration``: the transform report's recalibration section.
    """

    spec: RowSpec
    model: onnx.ModelProto | None
    name: str
    prepare_s: float = 0.0
    recalibration: Mapping[str, Any] | None = None
    available: bool = True
    note: str | None = None


@dataclass
class EvaluationSet:
    """Held-out data opened and checked against a float model; built by :func:`open_evaluation`."""

    float_model: onnx.ModelProto
    model_name: str
    specs: tuple[InputSpec, ...]
    output: str
    output_kind: str
    classification: bool
    stream: _EvalStream
    labels: Labels | None
    config: EvaluateConfig

    @property
    def labelled(self) -> bool:
        return self.stream.labels is not None


def open_evaluation(
    float_model: onnx.ModelProto,
    eval_data: Any,
    config: EvaluateConfig,
    *,
    labels: Any = None,
    images: ImagePreprocessing | None = None,
    model_name: str = "<ModelProto>",
) -> EvaluationSet:
    """Open the evaluation data and labels and check them on the float model's first batch.

    Fails fast (before any long pass): unknown ``config.output``, data that do
    not fit the model, labels that do not match the samples, a non-classification
    output with labels, labels outside the model's classes. Also decides the
    output kind (``config.output_kind="auto"``).
    """
    if isinstance(eval_data, str) and eval_data == "random":
        raise DataError("evaluation data cannot be 'random'; pass held-out data with --data")
    out_names = [o.name for o in float_model.graph.output]
    output = config.output or out_names[0]
    if output not in out_names:
        raise ConfigError(f"model has no output {output!r}; its outputs are {', '.join(out_names)}")
    specs = model_inputs(float_model)
    stream, resolved_labels = _open_eval_data(eval_data, labels, specs, config, images)
    check = Job(
        float_model, stream.data, OutputCollector((output,)),
        SessionOptions(intra_op_threads=config.session_threads), max_batches=1,
        what="float model",
    )  # fmt: skip
    first = np.asarray(LocalExecutor().run(check)[output][0])
    scores = as_classification(first)
    output_kind = config.output_kind
    if output_kind == "auto":
        output_kind = detect_output_kind(scores) if scores is not None else "logits"
        log.info("output %r read as %s", output, output_kind)
    if stream.labels is not None:
        if scores is None:
            raise DataError(
                f"labels need a classification output [N, classes]; output {output!r} has shape "
                f"{tuple(first.shape)}; evaluate without --labels for fidelity metrics"
            )
        if stream.labels.size and int(stream.labels.max()) >= scores.shape[1]:
            raise DataError(
                f"label {int(stream.labels.max())} is outside the model's {scores.shape[1]} classes "
                f"(0..{scores.shape[1] - 1}); check the label file"
            )
    return EvaluationSet(
        float_model=float_model,
        model_name=model_name,
        specs=specs,
        output=output,
        output_kind=output_kind,
        classification=scores is not None,
        stream=stream,
        labels=resolved_labels,
        config=config,
    )


def evaluate_models(
    evaluation: EvaluationSet,
    rows: Sequence[ModelRow],
    *,
    int8_model: onnx.ModelProto,
    calib: CalibrationData,
    warnings: Sequence[str] = (),
    transform_report: Mapping[str, Any] | None = None,
    started: float | None = None,
    executor: Executor | None = None,
) -> EvaluationResult:
    """Score ``rows`` (models already built) on ``evaluation``'s data; apply the gate.

    ``int8_model``: the threads=1 model the per-layer SQNR of the NB-SMT rows
    is measured against; ``calib``: the calibration data the models were built
    with (its samples are hashed to warn about evaluation samples that also
    occur in it, and it is described in the result). ``evaluate`` and
    ``transform`` (with an evaluation set) both end here.

    All rows run in one lockstep pass through ``executor`` (in process by
    default; :class:`ScoringReducer`): the same held-out batch goes through
    every row's model, so every difference between rows is a paired one, and
    the result does not depend on how the batches were spread over workers.
    """
    config = evaluation.config
    started = time.perf_counter() if started is None else started
    warnings = list(warnings)
    specs = evaluation.specs
    output, output_kind = evaluation.output, evaluation.output_kind
    stream = evaluation.stream
    labelled = evaluation.labelled
    sopts = SessionOptions(intra_op_threads=config.session_threads)

    # Content hashes of the calibration samples actually used (one streamed load pass).
    calib_digests: set[bytes] = set()
    if not calib.is_random:
        for batch in calib.batches():
            calib_digests.update(_sample_digests(batch, specs))

    runners: list[_Runner] = []
    for row in rows:
        r = _Runner(
            row.spec, row.spec.id, row.name, available=row.available, note=row.note,
            prepare_s=row.prepare_s, recalibration=row.recalibration,
        )  # fmt: skip
        if row.available and not row.spec.is_float:
            if row.model is None:
                raise InternalError(f"row {row.spec.id!r} is available but has no model")
            else:
                r.model = row.model
        runners.append(r)
    if len({r.row_id for r in runners}) != len(runners):
        raise InternalError(f"duplicate row ids: {[r.row_id for r in runners]}")

    # --- models: stats outputs everywhere; NB-SMT layer outputs for per-layer SQNR vs int8
    available = [r for r in runners if r.available]
    nbsmt_rows = [r for r in available if not r.spec.is_float]
    want_layers = config.layer_samples > 0 and any(r.spec.kind != "int8" for r in nbsmt_rows)
    int8_tensors = _produced(int8_model)
    probed: dict[str, onnx.ModelProto] = {}
    for r in nbsmt_rows:
        assert r.model is not None
        probed[r.row_id], r.stats_outputs = add_stats_outputs(r.model)
        r.op_types = {n.name: n.op_type for n in r.model.graph.node if n.domain == schema.DOMAIN}
        if want_layers and r.spec.kind != "int8":
            r.layer_outputs = {
                node: t for node, t in _nbsmt_outputs(r.model).items() if t in int8_tensors
            }
    ref_tensors = sorted({t for r in nbsmt_rows for t in r.layer_outputs.values()})
    int8_runner = next((r for r in nbsmt_rows if r.spec.kind == "int8"), None)
    reference_model: onnx.ModelProto | None = None  # int8, only for the reference tensors
    if ref_tensors:
        if int8_runner is not None:
            _expose(probed[int8_runner.row_id], ref_tensors)
        else:
            reference_model = _expose(add_stats_outputs(int8_model)[0], ref_tensors)
    for r in nbsmt_rows:
        _expose(probed[r.row_id], r.layer_outputs.values())

    # --- one lockstep pass through the executor: float first (the reference), then the int8
    # reference tensors, then int8, then the rest; the batches holding the first
    # ``layer_samples`` samples also fetch the per-layer tensors (a job of their own)
    ordered = sorted(available, key=lambda r: (not r.spec.is_float, r is not int8_runner))
    float_row = next((r for r in ordered if r.spec.is_float), None)
    if float_row is None:
        raise InternalError("the evaluation has no float32 row (the reference of every metric)")

    def slot(r: _Runner, layers: bool) -> _ModelSlot:
        return _ModelSlot(
            r.row_id,
            r.spec.is_float,
            tuple(r.stats_outputs.items()),
            tuple(r.layer_outputs.items()) if layers else (),
            layers and r is int8_runner,
        )

    def job(layers: bool, start: int, stop: int | None) -> Job[_ScorePartial]:
        slots = [slot(r, layers) for r in ordered]
        models = [probed[r.row_id] for r in ordered[1:]]
        if layers and reference_model is not None:
            slots.insert(1, _ModelSlot("int8-reference", False, (), (), True, True))
            models.insert(0, reference_model)
        reducer = ScoringReducer(
            tuple(slots), output, output_kind, specs, stream.labels,
            tuple(ref_tensors) if layers else (), config.layer_samples,
        )  # fmt: skip
        return Job(
            evaluation.float_model, stream.data, reducer, sopts, max_batches=stop, start=start,
            what="evaluation models", lockstep=tuple(models),
        )  # fmt: skip

    batches = stream.data.num_batches
    jobs = []
    if ref_tensors and batches is not None and stream.data.batch_size > 0:
        with_layers = min(batches, -(-config.layer_samples // stream.data.batch_size))
        jobs.append(job(True, 0, with_layers))
        if with_layers < batches:
            jobs.append(job(False, with_layers, None))
    else:  # batches of unknown sizes: every batch fetches the layers, the reducer checks
        jobs.append(job(bool(ref_tensors), 0, None))
    with Progress("evaluate", batches, enabled=config.progress) as bar:
        # In process the count restarts with each job; on Ray it counts shards of all jobs.
        base, last = 0, 0

        def progress(count: int, total: int | None) -> None:
            nonlocal base, last
            if count < last:
                base += last
            last = count
            bar.update(base + count, None if total is None else base + total)

        parts = (executor or LocalExecutor()).map(jobs, progress)
    scored = parts[0]
    for part in parts[1:]:
        scored = jobs[0].reducer.merge(scored, part)

    for r in available:
        score = scored.rows[r.row_id]
        r.samples, r.inference_s = score.samples, score.inference_s
        r.accuracy = score.accuracy if labelled else None
        r.agreement = None if r.spec.is_float else score.agreement
        r.stats, r.layer_sqnr = score.stats, score.layer_sqnr
    duplicates = within_eval = position = 0
    seen_eval: set[bytes] = set()
    for digests in scored.digests:
        duplicates += sum(d in calib_digests for d in digests)
        within_eval += sum(d in seen_eval for d in digests)
        seen_eval.update(digests)
        position += len(digests)

    if duplicates:
        msg = (
            f"{duplicates} evaluation sample(s) also occur in the calibration data (same bytes); "
            "the results may be optimistic"
        )
        log.warning(msg)
        warnings.append(msg)
    if within_eval:
        log.info("%d evaluation sample(s) occur more than once in the evaluation data", within_eval)

    uncertainty = _uncertainty(runners, config, labelled)
    macs = _count_macs(int8_model, stream.data) if nbsmt_rows else None
    finished = tuple(_finish_row(r, labelled, uncertainty.get(r.row_id), macs) for r in runners)
    gate = _gate(finished, config, labelled)
    return EvaluationResult(
        rows=finished,
        model=evaluation.model_name,
        output=output,
        output_kind=output_kind,
        classification=evaluation.classification,
        labels=evaluation.labels.description if evaluation.labels is not None else None,
        eval_data={
            "source": stream.data.description,
            "samples": position,
            "seed": config.eval_seed,
            "batch_size": stream.data.batch_size,
            "subset": config.eval_samples is not None,
        },
        calib_data={
            "source": calib.description,
            "samples": calib.num_samples,
            "seed": calib.seed,
            "batch_size": calib.batch_size,
            "random": calib.is_random,
        },
        duplicates=duplicates,
        gate=gate,
        config=config,
        warnings=tuple(warnings),
        wall_time_s=time.perf_counter() - started,
        transform_report=dict(transform_report or {}),
    )


@dataclass(frozen=True)
class _RowUncertainty:
    intervals: dict[str, Interval | None]
    reference: str | None
    difference: dict[str, PairedDifference | None]
    unrecalibrated: str | None = None
    recalibration_effect: dict[str, PairedDifference | None] = field(default_factory=dict)


def _uncertainty(
    runners: Sequence[_Runner], config: EvaluateConfig, labelled: bool
) -> dict[str, _RowUncertainty]:
    """Intervals of every available row and its paired difference to the reference row.

    Every available row ran on the same samples in the same order, so the
    per-sample values of two rows pair up. Proportions: Wilson intervals and
    Newcombe's paired interval + McNemar's exact p (``metrics``); the float32
    row agrees with itself on every sample. KL / cosine / SQNR: one seeded
    bootstrap (the same resamples for every row and metric), percentile
    intervals of each row's value and of its difference to the reference.
    """
    available = [r for r in runners if r.available and r.samples > 0]
    if not available:
        return {}
    n = available[0].samples
    if any(r.samples != n for r in available):
        raise InternalError(
            f"rows saw different numbers of samples: {[r.samples for r in available]}"
        )

    def proportions(r: _Runner) -> dict[str, np.ndarray | None]:
        out: dict[str, np.ndarray | None] = dict.fromkeys(_PROPORTIONS)
        if labelled and r.accuracy is not None:
            out["top1"], out["top5"] = r.accuracy.hits(1), r.accuracy.hits(5)
        if r.spec.is_float:
            out["agreement"] = np.ones(n, dtype=bool)
        elif r.agreement is not None:
            out["agreement"] = r.agreement.per_sample("agree")
        return out

    # One bootstrap for all rows: columns kl, cosine, signal, noise of every NB-SMT row.
    columns: list[np.ndarray] = []
    where: dict[tuple[str, str], int] = {}
    for r in available:
        if r.agreement is None:
            continue
        for key in ("kl", "cosine", "signal", "noise"):
            v = r.agreement.per_sample(key)
            if v is not None:
                where[(r.row_id, key)] = len(columns)
                columns.append(v)
    boot = (
        resample_means(np.stack(columns, axis=1), config.bootstrap_resamples, config.bootstrap_seed)
        if columns
        else np.zeros((0, 0))
    )

    def boot_stat(row_id: str, key: str) -> np.ndarray | None:
        """The row's metric under every resample (None = not applicable)."""
        if key == "sqnr_db":
            s_col, n_col = where.get((row_id, "signal")), where.get((row_id, "noise"))
            if s_col is None or n_col is None:
                return None
            with np.errstate(divide="ignore", invalid="ignore"):
                return 10.0 * np.log10(boot[:, s_col] / boot[:, n_col])
        col = where.get((row_id, key))
        return None if col is None else boot[:, col]

    def compare(r: _Runner, other: _Runner) -> dict[str, PairedDifference | None]:
        """``r - other`` of every metric on the same samples (None = not applicable)."""
        difference: dict[str, PairedDifference | None] = dict.fromkeys(_METRIC_KEYS)
        props, other_props = proportions(r), proportions(other)
        for key in _PROPORTIONS:
            a, b = props[key], other_props[key]
            if a is not None and b is not None:
                difference[key] = paired_proportion_difference(a, b)
        metrics = r.agreement.result() if r.agreement is not None else {}
        other_metrics = other.agreement.result() if other.agreement is not None else {}
        for key in _CONTINUOUS:
            stat, value = boot_stat(r.row_id, key), metrics.get(key)
            if stat is None or value is None:
                continue
            if other.spec.is_float:
                if key == "sqnr_db":
                    continue  # float32 vs itself: infinite SQNR, no finite difference
                # the float row's KL with itself is 0, its cosine 1 (on every resample)
                other_stat: np.ndarray | None = np.full_like(stat, 0.0 if key == "kl" else 1.0)
                other_value: float | None = 0.0 if key == "kl" else 1.0
            else:
                other_stat, other_value = boot_stat(other.row_id, key), other_metrics.get(key)
            if other_stat is None or other_value is None:
                continue
            estimate = float(value) - float(other_value)
            if not math.isfinite(estimate):
                continue
            with np.errstate(invalid="ignore"):
                interval = percentile_interval(stat - other_stat)
            if interval is not None:
                difference[key] = PairedDifference(estimate, interval, samples=n)
        return difference

    ref = next((r for r in available if r.spec.kind == config.reference), None)
    unrecalibrated = {
        (r.spec.kind, r.spec.threads, r.spec.mapping, r.spec.reduce): r
        for r in available
        if not r.spec.recalibrated
    }
    out: dict[str, _RowUncertainty] = {}
    for r in available:
        metrics = r.agreement.result() if r.agreement is not None else {}
        intervals: dict[str, Interval | None] = dict.fromkeys(_METRIC_KEYS)
        props = proportions(r)
        for key in _PROPORTIONS:
            vec = props[key]
            if vec is not None and not (r.spec.is_float and key == "agreement"):
                intervals[key] = wilson_interval(int(np.sum(vec)), int(vec.size))
        for key in _CONTINUOUS:
            stat = boot_stat(r.row_id, key)
            if stat is not None and metrics.get(key) is not None:
                intervals[key] = percentile_interval(stat)
        has_ref = ref is not None and r is not ref
        base = None
        if r.spec.recalibrated:
            kind = r.spec.kind.removesuffix("+recal")
            base = unrecalibrated.get((kind, r.spec.threads, r.spec.mapping, r.spec.reduce))
        out[r.row_id] = _RowUncertainty(
            intervals,
            ref.row_id if (has_ref and ref is not None) else None,
            compare(r, ref) if (has_ref and ref is not None) else dict.fromkeys(_METRIC_KEYS),
            base.row_id if base is not None else None,
            compare(r, base) if base is not None else {},
        )
    return out


def _finish_row(
    r: _Runner,
    labelled: bool,
    uncertainty: _RowUncertainty | None,
    macs: MacCount | None = None,
) -> EvaluationRow:
    metrics: dict[str, float | None] = dict.fromkeys(_METRIC_KEYS)
    if r.available:
        if r.accuracy is not None and labelled:
            metrics.update(r.accuracy.result())
        if r.agreement is not None:
            metrics.update(r.agreement.result())
    layers: list[dict[str, Any]] = []
    for node in r.stats_outputs:
        entry: dict[str, Any] = {"node": node, "op_type": r.op_types.get(node)}
        if node in r.stats:
            entry["nbsmt"] = layer_metrics(np.asarray(r.stats[node]), int(r.spec.threads or 1))
        acc = r.layer_sqnr.get(node)
        entry["sqnr_vs_int8_db"] = acc.result() if acc is not None else None
        entry["sqnr_samples"] = acc.count if acc is not None else 0
        layers.append(entry)
    return EvaluationRow(
        id=r.row_id,
        name=r.name,
        kind=r.spec.kind,
        threads=r.spec.threads,
        mapping=r.spec.mapping,
        reduce=r.spec.reduce,
        recalibrated=r.spec.recalibrated,
        available=r.available,
        note=r.note,
        metrics=metrics,
        samples=r.samples,
        prepare_s=r.prepare_s,
        inference_s=r.inference_s,
        layers=tuple(layers),
        recalibration=r.recalibration,
        intervals=dict(uncertainty.intervals) if uncertainty else {},
        reference=uncertainty.reference if uncertainty else None,
        difference=dict(uncertainty.difference) if uncertainty else {},
        unrecalibrated=uncertainty.unrecalibrated if uncertainty else None,
        recalibration_effect=dict(uncertainty.recalibration_effect) if uncertainty else {},
        speedup=_row_speedup(r.model, macs) if r.available and not r.spec.is_float else None,
    )


def _row_speedup(model: onnx.ModelProto | None, macs: MacCount | None) -> float | None:
    """The speed-up of ``model`` with the MACs of ``macs`` and the threads of its own NbSmt nodes.

    The threads are read from the model (node attributes), not from the row's
    settings, so a model built with per-layer threads reports its own figure.
    """
    if model is None or macs is None or macs.unknown:
        return None
    threads = {n.name: node_threads(n) for n in nbsmt_nodes(model)}
    layers = []
    for layer in macs.layers:
        if layer.op_type in schema.OP_TYPES:
            if layer.name not in threads:
                return None  # a different graph than the one counted
            layer = replace(layer, threads=threads[layer.name])
        layers.append(layer)
    return speedup(layers)


def _count_macs(model: onnx.ModelProto, data: CalibrationData) -> MacCount | None:
    """Per-sample MACs of ``model`` on the shapes of ``data``'s first batch; None if unknowable."""
    first = data.first_batch()
    try:
        return layer_macs(model, {k: v.shape for k, v in first.items()}, data.samples_in(first))
    except InternalError as err:  # a reporting figure must not stop the evaluation
        log.warning("speed-up figure unavailable: %s", err)
        return None


def write_text(path: str | Path, text: str, *, force: bool = False) -> Path:
    """Write ``text`` atomically (``io.write_text``: the one text writer)."""
    return io.write_text(path, text, force=force)


__all__ = [
    "DEFAULT_ROWS",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_THRESHOLD",
    "EXIT_USER_ERROR",
    "GATE_BOUNDS",
    "REFERENCE_CHOICES",
    "ROW_KINDS",
    "EvaluateConfig",
    "EvaluationResult",
    "EvaluationRow",
    "EvaluationSet",
    "GateCheck",
    "GateResult",
    "ModelRow",
    "NbsmtError",
    "RowSpec",
    "check_disjoint_paths",
    "evaluate_models",
    "format_table",
    "open_evaluation",
    "plan_rows",
    "with_nbsmt_settings",
    "write_text",
]
