"""The transform report (JSON): settings, per-layer quantization and NB-SMT statistics.

Per-layer NB-SMT numbers come from the ``stats`` output of every NB-SMT op
(docs/spec.md §3.4: ``[groups, active_slots, collisions, reduced_operands]``) summed
over one pass of the simulation model on the calibration data. With ``T``
threads the report defines:

- **MAC utilization** = ``active_slots / (groups * T)``: the fraction of the
  ``T`` thread slots of each (output element, step) pair that carry a
  non-zero product. ``T=1`` gives the fraction of non-zero products (the
  useful work of a dense int8 MAC); NB-SMT raises it by packing threads.
- **collision rate** = ``collisions / groups``: the fraction of (output
  element, step) pairs where two or more threads were active, i.e. where the
  MAC had to be shared and operands were reduced to 4 bits.
- **squeezed-operand fraction** = ``reduced_operands / (2 * active_slots)``:
  of all operands (one activation and one weight per active thread slot)
  that reached the MAC, the fraction whose value was changed by the 4-bit
  reduction R. 0 means NB-SMT computed exactly what int8 would.

Model totals use the same formulas on the sums over all layers (so they
are weighted by each layer's amount of work); with per-layer threads the
total utilization divides by ``sum(groups_l * T_l)``.

The summary's ``speedup`` is the MAC-weighted speed-up over an 8-bit array
without NB-SMT, ``sum(MACs) / sum(MACs / T)``, with every layer's MACs per
sample counted from the shapes of the first calibration batch
(``graph.threads``; layers left in float count with T = 1).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from nbsmt_onnx import io
from nbsmt_onnx.errors import ConfigError, UnsupportedModelError
from nbsmt_onnx.graph.naming import NameGenerator
from nbsmt_onnx.graph.rewrite import RewrittenNode, SkippedNode
from nbsmt_onnx.graph.threads import MacCount
from nbsmt_onnx.html_report import write_html
from nbsmt_onnx.ops import schema

log = logging.getLogger(__name__)

REPORT_FORMAT = "nbsmt-onnx/transform-report"
REPORT_VERSION = 1


def add_stats_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` whose NB-SMT nodes expose ``stats`` as graph outputs.

    Returns the copy and ``{node name: stats output name}``. The original
    graph outputs are kept (the same run verifies them).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = NameGenerator.for_model(out)
    mapping: dict[str, str] = {}
    for node in out.graph.node:
        if node.domain != schema.DOMAIN:
            continue
        if len(node.output) > 1 and node.output[1]:
            stats = node.output[1]
        else:
            stats = names.new(node.name, "stats")
            if len(node.output) == 1:
                node.output.append(stats)
            else:
                node.output[1] = stats
        mapping[node.name] = stats
        if stats not in {o.name for o in out.graph.output}:
            out.graph.output.append(
                helper.make_tensor_value_info(
                    stats, onnx.TensorProto.INT64, [len(schema.STATS_FIELDS)]
                )
            )
    return out, mapping


@dataclass(frozen=True)
class StatsReducer:
    """Executor reducer of the stats pass: sums every op's ``stats``; checks outputs are finite.

    ``outputs`` = the model's own outputs, then one ``stats`` output per op of
    ``ops`` (same order). The pass is also the verification run of the
    simulation model, so a NaN/Inf output is an error naming the output.
    """

    model_outputs: tuple[str, ...]
    ops: tuple[str, ...]
    stats_outputs: tuple[str, ...]

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.model_outputs + self.stats_outputs

    def reduce(
        self, outputs: Sequence[np.ndarray], batch: Mapping[str, np.ndarray], first_sample: int
    ) -> dict[str, np.ndarray]:
        n = len(self.model_outputs)
        for name, value in zip(self.model_outputs, outputs[:n], strict=True):
            arr = np.asarray(value)
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise UnsupportedModelError(
                    f"the simulation model produced NaN/Inf in output {name!r} (samples from "
                    f"{first_sample}); check the calibration ranges"
                )
        return {
            op: np.asarray(v, dtype=np.int64) for op, v in zip(self.ops, outputs[n:], strict=True)
        }

    def merge(
        self, left: dict[str, np.ndarray], right: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        return {op: left[op] + right[op] for op in self.ops}


def layer_metrics(stats: np.ndarray, threads: int) -> dict[str, float | int]:
    """The report's per-layer numbers from a summed ``stats`` vector (definitions in the module doc)."""
    groups, active, collisions, reduced = (int(v) for v in stats)
    return {
        "groups": groups,
        "active_slots": active,
        "collisions": collisions,
        "reduced_operands": reduced,
        "mac_utilization": active / (groups * threads) if groups else 0.0,
        "collision_rate": collisions / groups if groups else 0.0,
        "squeezed_operand_fraction": reduced / (2 * active) if active else 0.0,
    }


