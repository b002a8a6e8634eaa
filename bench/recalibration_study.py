"""Recalibration study: BatchNorm recalibration / fused-layer correction under NB-SMT, measured.

For one model (BN kept or BN fused) this script builds, with the tool's own
APIs, the int8 simulation model (``nbsmt_onnx.transform`` at ``threads=1``,
recalibration off), its NB-SMT variants (``evaluate.with_nbsmt_settings``)
and their recalibrated versions (``calibration.recalibrate.recalibrate``: the
transform's recalibration step — BN strategy, then correction of the layers
without BN, then folding), runs every variant and the float model over
held-out data, and prints markdown tables (and writes JSON after every row,
so partial results survive an interruption; ``--resume`` skips rows already
in the JSON).

Rows (``--rows``, comma separated; default: the grid of ``--threads`` x
``--strategies`` plus int8 rows) are ``T[:METHOD][:key=value...]``:

- ``T``: 1 (int8), 2 or 4 (NB-SMT threads);
- ``METHOD``: ``none`` (default), a BN strategy (``train-mode``,
  ``sequential``, ``relative``, ``one-pass``) or, for fused models, a
  correction (``mean``, ``mean+var``);
- keys: ``f`` / ``r`` (VarianceRatio floor / bound of both the ``relative``
  variance transfer and the ``mean+var`` correction; default: the tool's,
  i.e. ``relative`` mean shift only (bound 1) and ``mean+var`` f=0.01, r=4),
  ``amp`` (1: VarianceRatio.amplify_only — variance only corrected where
  NB-SMT attenuated the signal),
  ``corr`` (correction of the layers without BN after BN recalibration,
  default ``--correction``, i.e. the tool's default),
  ``batch`` (calibration batch size; default ``--train-batch`` for
  train-mode / one-pass, else the whole set in one batch — the exact
  sequential route), ``samples`` (calibration samples used for
  recalibration), ``data`` (name of an ``--extra-calib`` set), ``keep_first``
  (1: first NB-SMT layer kept in float), ``fold`` (0/1), ``map``
  (``channel`` | ``interleave``) and ``red`` (``activations`` | ``weights``):
  the NB-SMT mapping and reduce mode (default channel / activations).

Activation ranges always come from ``--calib`` (``--num-calib`` samples), so
rows differ only in what the row key says.

Examples (docs/recalibration.md, "Measured", has the exact commands used)::

    python bench/recalibration_study.py --model models/fashion_mnist/fmnist_resnet.onnx \\
        --calib D/calib.npz --num-calib 2000 --eval test=D/eval.npz:D/eval_labels.npy \\
        --out fmnist_bn.json
    python bench/recalibration_study.py --model mobilenetv2_bn.onnx --calib M/photos_calib.npz \\
        --num-calib 126 --eval heldout=M/photos_heldout.npz \\
        --eval imagenet20=M/imagenet20.npz:M/imagenet20_labels.npy --out mnv2_bn.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import nbsmt_onnx as nb
from nbsmt_onnx import io
from nbsmt_onnx.calibration.data import CalibrationData, model_inputs, open_calibration_data
from nbsmt_onnx.calibration.recalibrate import (
    CORRECTIONS,
    DEFAULT_CORRECTION,
    DEFAULT_RATIO,
    DEFAULT_RELATIVE_RATIO,
    STRATEGIES,
    VarianceRatio,
    recalibrate,
)
from nbsmt_onnx.config import STRATEGY_CHOICES, RecalibrationConfig, Selection
from nbsmt_onnx.evaluate import with_nbsmt_settings
from nbsmt_onnx.graph.rewrite import ensure_node_names
from nbsmt_onnx.metrics import Agreement, SqnrAccumulator, TopKAccuracy
from nbsmt_onnx.ops import schema
from nbsmt_onnx.report import add_stats_outputs, layer_metrics
from nbsmt_onnx.runtime.session import SessionOptions, create_session

log = logging.getLogger("recalibration_study")

METHODS = ("none", *STRATEGIES, *CORRECTIONS)
ROW_KEYS = ("f", "r", "amp", "corr", "batch", "samples", "data", "keep_first", "fold", "map", "red")


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    """One variant: threads, method and the keys that differ from the defaults."""

    threads: int
    method: str = "none"
    keys: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Row:
        parts = [p for p in text.strip().split(":") if p]
        if not parts:
            raise SystemExit(f"empty row spec in {text!r}")
        threads = int(parts[0])
        if threads not in (1, 2, 4):
            raise SystemExit(f"row {text!r}: threads must be 1, 2 or 4")
        method = "none"
        keys: dict[str, str] = {}
        for p in parts[1:]:
            if "=" in p:
                k, v = p.split("=", 1)
                if k not in ROW_KEYS:
                    raise SystemExit(
                        f"row {text!r}: unknown key {k!r}; keys: {', '.join(ROW_KEYS)}"
                    )
                keys[k] = v
            elif p in METHODS:
                method = p
            else:
                raise SystemExit(
                    f"row {text!r}: unknown method {p!r}; methods: {', '.join(METHODS)}"
                )
        return cls(threads, method, tuple(sorted(keys.items())))

    @property
    def id(self) -> str:
        return ":".join([str(self.threads), self.method, *(f"{k}={v}" for k, v in self.keys)])

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.keys).get(key, default)

    @property
    def recalibrated(self) -> bool:
        return self.method != "none"

    @property
    def label(self) -> str:
        base = "int8 (T=1)" if self.threads == 1 else f"NB-SMT T={self.threads}"
        if self.method != "none":
            base += f" + {self.method}"
        extra = [f"{k}={v}" for k, v in self.keys]
        return base + (f" ({', '.join(extra)})" if extra else "")


def default_rows(args: argparse.Namespace, fused: bool) -> list[Row]:
    methods = args.corrections if fused else args.strategies
    rows = [Row(1)]
    if not fused:
        rows += [Row(1, m) for m in args.int8_strategies]
    for t in args.threads:
        rows.append(Row(t))
        rows += [Row(t, m) for m in methods]
    return rows


# --------------------------------------------------------------------------- data and runs


@dataclass
class EvalSet:
    name: str
    data: CalibrationData
    labels: np.ndarray | None


def _parse_eval(text: str) -> tuple[str, str, str | None]:
    name, _, rest = text.partition("=")
    if not rest:
        raise SystemExit(f"--eval {text!r}: expected NAME=DATA[:LABELS]")
    data, _, labels = rest.partition(":")
    return name, data, labels or None


def open_eval_sets(
    specs: Sequence[str], inputs: Any, limit: int | None, batch: int
) -> list[EvalSet]:
    out = []
    for text in specs:
        name, path, labels = _parse_eval(text)
        probe = open_calibration_data(path, inputs, num_samples=1, batch_size=1, seed=0)
        total = len(probe.source) if probe.source is not None else 0
        n = min(limit, total) if limit else total
        # a seeded draw (all samples, permuted, when no limit); labels follow ``indices``
        data = open_calibration_data(path, inputs, num_samples=n, batch_size=batch, seed=0)
        lab = None
        if labels is not None:
            lab = np.load(labels).astype(np.int64).reshape(-1)
            lab = lab[np.asarray(data.indices)]  # the draw's source indices
        out.append(EvalSet(name, data, lab))
    return out


def session_for(model: onnx.ModelProto, threads: int) -> Any:
    with io.session_source(model) as src:
        return create_session(src, SessionOptions(intra_op_threads=threads))


def run_outputs(model: onnx.ModelProto, data: CalibrationData, threads: int) -> np.ndarray:
    """The model's first output over all batches, concatenated (logits are small)."""
    session = session_for(model, threads)
    name = model.graph.output[0].name
    return np.concatenate([np.asarray(session.run([name], feed)[0]) for feed in data.batches()])


