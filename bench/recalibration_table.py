"""Measured table: NB-SMT without vs with the default recalibration, on held-out data.

For each model and NB-SMT thread count T, this script builds two simulation
models with the public API (``nbsmt_onnx.transform``): one with recalibration
off (``RecalibrationConfig(enabled=False)``) and one with the tool's DEFAULT
recalibration (``TransformConfig()`` as it is, only ``threads`` /
``num_samples`` set). Both use the same calibration data (the second transform
reuses the activation ranges of the first, which the float pass makes
identical anyway). Both, and the float model, are then run on HELD-OUT data
(never used for calibration) and scored per sample:

- ``top1`` (where labels exist; Wilson 95 % interval), ``agree`` (argmax
  agreement with float), ``kl`` (mean KL(float || model), nats) — classifier-
  like outputs ([N, C]); for sequence outputs ([N, T, C], the recogniser)
  ``step_agree`` and ``kl`` are per time step, averaged per sample;
- ``cosine`` (mean per-sample cosine to float) and ``sqnr`` (dB, over all
  elements) for every output; ``iou@t`` (per-sample IoU of the maps
  thresholded at t) for the detector's probability map.

The key column is the PAIRED difference recal - no-recal on the same samples
with a 95 % interval: Newcombe's paired interval (and McNemar's exact p) for
proportions (``nbsmt_onnx.metrics.paired_proportion_difference``), a seeded
paired bootstrap over samples otherwise (``metrics.resample_means``,
``metrics.percentile_interval``; SQNR as a ratio of resampled sums). The
verdict per metric is "helps" / "hurts" from the interval's sign (KL: lower is
better), else "no significant change"; the row verdict is "helps" / "hurts" if
some metric says so and none the opposite, "mixed" if both.

The recalibrated transform's ``report["recalibration"]`` is stored whole in the
JSON (whatever fields it has: a future guard's decisions appear there) and its
scalar fields are printed, so the script re-measures the same table when the
defaults change. JSON is rewritten after every (model, T) row; ``--resume``
skips rows already in it.

Data (``--data D``; see docs/recalibration.md, "Recalibration table", for the
exact commands)::

    python models/fashion_mnist/data.py --out D/fm --num-calib 500 --num-eval 1000
    python models/mobilenetv2/build_onnx.py --out-dir D/mnv2
    python models/mobilenetv2/make_data.py --out D/mnv2 --num-calib 96 --num-heldout 128 \\
        --download-dir W
    python models/thirdparty/fetch.py --out D/pp --model cls --model det --model rec
    python models/thirdparty/make_data.py --out D/pp --num-calib 128 --num-eval 256
    python models/thirdparty/make_ocr_data.py --out D/pp --num-calib 96 --num-heldout 128 \\
        --download-dir W

Run::

    python bench/recalibration_table.py --data D --out table.json
    python bench/recalibration_table.py --data D --models fmnist-fused,ocr-det --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import nbsmt_onnx as nb
from nbsmt_onnx import io
from nbsmt_onnx.config import RecalibrationConfig, TransformConfig
from nbsmt_onnx.metrics import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    detect_output_kind,
    log_probabilities,
    paired_proportion_difference,
    percentile_interval,
    resample_means,
    sqnr_db,
    wilson_interval,
)
from nbsmt_onnx.runtime.session import SessionOptions, create_session

REPO = Path(__file__).resolve().parents[1]
SEED = 0


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class HeldOut:
    """One held-out file (its rows are appended to the model's held-out set)."""

    data: str
    labels: str | None = None
    limit: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model: str  # path; "{data}" is replaced by --data, "{repo}" by the repository
    calib: str
    heldout: tuple[HeldOut, ...]
    num_calib: int
    #: "classifier" ([N, C]), "sequence" ([N, T, C] per-step distributions) or "map"
    kind: str
    mask_threshold: float | None = None
    description: str = ""


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec(
            "fmnist-bn",
            "{repo}/models/fashion_mnist/fmnist_resnet.onnx",
            "{data}/fm/calib.npz",
            (HeldOut("{data}/fm/eval.npz", "{data}/fm/eval_labels.npy", 1000),),
            500,
            "classifier",
            description="Fashion-MNIST ResNet, BN kept",
        ),
        ModelSpec(
            "fmnist-fused",
            "{repo}/models/fashion_mnist/fmnist_resnet_fused.onnx",
            "{data}/fm/calib.npz",
            (HeldOut("{data}/fm/eval.npz", "{data}/fm/eval_labels.npy", 1000),),
            500,
            "classifier",
            description="Fashion-MNIST ResNet, BN fused",
        ),
        ModelSpec(
            "mnv2-bn",
            "{data}/mnv2/mobilenetv2_bn.onnx",
            "{data}/mnv2/photos_calib.npz",
            (
                HeldOut("{data}/mnv2/photos_heldout.npz"),
                HeldOut("{data}/mnv2/imagenet20.npz", "{data}/mnv2/imagenet20_labels.npy"),
            ),
            96,
            "classifier",
            description="MobileNetV2 ImageNet, BN kept",
        ),
        ModelSpec(
            "mnv2-fused",
            "{data}/mnv2/mobilenetv2_fused.onnx",
            "{data}/mnv2/photos_calib.npz",
            (
                HeldOut("{data}/mnv2/photos_heldout.npz"),
                HeldOut("{data}/mnv2/imagenet20.npz", "{data}/mnv2/imagenet20_labels.npy"),
            ),
            96,
            "classifier",
            description="MobileNetV2 ImageNet, BN fused",
        ),
        ModelSpec(
            "ocr-cls",
            "{repo}/models/thirdparty/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "{data}/pp/text_calib.npz",
            (HeldOut("{data}/pp/text_eval.npz", "{data}/pp/text_eval_labels.npy", 256),),
            128,
            "classifier",
            description="PaddleOCR text-direction classifier (BN kept)",
        ),
        ModelSpec(
            "ocr-det",
            "{data}/pp/ch_PP-OCRv4_det_infer.onnx",
            "{data}/pp/det_calib.npz",
            (HeldOut("{data}/pp/det_heldout.npz", None, 128),),
            96,
            "map",
            mask_threshold=0.3,  # RapidOCR's det "thresh"
            description="PP-OCRv4 text detector (BN fused), 320x320 photo crops",
        ),
        ModelSpec(
            "ocr-rec",
            "{data}/pp/ch_PP-OCRv4_rec_infer.onnx",
            "{data}/pp/rec_calib.npz",
            (HeldOut("{data}/pp/rec_heldout.npz", None, 128),),
            96,
            "sequence",
            description="PP-OCRv4 text recogniser (BN fused), 3x48x320 text lines",
        ),
    )
}