def build_report(
    *,
    version: str,
    settings: Mapping[str, Any],
    source: str,
    data: Mapping[str, Any],
    rewritten: Sequence[RewrittenNode],
    skipped: Sequence[SkippedNode],
    stats: Mapping[str, np.ndarray] | None,
    threads: Mapping[str, int],
    macs: MacCount | None = None,
    recalibration: Mapping[str, Any] | None = None,
    exports: Mapping[str, Any] | None = None,
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """Assemble the JSON-serialisable report dict."""
    layers = []
    total = np.zeros(len(schema.STATS_FIELDS), dtype=np.int64)
    capacity = 0  # thread slots offered: sum over layers of groups x T
    layer_macs = {m.name: m.macs for m in macs.layers} if macs is not None else {}
    for r in rewritten:
        entry: dict[str, Any] = {
            "node": r.node_name,
            "op_type": r.op_type,
            "source_op_type": r.source_op_type,
            "activation": r.activation,
            "activation_scale": r.act_scale,
            "activation_signed": r.act_signed,
            "activation_range": list(r.act_range),
            "weight_shape": list(r.weight_shape),
            "reduction_length": r.reduction_length,
            "weight_origin": r.weight_origin,
            "weight_shared": r.weight_shared,
            "threads": threads[r.node_name],
            "macs_per_sample": layer_macs.get(r.node_name),
        }
        if stats is not None and r.node_name in stats:
            s = np.asarray(stats[r.node_name], dtype=np.int64)
            total += s
            capacity += int(s[0]) * threads[r.node_name]
            entry["nbsmt"] = layer_metrics(s, threads[r.node_name])
        layers.append(entry)
    summary_stats = None
    if stats is not None:
        summary_stats = layer_metrics(total, 1)
        summary_stats["mac_utilization"] = int(total[1]) / capacity if capacity else 0.0
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "tool_version": version,
        "source_model": source,
        "settings": dict(settings),
        "calibration_data": dict(data),
        "summary": {
            "rewritten": len(rewritten),
            "skipped": len(skipped),
            "nbsmt": summary_stats,
            "speedup": macs.to_dict() if macs is not None else None,
        },
        "layers": layers,
        "skipped": [
            {"node": s.node_name, "op_type": s.op_type, "reason": s.reason} for s in skipped
        ],
        "warnings": list(warnings),
    }
    if recalibration is not None:
        report["recalibration"] = dict(recalibration)
    if exports is not None:
        report["exports"] = dict(exports)
    return report


#: Report formats by file suffix (any case); every command that writes a report uses these.
REPORT_SUFFIXES = {".html": "html", ".htm": "html", ".json": "json"}


def report_kind(path: str | Path) -> str:
    """``"html"`` or ``"json"`` from the suffix of ``path``; anything else is refused."""
    kind = REPORT_SUFFIXES.get(Path(path).suffix.lower())
    if kind is None:
        raise ConfigError(
            f"--report {path}: unknown report format {Path(path).suffix or '(no suffix)'!r}; "
            "end the path in .html (one page with plots) or .json"
        )
    return kind


def write_report(report: Mapping[str, Any], path: str | Path, *, force: bool = False) -> Path:
    """Write a report atomically: HTML (``html_report``) or JSON, chosen by :func:`report_kind`."""
    if report_kind(path) == "html":
        return write_html(report, path, force=force)
    return io.write_text(path, json.dumps(report, indent=2, sort_keys=False) + "\n", force=force)
