"""``evaluate``: the paper's table for any model — float32, int8, NB-SMT with and without recalibration.

``evaluate(model, eval_data, calib_data, config)`` (the CLI's ``nbsmt-onnx
evaluate`` is a thin layer over it):

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
5. check the thresholds (``max_drop``, ``min_agreement``): the pipeline gate.

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
import os
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper
from tqdm import tqdm

from nbsmt_onnx import io
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
from nbsmt_onnx.config import ImagePreprocessing, TransformConfig
from nbsmt_onnx.errors import ConfigError, DataError, InternalError, NbsmtError, OutputError
from nbsmt_onnx.metrics import (
    OUTPUT_KINDS,
    Agreement,
    SqnrAccumulator,
    TopKAccuracy,
    as_classification,
    detect_output_kind,
)
from nbsmt_onnx.ops import schema
from nbsmt_onnx.report import add_stats_outputs, layer_metrics
from nbsmt_onnx.runtime.library import get_library_path
from nbsmt_onnx.runtime.session import SessionOptions, create_session

log = logging.getLogger(__name__)

RESULT_FORMAT = "nbsmt-onnx/evaluation"
RESULT_VERSION = 1

#: Row kinds: the float model, int8 (NB-SMT with T=1 = exact int8 GEMM), NB-SMT
#: at every swept setting, each optionally recalibrated.
ROW_KINDS = ("float32", "int8", "int8+recal", "nbsmt", "nbsmt+recal")
DEFAULT_ROWS = ("float32", "int8", "nbsmt", "nbsmt+recal")
REFERENCE_CHOICES = ("float32", "int8")

#: Exit codes of ``nbsmt-onnx evaluate`` (docs/evaluate.md).
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: Python traceback
EXIT_USER_ERROR = 2  # NbsmtError.exit_code: bad option, data, model, path
EXIT_THRESHOLD = 3  # evaluation ran, a configuration missed --max-drop / --min-agreement

_METRIC_KEYS = ("top1", "top5", "agreement", "kl", "cosine", "sqnr_db")


def _tuple(name: str, value: object, choices: Sequence[Any]) -> tuple[Any, ...]:
    items = (value,) if isinstance(value, (str, int)) else tuple(value)  # type: ignore[arg-type]
    if not items:
        raise ConfigError(f"{name} must not be empty")
    for item in items:
        if item not in choices:
            valid = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{name} must contain only {valid}; got {item!r}")
    if len(set(items)) != len(items):
        raise ConfigError(f"{name} lists a value twice: {list(items)}")
    return items


def _optional_positive_int(name: str, value: object) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"{name} must be a positive integer; got {value!r}")


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything ``evaluate`` needs besides the model and the data; validated on construction.

    ``rows``: row kinds (:data:`ROW_KINDS`) in table order; None = :data:`DEFAULT_ROWS`,
    and then recalibrated rows that cannot be computed (random calibration data)
    are listed as unavailable instead of failing. ``threads`` x ``mappings`` x
    ``reduces`` is the NB-SMT sweep grid of the ``nbsmt`` / ``nbsmt+recal`` rows.
    ``transform``: calibration settings (samples, batch size, seed, ranges,
    selection, recalibration strategy / fold / correction); its threads,
    mapping, reduce, export and ``recalibration.enabled`` are set per row.
    ``eval_samples``: a seeded random subset (``eval_seed``) of the evaluation
    data, None = all. ``output``: the model output to score (default the
    first). ``output_kind``: how KL reads the output (:data:`metrics.OUTPUT_KINDS`).
    Gate: ``max_drop`` (percentage points of top-1 accuracy with labels, of
    top-1 agreement with the float model without, vs the ``reference`` row)
    and ``min_agreement`` (fraction) apply to the rows of kinds ``gate_rows``
    (None = the recalibrated NB-SMT rows if any, else the NB-SMT rows).
    ``layer_samples``: evaluation samples used for per-layer output SQNR vs int8
    (0 = off; memory grows with the batch's activations, not with this number).
    """

    rows: tuple[str, ...] | None = None
    threads: tuple[int, ...] = (2, 4)
    mappings: tuple[str, ...] = ("channel",)
    reduces: tuple[str, ...] = ("activations",)
    transform: TransformConfig = field(default_factory=TransformConfig)
    eval_samples: int | None = None
    eval_batch_size: int = 16
    eval_seed: int = 0
    output: str | None = None
    output_kind: str = "auto"
    reference: str = "float32"
    max_drop: float | None = None
    min_agreement: float | None = None
    gate_rows: tuple[str, ...] | None = None
    layer_samples: int = 256
    session_threads: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.rows is not None:
            rows = _tuple("rows", self.rows, ROW_KINDS)
            if "float32" not in rows:
                raise ConfigError(
                    "rows must include 'float32' (the reference of every agreement metric)"
                )
            object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "threads", _tuple("threads", self.threads, schema.THREADS_CHOICES))
        object.__setattr__(
            self, "mappings", _tuple("mappings", self.mappings, schema.MAPPING_CHOICES)
        )
        object.__setattr__(self, "reduces", _tuple("reduces", self.reduces, schema.REDUCE_CHOICES))
        if not isinstance(self.transform, TransformConfig):
            raise ConfigError(f"transform must be a TransformConfig; got {self.transform!r}")
        _optional_positive_int("eval_samples", self.eval_samples)
        _optional_positive_int("eval_batch_size", self.eval_batch_size)
        if (
            not isinstance(self.eval_seed, int)
            or isinstance(self.eval_seed, bool)
            or self.eval_seed < 0
        ):
            raise ConfigError(f"eval_seed must be a non-negative integer; got {self.eval_seed!r}")
        if self.output_kind not in OUTPUT_KINDS:
            raise ConfigError(
                f"output_kind must be one of {', '.join(map(repr, OUTPUT_KINDS))}; got {self.output_kind!r}"
            )
        if self.reference not in REFERENCE_CHOICES:
            raise ConfigError(
                f"reference must be one of {', '.join(map(repr, REFERENCE_CHOICES))}; got {self.reference!r}"
            )
        if self.reference not in self.row_kinds:
            raise ConfigError(
                f"reference {self.reference!r} is not among the rows {list(self.row_kinds)}; add it"
            )
        if self.max_drop is not None and not (
            isinstance(self.max_drop, (int, float))
            and math.isfinite(self.max_drop)
            and self.max_drop >= 0
        ):
            raise ConfigError(f"max_drop must be a number of points >= 0; got {self.max_drop!r}")
        if self.min_agreement is not None and not (
            isinstance(self.min_agreement, (int, float)) and 0.0 <= self.min_agreement <= 1.0
        ):
            raise ConfigError(
                f"min_agreement must be a fraction in [0, 1] (e.g. 0.95); got {self.min_agreement!r}"
            )
        if self.gate_rows is not None:
            gate = _tuple("gate_rows", self.gate_rows, ROW_KINDS)
            missing = [g for g in gate if g not in self.row_kinds]
            if missing:
                raise ConfigError(
                    f"gate_rows {missing} are not among the rows {list(self.row_kinds)}"
                )
            object.__setattr__(self, "gate_rows", gate)
        if not isinstance(self.layer_samples, int) or self.layer_samples < 0:
            raise ConfigError(f"layer_samples must be an integer >= 0; got {self.layer_samples!r}")
        if not isinstance(self.session_threads, int) or self.session_threads < 0:
            raise ConfigError(
                f"session_threads must be an integer >= 0; got {self.session_threads!r}"
            )

    @property
    def row_kinds(self) -> tuple[str, ...]:
        return self.rows if self.rows is not None else DEFAULT_ROWS

    @property
    def gated_kinds(self) -> tuple[str, ...]:
        if self.gate_rows is not None:
            return self.gate_rows
        for kind in ("nbsmt+recal", "nbsmt"):
            if kind in self.row_kinds:
                return (kind,)
        return ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows"] = list(self.row_kinds)
        out["transform"] = self.transform.to_dict()
        out.pop("progress")
        return out


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
    value: float | None  # the row's value (drop in points, or agreement); None = not computable
    threshold: float
    passed: bool
    reason: str


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


