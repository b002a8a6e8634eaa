"""Render a report dict as one self-contained HTML file (plots as embedded PNG, no external resources).

Two kinds of report are understood, told apart by their ``format`` field:

- the evaluation result (``EvaluationResult.to_dict()``, ``nbsmt-onnx evaluate --report``):
  the table, per-layer NB-SMT statistics of every variant on the evaluation
  data, per-layer output SQNR vs int8, BatchNorm statistic shifts of the
  recalibrated rows, the gate;
- the transform report (``report.build_report``, ``nbsmt-onnx transform``):
  per-layer NB-SMT statistics on the calibration data and the recalibration
  section;
- the search report (``SearchResult.report()``, ``nbsmt-onnx search``): the
  verified result, the Pareto table and front (speed-up vs the metric), the
  per-layer sensitivities and threads.

A section whose data the report does not hold says "not available" and why,
instead of being dropped silently. Plots are drawn with matplotlib's
object-oriented API on the Agg canvas (no pyplot, no global backend change)
and embedded as base64 PNG ``data:`` URIs; the page has no scripts and loads
nothing from the network.
"""

from __future__ import annotations

import base64
import html
import io as _stdio
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nbsmt_onnx.errors import ConfigError
from nbsmt_onnx.io import write_text

EVALUATION_FORMAT = "nbsmt-onnx/evaluation"
TRANSFORM_FORMAT = "nbsmt-onnx/transform-report"
SEARCH_FORMAT = "nbsmt-onnx/search-report"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1180px; color: #1d2329; background: #ffffff; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: right; }
th { background: #f3f5f7; }
td.l, th.l { text-align: left; }
.ci { color: #57606a; font-size: 0.85em; white-space: nowrap; }
tr.unavailable td { color: #8c959f; font-style: italic; }
.fail { color: #b42318; font-weight: 600; }
.ok { color: #1a7f37; font-weight: 600; }
.na { color: #6e7781; font-style: italic; }
.meta { color: #57606a; font-size: 0.9em; }
.warn { background: #fff8c5; border: 1px solid #d4a72c; padding: 6px 10px; margin: 6px 0; }
img.plot { max-width: 100%; height: auto; display: block; margin: 8px 0; }
details { margin: 8px 0; }
code { background: #f3f5f7; padding: 1px 4px; }
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> float | None:
    """A plottable float, or None (missing, or the JSON strings "inf"/"nan")."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    return None


def _fmt(value: Any, kind: str = "num") -> str:
    v = _num(value)
    if v is None:
        return "-"
    if not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    if kind == "pct":
        return f"{100.0 * v:.2f}%"
    if kind == "db":
        return f"{v:.1f}"
    if kind == "int":
        return f"{int(v):,}"
    return f"{v:.4f}"


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any, alt: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = _stdio.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="plot" alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _short(name: str, limit: int = 42) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def _colours(n: int) -> list[Any]:
    """Distinct colours for n series (tab10, or tab20 beyond ten)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _legend_below(fig: Any, ax: Any, count: int) -> None:
    """One legend for the figure, under the plots (never over the data)."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    ncols = min(count, 4)
    try:  # matplotlib >= 3.7: constrained layout reserves room for it
        fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=8)
    except ValueError:
        ax.legend(handles, labels, fontsize=7)


def _palette(names: Sequence[str]) -> dict[str, Any]:
    """One colour per series name, so a row has the same colour in every plot."""
    return dict(zip(names, _colours(len(names)), strict=True))


def _grouped_barh(
    ax: Any,
    labels: Sequence[str],
    series: Sequence[tuple[str, Sequence[float | None]]],
    palette: Mapping[str, Any] | None = None,
    *,
    invert: bool = True,
) -> None:
    """Horizontal grouped bars: one group per label (top to bottom), one bar per series.

    ``invert=False`` for a second axis sharing y with a first one: inverting a
    shared axis twice would turn the order back to bottom-to-top.
    """
    k = max(1, len(series))
    height = 0.8 / k
    colours = _colours(k)
    for j, (_name, values) in enumerate(series):
        colour = palette[_name] if palette and _name in palette else colours[j]
        ys = [i + (j - (k - 1) / 2) * height for i in range(len(labels))]
        vals = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
        ax.barh(ys, vals, height=height, label=_name, color=colour)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels([_short(n) for n in labels], fontsize=7)
    if invert:
        ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)


def _layer_stats_plot(
    layers: Sequence[str],
    series: Mapping[str, Mapping[str, Mapping[str, Any]]],
    palette: Mapping[str, Any] | None = None,
) -> str:
    """MAC utilization / collision rate / squeezed operands per layer, one bar per variant."""
    fields = (
        ("mac_utilization", "MAC utilization"),
        ("collision_rate", "collision rate"),
        ("squeezed_operand_fraction", "squeezed operands"),
    )
    height = max(3.0, 0.18 * len(layers) * max(1.0, len(series) / 2) + 1.2)
    height += 0.22 * math.ceil(len(series) / 4)  # the legend
    fig = _figure(11.5, height)
    axes = fig.subplots(1, 3, sharey=True)
    for ax, (key, title) in zip(axes, fields, strict=True):
        data = [
            (name, [_num(per.get(layer, {}).get(key)) for layer in layers])
            for name, per in series.items()
        ]
        _grouped_barh(ax, layers, data, palette)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, 1)
    _legend_below(fig, axes[0], len(series))
    return _png(fig, "per-layer MAC utilization, collision rate and squeezed operands")


def _sqnr_plot(
    layers: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    palette: Mapping[str, Any] | None = None,
) -> str:
    fig = _figure(11.5, 4.6 + 0.22 * math.ceil(len(series) / 4))
    ax = fig.subplots()
    xs = list(range(len(layers)))
    colours = _colours(len(series))
    for j, (name, values) in enumerate(series.items()):
        colour = palette[name] if palette and name in palette else colours[j]
        ys = [v if v is not None and math.isfinite(v) else math.nan for v in values]
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=name, color=colour)
    ax.set_xticks(xs)
    ax.set_xticklabels([_short(n, 30) for n in layers], rotation=90, fontsize=6)
    ax.set_ylabel("output SQNR vs int8 (dB)")
    ax.grid(alpha=0.3)
    _legend_below(fig, ax, len(series))
    return _png(fig, "per-layer output SQNR vs int8")


def _shift_plot(
    names: Sequence[str],
    series: Mapping[str, tuple[list[float | None], list[float | None]]],
    palette: Mapping[str, Any] | None = None,
) -> str:
    height = max(3.0, 0.2 * len(names) * max(1.0, len(series) / 2) + 1.2)
    height += 0.22 * math.ceil(len(series) / 4)  # the legend
    fig = _figure(11.5, height)
    std_change = [
        [None if r is None else 100.0 * (r - 1.0) for r in v[1]] for v in series.values()
    ]
    # With the default mean-only correction no std changes: one panel, full width.
    changed = any(c is not None and abs(c) > 1e-9 for values in std_change for c in values)
    if changed:
        ax_mean, ax_std = fig.subplots(1, 2, sharey=True)
    else:
        ax_mean, ax_std = fig.subplots(), None
    _grouped_barh(ax_mean, names, [(k, v[0]) for k, v in series.items()], palette)
    ax_mean.set_title("mean shift (RMS over channels, old std units)", fontsize=10)
    if ax_std is not None:
        _grouped_barh(
            ax_std, names, list(zip(series, std_change, strict=True)), palette, invert=False
        )
        ax_std.set_title("std change (%), geometric mean over channels", fontsize=10)
        ax_std.axvline(0.0, color="#444444", linewidth=0.8)
    else:
        ax_mean.set_xlabel("(standard deviations unchanged: mean-only correction)", fontsize=8)
    _legend_below(fig, ax_mean, len(series))
    return _png(fig, "BatchNorm statistic shift per layer")


def _accuracy_plot(rows: Sequence[Mapping[str, Any]], key: str, label: str) -> str:
    """A dot per row with its 95 % interval (not bars: the axis starts near the lowest value)."""
    fig = _figure(11.5, max(2.2, 0.32 * len(rows) + 1.0))
    ax = fig.subplots()
    vals = [_num(r["metrics"].get(key)) for r in rows]
    pct = [100.0 * v if v is not None else math.nan for v in vals]
    err_lo, err_hi = [], []
    for r, p in zip(rows, pct, strict=True):
        iv = (r.get("intervals") or {}).get(key)
        lo, hi = (_num(iv.get("lo")), _num(iv.get("hi"))) if iv else (None, None)
        ok = lo is not None and hi is not None and math.isfinite(p)
        err_lo.append(p - 100.0 * lo if ok and lo is not None else 0.0)
        err_hi.append(100.0 * hi - p if ok and hi is not None else 0.0)
    finite = [p - e for p, e in zip(pct, err_lo, strict=True) if math.isfinite(p)]
    low = max(0.0, min(finite) - 5.0) if finite else 0.0
    ax.errorbar(pct, range(len(rows)), xerr=[err_lo, err_hi], fmt="o", color="#4c72b0", capsize=3)
    for i, p in enumerate(pct):
        if math.isfinite(p):
            ax.annotate(
                f"{p:.2f}%",
                (p, i),
                xytext=(6, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["name"] for r in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(low, 100.0 + (100.0 - low) * 0.08)
    ax.set_xlabel(label + " (%), bars: 95% Wilson interval")
    ax.grid(alpha=0.3)
    return _png(fig, label)


# --------------------------------------------------------------------------- sections


def _na(text: str) -> str:
    return f'<p class="na">Not available: {_esc(text)}</p>'


def _table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    left: int = 1,
    classes: Sequence[str] | None = None,
) -> str:
    out = ["<table><thead><tr>"]
    out += [f'<th class="{"l" if i < left else ""}">{_esc(h)}</th>' for i, h in enumerate(header)]
    out.append("</tr></thead><tbody>")
    for r_i, row in enumerate(rows):
        cls = f' class="{classes[r_i]}"' if classes and classes[r_i] else ""
        out.append(f"<tr{cls}>")
        out += [f'<td class="{"l" if i < left else ""}">{cell}</td>' for i, cell in enumerate(row)]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _evaluation_table(result: Mapping[str, Any]) -> str:
    labelled = bool(result.get("labels"))
    classification = result.get("classification", True)
    cols: list[tuple[str, str, str]] = []
    if labelled:
        cols += [("top-1", "top1", "pct"), ("top-5", "top5", "pct")]
    if classification:
        cols += [("agreement", "agreement", "pct"), ("KL", "kl", "num")]
    cols += [("cosine", "cosine", "num"), ("SQNR dB", "sqnr_db", "db")]
    verdict: dict[str, bool] = {}
    for c in result.get("gate", {}).get("checks", []):
        verdict[c["row"]] = verdict.get(c["row"], True) and bool(c["passed"])
    header = ["row", "settings", "speed-up", *[c[0] for c in cols], "samples", "time s"]
    if verdict:
        header.append("gate")
    body, classes = [], []
    for r in result["rows"]:
        settings = (
            "-" if not r.get("threads") or r["threads"] == 1 else f"{r['mapping']}/{r['reduce']}"
        )
        if not r.get("available", True):
            cells = [_esc(r["name"]), _esc(settings), "-"] + ["-"] * len(cols) + ["-", "-"]
            if verdict:
                cells.append(_gate_cell(verdict.get(r["id"])))
            cells[3] = f"unavailable: {_esc(r.get('note'))}"
            body.append(cells)
            classes.append("unavailable")
            continue
        speed = r.get("speedup")
        cells = [_esc(r["name"]), _esc(settings), "-" if speed is None else f"{speed:.2f}&times;"]
        intervals = r.get("intervals") or {}
        for _, k, f in cols:
            cell = _esc(_fmt(r["metrics"].get(k), f))
            iv = intervals.get(k)
            if iv is not None and r["metrics"].get(k) is not None:
                cell += f' <span class="ci">{_esc(_fmt_range(iv, f))}</span>'
            cells.append(cell)
        cells += [_esc(r.get("samples", "")), _esc(f"{float(r.get('wall_s', 0.0)):.1f}")]
        if verdict:
            cells.append(_gate_cell(verdict.get(r["id"])))
        body.append(cells)
        classes.append("")
    return (
        _table(header, body, left=2, classes=classes)
        + _difference_table(result, cols, "difference")
        + _difference_table(result, cols, "recalibration_effect")
    )


def _fmt_range(iv: Mapping[str, Any], kind: str, signed: bool = False) -> str:
    """``[lo, hi]`` of an interval dict, in percent for proportions (without the % sign)."""
    scale, digits = {"pct": (100.0, 2), "db": (1.0, 1)}.get(kind, (1.0, 4))
    spec = ("+" if signed else "") + f".{digits}f"

    def one(v: Any) -> str:
        x = _num(v)
        if x is None:
            return "-"
        return format(scale * x, spec) if math.isfinite(x) else _fmt(x)

    return f"[{one(iv.get('lo'))}, {one(iv.get('hi'))}]"


def _difference_table(
    result: Mapping[str, Any], cols: Sequence[tuple[str, str, str]], field_name: str
) -> str:
    """Paired differences with 95 % intervals: each row minus the reference row
    (``field_name="difference"``), or each recalibrated row minus the same row
    without recalibration (``"recalibration_effect"``)."""
    rows = [r for r in result["rows"] if r.get("available", True) and r.get(field_name)]
    if not rows:
        return ""
    ref_id = rows[0][field_name]["reference"]
    ref_name = next((r["name"] for r in result["rows"] if r["id"] == ref_id), ref_id)
    unc = result.get("uncertainty") or {}
    against_float = field_name == "difference" and ref_id == "float32"
    keys = [(h, k, f) for h, k, f in cols if not (k == "sqnr_db" and against_float)]
    header = ["row"]
    for h, _k, f in keys:
        header.append(f"{h} diff" + (" (points)" if f == "pct" else ""))
        if f == "pct":
            header.append("McNemar p")
    body = []
    for r in rows:
        metrics = r[field_name]["metrics"]
        cells = [_esc(r["name"])]
        for _, k, f in keys:
            d = metrics.get(k)
            if d is None:
                cells.append("-")
            else:
                scale = 100.0 if f == "pct" else 1.0
                digits = {"pct": 2, "db": 1}.get(f, 4)
                est = _num(d.get("estimate"))
                text = "-" if est is None else format(scale * est, f"+.{digits}f")
                cells.append(f'{_esc(text)} <span class="ci">{_esc(_fmt_range(d, f, True))}</span>')
            if f == "pct":
                p = _num(d.get("p_value")) if d else None
                cells.append("-" if p is None else _esc(f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"))
        body.append(cells)
    what = (
        f"Difference to {_esc(ref_name)}: this row minus {_esc(ref_name)}"
        if field_name == "difference"
        else "Recalibration effect: each +recal row minus the same row without recalibration"
    )
    if field_name != "difference":
        return f'<p class="meta">{what}, same samples and intervals.</p>' + _table(
            header, body, left=1
        )
    note = (
        f'<p class="meta">{what} on the '
        "same samples, with paired 95% intervals: Newcombe's paired interval and McNemar's exact "
        "p-value for proportions (points), a seeded paired bootstrap over samples for KL, cosine "
        f"and SQNR ({_esc(unc.get('bootstrap_resamples'))} resamples, seed "
        f"{_esc(unc.get('bootstrap_seed'))}, percentile interval). Brackets in the table above: "
        "95% intervals (Wilson for proportions, the same bootstrap for the rest).</p>"
    )
    return note + _table(header, body, left=1)


def _gate_cell(passed: bool | None) -> str:
    if passed is None:
        return ""
    return '<span class="ok">pass</span>' if passed else '<span class="fail">FAIL</span>'


def _gate_section(result: Mapping[str, Any]) -> str:
    gate = result.get("gate") or {}
    checks = gate.get("checks") or []
    if not checks:
        return '<p class="meta">No thresholds were set (exit code 0).</p>'
    head = (
        '<p class="ok">All thresholds met (exit code 0).</p>'
        if gate.get("passed")
        else f'<p class="fail">Thresholds missed (exit code {_esc(gate.get("exit_code", 3))}).</p>'
    )
    rows = [
        [
            _esc(c["row"]),
            _esc(c["check"]),
            _esc(_fmt(c.get("value"))),
            _esc(c.get("threshold")),
            _gate_cell(bool(c["passed"])),
            _esc(c.get("reason", "")),
        ]
        for c in checks
    ]
    return head + _table(["row", "check", "value", "threshold", "result", "reason"], rows, left=2)


def _layer_order(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(e["node"]) for e in entries]


def _evaluation_layers(result: Mapping[str, Any], palette: Mapping[str, Any]) -> str:
    rows = [r for r in result["rows"] if r.get("available", True) and r.get("layers")]
    if not rows:
        return "<h2>Per-layer NB-SMT statistics</h2>" + _na("the result has no NB-SMT rows")
    plain = [r for r in rows if not r.get("recalibrated")] or rows
    layers = _layer_order(plain[0]["layers"])
    series = {r["name"]: {str(e["node"]): e.get("nbsmt", {}) for e in r["layers"]} for r in plain}
    parts = [
        "<h2>Per-layer NB-SMT statistics (evaluation data)</h2>",
        '<p class="meta">MAC utilization = active thread slots / (groups &times; T); collision rate = '
        "(output element, step) pairs with two or more active threads / groups; squeezed operands = "
        "operands changed by the 4-bit reduction / operands of active threads (docs/spec.md §3.4).</p>",
        _layer_stats_plot(layers, series, palette),
    ]
    # Per-layer output SQNR vs int8
    parts.append("<h2>Per-layer output SQNR vs int8</h2>")
    sqnr_rows = [
        r
        for r in rows
        if r["kind"] != "int8"
        and any(_num(e.get("sqnr_vs_int8_db")) is not None for e in r["layers"])
    ]
    if not sqnr_rows:
        parts.append(
            _na("no per-layer SQNR in the result (layer_samples = 0, or no int8 reference)")
        )
    else:
        samples = max(int(e.get("sqnr_samples", 0)) for r in sqnr_rows for e in r["layers"])
        parts.append(
            f'<p class="meta">10&middot;log10(&Sigma; int8&sup2; / &Sigma; (int8 &minus; variant)&sup2;) of each NB-SMT layer\'s output '
            f"tensor, both models run end to end on the first {samples} evaluation samples (so a "
            "layer's SQNR includes the noise propagated from the layers before it). For folded "
            "recalibrated rows the layer output is the BatchNorm output.</p>"
        )
        sq_series = {
            r["name"]: [
                _num(
                    next(
                        (e.get("sqnr_vs_int8_db") for e in r["layers"] if e["node"] == layer), None
                    )
                )
                for layer in layers
            ]
            for r in sqnr_rows
        }
        parts.append(_sqnr_plot(layers, sq_series, palette))
        table_rows = [
            [_esc(layer)] + [_esc(_fmt(sq_series[name][i], "db")) for name in sq_series]
            for i, layer in enumerate(layers)
        ]
        parts.append(
            "<details><summary>SQNR table</summary>"
            + _table(["layer", *sq_series], table_rows)
            + "</details>"
        )
    return "".join(parts)


def _recalibration_section(
    recals: Sequence[tuple[str, Mapping[str, Any] | None]],
    palette: Mapping[str, Any] | None = None,
) -> str:
    parts = ["<h2>BatchNorm statistics before / after recalibration</h2>"]
    present = [
        (name, rc) for name, rc in recals if rc and (rc.get("batchnorms") or rc.get("correction"))
    ]
    if not present:
        skipped = [
            rc.get("skipped") for _, rc in recals if rc and isinstance(rc.get("skipped"), str)
        ]
        reason = (
            f"recalibration was skipped ({skipped[0]})"
            if skipped
            else "no recalibrated rows / recalibration disabled, or the model has no BatchNorm "
            "affected by NB-SMT"
        )
        return parts[0] + _na(reason)
    bn_names: list[str] = []
    for _, rc in present:
        for b in rc.get("batchnorms") or []:
            if b["name"] not in bn_names:
                bn_names.append(b["name"])
    if bn_names:
        series = {}
        for name, rc in present:
            by = {b["name"]: b for b in rc.get("batchnorms") or []}
            series[name] = (
                [_num(by.get(n, {}).get("mean_shift")) for n in bn_names],
                [_num(by.get(n, {}).get("std_ratio")) for n in bn_names],
            )
        strategy = ", ".join(
            f"{_esc(name)}: {_esc(rc.get('strategy'))} ({_esc(rc.get('passes'))} passes)"
            for name, rc in present
        )
        parts.append(
            f'<p class="meta">Strategy: {strategy}. Channel-averaged statistics in the table.</p>'
        )
        plans = [
            f"{_esc(name)}: {_esc(rc['batches'].get('note'))}"
            for name, rc in present
            if isinstance(rc.get("batches"), Mapping) and rc["batches"].get("note")
        ]
        if plans:
            parts.append(f'<p class="meta">Calibration batches: {"; ".join(plans)}.</p>')
        parts.append(_shift_plot(bn_names, series, palette))
        rows = []
        for name, rc in present:
            for b in rc.get("batchnorms") or []:
                old, new = b.get("old", {}), b.get("new", {})
                rows.append(
                    [
                        _esc(name),
                        _esc(b["name"]),
                        _esc(b.get("level", "")),
                        _esc(_fmt(old.get("mean"))),
                        _esc(_fmt(new.get("mean"))),
                        _esc(_fmt(old.get("std"))),
                        _esc(_fmt(new.get("std"))),
                        _esc(_fmt(b.get("mean_shift"))),
                        _esc(_fmt(b.get("std_ratio"))),
                    ]
                )
        parts.append(
            "<details><summary>per-BN table</summary>"
            + _table(
                ["row", "BatchNorm", "level", "mean before", "mean after", "std before", "std after",
                 "mean shift", "std ratio"],
                rows,
                left=2,
            )
            + "</details>"
        )  # fmt: skip
    corrected = [(name, rc["correction"]) for name, rc in present if rc.get("correction")]
    if corrected:
        parts.append(
            "<h2>Fused-layer correction (NB-SMT vs float statistics before correction)</h2>"
        )
        names: list[str] = []
        for _, c in corrected:
            for layer in c.get("layers") or []:
                if layer["name"] not in names:
                    names.append(layer["name"])
        series = {}
        for name, c in corrected:
            by = {layer["name"]: layer for layer in c.get("layers") or []}
            series[name] = (
                [_num(by.get(n, {}).get("mean_shift")) for n in names],
                [_num(by.get(n, {}).get("std_ratio")) for n in names],
            )
        if names:
            parts.append(_shift_plot(names, series, palette))
    parts.append(_guard_section(recals))
    return "".join(parts)


def _guard_section(recals: Sequence[tuple[str, Mapping[str, Any] | None]]) -> str:
    """What the held-out guard kept, with each prefix's paired difference to no correction."""
    guarded = [(name, rc["guard"]) for name, rc in recals if rc and isinstance(rc.get("guard"), Mapping)]
    if not guarded:
        return ""
    parts = ["<h2>Recalibration guard (held-out fidelity to float32)</h2>"]
    for name, g in guarded:
        if "summary" not in g:
            parts.append(_na(f"{name}: guard {g.get('decision')} ({g.get('reason', '')})"))
            continue
        parts.append(
            f'<p class="meta">{_esc(name)}: {_esc(g["summary"])}; metric {_esc(g.get("metric"))}, '
            f"{_esc(g.get('samples'))} held-out samples from {_esc(g.get('data'))}; a prefix is "
            f"kept only if it beats no correction by more than {_esc(g.get('margin_se'))} paired "
            "standard error(s) and makes no check metric "
            f"({_esc(', '.join(g.get('checks') or []) or 'none')}) worse by more than "
            f"{_esc(g.get('check_margin_se'))}.</p>"
        )
        rows = []
        for i, b in enumerate(g.get("blocks") or []):
            iv = b.get("interval95") or [None, None]
            units = b.get("units") or []
            rows.append(
                [
                    _esc(f"1-{i + 1}"),
                    _esc(f"{_short(units[0])} … ({len(units)})" if units else ""),
                    _esc(_fmt(b.get("loss_after"))),
                    _esc(_fmt(b.get("improvement"))),
                    _esc(f"[{_fmt(iv[0])}, {_fmt(iv[1])}]"),
                    _esc(_checks_cell(b.get("checks") or {})),
                    "kept" if b.get("kept") else (
                        _esc("vetoed: " + ", ".join(b["vetoed_by"])) if b.get("vetoed_by")
                        else "rejected"
                    ),
                ]
            )
        parts.append(
            _table(
                ["blocks", "last block starts at", "held-out loss", "improvement over none",
                 "95 % interval", "checks: change (SE)", "decision"],
                rows,
                left=2,
            )
        )  # fmt: skip
    return "".join(parts)


def _checks_cell(checks: Mapping[str, Any]) -> str:
    """Each check metric's change vs no correction (negative: closer to float) in its SEs."""
    cells = []
    for name, c in checks.items():
        change = -float(c.get("improvement", 0.0))
        se = float(c.get("se", 0.0))
        ratio = f"{change / se:+.1f}" if se > 0 and math.isfinite(change) else "n/a"
        cells.append(f"{name} {change:+.3g} ({ratio})")
    return "; ".join(cells)


def _transform_layers(report: Mapping[str, Any]) -> str:
    layers = report.get("layers") or []
    with_stats = [e for e in layers if e.get("nbsmt")]
    parts = ["<h2>Per-layer NB-SMT statistics (calibration data)</h2>"]
    if not with_stats:
        parts.append(_na("the transform ran without collecting statistics"))
    else:
        threads = (report.get("settings") or {}).get("threads", "?")
        series = {f"T={threads}": {str(e["node"]): e["nbsmt"] for e in with_stats}}
        parts.append(_layer_stats_plot([str(e["node"]) for e in with_stats], series))
    parts.append("<h2>Per-layer output SQNR vs int8</h2>")
    parts.append(_na("the transform report does not measure it; run nbsmt-onnx evaluate --report"))
    return "".join(parts)


def _macs(value: Any) -> str:
    return "" if value is None else f"{float(value) / 1e6:.3f} M"


def _speedup_cell(summary: Mapping[str, Any]) -> str:
    value = (summary.get("speedup") or {}).get("speedup")
    return "n/a" if value is None else f"{float(value):.2f}x"


def _layers_table(report: Mapping[str, Any]) -> str:
    layers = report.get("layers") or []
    if not layers:
        return ""
    rows = [
        [
            _esc(e.get("node")),
            _esc(e.get("source_op_type", e.get("op_type"))),
            _esc(_fmt(e.get("activation_scale"))),
            "signed" if e.get("activation_signed") else "unsigned",
            _esc(e.get("reduction_length", "")),
            _esc(e.get("threads", "")),
            _esc(_macs(e.get("macs_per_sample"))),
            _esc(e.get("weight_origin", "")),
        ]
        for e in layers
    ]
    out = (
        "<details><summary>Rewritten layers: activation scales, threads, MACs</summary>"
        + _table(
            ["layer", "op", "activation scale", "mode", "K", "T", "MACs / sample", "weights"],
            rows,
            left=2,
        )
        + "</details>"
    )
    skipped = report.get("skipped") or []
    if skipped:
        out += (
            f"<details><summary>Not rewritten ({len(skipped)})</summary>"
            + _table(
                ["node", "op", "reason"],
                [[_esc(s["node"]), _esc(s["op_type"]), _esc(s["reason"])] for s in skipped],
                left=3,
            )
            + "</details>"
        )
    return out


def _warnings(items: Sequence[str]) -> str:
    return "".join(f'<div class="warn">{_esc(w)}</div>' for w in items)


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def _render_evaluation(result: Mapping[str, Any]) -> str:
    ev, cal = result.get("eval_data", {}), result.get("calib_data", {})
    labelled = bool(result.get("labels"))
    parts = [
        "<h1>nbsmt-onnx evaluation</h1>",
        f'<p class="meta">Model <code>{_esc(result.get("model"))}</code>, output '
        f"<code>{_esc(result.get('output'))}</code> read as {_esc(result.get('output_kind'))}; "
        f"nbsmt-onnx {_esc(result.get('tool_version'))}.<br>"
        f"Evaluation: {_esc(ev.get('samples'))} samples of {_esc(ev.get('source'))} (seed {_esc(ev.get('seed'))}); "
        f"calibration: {_esc(cal.get('samples'))} samples of {_esc(cal.get('source'))} "
        f"(seed {_esc(cal.get('seed'))}). "
        + (
            f"Labels: {_esc(result['labels'])}."
            if labelled
            else "No labels: fidelity to the float32 model."
        )
        + f" Wall time {float(result.get('wall_time_s') or 0.0):.1f} s.</p>",
        _warnings(result.get("warnings") or []),
        "<h2>Results</h2>",
        _evaluation_table(result),
    ]
    available = [r for r in result["rows"] if r.get("available", True)]
    key, label = (
        ("top1", "top-1 accuracy") if labelled else ("agreement", "top-1 agreement with float32")
    )
    if any(_num(r["metrics"].get(key)) is not None for r in available):
        parts.append(_accuracy_plot(available, key, label))
    parts += ["<h2>Pipeline gate</h2>", _gate_section(result)]
    palette = _palette([r["name"] for r in result["rows"] if r.get("kind") != "float32"])
    parts.append(_evaluation_layers(result, palette))
    recals = [(r["name"], r.get("recalibration")) for r in result["rows"] if r.get("recalibrated")]
    parts.append(_recalibration_section(recals, palette))
    transform = result.get("transform") or {}
    if transform:
        parts.append("<h2>Quantization</h2>")
        parts.append(_layers_table(transform))
    return _page("nbsmt-onnx evaluation", "".join(parts))


def _transform_accuracy(evaluation: Mapping[str, Any] | None) -> list[str]:
    """The accuracy table and gate of ``transform --eval-data`` (the report's ``evaluation``)."""
    if not evaluation:
        return [
            "<h2>Accuracy</h2>",
            _na(
                "the transform ran without an evaluation set; pass --eval-data "
                "(or run nbsmt-onnx evaluate --report)"
            ),
        ]
    ev = evaluation.get("eval_data") or {}
    labelled = bool(evaluation.get("labels"))
    meta = (
        f'<p class="meta">Evaluation: {_esc(ev.get("samples"))} samples of '
        f"{_esc(ev.get('source'))} (seed {_esc(ev.get('seed'))}); output "
        f"<code>{_esc(evaluation.get('output'))}</code> read as "
        f"{_esc(evaluation.get('output_kind'))}. "
        + (
            f"Labels: {_esc(evaluation['labels'])}."
            if labelled
            else "No labels: fidelity to the float32 model."
        )
        + "</p>"
    )
    return [
        "<h2>Accuracy</h2>",
        meta,
        _evaluation_table(evaluation),
        "<h2>Pipeline gate</h2>",
        _gate_section(evaluation),
    ]


def _render_transform(report: Mapping[str, Any]) -> str:
    settings = report.get("settings") or {}
    data = report.get("calibration_data") or {}
    summary = report.get("summary") or {}
    nb = summary.get("nbsmt") or {}
    parts = [
        "<h1>nbsmt-onnx transform report</h1>",
        f'<p class="meta">Model <code>{_esc(report.get("source_model"))}</code>; nbsmt-onnx '
        f"{_esc(report.get('tool_version'))}; threads {_esc(settings.get('threads'))}, mapping "
        f"{_esc(settings.get('mapping'))}, reduce {_esc(settings.get('reduce'))}. Calibration: "
        f"{_esc(data.get('samples'))} samples of {_esc(data.get('source'))} (seed {_esc(data.get('seed'))}).</p>",
        _warnings(report.get("warnings") or []),
        "<h2>Summary</h2>",
        _table(
            ["rewritten", "skipped", "MAC utilization", "collision rate", "squeezed operands",
             "speed-up"],
            [[
                _esc(summary.get("rewritten")), _esc(summary.get("skipped")),
                _esc(_fmt(nb.get("mac_utilization"))), _esc(_fmt(nb.get("collision_rate"))),
                _esc(_fmt(nb.get("squeezed_operand_fraction"))), _speedup_cell(summary),
            ]],
            left=0,
        ),
        '<p class="meta">Speed-up: MAC-weighted, over an 8-bit array without NB-SMT, '
        "sum(MACs) / sum(MACs / T) with each layer at its own T (layers in float count with "
        "T = 1); memory bandwidth is not modelled.</p>",
        *_transform_accuracy(report.get("evaluation")),
        _transform_layers(report),
        _recalibration_section([("transform", report.get("recalibration"))]),
        "<h2>Quantization</h2>",
        _layers_table(report),
    ]  # fmt: skip
    return _page("nbsmt-onnx transform report", "".join(parts))


# --------------------------------------------------------------------------- search


def _pareto_plot(report: Mapping[str, Any], name: str) -> str:
    """Speed-up (x) against the metric (y): verified assignments with their 95 % intervals,
    the chain's predicted ones hollow, the front as a line, the chosen one starred, the
    reference and the budget as horizontal lines."""
    rows = report.get("pareto_table") or []
    fig = _figure(9.0, 4.8)
    ax = fig.subplots()
    evaluated = [r for r in rows if r.get("status") == "evaluated" and _num(r.get("metric")) is not None]
    predicted = [r for r in rows if r.get("status") == "predicted" and _num(r.get("metric")) is not None]
    if predicted:
        ax.plot(
            [float(r["speedup"]) for r in predicted], [float(r["metric"]) for r in predicted],
            "o", mfc="none", color="#8c959f", label="predicted (base + sensitivities)",
        )  # fmt: skip
    if evaluated:
        xs = [float(r["speedup"]) for r in evaluated]
        ys = [float(r["metric"]) for r in evaluated]
        lo = [y - float(r["interval"][0]) if r.get("interval") else 0.0 for y, r in zip(ys, evaluated, strict=True)]
        hi = [float(r["interval"][1]) - y if r.get("interval") else 0.0 for y, r in zip(ys, evaluated, strict=True)]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color="#4c72b0", capsize=3,
                    label="evaluated (95% Wilson interval)")  # fmt: skip
        front = sorted((float(r["speedup"]), float(r["metric"])) for r in evaluated if r.get("pareto"))
        if front:
            ax.plot([f[0] for f in front], [f[1] for f in front], "-", color="#4c72b0", alpha=0.6,
                    label="Pareto front")  # fmt: skip
        for r in evaluated:
            if r.get("chosen"):
                ax.plot([float(r["speedup"])], [float(r["metric"])], "*", ms=16, color="#d62728",
                        label="chosen")  # fmt: skip
    ref = _num(report.get("reference_metric"))
    budget = _num(report.get("max_drop"))
    if ref is not None:
        ax.axhline(ref, color="#1a7f37", ls="--", lw=1, label=f"reference ({report.get('reference')})")
        if budget is not None:
            ax.axhline(ref - budget, color="#b42318", ls=":", lw=1, label="budget")
    ax.set_xlabel("speed-up over an 8-bit array without NB-SMT (MAC-weighted)")
    ax.set_ylabel(f"{name} (%)")
    ax.grid(alpha=0.3)
    _legend_below(fig, ax, 6)
    return _png(fig, "Pareto front: speed-up vs " + name)


def _sensitivity_plot(layers: Sequence[Mapping[str, Any]], choices: Sequence[int]) -> str:
    """Per layer (top-down), the drop when that layer alone moves to each higher choice."""
    names = [str(layer["name"]) for layer in layers]
    series = [
        (f"T={t}", [_num((layer.get("sensitivity") or {}).get(str(t))) for layer in layers])
        for t in choices[1:]
    ]
    fig = _figure(11.5, max(2.4, 0.28 * len(names) * max(1, len(series)) / 1.5 + 1.2))
    ax = fig.subplots()
    _grouped_barh(ax, names, series)
    ax.axvline(0.0, color="#57606a", lw=0.8)
    ax.set_xlabel("drop when this layer alone moves up (points; negative = better)")
    _legend_below(fig, ax, len(series))
    return _png(fig, "per-layer sensitivity")


def _pts(value: Any) -> str:
    """A percentage or points figure with two decimals ("-" when missing)."""
    v = _num(value)
    return "-" if v is None else f"{v:.2f}"


def _interval_cell(iv: Any) -> str:
    if not iv:
        return "-"
    return f'<span class="ci">[{float(iv[0]):.2f}, {float(iv[1]):.2f}]</span>'


def _render_search(report: Mapping[str, Any]) -> str:
    name = "top-1" if report.get("metric") == "top1" else "agreement with float32"
    final = report.get("final") or {}
    data = report.get("search_data") or {}
    met = bool(report.get("met_budget"))
    choices = [int(c) for c in report.get("choices") or []]
    verdict = (
        '<span class="ok">met</span>' if met
        else '<span class="fail">NOT met: every layer stays at the lowest choice</span>'
    )  # fmt: skip
    parts = [
        "<h1>nbsmt-onnx search report</h1>",
        f'<p class="meta">Model <code>{_esc(report.get("model"))}</code>; nbsmt-onnx '
        f"{_esc(report.get('tool_version'))}. Search data: {_esc(data.get('samples'))} samples of "
        f"{_esc(data.get('source'))}. Metric {_esc(name)}; reference {_esc(report.get('reference'))} "
        f"({_pts(report.get('reference_metric'))} %); budget: drop &le; "
        f"{_esc(report.get('max_drop'))} points ({_esc(report.get('bound'))} estimate); choices "
        f"{_esc(', '.join(map(str, choices)))}. {_esc(report.get('model_evaluations'))} model "
        f"evaluations, {float(report.get('wall_time_s') or 0.0):.1f} s.</p>",
        "<h2>Result</h2>",
        _table(
            ["assignment", "speed-up", f"{name} %", "95% interval", "drop (points)",
             "paired 95% interval", "budget"],
            [[
                _esc(final.get("label")), f"{float(final.get('speedup') or 0.0):.2f}&times;",
                _pts(final.get("metric")), _interval_cell(final.get("interval")),
                _pts(final.get("drop")), _interval_cell(final.get("drop_interval")),
                verdict,
            ]],
        ),
        '<p class="meta">The accuracy is measured on the search data by evaluating the final '
        "model (recalibrated under the chosen assignment), not predicted. Speed-up: MAC-weighted, "
        "over an 8-bit array without NB-SMT, sum(MACs) / sum(MACs / T); memory bandwidth and "
        "layers left in float (counted at T = 1) are not modelled beyond that.</p>",
        "<h2>Pareto front</h2>",
    ]  # fmt: skip
    rows = report.get("pareto_table") or []
    if rows:
        parts.append(_pareto_plot(report, name))
        body, classes = [], []
        for r in rows:
            mark = (
                ("chosen" if met else "kept (budget not met)") if r.get("chosen")
                else ("front" if r.get("pareto") else "")
            )  # fmt: skip
            body.append([
                _esc(r.get("label")), _esc("" if r.get("step") is None else r["step"]),
                f"{float(r['speedup']):.2f}&times;", _esc(r.get("status")),
                _pts(r.get("metric")), _interval_cell(r.get("interval")),
                _pts(r.get("drop")), _interval_cell(r.get("drop_interval")),
                _esc(mark),
            ])  # fmt: skip
            classes.append("unavailable" if r.get("status") == "predicted" else "")
        table = _table(
            ["assignment", "chain step", "speed-up", "measured?", f"{name} %", "95% interval",
             "drop", "paired 95% interval", ""],
            body, left=1, classes=classes,
        )  # fmt: skip
        parts.append(table)
        parts.append(
            '<p class="meta">Predicted rows (greyed) were not built: their figure is the '
            "base's metric minus the sum of their layers' sensitivities.</p>"
        )
    else:
        parts.append(_na("the report has no assignments"))
    layers = report.get("layers") or []
    parts.append("<h2>Per-layer sensitivity and threads</h2>")
    if layers and len(choices) > 1:
        parts.append(_sensitivity_plot(layers, choices))
        table = _table(
            ["layer", "op", "MACs / sample", "threads", *[f"drop at T={t}" for t in choices[1:]]],
            [[
                _esc(layer.get("name")), _esc(layer.get("op_type")),
                _esc(_macs(layer.get("macs"))), _esc(layer.get("threads")),
                *[_pts((layer.get("sensitivity") or {}).get(str(t))) for t in choices[1:]],
            ] for layer in layers],
            left=2,
        )  # fmt: skip
        parts.append(table)
    else:
        parts.append(_na("the report has no layers"))
    return _page("nbsmt-onnx search report", "".join(parts))


def render_html(report: Mapping[str, Any]) -> str:
    """The HTML page of an evaluation result, a transform report or a search report dict."""
    fmt = report.get("format")
    if fmt == EVALUATION_FORMAT:
        return _render_evaluation(report)
    if fmt == TRANSFORM_FORMAT:
        return _render_transform(report)
    if fmt == SEARCH_FORMAT:
        return _render_search(report)
    raise ConfigError(
        f"cannot render a report of format {fmt!r}; expected {EVALUATION_FORMAT!r}, "
        f"{TRANSFORM_FORMAT!r} or {SEARCH_FORMAT!r}"
    )


def write_html(report: Mapping[str, Any], path: str | Path, *, force: bool = False) -> Path:
    """Render ``report`` and write it atomically to ``path`` (refuses to overwrite without ``force``)."""
    return write_text(path, render_html(report), force=force)


__all__ = ["EVALUATION_FORMAT", "SEARCH_FORMAT", "TRANSFORM_FORMAT", "render_html", "write_html"]
