"""Why recalibration hurts a fused model: per-layer attribution on held-out data.

For one model of ``bench/recalibration_table.py`` (``--model``) and one NB-SMT
thread count, this script builds the simulation model without recalibration
(``nbsmt_onnx.transform``), then runs the tool's recalibration step
(``calibration.recalibrate.recalibrate``, default config, fold off, the
calibration samples in ONE batch: the exact route) and takes its per-layer
mean corrections apart:

- per layer: level (depth), RMS shift in units of the clean std (the report's
  ``mean_shift``), its split-half noise — the same correction estimated on the
  two halves of the calibration samples, ``noise = RMS_c((d_A - d_B) / 2) /
  RMS_c(d)`` (about 1: the shift is estimation noise) — and its transfer — the
  correction estimated on the held-out samples themselves (an oracle),
  ``transfer = corr_c(d_calib, d_heldout)``;
- held-out fidelity (the table's metrics vs float) of models corrected on
  subsets: none; all (the default); only levels <= k (cumulative, a few cuts);
  each of the ``--single`` layers with the largest shifts alone; all but
  each of the ``--leave-out`` last levels; all with each channel's shift
  shrunk by its split-half standard error (``d * max(0, 1 - se^2 / d^2)``,
  ``se`` pooled per layer); and the held-out oracle (corrections estimated on
  the evaluation data itself: what a perfect estimate of the mean could do).

JSON after every evaluation (``--out``); a markdown summary at the end.

    python bench/recalibration_layers.py --data D --model ocr-det --threads 2 --out det_layers.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recalibration_table import (
    MODELS,
    _path,
    _rows,
    detect_output_kind,
    load_heldout,
    per_sample,
    run_model,
)

import nbsmt_onnx as nb
from nbsmt_onnx.calibration.recalibrate import recalibrate
from nbsmt_onnx.config import RecalibrationConfig, TransformConfig
from nbsmt_onnx.graph.bn import BatchNormStatistics
from nbsmt_onnx.graph.fold import (
    ChannelAffine,
    apply_channel_corrections,
    write_batchnorm_statistics,
)


def _one_batch(feed: dict[str, np.ndarray]) -> Any:
    return lambda: iter([feed])


def _slice(feed: dict[str, np.ndarray], sl: slice) -> dict[str, np.ndarray]:
    return {k: v[sl] for k, v in feed.items()}


def _shift(corr: Any) -> np.ndarray:
    return np.asarray(corr.correction.shift, dtype=np.float64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-calib", type=int, default=None)
    p.add_argument("--heldout", type=int, default=64, help="held-out samples scored")
    p.add_argument("--cuts", type=int, default=5, help="cumulative level cuts")
    p.add_argument("--single", type=int, default=6, help="largest-shift layers tried alone")
    p.add_argument("--leave-out", type=int, default=3, help="last levels left out one by one")
    p.add_argument("--session-threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    spec = MODELS[args.model]
    num_calib = args.num_calib or spec.num_calib
    model_path, calib_path = _path(spec.model, args.data), _path(spec.calib, args.data)
    float_model = onnx.load(model_path)
    with np.load(calib_path) as z:
        calib = {k: z[k][:num_calib] for k in z.files}
    feeds, labels = load_heldout(spec, args.data)
    feeds = _slice(feeds, slice(0, args.heldout))
    labels = labels[: args.heldout]
    t0 = time.time()
    ref = run_model(float_model, feeds, args.session_threads, args.batch)
    kind = "logits"
    if spec.kind in ("classifier", "sequence"):
        kind = detect_output_kind(_rows(ref, spec.kind))
    cfg = TransformConfig(
        threads=args.threads,
        num_samples=num_calib,
        collect_stats=False,
        recalibration=RecalibrationConfig(enabled=False),
    )
    sim0 = nb.transform(str(model_path), str(calib_path), cfg).sim_model
    rcfg = replace(RecalibrationConfig(), fold=False)
    out: dict[str, Any] = {
        "model": spec.name,
        "threads": args.threads,
        "num_calib": num_calib,
        "heldout": int(labels.size),
        "layers": [],
        "evaluations": [],
    }

    def write() -> None:
        if args.out is not None:
            args.out.write_text(json.dumps(out, indent=1, default=float))

    def run_recal(feed: dict[str, np.ndarray]) -> Any:
        return recalibrate(
            float_model=float_model,
            sim_model=sim0,
            data=_one_batch(feed),
            config=rcfg,
            auto_batch=False,
        )

    full = run_recal(calib)
    bns = list(full.batchnorm.updates)
    corrs = list(full.correction.corrections) if full.correction else []
    names = [c.name for c in corrs]
    half = num_calib // 2
    part_a = run_recal(_slice(calib, slice(0, half)))
    part_b = run_recal(_slice(calib, slice(half, 2 * half)))
    oracle = run_recal(feeds)
    runs = {"a": part_a, "b": part_b, "oracle": oracle}
    print(
        f"[{spec.name} T={args.threads}] {len(bns)} BN recalibrated, "
        f"{len(corrs)} layers corrected; recalibration runs {time.time() - t0:.0f} s",
        flush=True,
    )

    def unit_shift(r: Any, kind: str, name: str) -> np.ndarray:
        """Per-channel shift of one unit: BN new - old mean, or the correction's shift."""
        if kind == "bn":
            u = {u.name: u for u in r.batchnorm.updates}[name]
            return np.asarray(u.new.mean - u.old.mean, dtype=np.float64)
        c = {c.name: c for c in (r.correction.corrections if r.correction else ())}[name]
        return _shift(c)

    shrunk_bn: dict[str, BatchNormStatistics] = {}
    shrunk: dict[str, ChannelAffine] = {}
    units = [("bn", u.name, u.level, np.sqrt(u.old.var + u.epsilon)) for u in bns] + [
        ("corr", c.name, c.level, np.sqrt(c.reference.variance + 1e-12)) for c in corrs
    ]
    for ukind, name, level, std in units:
        d = unit_shift(full, ukind, name)
        da, db = unit_shift(part_a, ukind, name), unit_shift(part_b, ukind, name)
        do = unit_shift(oracle, ukind, name)
        rms = float(np.sqrt(np.mean((d / std) ** 2)))
        se_c = (da - db) / 2.0  # one draw per channel of the full estimate's error
        se = float(np.sqrt(np.mean(se_c**2)))  # pooled per unit (output units)
        noise = float(np.sqrt(np.mean((se_c / std) ** 2))) / max(rms, 1e-12)
        transfer = float(np.corrcoef(d, do)[0, 1]) if d.size > 1 and np.std(d) > 0 else float("nan")
        gain = np.maximum(0.0, 1.0 - se**2 / np.maximum(d**2, 1e-30))
        if ukind == "bn":
            u = {u.name: u for u in bns}[name]
            shrunk_bn[name] = BatchNormStatistics(u.old.mean + d * gain, u.new.var)
        else:
            c = {c.name: c for c in corrs}[name]
            shrunk[name] = ChannelAffine(c.correction.scale, d * gain)
        out["layers"].append(
            {
                "kind": ukind,
                "name": name,
                "level": level,
                "channels": int(d.size),
                "mean_shift_rms_std": rms,
                "split_half_noise_ratio": noise,
                "oracle_corr": transfer,
                "oracle_rms_std": float(np.sqrt(np.mean((do / std) ** 2))),
                "calib_minus_oracle_rms_std": float(np.sqrt(np.mean(((d - do) / std) ** 2))),
                "shrink_kept_fraction": float(np.mean(gain)),
            }
        )
    write()

    def evaluate(label: str, model: onnx.ModelProto, layers: list[str] | None) -> None:
        t = time.time()
        o = run_model(model, feeds, args.session_threads, args.batch)
        m = per_sample(spec, ref, o, labels, kind)
        res = {k: float(np.mean(v)) for k, v in m.items() if not k.startswith("_")}
        res["sqnr"] = float(10 * np.log10(m["_signal"].sum() / max(m["_noise"].sum(), 1e-30)))
        out["evaluations"].append(
            {"label": label, "layers": layers, **res, "seconds": time.time() - t}
        )
        write()
        print(f"  {label:40s} " + " ".join(f"{k}={v:.4f}" for k, v in res.items()), flush=True)

    def with_bns(selected: list[str], stats: dict[str, BatchNormStatistics] | None = None) -> Any:
        new = stats or {u.name: u.new for u in bns}
        return write_batchnorm_statistics(sim0, {n: new[n] for n in selected})

    all_bn = [u.name for u in bns]
    base = with_bns(all_bn)  # every BN recalibrated, nothing corrected yet
    affine = full.correction.affine if full.correction else {}
    evaluate("none", sim0, [])
    evaluate("all (default)", apply_channel_corrections(base, affine), all_bn + names)
    if bns and corrs:
        evaluate("BN only", base, all_bn)
        evaluate("corrections only", apply_channel_corrections(sim0, affine), names)
    if len(bns) > 1:
        for u in bns:
            evaluate(
                f"only BN {u.name} (L{u.level}, shift {u.mean_shift:.2f})",
                with_bns([u.name]),
                [u.name],
            )
            rest = [n for n in all_bn if n != u.name]
            evaluate(
                f"all but BN {u.name}",
                apply_channel_corrections(with_bns(rest), affine),
                rest + names,
            )
    levels = sorted({c.level for c in corrs})
    if levels:
        cuts = sorted(
            {
                levels[min(len(levels) - 1, round(i * (len(levels) - 1) / args.cuts))]
                for i in range(args.cuts)
            }
        )
        for cut in cuts:
            sel = {c.name: c.correction for c in corrs if c.level <= cut}
            evaluate(
                f"levels <= {cut} ({len(sel)} layers)",
                apply_channel_corrections(base, sel),
                list(sel),
            )
        for c in sorted(corrs, key=lambda c: -c.mean_shift)[: args.single]:
            evaluate(
                f"only {c.name} (L{c.level}, shift {c.mean_shift:.2f})",
                apply_channel_corrections(base, {c.name: c.correction}),
                [c.name],
            )
        for lev in levels[::-1][: args.leave_out]:
            sel = {c.name: c.correction for c in corrs if c.level != lev}
            evaluate(f"all but level {lev}", apply_channel_corrections(base, sel), list(sel))
    evaluate(
        "all, shrunk by split-half SE",
        apply_channel_corrections(with_bns(all_bn, shrunk_bn), shrunk),
        all_bn + names,
    )
    oracle_affine = oracle.correction.affine if oracle.correction else {}
    evaluate(
        "oracle (estimated on held-out)",
        apply_channel_corrections(oracle.batchnorm.model, oracle_affine),
        all_bn + names,
    )
    del runs
    out["seconds"] = time.time() - t0
    write()
    print("\n| unit | layer | level | C | shift (RMS, std) | split-half noise | corr w/ oracle |")
    print("|---|---|---|---|---|---|---|")
    for e in out["layers"]:
        print(
            f"| {e['kind']} "
            f"| {e['name']} | {e['level']} | {e['channels']} | {e['mean_shift_rms_std']:.3f} | "
            f"{e['split_half_noise_ratio']:.2f} | {e['oracle_corr']:.2f} |"
        )
    print(f"total {out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