@dataclass(frozen=True)
class EvaluationResult:
    """The table and everything needed to reproduce it."""

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
                "gate": {
                    "passed": self.gate.passed,
                    "exit_code": self.exit_code,
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
        """One line per row: settings, metrics, samples, times, gate verdict."""
        buf = _stdio.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(
            [
                "id", "name", "kind", "threads", "mapping", "reduce", "recalibrated",
                "available", *_METRIC_KEYS, "samples", "prepare_s", "inference_s", "gate",
            ]
        )  # fmt: skip
        verdicts = _row_verdicts(self.gate)
        for r in self.rows:
            writer.writerow(
                [
                    r.id, r.name, r.kind, _blank(r.threads), _blank(r.mapping), _blank(r.reduce),
                    int(r.recalibrated), int(r.available),
                    *[_blank(r.metrics.get(k)) for k in _METRIC_KEYS],
                    r.samples, f"{r.prepare_s:.3f}", f"{r.inference_s:.3f}", verdicts.get(r.id, ""),
                ]
            )  # fmt: skip
        return buf.getvalue()

    def format_table(self) -> str:
        """The terminal table (plain text) with a footer of counts, seeds and the gate verdict."""
        return format_table(self.to_dict())


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


def format_table(result: Mapping[str, Any]) -> str:
    """Plain-text table of an evaluation result dict (``EvaluationResult.to_dict()``)."""
    rows = result["rows"]
    columns: list[tuple[str, str, str]] = []  # header, metric key, format
    if result.get("labels"):
        columns += [("top-1", "top1", "pct"), ("top-5", "top5", "pct")]
    if result.get("classification", True):
        columns += [("agree", "agreement", "pct"), ("KL", "kl", "num")]
    columns += [("cosine", "cosine", "num"), ("SQNR dB", "sqnr_db", "db")]
    header = ["row", "settings", *[c[0] for c in columns], "time s"]
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
            cells = [r["name"], settings, f"unavailable: {r['note']}"]
            lines.append(cells)
            continue
        cells = [r["name"], settings]
        cells += [_fmt(r["metrics"].get(key), kind) for _, key, kind in columns]
        cells.append(f"{r['wall_s']:.1f}")
        if verdicts:
            cells.append(verdicts.get(r["id"], ""))
        lines.append(cells)
    widths = [len(h) for h in header]
    for cells in lines:
        if len(cells) == len(header) or len(cells) == len(header) - (1 if verdicts else 0):
            for i, c in enumerate(cells):
                widths[i] = max(widths[i], len(c))

    def render(cells: list[str]) -> str:
        if len(cells) == 3 and cells[2].startswith("unavailable"):
            return f"{cells[0]:<{widths[0]}}  {cells[1]:<{widths[1]}}  {cells[2]}"
        parts = []
        for i, c in enumerate(cells):
            parts.append(f"{c:<{widths[i]}}" if i < 2 else f"{c:>{widths[i]}}")
        return "  ".join(parts).rstrip()

    out = [render(header), "  ".join("-" * w for w in widths)]
    out += [render(cells) for cells in lines]
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
        if gate["passed"]:
            out.append(f"gate: passed ({len(gate['checks'])} check(s))")
        else:
            for c in gate["checks"]:
                if not c["passed"]:
                    out.append(f"gate: FAILED {c['row']}: {c['reason']}")
    return "\n".join(out)


def _version() -> str:
    from nbsmt_onnx import __version__

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
            "evaluation data has %d samples; using all of them (%d requested)",
            total,
            config.eval_samples,
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
    """One row's model and session, and its running sums."""

    spec: RowSpec
    row_id: str
    name: str
    session: Any = None
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


def _variant_config(base: TransformConfig, spec: RowSpec) -> TransformConfig:
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
    if config.max_drop is None and config.min_agreement is None:
        return GateResult()
    metric = "top1" if labelled else "agreement"
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
            if value is None or ref_value is None:
                checks.append(
                    GateCheck(r.id, "max_drop", None, float(config.max_drop), False,
                              f"{what} cannot be computed ({r.note or 'metric unavailable'})")
                )  # fmt: skip
            else:
                drop = 100.0 * (ref_value - value)
                ok = drop <= config.max_drop
                checks.append(
                    GateCheck(
                        r.id, "max_drop", drop, float(config.max_drop), ok,
                        f"{what} is {drop:.2f} points ({'<=' if ok else '>'} {config.max_drop:g})",
                    )
                )  # fmt: skip
        if config.min_agreement is not None:
            agree = r.metrics.get("agreement") if r.available else None
            if agree is None:
                checks.append(
                    GateCheck(r.id, "min_agreement", None, float(config.min_agreement), False,
                              f"top-1 agreement cannot be computed ({r.note or 'not a classification output'})")
                )  # fmt: skip
            else:
                ok = agree >= config.min_agreement
                checks.append(
                    GateCheck(
                        r.id, "min_agreement", agree, float(config.min_agreement), ok,
                        f"top-1 agreement with float32 is {agree:.4f} ({'>=' if ok else '<'} {config.min_agreement:g})",
                    )
                )  # fmt: skip
    return GateResult(tuple(checks))


# --------------------------------------------------------------------------- evaluate


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
    float_session: Any
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
    sopts = SessionOptions(intra_op_threads=config.session_threads)
    with io.session_source(float_model) as src:
        float_session = create_session(src, sopts)
    first = np.asarray(float_session.run([output], stream.data.first_batch())[0])
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
        float_session=float_session,
        config=config,
    )