def metrics(
    reference: np.ndarray, outputs: np.ndarray, labels: np.ndarray | None, kind: str = "logits"
) -> dict[str, Any]:
    agree = Agreement(kind=kind)
    agree.update(reference, outputs)
    out: dict[str, Any] = dict(agree.result())
    if labels is not None:
        acc = TopKAccuracy()
        acc.update(outputs, labels)
        out.update(acc.result())
        out["correct"] = round(out["top1"] * len(labels))
    out["samples"] = int(outputs.shape[0])
    return out


def layer_tensors(float_model: onnx.ModelProto) -> list[str]:
    """Tensors compared along the depth: BN outputs (BN kept) or Conv/Gemm outputs (fused)."""
    bns = [n.output[0] for n in float_model.graph.node if n.op_type == "BatchNormalization"]
    if bns:
        return bns
    return [n.output[0] for n in float_model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]


def _expose(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for t in tensors:
        if t not in have:
            out.graph.output.append(
                onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
            )
    return out


def layer_diagnostics(
    float_model: onnx.ModelProto, model: onnx.ModelProto, feed: dict[str, np.ndarray], threads: int
) -> dict[str, Any]:
    """Per layer on one batch: output SQNR vs the float model and the NB-SMT op statistics."""
    produced = {o for n in model.graph.node for o in n.output}
    tensors = [t for t in layer_tensors(float_model) if t in produced]
    ref = dict(
        zip(
            tensors,
            session_for(_expose(float_model, tensors), threads).run(tensors, feed),
            strict=True,
        )
    )
    probed, stats_names = add_stats_outputs(model)
    probed = _expose(probed, tensors)
    names = tensors + list(stats_names.values())
    values = dict(zip(names, session_for(probed, threads).run(names, feed), strict=True))
    sqnr, fit = {}, {}
    for t in tensors:
        acc = SqnrAccumulator()
        acc.update(ref[t], values[t])
        sqnr[t] = acc.result()
        fit[t] = affine_fit(ref[t], values[t])
    attrs = {n.name: n for n in model.graph.node if n.domain == schema.DOMAIN}
    ops = {}
    for node, out in stats_names.items():
        t = next((a.i for a in attrs[node].attribute if a.name == "threads"), 2)
        ops[node] = layer_metrics(np.asarray(values[out], dtype=np.int64), int(t))
    return {"sqnr_vs_float_db": sqnr, "fit": fit, "ops": ops}


def affine_fit(reference: np.ndarray, value: np.ndarray) -> dict[str, float]:
    """How much of a tensor's error a per-channel affine map could remove (channel axis 1).

    ``bias_fraction``: share of the mean squared error that is per-channel mean
    offset (what a mean correction removes). ``sqnr_mean_db`` / ``sqnr_affine_db``:
    the SQNR after the in-sample best per-channel shift / least-squares
    ``a * value + b`` — an upper bound on what any BN statistic change at this
    tensor alone can do, given its input. ``gain_mean``: the variant's signal
    gain (slope of value on reference), ``std_ratio_mean``: its std over the
    reference's; noise that keeps the signal (gain 1) but inflates the std is
    what variance matching wrongly "corrects" by shrinking the signal.
    """
    r = np.moveaxis(reference.astype(np.float64), 1, 0).reshape(reference.shape[1], -1)
    v = np.moveaxis(value.astype(np.float64), 1, 0).reshape(value.shape[1], -1)
    signal = float(np.sum(r * r))
    err = v - r
    mse = float(np.mean(err * err))
    bias = err.mean(axis=1)
    vc = v - v.mean(axis=1, keepdims=True)
    rc = r - r.mean(axis=1, keepdims=True)
    var_v = np.sum(vc * vc, axis=1)
    a = np.where(var_v > 0, np.sum(vc * rc, axis=1) / np.where(var_v > 0, var_v, 1.0), 0.0)
    var_r = np.sum(rc * rc, axis=1)
    gain = np.sum(vc * rc, axis=1)[var_r > 0] / var_r[var_r > 0]
    resid_affine = rc - a[:, None] * vc
    resid_mean = rc - vc

    def db(noise: float) -> float:
        return 10 * math.log10(signal / noise) if noise > 0 else math.inf

    return {
        "bias_fraction": float(np.mean(bias * bias) / mse) if mse > 0 else 0.0,
        "sqnr_mean_db": db(float(np.sum(resid_mean * resid_mean))),
        "sqnr_affine_db": db(float(np.sum(resid_affine * resid_affine))),
        "fit_scale_mean": float(np.mean(a)),
        # signal gain: regression slope of the variant on the reference (1 = signal kept)
        "gain_mean": float(np.mean(gain)) if gain.size else 1.0,
        # std ratio variant / reference (>1: variance inflated by noise)
        "std_ratio_mean": float(np.mean(np.sqrt(var_v[var_r > 0] / var_r[var_r > 0]))),
    }


@dataclass
class Study:
    args: argparse.Namespace
    float_model: onnx.ModelProto
    fused: bool
    evals: list[EvalSet]
    float_outputs: dict[str, np.ndarray] = field(default_factory=dict)
    int8_models: dict[bool, onnx.ModelProto] = field(default_factory=dict)
    int8_seconds: dict[bool, float] = field(default_factory=dict)

    def int8(self, keep_first: bool) -> onnx.ModelProto:
        if keep_first not in self.int8_models:
            t0 = time.perf_counter()
            cfg = nb.TransformConfig(
                threads=1,
                num_samples=self.args.num_calib,
                batch_size=self.args.range_batch,
                selection=Selection(keep_first=keep_first),
                recalibration=RecalibrationConfig(enabled=False),
                collect_stats=False,
            )
            res = nb.transform(self.float_model, self.args.calib, cfg)
            self.int8_models[keep_first] = res.sim_model
            self.int8_seconds[keep_first] = time.perf_counter() - t0
            log.info(
                "int8 transform (keep_first=%s): %.1f s", keep_first, self.int8_seconds[keep_first]
            )
        return self.int8_models[keep_first]

    def calib_data(self, row: Row) -> CalibrationData:
        path = self.args.calib
        if row.get("data"):
            extra = dict(_split_named(self.args.extra_calib))
            if row.get("data") not in extra:
                raise SystemExit(f"row {row.id}: no --extra-calib named {row.get('data')!r}")
            path = extra[row.get("data")]
        samples = int(row.get("samples", self.args.num_calib))
        if row.get("batch") is not None:
            batch = int(row.get("batch"))
        elif row.method in ("train-mode", "one-pass"):
            batch = self.args.train_batch
        else:
            batch = self.args.exact_batch or samples
        specs = model_inputs(self.float_model)
        return open_calibration_data(path, specs, num_samples=samples, batch_size=batch, seed=0)

    def build(self, row: Row) -> tuple[onnx.ModelProto, dict[str, Any]]:
        keep_first = bool(int(row.get("keep_first", 0)))
        sim = with_nbsmt_settings(
            self.int8(keep_first),
            row.threads,
            row.get("map", "channel"),
            row.get("red", "activations"),
        )
        info: dict[str, Any] = {"recal_s": 0.0, "passes": 0, "model_runs": 0}
        if not row.recalibrated:
            return sim, info
        if self.fused and row.method in STRATEGIES:
            raise SystemExit(
                f"row {row.id}: the model has no BN; use a correction (mean, mean+var)"
            )
        if not self.fused and row.method in CORRECTIONS:
            raise SystemExit(f"row {row.id}: BN model rows take a strategy; corrections via corr=")
        strategy = row.method if row.method in STRATEGIES else "sequential"
        correction = (
            row.method if row.method in CORRECTIONS else row.get("corr", self.args.correction)
        )
        relative_ratio, correction_ratio = DEFAULT_RELATIVE_RATIO, DEFAULT_RATIO
        if any(row.get(k) is not None for k in ("f", "r", "amp")):
            relative_ratio = correction_ratio = VarianceRatio(
                floor=float(row.get("f", DEFAULT_RATIO.floor)),
                bound=float(row.get("r", DEFAULT_RATIO.bound)),
                amplify_only=bool(int(row.get("amp", 0))),
            )
        data = self.calib_data(row)
        cfg = _RecalSettings(strategy, correction, bool(int(row.get("fold", 1))))
        t0 = time.perf_counter()
        res = recalibrate(
            float_model=self.float_model,
            sim_model=sim,
            data=data,
            config=cfg,
            relative_ratio=relative_ratio,
            correction_ratio=correction_ratio,
            auto_batch=False,  # the row's batch size is part of what is measured
        )
        info["recal_s"] = time.perf_counter() - t0
        bn_passes = res.batchnorm.passes if res.batchnorm else 0
        corr_passes = res.correction.passes if res.correction else 0
        info.update(
            passes=bn_passes + corr_passes,
            model_runs=(res.batchnorm.model_runs if res.batchnorm else 0)
            + (res.correction.model_runs if res.correction else 0),
            bn_passes=bn_passes,
            correction_passes=corr_passes,
            calib_samples=data.num_samples,
            calib_batch=data.batch_size,
            batchnorms=len(res.batchnorm.updates) if res.batchnorm else 0,
            corrected_layers=len(res.correction.corrections) if res.correction else 0,
            report=res.report,
        )
        return res.model, info

    def evaluate(self, model: onnx.ModelProto) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        out = {}
        for ev in self.evals:
            outputs = run_outputs(model, ev.data, self.args.session_threads)
            out[ev.name] = metrics(
                self.float_outputs[ev.name], outputs, ev.labels, self.args.output_kind
            )
        return out, time.perf_counter() - t0


@dataclass(frozen=True)
class _RecalSettings:
    """What ``recalibrate`` reads from ``config.RecalibrationConfig`` (also allows ``one-pass``)."""

    strategy: str
    correction: str
    fold: bool


def _split_named(items: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for text in items:
        name, _, path = text.partition("=")
        if not path:
            raise SystemExit(f"expected NAME=PATH, got {text!r}")
        out.append((name, path))
    return out


# --------------------------------------------------------------------------- output


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * v:.2f}%"
    if kind == "frac":
        return f"{v:.3f}"
    if kind == "kl":
        return f"{v:.3f}"
    return str(v)


def markdown(result: dict[str, Any]) -> str:
    evals = result["eval_sets"]
    header = ["row", "passes", "recal s"]
    for ev in evals:
        if ev["labelled"]:
            header += [f"{ev['name']} top-1"]
        header += [f"{ev['name']} agree", f"{ev['name']} KL"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in result["rows"]:
        cells = [r["label"], str(r.get("passes", 0)), f"{r.get('recal_s', 0.0):.0f}"]
        for ev in evals:
            m = r["metrics"][ev["name"]]
            if ev["labelled"]:
                cells.append(f"{100 * m['top1']:.2f}% ({m['correct']}/{m['samples']})")
            cells += [_fmt(m["agreement"], "frac"), _fmt(m["kl"], "kl")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_safe(result), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    if isinstance(v, dict):
        return {k: _safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_safe(x) for x in v]
    if isinstance(v, np.generic):
        return _safe(v.item())
    return v


# --------------------------------------------------------------------------- main


def _csv(kind: type) -> Any:
    return lambda text: [kind(x) for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="float ONNX model (BN kept or fused)")
    p.add_argument(
        "--calib", required=True, help="calibration data (.npz): ranges and recalibration"
    )
    p.add_argument("--num-calib", type=int, required=True, help="calibration samples")
    p.add_argument(
        "--extra-calib",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="other calibration data for rows with data=NAME",
    )
    p.add_argument(
        "--eval",
        action="append",
        required=True,
        metavar="NAME=DATA[:LABELS]",
        help="held-out data (repeatable); labels .npy optional",
    )
    p.add_argument("--eval-samples", type=int, default=None, help="first N samples of each set")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--rows", type=_csv(str), default=None, help="row specs (see the module doc)")
    p.add_argument("--threads", type=_csv(int), default=[2, 4])
    p.add_argument("--strategies", type=_csv(str), default=list(STRATEGIES))
    p.add_argument("--int8-strategies", type=_csv(str), default=list(STRATEGY_CHOICES))
    p.add_argument("--corrections", type=_csv(str), default=list(CORRECTIONS))
    p.add_argument(
        "--correction",
        default=DEFAULT_CORRECTION,
        help="correction of layers without BN in BN models (default: the tool's)",
    )
    p.add_argument(
        "--output-kind",
        choices=("logits", "probabilities"),
        default="logits",
        help="what the model's first output is (for the KL divergence)",
    )
    p.add_argument("--train-batch", type=int, default=25, help="batch of train-mode / one-pass")
    p.add_argument(
        "--exact-batch",
        type=int,
        default=0,
        help="batch of sequential/relative/corrections (0: the whole set, exact in 1-2 passes)",
    )
    p.add_argument(
        "--range-batch", type=int, default=16, help="batch of the range calibration pass"
    )
    p.add_argument("--session-threads", type=int, default=0, help="ORT intra-op threads (0: all)")
    p.add_argument(
        "--layers",
        type=int,
        default=0,
        metavar="N",
        help="per-layer SQNR vs float and NB-SMT op statistics on the first N samples "
        "of the first --eval set",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="JSON results (rewritten after every row)"
    )
    p.add_argument("--resume", action="store_true", help="keep rows already in --out")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    for s in args.strategies + args.int8_strategies:
        if s not in STRATEGIES:
            raise SystemExit(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    started = time.perf_counter()
    float_model = io.load_model(Path(args.model))
    ensure_node_names(float_model)
    fused = not any(n.op_type == "BatchNormalization" for n in float_model.graph.node)
    rows = [Row.parse(r) for r in args.rows] if args.rows else default_rows(args, fused)
    inputs = model_inputs(float_model)
    evals = open_eval_sets(args.eval, inputs, args.eval_samples, args.eval_batch)
    study = Study(args, float_model, fused, evals)

    result: dict[str, Any] = {
        "title": args.title or Path(args.model).name,
        "model": str(args.model),
        "fused": fused,
        "calib": {
            "path": args.calib,
            "samples": args.num_calib,
            "train_batch": args.train_batch,
            "exact_batch": args.exact_batch or "all",
        },
        "eval_sets": [
            {"name": e.name, "samples": e.data.num_samples, "labelled": e.labels is not None}
            for e in evals
        ],
        "defaults": {
            "relative_ratio": vars(DEFAULT_RELATIVE_RATIO),
            "correction_ratio": vars(DEFAULT_RATIO),
            "correction": args.correction,
        },
        "argv": sys.argv[1:] if argv is None else list(argv),
        "rows": [],
    }
    done: dict[str, dict[str, Any]] = {}
    if args.resume and args.out.exists():
        old = json.loads(args.out.read_text(encoding="utf-8"))
        done = {r["id"]: r for r in old.get("rows", [])}

    t0 = time.perf_counter()
    for ev in evals:
        study.float_outputs[ev.name] = run_outputs(float_model, ev.data, args.session_threads)
    float_s = time.perf_counter() - t0
    float_row = {
        "id": "float32",
        "label": "float32",
        "passes": 0,
        "recal_s": 0.0,
        "eval_s": float_s,
        "metrics": {
            ev.name: metrics(
                study.float_outputs[ev.name],
                study.float_outputs[ev.name],
                ev.labels,
                args.output_kind,
            )
            for ev in evals
        },
    }
    result["rows"].append(float_row)
    first_feed = None
    if args.layers:
        first_feed = next(
            open_calibration_data(
                _parse_eval(args.eval[0])[1],
                inputs,
                num_samples=args.layers,
                batch_size=args.layers,
                seed=0,
            ).batches()
        )

    for row in rows:
        if row.id in done:
            result["rows"].append(done[row.id])
            log.info("row %s: kept from %s", row.id, args.out)
            continue
        log.info("row %s: building", row.id)
        model, info = study.build(row)
        m, eval_s = study.evaluate(model)
        entry = {
            "id": row.id,
            "label": row.label,
            "threads": row.threads,
            "method": row.method,
            "keys": dict(row.keys),
            **info,
            "eval_s": eval_s,
            "metrics": m,
        }
        if first_feed is not None:
            entry["layers"] = layer_diagnostics(
                float_model, model, first_feed, args.session_threads
            )
        result["rows"].append(entry)
        result["int8_transform_s"] = {str(k): v for k, v in study.int8_seconds.items()}
        result["wall_s"] = time.perf_counter() - started
        write_json(args.out, result)
        summary = ", ".join(
            f"{k}: agree {v['agreement']:.3f} KL {v['kl']:.3f}"
            + (f" top-1 {v['top1']:.4f}" if "top1" in v else "")
            for k, v in m.items()
        )
        log.info(
            "row %s: %s (recal %.1f s, %d passes, eval %.1f s)",
            row.id,
            summary,
            info["recal_s"],
            info["passes"],
            eval_s,
        )
    result["wall_s"] = time.perf_counter() - started
    write_json(args.out, result)
    print(f"## {result['title']}\n")
    print(markdown(result))
    print(f"\nwall time {result['wall_s']:.0f} s; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