def _path(template: str, data: Path) -> Path:
    return Path(template.format(data=data, repo=REPO))


def load_heldout(spec: ModelSpec, data: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The held-out inputs (concatenated) and labels (-1 where a part has none)."""
    feeds: dict[str, list[np.ndarray]] = {}
    labels: list[np.ndarray] = []
    for part in spec.heldout:
        with np.load(_path(part.data, data)) as z:
            arrays = {k: z[k][: part.limit] for k in z.files}
        n = next(iter(arrays.values())).shape[0]
        for k, v in arrays.items():
            feeds.setdefault(k, []).append(v)
        if part.labels is not None:
            labels.append(np.load(_path(part.labels, data)).astype(np.int64).reshape(-1)[:n])
        else:
            labels.append(np.full(n, -1, dtype=np.int64))
    return {k: np.concatenate(v) for k, v in feeds.items()}, np.concatenate(labels)


# --------------------------------------------------------------------------- running


def run_model(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], threads: int, batch: int
) -> np.ndarray:
    """The model's first output over the held-out set (batches of ``batch``)."""
    with io.session_source(model) as src:
        session = create_session(src, SessionOptions(intra_op_threads=threads))
    name = model.graph.output[0].name
    inputs = {i.name for i in model.graph.input}
    n = next(iter(feeds.values())).shape[0]
    outs = []
    for start in range(0, n, batch):
        feed = {k: v[start : start + batch] for k, v in feeds.items() if k in inputs}
        outs.append(np.asarray(session.run([name], feed)[0], dtype=np.float32))
    return np.concatenate(outs)


# --------------------------------------------------------------------------- per-sample metrics


def _rows(x: np.ndarray, kind: str) -> np.ndarray:
    """Distribution rows: [N, C] for classifiers, [N * T, C] for sequences."""
    return x.reshape(-1, x.shape[-1]) if kind == "sequence" else x.reshape(x.shape[0], -1)


def per_sample(
    spec: ModelSpec, ref: np.ndarray, out: np.ndarray, labels: np.ndarray, out_kind: str
) -> dict[str, np.ndarray]:
    """Per-sample values of every metric of ``spec.kind`` (the float model: ``out is ref``)."""
    n = ref.shape[0]
    r = ref.reshape(n, -1).astype(np.float64)
    o = out.reshape(n, -1).astype(np.float64)
    res: dict[str, np.ndarray] = {}
    if spec.kind in ("classifier", "sequence"):
        rr, oo = _rows(ref, spec.kind), _rows(out, spec.kind)
        lp_r = log_probabilities(rr, out_kind)
        lp_o = log_probabilities(oo, out_kind)
        kl = np.sum(np.exp(lp_r) * (lp_r - lp_o), axis=1)
        agree = np.argmax(rr, axis=1) == np.argmax(oo, axis=1)
        if spec.kind == "sequence":
            res["step_agree"] = agree.reshape(n, -1).mean(axis=1)
            res["kl"] = kl.reshape(n, -1).mean(axis=1)
        else:
            res["agree"] = agree
            res["kl"] = kl
            mask = labels >= 0
            if mask.any():
                res["top1"] = np.argmax(oo[mask], axis=1) == labels[mask]
    dot = np.sum(r * o, axis=1)
    norms = np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1)
    res["cosine"] = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 1.0)
    res["_signal"] = np.sum(r * r, axis=1)
    res["_noise"] = np.sum((r - o) ** 2, axis=1)
    if spec.mask_threshold is not None:
        mr, mo = r > spec.mask_threshold, o > spec.mask_threshold
        inter = np.sum(mr & mo, axis=1)
        union = np.sum(mr | mo, axis=1)
        res[f"iou@{spec.mask_threshold:g}"] = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return res