def evaluate(
    model: str | Path | onnx.ModelProto,
    eval_data: Any,
    calib_data: Any,
    config: EvaluateConfig | None = None,
    *,
    labels: Any = None,
    images: ImagePreprocessing | None = None,
) -> EvaluationResult:
    """Evaluate float32 / int8 / NB-SMT (with and without recalibration) on held-out data.

    ``eval_data`` / ``calib_data``: what ``transform`` accepts as calibration
    data (paths, mappings of arrays, feed iterables; ``"random"`` only for
    calibration, smoke tests). ``labels``: a ``.npy`` / ``.csv`` path, an
    array, ``"folders"`` (class sub-folders of an image folder), or None for
    fidelity metrics only. ``images``: preprocessing of image folders (both sets).
    """
    from nbsmt_onnx.api import transform

    started = time.perf_counter()
    config = EvaluateConfig() if config is None else config
    if not isinstance(config, EvaluateConfig):
        raise ConfigError(f"config must be an EvaluateConfig; got {type(config).__name__}")
    warnings: list[str] = []
    if isinstance(eval_data, str) and eval_data == "random":
        raise DataError("evaluation data cannot be 'random'; pass held-out data with --data")
    check_disjoint_paths(eval_data, calib_data)
    get_library_path()  # fail before any long pass if the library is missing

    if isinstance(model, onnx.ModelProto):
        float_model = onnx.ModelProto()
        float_model.CopyFrom(model)
        io.check_model(float_model, what="input model")
        model_name = "<ModelProto>"
    else:
        float_model = io.load_model(Path(model))
        model_name = str(model)
    if config.output is not None and config.output not in {
        o.name for o in float_model.graph.output
    }:
        names = ", ".join(o.name for o in float_model.graph.output)
        raise ConfigError(f"model has no output {config.output!r}; its outputs are {names}")

    specs = model_inputs(float_model)
    tc = config.transform
    calib = open_calibration_data(
        calib_data, specs, num_samples=tc.num_samples, batch_size=tc.batch_size, seed=tc.seed,
        images=images,
    )  # fmt: skip
    evaluation = open_evaluation(
        float_model, eval_data, config, labels=labels, images=images, model_name=model_name
    )

    swept = {"mapping": len(config.mappings) > 1, "reduce": len(config.reduces) > 1}
    planned = plan_rows(config)
    unavailable: dict[str, str] = {}
    for spec in planned:
        if not spec.recalibrated:
            continue
        reason = None
        if calib.is_random:
            reason = "random calibration data (recalibration needs real data)"
        if reason is not None:
            if config.rows is not None:
                raise ConfigError(f"row {spec.kind!r} cannot be computed: {reason}")
            unavailable[spec.id] = reason
            warnings.append(f"{spec.name(swept)}: unavailable: {reason}")

    # --- models: one int8 transform, attribute edits, one transform per recalibrated row.
    # The recalibrated rows reuse the int8 transform's activation ranges (the float pass
    # over the calibration data gives the same ranges for every variant).
    t0 = time.perf_counter()
    int8_spec = RowSpec("int8", 1, "channel", "activations")
    base = transform(float_model, calib, _variant_config(tc, int8_spec))
    base_s = time.perf_counter() - t0
    warnings.extend(w for w in base.warnings if w not in warnings)
    int8_model = base.sim_model
    rows: list[ModelRow] = []
    for spec in planned:
        name = spec.name(swept)
        if spec.id in unavailable:
            rows.append(ModelRow(spec, None, name, available=False, note=unavailable[spec.id]))
        elif spec.is_float:
            rows.append(ModelRow(spec, None, name))
        elif not spec.recalibrated:
            assert spec.threads and spec.mapping and spec.reduce
            model_t = with_nbsmt_settings(int8_model, spec.threads, spec.mapping, spec.reduce)
            rows.append(
                ModelRow(spec, model_t, name, prepare_s=base_s if spec.kind == "int8" else 0.0)
            )
        else:
            log.info("transform with recalibration: %s", name)
            t0 = time.perf_counter()
            res = transform(float_model, calib, _variant_config(tc, spec), ranges=base.ranges)
            rows.append(
                ModelRow(
                    spec, res.sim_model, name, prepare_s=time.perf_counter() - t0,
                    recalibration=res.report.get("recalibration"),
                )
            )  # fmt: skip
    return evaluate_models(
        evaluation,
        rows,
        int8_model=int8_model,
        calib=calib,
        warnings=warnings,
        transform_report=base.report,
        started=started,
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
) -> EvaluationResult:
    """Score ``rows`` (models already built) on ``evaluation``'s data; apply the gate.

    ``int8_model``: the threads=1 model the per-layer SQNR of the NB-SMT rows
    is measured against; ``calib``: the calibration data the models were built
    with (its samples are hashed to warn about evaluation samples that also
    occur in it, and it is described in the result). ``evaluate`` and
    ``transform`` (with an evaluation set) both end here.
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
        if row.available:
            if row.spec.is_float:
                r.session = evaluation.float_session
            elif row.model is None:
                raise InternalError(f"row {row.spec.id!r} is available but has no model")
            else:
                r.model = row.model
        runners.append(r)
    if len({r.row_id for r in runners}) != len(runners):
        raise InternalError(f"duplicate row ids: {[r.row_id for r in runners]}")

    # --- sessions: stats outputs everywhere; NB-SMT layer outputs for per-layer SQNR vs int8
    int8_spec = RowSpec("int8", 1, "channel", "activations")
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
    layer_ref: _Runner | None = None
    if ref_tensors:
        if int8_runner is not None:
            layer_ref = int8_runner
            _expose(probed[int8_runner.row_id], ref_tensors)
        else:
            # No int8 row: a separate int8 session only for the reference tensors.
            layer_ref = _Runner(int8_spec, "int8-reference", "int8")
            layer_ref.model = _expose(add_stats_outputs(int8_model)[0], ref_tensors)
    for r in nbsmt_rows:
        _expose(probed[r.row_id], r.layer_outputs.values())
        with io.session_source(probed[r.row_id]) as src:
            r.session = create_session(src, sopts)
    if layer_ref is not None and layer_ref.session is None:
        assert layer_ref.model is not None
        with io.session_source(layer_ref.model) as src:
            layer_ref.session = create_session(src, sopts)

    # --- lockstep evaluation: float first (the reference), then int8, then the rest
    for r in available:
        r.accuracy = TopKAccuracy() if labelled else None
        r.agreement = None if r.spec.is_float else Agreement(kind=output_kind)
    ordered = sorted(available, key=lambda r: (not r.spec.is_float, r is not int8_runner))
    duplicates = within_eval = position = 0
    seen_eval: set[bytes] = set()
    bar = tqdm(
        total=stream.data.num_batches, desc="evaluate", unit="batch", file=sys.stderr,
        disable=not config.progress or None, leave=False,
    )  # fmt: skip
    try:
        for feed in stream.data.batches():
            digests = _sample_digests(feed, specs)
            n = len(digests)
            duplicates += sum(d in calib_digests for d in digests)
            within_eval += sum(d in seen_eval for d in digests)
            seen_eval.update(digests)
            batch_labels = None if stream.labels is None else stream.labels[position : position + n]
            layers_now = bool(ref_tensors) and position < config.layer_samples
            ref_layers: dict[str, np.ndarray] = {}
            if layers_now and layer_ref is not None and layer_ref is not int8_runner:
                values = layer_ref.session.run(ref_tensors, feed)
                ref_layers = dict(zip(ref_tensors, values, strict=True))
            reference_out: np.ndarray | None = None
            for r in ordered:
                wanted = [output, *r.stats_outputs.values()]
                if layers_now:
                    extra = ref_tensors if r is layer_ref else list(r.layer_outputs.values())
                else:
                    extra = []
                t0 = time.perf_counter()
                values = r.session.run(wanted + extra, feed)
                r.inference_s += time.perf_counter() - t0
                out = np.asarray(values[0])
                r.samples += n
                if r.accuracy is not None and batch_labels is not None:
                    r.accuracy.update(out, batch_labels)
                if r.spec.is_float:
                    reference_out = out
                    continue
                assert r.agreement is not None and reference_out is not None
                r.agreement.update(reference_out, out)
                for node, v in zip(r.stats_outputs, values[1 : len(wanted)], strict=True):
                    r.stats[node] = r.stats.get(node, 0) + np.asarray(v, dtype=np.int64)
                tensors = dict(zip(extra, values[len(wanted) :], strict=True))
                if r is layer_ref:
                    ref_layers = tensors
                    continue
                for node, t in r.layer_outputs.items():
                    if t in tensors and t in ref_layers:
                        r.layer_sqnr.setdefault(node, SqnrAccumulator()).update(
                            ref_layers[t], tensors[t]
                        )
            position += n
            bar.update(1)
    finally:
        bar.close()

    if duplicates:
        msg = (
            f"{duplicates} evaluation sample(s) also occur in the calibration data (same bytes); "
            "the results may be optimistic"
        )
        log.warning(msg)
        warnings.append(msg)
    if within_eval:
        log.info("%d evaluation sample(s) occur more than once in the evaluation data", within_eval)

    finished = tuple(_finish_row(r, labelled) for r in runners)
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


def _finish_row(r: _Runner, labelled: bool) -> EvaluationRow:
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
    )


def write_text(path: str | Path, text: str, *, force: bool = False) -> Path:
    """Write ``text`` atomically (temp file + rename); refuse to overwrite without ``force``.

    The temporary file is created with ``open(..., "x")`` so it gets the
    usual permissions (umask), unlike ``tempfile.mkstemp``'s 0600.
    """
    dest = Path(path)
    io.check_destination(dest, force=force, protect=())
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, dest)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {dest}: {err.strerror or err}") from err
    except BaseException:  # interrupted: no temporary file left behind
        tmp.unlink(missing_ok=True)
        raise
    return dest


__all__ = [
    "DEFAULT_ROWS",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_THRESHOLD",
    "EXIT_USER_ERROR",
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
    "evaluate",
    "evaluate_models",
    "format_table",
    "open_evaluation",
    "plan_rows",
    "with_nbsmt_settings",
    "write_text",
]
