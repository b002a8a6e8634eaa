"""Per-layer threads under a budget: what ``search`` finds, measured on data it did not see.

For one model and each budget, ``nbsmt_onnx.search`` runs on a *search*
split; the chosen assignment and uniform T = 2 / T = 4 (every one built by
``transform`` with recalibration) are then scored on a disjoint *test* split,
beside the float32 model (with labels) and the int8 model at T = 1 (no
NB-SMT, not recalibrated: the 1.00x row). Printed per row: speed-up
(MAC-weighted), the metric on the test split with its 95 % Wilson interval,
the drop to ``--reference`` with its paired 95 % interval, and the search's
cost (model evaluations, wall time).

    python models/fashion_mnist/data.py --out D --num-calib 1000 --num-eval 4000
    python bench/search_study.py --model models/fashion_mnist/fmnist_resnet.onnx \\
        --calib D/calib.npz --data D/eval.npz --labels D/eval_labels.npy \\
        --search-samples 1000 --test-samples 1000 --num-calib 500 \\
        --reference float32 --budgets 1 5

The data file is split by sample index: the first ``--search-samples`` for the
search, the next ``--test-samples`` for the test (write them shuffled, or use
a test set in its published order as here). ``--json OUT`` keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import nbsmt_onnx as nb
from nbsmt_onnx import io
from nbsmt_onnx.calibration.data import model_inputs, open_calibration_data
from nbsmt_onnx.metrics import paired_proportion_difference, wilson_interval
from nbsmt_onnx.runtime.executor import Job, LocalExecutor
from nbsmt_onnx.search import ArgmaxReducer, SearchConfig, search


def _split(path: str, labels: str | None, a: int, b: int, out: Path) -> tuple[Path, Path | None]:
    arrays = dict(np.load(path))
    np.savez(out.with_suffix(".npz"), **{k: v[a:b] for k, v in arrays.items()})
    lab = None
    if labels:
        lab = out.with_name(out.name + "_labels.npy")
        np.save(lab, np.load(labels)[a:b])
    return out.with_suffix(".npz"), lab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--labels")
    ap.add_argument("--search-samples", type=int, default=2000)
    ap.add_argument("--test-samples", type=int, default=2000)
    ap.add_argument("--num-calib", type=int, default=512)
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.0, 5.0])
    ap.add_argument("--reference", default="int8", choices=("int8", "float32"))
    ap.add_argument("--no-sensitivity-recal", action="store_true")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()

    metric = "top1" if args.labels else "agreement"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        search_data, search_labels = _split(
            args.data, args.labels, 0, args.search_samples, Path(tmp) / "search"
        )
        test_data, test_labels = _split(
            args.data, args.labels, args.search_samples,
            args.search_samples + args.test_samples, Path(tmp) / "test",
        )  # fmt: skip
        tcfg = nb.TransformConfig(num_samples=args.num_calib)
        fm = io.load_model(args.model)
        test_set = np.load(test_data)
        labels = np.load(test_labels) if test_labels else None
        executor = LocalExecutor()

        def predictions(model) -> np.ndarray:  # type: ignore[no-untyped-def]
            data = open_calibration_data(
                dict(test_set), model_inputs(model), num_samples=args.test_samples,
                batch_size=args.batch_size, seed=0,
            )  # fmt: skip
            order = np.asarray(data.indices)
            pred = executor.run(Job(model, data, ArgmaxReducer(model.graph.output[0].name)))
            out = np.empty_like(pred)
            out[order] = pred  # back to the file's order
            return out

        float_pred = predictions(fm)

        def correct(pred: np.ndarray) -> np.ndarray:
            return pred == labels if labels is not None else pred == float_pred

        int8 = nb.transform(args.model, args.calib, nb.TransformConfig(
            num_samples=args.num_calib, threads=1,
            recalibration=nb.RecalibrationConfig(enabled=False)))  # fmt: skip
        ref_ok = correct(float_pred) if args.reference == "float32" else correct(
            predictions(int8.sim_model)
        )
        if args.reference == "float32" and labels is None:
            ref_ok = np.ones_like(float_pred, dtype=bool)

        def test_row(name: str, threads_model, speedup: float, extra: dict) -> dict:  # type: ignore[no-untyped-def, type-arg]
            ok = correct(predictions(threads_model))
            n = int(ok.size)
            wil = wilson_interval(int(ok.sum()), n)
            diff = paired_proportion_difference(ok, ref_ok)
            row = {
                "row": name, "speedup": speedup, "metric": 100 * ok.mean(),
                "metric_ci": [100 * wil.lo, 100 * wil.hi], "drop": -100 * diff.estimate + 0.0,
                "drop_ci": [-100 * diff.interval.hi, -100 * diff.interval.lo], **extra,
            }  # fmt: skip
            rows.append(row)
            return row

        if labels is not None:  # the float model's own score (agreement with itself is 100 %)
            ok = correct(float_pred)
            wil = wilson_interval(int(ok.sum()), int(ok.size))
            diff = paired_proportion_difference(ok, ref_ok)
            rows.append({
                "row": "float32" + (" (reference)" if args.reference == "float32" else ""),
                "speedup": None, "metric": 100 * ok.mean(),
                "metric_ci": [100 * wil.lo, 100 * wil.hi], "drop": -100 * diff.estimate + 0.0,
                "drop_ci": [-100 * diff.interval.hi, -100 * diff.interval.lo],
            })  # fmt: skip
        # the int8 simulation model at T = 1 (no NB-SMT, no recalibration): the 1.00x row
        test_row("int8, T=1 (no NB-SMT)" + (" (reference)" if args.reference == "int8" else ""),
                 int8.sim_model, 1.0, {})  # fmt: skip
        for t in (2, 4):
            res = nb.transform(args.model, args.calib, nb.TransformConfig(
                num_samples=args.num_calib, threads=t), ranges=int8.ranges)  # fmt: skip
            test_row(f"uniform T={t}", res.sim_model,
                     res.report["summary"]["speedup"]["speedup"], {})  # fmt: skip
        for budget in args.budgets:
            start = time.perf_counter()
            result = search(
                args.model, args.calib, str(search_data),
                SearchConfig(max_drop=budget, metric=metric, reference=args.reference,
                             transform=tcfg, eval_batch_size=args.batch_size,
                             sensitivity_recalibration=not args.no_sensitivity_recal),
                labels=str(search_labels) if search_labels else None,
            )  # fmt: skip
            test_row(
                f"search, budget {budget:g}", result.transform.sim_model, result.best.speedup,
                {"search_drop": result.best.score.drop, "met": result.met_budget,
                 "evaluations": result.model_evaluations,
                 "wall_s": round(time.perf_counter() - start, 1),
                 "assignment": result.best.label},
            )  # fmt: skip

    name = "top-1" if labels is not None else "agreement"
    print(f"model {Path(args.model).name}; {metric} on {args.test_samples} test samples not seen "
          f"by the search ({args.search_samples} search samples); reference {args.reference}")  # fmt: skip
    print(f"| row | speed-up | {name} % [95% CI] | drop (points) [paired 95% CI] | search: drop on "
          "search split, evaluations, wall s |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        cost = (f"{r['search_drop']:.2f}, {r['evaluations']}, {r['wall_s']} ({r['assignment']})"
                if "evaluations" in r else "")  # fmt: skip
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        print(f"| {r['row']} | {speed} | {r['metric']:.2f} [{r['metric_ci'][0]:.2f}, "
              f"{r['metric_ci'][1]:.2f}] | {r['drop']:.2f} [{r['drop_ci'][0]:.2f}, "
              f"{r['drop_ci'][1]:.2f}] | {cost} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