# metrics whose improvement is a DEcrease
LOWER_BETTER = {"kl"}
PROPORTIONS = {"top1", "agree"}


def _verdict(metric: str, lo: float, hi: float) -> str:
    if lo > 0 or hi < 0:
        better = (lo > 0) != (metric in LOWER_BETTER)
        return "helps" if better else "hurts"
    return "no significant change"


def summarise(
    base: dict[str, np.ndarray], recal: dict[str, np.ndarray], flt: dict[str, np.ndarray] | None
) -> dict[str, Any]:
    """Absolute values (no-recal, recal, float) and the paired difference recal - no-recal."""
    out: dict[str, Any] = {}
    for metric in [k for k in base if not k.startswith("_")]:
        a, b = base[metric], recal[metric]
        entry: dict[str, Any] = {"samples": int(a.size)}
        if metric in PROPORTIONS:
            for label, v in (("no_recal", a), ("recal", b)):
                k = int(np.sum(v))
                w = wilson_interval(k, v.size)
                entry[label] = {"value": k / v.size, "lo": w.lo, "hi": w.hi, "count": k}
            if flt is not None and metric == "top1":
                k = int(np.sum(flt[metric]))
                w = wilson_interval(k, flt[metric].size)
                entry["float"] = {"value": k / flt[metric].size, "lo": w.lo, "hi": w.hi}
            diff = paired_proportion_difference(b, a)
            d = diff.to_dict()
        else:
            entry["no_recal"] = {"value": float(np.mean(a))}
            entry["recal"] = {"value": float(np.mean(b))}
            stats = resample_means(np.stack([a, b], axis=1), BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
            ci = percentile_interval(stats[:, 1] - stats[:, 0])
            d = {"estimate": float(np.mean(b) - np.mean(a)), "samples": int(a.size)}
            if ci is not None:
                d.update(ci.to_dict())
        d["verdict"] = _verdict(metric, d.get("lo", 0.0), d.get("hi", 0.0)) if "lo" in d else "n/a"
        entry["diff"] = d
        out[metric] = entry
    # SQNR: ratio of sums, paired bootstrap of the ratio's difference in dB
    cols = np.stack([base["_signal"], base["_noise"], recal["_noise"]], axis=1)
    s_a = sqnr_db(float(cols[:, 0].sum()), float(cols[:, 1].sum()))
    s_b = sqnr_db(float(cols[:, 0].sum()), float(cols[:, 2].sum()))
    rs = resample_means(cols, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
    with np.errstate(divide="ignore", invalid="ignore"):
        deltas = 10.0 * np.log10(rs[:, 1] / rs[:, 2])  # SQNR_b - SQNR_a
    ci = percentile_interval(deltas)
    d = {"estimate": s_b - s_a, "samples": int(cols.shape[0])}
    if ci is not None:
        d.update(ci.to_dict())
        d["verdict"] = _verdict("sqnr", ci.lo, ci.hi)
    out["sqnr"] = {
        "no_recal": {"value": s_a},
        "recal": {"value": s_b},
        "diff": d,
        "samples": int(cols.shape[0]),
    }
    return out


def row_verdict(metrics: dict[str, Any]) -> str:
    verdicts = {m["diff"].get("verdict") for m in metrics.values()}
    helps, hurts = "helps" in verdicts, "hurts" in verdicts
    if helps and hurts:
        return "mixed"
    return "helps" if helps else "hurts" if hurts else "no significant change"


# --------------------------------------------------------------------------- report


def _scalars(d: Any, depth: int = 0) -> Any:
    """The scalar fields of a report section (lists summarised by their length)."""
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and depth < 2:
                out[k] = _scalars(v, depth + 1)
            elif isinstance(v, list):
                out[k] = f"[{len(v)} items]"
            elif not isinstance(v, dict):
                out[k] = v
        return out
    return d


def recal_report(result: Any) -> dict[str, Any]:
    report = getattr(result, "report", None) or {}
    section = report.get("recalibration")
    return {
        "report_keys": sorted(report),
        "recalibration": section,
        "recalibration_summary": _scalars(section) if isinstance(section, dict) else section,
        "warnings": list(getattr(result, "warnings", []) or []),
    }


# --------------------------------------------------------------------------- table


def _fmt(metric: str, v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if metric in PROPORTIONS or metric == "step_agree" or metric.startswith("iou"):
        return f"{100 * v:.1f}%"
    if metric == "sqnr":
        return f"{v:.2f} dB"
    return f"{v:.4f}"


def _fmt_diff(metric: str, d: dict[str, Any]) -> str:
    scale, unit = (
        (100.0, " pt")
        if metric in PROPORTIONS or metric == "step_agree" or metric.startswith("iou")
        else (1.0, "")
    )
    if metric == "sqnr":
        unit = " dB"
    digits = 1 if scale == 100.0 or metric == "sqnr" else 4
    est = f"{scale * d['estimate']:+.{digits}f}"
    if "lo" not in d:
        return est + unit
    return f"{est}{unit} [{scale * d['lo']:+.{digits}f}, {scale * d['hi']:+.{digits}f}]"


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| model | T | metric | n | float | no recal | recal | recal - no recal [95 %] | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for metric, m in row["metrics"].items():

            def cell(key: str, metric: str = metric, m: dict[str, Any] = m) -> str:
                e = m.get(key)
                if e is None:
                    return ""
                s = _fmt(metric, e["value"])
                if "lo" in e:
                    s += f" [{_fmt(metric, e['lo'])}, {_fmt(metric, e['hi'])}]"
                return s

            lines.append(
                f"| {row['model']} | {row['threads']} | {metric} | {m['samples']} | "
                f"{cell('float')} | {cell('no_recal')} | {cell('recal')} | "
                f"{_fmt_diff(metric, m['diff'])} | {m['diff'].get('verdict', 'n/a')} |"
            )
        lines.append(
            f"| {row['model']} | {row['threads']} | **row** | | | | | | **{row['verdict']}** |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


@dataclass
class State:
    out: Path | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def write(self) -> None:
        if self.out is None:
            return
        tmp = self.out.with_suffix(".json.part")
        tmp.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1, default=str))
        tmp.replace(self.out)


def measure_model(
    spec: ModelSpec, args: argparse.Namespace, state: State, done: set[tuple[str, int]]
) -> None:
    model_path = _path(spec.model, args.data)
    calib = _path(spec.calib, args.data)
    num_calib = args.num_calib or spec.num_calib
    feeds, labels = load_heldout(spec, args.data)
    n = labels.size
    t0 = time.time()
    float_model = onnx.load(model_path)
    ref = run_model(float_model, feeds, args.session_threads, args.batch)
    out_kind = "logits"
    if spec.kind in ("classifier", "sequence"):
        out_kind = detect_output_kind(_rows(ref, spec.kind))
    flt = per_sample(spec, ref, ref, labels, out_kind)
    print(
        f"[{spec.name}] float model on {n} held-out samples: {time.time() - t0:.1f} s", flush=True
    )
    ranges = None
    for threads in args.threads:
        if (spec.name, threads) in done:
            print(f"[{spec.name}] T={threads}: in {args.out}, skipped", flush=True)
            continue
        t_row = time.time()
        base_cfg = TransformConfig(
            threads=threads, num_samples=num_calib, seed=SEED, collect_stats=args.collect_stats
        )
        no_recal_cfg = replace(base_cfg, recalibration=RecalibrationConfig(enabled=False))
        t = time.time()
        no_recal = nb.transform(str(model_path), str(calib), no_recal_cfg, ranges=ranges)
        t_no_recal = time.time() - t
        ranges = no_recal.ranges
        t = time.time()
        recal = nb.transform(str(model_path), str(calib), base_cfg, ranges=ranges)
        t_recal = time.time() - t
        t = time.time()
        out_a = run_model(no_recal.sim_model, feeds, args.session_threads, args.batch)
        out_b = run_model(recal.sim_model, feeds, args.session_threads, args.batch)
        t_eval = time.time() - t
        a = per_sample(spec, ref, out_a, labels, out_kind)
        b = per_sample(spec, ref, out_b, labels, out_kind)
        metrics = summarise(a, b, flt)
        row = {
            "model": spec.name,
            "description": spec.description,
            "model_path": str(model_path),
            "threads": threads,
            "num_calib": num_calib,
            "calib": str(calib),
            "heldout": [p.data.format(data=args.data, repo=REPO) for p in spec.heldout],
            "heldout_samples": int(n),
            "labelled_samples": int(np.sum(labels >= 0)),
            "output_kind": out_kind if spec.kind != "map" else "map",
            "metrics": metrics,
            "verdict": row_verdict(metrics),
            "report": recal_report(recal),
            "seconds": {
                "transform_no_recal": t_no_recal,
                "transform_recal": t_recal,
                "evaluate": t_eval,
                "row": time.time() - t_row,
            },
        }
        state.rows = [r for r in state.rows if (r["model"], r["threads"]) != (spec.name, threads)]
        state.rows.append(row)
        state.write()
        print(markdown([row]), flush=True)
        summary = row["report"]["recalibration_summary"]
        print(
            f"[{spec.name}] T={threads}: recalibration report: "
            f"{json.dumps(summary, default=str)[:600]}",
            flush=True,
        )
        print(
            f"[{spec.name}] T={threads}: {row['seconds']['row']:.0f} s "
            f"(transforms {t_no_recal:.0f} + {t_recal:.0f} s, evaluation {t_eval:.0f} s)",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=None, help="folder with fm/, mnv2/ and pp/ (module docstring)"
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}"
    )
    parser.add_argument(
        "--threads", default="2,4", help="NB-SMT thread counts T (comma-separated; default 2,4)"
    )
    parser.add_argument(
        "--num-calib",
        type=int,
        default=None,
        help="calibration samples (default: per model, see MODELS)",
    )
    parser.add_argument(
        "--session-threads",
        type=int,
        default=2,
        help="ONNX Runtime intra-op threads for the held-out runs",
    )
    parser.add_argument("--batch", type=int, default=16, help="held-out batch size")
    parser.add_argument(
        "--collect-stats",
        action="store_true",
        help="keep the transform's statistics pass (off: it does not change "
        "the model and costs a pass)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON written after every row")
    parser.add_argument("--resume", action="store_true", help="skip rows already in --out")
    parser.add_argument(
        "--render",
        type=Path,
        nargs="+",
        default=None,
        help="only print the markdown table of these JSON files (rows merged in order)",
    )
    args = parser.parse_args(argv)
    if args.render:
        rows = [r for f in args.render for r in json.loads(f.read_text())["rows"]]
        print(markdown(rows))
        return 0
    if args.data is None:
        parser.error("--data is required")
    args.threads = [int(t) for t in args.threads.split(",") if t]
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    state = State(args.out)
    done: set[tuple[str, int]] = set()
    if args.resume and args.out is not None and args.out.is_file():
        previous = json.loads(args.out.read_text())
        state.rows = previous.get("rows", [])
        done = {(r["model"], r["threads"]) for r in state.rows}
    state.meta = {
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "nbsmt_onnx": getattr(nb, "__version__", None),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED},
        "level": 0.95,
    }
    t0 = time.time()
    for name in names:
        measure_model(MODELS[name], args, state, done)
    state.meta["seconds"] = time.time() - t0
    state.write()
    print()
    print(markdown(state.rows))
    print(f"\ntotal {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
