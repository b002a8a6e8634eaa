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

Without ``--labels`` the metric is argmax agreement with the float model
(the float32 row is then 100 % by definition). MobileNetV2 on held-out photo
crops (docs/search.md, "Measured")::

    python models/mobilenetv2/build_onnx.py --out-dir D
    python models/mobilenetv2/make_data.py --out D --num-calib 126 --num-heldout 576 \\
        --download-dir W
    python bench/search_study.py --model D/mobilenetv2_bn.onnx --calib D/photos_calib.npz \\
        --data D/photos_heldout.npz --shuffle-seed 0 --search-samples 192 \\
        --test-samples 384 --num-calib 126 --reference float32 --budgets 1 5 \\
        --search-references int8 float32 --no-sensitivity-recal

The data file is split by sample index: the first ``--search-samples`` for the
search, the next ``--test-samples`` for the test (write them shuffled, use a
test set in its published order as for Fashion-MNIST, or pass
``--shuffle-seed S`` to permute the samples with a seeded generator first:
``make_data.py`` writes its crops grouped by source photo).

The budgets (for each of ``--search-references``) are searched one after the
other on the same split; every later search reuses the first one's base,
sensitivities and built candidates (``search(..., reuse=...)``), so its cost
column counts only what it added.
The uniform T = 2 / T = 4 and int8 rows are the models the search built (the
same ``transform`` calls: T = 1 base ranges, recalibrated under the
assignment). ``--json OUT`` keeps the numbers; every search's own table (on
its split) goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
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


def _split(
    path: str, labels: str | None, a: int, b: int, out: Path, order: np.ndarray | None
) -> tuple[Path, Path | None]:
    """Samples ``a:b`` (after permuting them by ``order``) of the data and label files."""
    arrays = dict(np.load(path))
    take = slice(a, b) if order is None else order[a:b]
    np.savez(out.with_suffix(".npz"), **{k: v[take] for k, v in arrays.items()})
    lab = None
    if labels:
        lab = out.with_name(out.name + "_labels.npy")
        np.save(lab, np.load(labels)[take])
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
    ap.add_argument(
        "--reference",
        default="int8",
        choices=("int8", "float32"),
        help="the reference of the test table's drop column (and of the searches)",
    )
    ap.add_argument("--search-references", nargs="+", choices=("int8", "float32"),
                    help="search each budget against each of these references "
                         "[default: --reference]")  # fmt: skip
    ap.add_argument(
        "--no-sensitivity-recal",
        action="store_true",
        help="sensitivity by editing the base model's threads (no transform per layer)",
    )
    ap.add_argument(
        "--shuffle-seed",
        type=int,
        default=None,
        help="permute the data (and labels) with this seed before splitting",
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()
    # the search's progress (stages, passes, evaluations) as log lines on stderr
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    metric = "top1" if args.labels else "agreement"
    rows = []
    total = len(np.load(args.data)[next(iter(np.load(args.data).keys()))])
    if args.search_samples + args.test_samples > total:
        sys.exit(f"--search-samples + --test-samples > {total} samples in {args.data}")
    order = None
    if args.shuffle_seed is not None:
        order = np.random.default_rng(args.shuffle_seed).permutation(total)
    with tempfile.TemporaryDirectory() as tmp:
        search_data, search_labels = _split(
            args.data, args.labels, 0, args.search_samples, Path(tmp) / "search", order
        )
        test_data, test_labels = _split(
            args.data, args.labels, args.search_samples,
            args.search_samples + args.test_samples, Path(tmp) / "test", order,
        )  # fmt: skip
        tcfg = nb.TransformConfig(num_samples=args.num_calib)
        fm = io.load_model(args.model)
        test_set = np.load(test_data)
        labels = np.load(test_labels) if test_labels else None
        executor = LocalExecutor()

        # the searches first: the test rows use the models they built
        results = []
        searches = [
            (r, b) for r in args.search_references or [args.reference] for b in args.budgets
        ]
        for search_ref, budget in searches:
            start = time.perf_counter()
            result = search(
                args.model, args.calib, str(search_data),
                SearchConfig(max_drop=budget, metric=metric, reference=search_ref,
                             transform=tcfg, eval_batch_size=args.batch_size,
                             sensitivity_recalibration=not args.no_sensitivity_recal,
                             progress=True),
                labels=str(search_labels) if search_labels else None,
                reuse=results[0][0] if results else None,
            )  # fmt: skip
            results.append((result, round(time.perf_counter() - start, 1)))
            print(f"search, budget {budget:g} vs {search_ref} ({args.search_samples} search "
                  f"samples):\n"
                  f"{result.format_table()}", file=sys.stderr, flush=True)  # fmt: skip
        first = results[0][0]
        by_label = {c.label: c for c in first.tried}

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

        int8 = first.built(first.tried[0])  # T = 1 everywhere, not recalibrated
        int8_ok = correct(predictions(int8.sim_model))
        ref_ok = correct(float_pred) if args.reference == "float32" else int8_ok
        # with a float32 reference, the drop against int8 too: what NB-SMT adds to int8's loss
        also_int8 = args.reference == "float32"

        def test_row(name: str, threads_model, speedup: float, extra: dict) -> dict:  # type: ignore[no-untyped-def, type-arg]
            ok = int8_ok if threads_model is int8.sim_model else correct(predictions(threads_model))
            n = int(ok.size)
            wil = wilson_interval(int(ok.sum()), n)
            diff = paired_proportion_difference(ok, ref_ok)
            row = {
                "row": name, "speedup": speedup, "metric": 100 * ok.mean(),
                "metric_ci": [100 * wil.lo, 100 * wil.hi], "drop": -100 * diff.estimate + 0.0,
                "drop_ci": [-100 * diff.interval.hi, -100 * diff.interval.lo], **extra,
            }  # fmt: skip
            if also_int8:
                d8 = paired_proportion_difference(ok, int8_ok)
                row["drop_int8"] = -100 * d8.estimate + 0.0
                row["drop_int8_ci"] = [-100 * d8.interval.hi, -100 * d8.interval.lo]
            rows.append(row)
            print(f"test row {name}: {row['metric']:.2f}", file=sys.stderr, flush=True)
            return row

        if labels is not None:  # the float model's own score
            ok = correct(float_pred)
            wil = wilson_interval(int(ok.sum()), int(ok.size))
            diff = paired_proportion_difference(ok, ref_ok)
            rows.append({
                "row": "float32" + (" (reference)" if args.reference == "float32" else ""),
                "speedup": None, "metric": 100 * ok.mean(),
                "metric_ci": [100 * wil.lo, 100 * wil.hi], "drop": -100 * diff.estimate + 0.0,
                "drop_ci": [-100 * diff.interval.hi, -100 * diff.interval.lo],
            })  # fmt: skip
        else:  # agreement of the float model with itself
            rows.append({"row": "float32 (reference; 100 % agreement by definition)",
                         "speedup": None, "metric": 100.0, "metric_ci": None, "drop": 0.0,
                         "drop_ci": None})  # fmt: skip
        # the int8 simulation model at T = 1 (no NB-SMT, no recalibration): the 1.00x row
        test_row("int8, T=1 (no NB-SMT)" + (" (reference)" if args.reference == "int8" else ""),
                 int8.sim_model, 1.0, {})  # fmt: skip
        for t in (2, 4):
            cand = by_label[f"uniform T={t}"]
            test_row(f"uniform T={t}", first.built(cand).sim_model, cand.speedup,
                     {"search_metric": cand.score.metric, "search_drop": cand.score.drop,
                      "search_reference": first.config.reference})  # fmt: skip
        for (search_ref, budget), (result, wall) in zip(searches, results, strict=True):
            test_row(
                f"search, budget {budget:g} vs {search_ref}", result.transform.sim_model,
                result.best.speedup,
                {"search_drop": result.best.score.drop, "search_reference": search_ref,
                 "met": result.met_budget,
                 "evaluations": result.model_evaluations,
                 "reused_evaluations": result.reused_evaluations, "wall_s": wall,
                 "assignment": result.best.label, "threads": result.best.threads},
            )  # fmt: skip

    name = "top-1" if labels is not None else "agreement"
    print(f"model {Path(args.model).name}; {metric} on {args.test_samples} test samples not seen "
          f"by the search ({args.search_samples} search samples); reference {args.reference}")  # fmt: skip
    int8_col = " drop vs int8 [paired 95% CI] |" if also_int8 else ""
    print(
        f"| row | speed-up | {name} % [95% CI] | drop vs {args.reference} (points) [paired 95% CI] |"
        f"{int8_col} search: drop on search split (vs its reference); evaluations; wall s |"
    )
    print("| --- | --- | --- | --- |" + (" --- |" if also_int8 else "") + " --- |")
    for r in rows:
        cost = ""
        if "evaluations" in r:
            reused = f" (+{r['reused_evaluations']} reused)" if r["reused_evaluations"] else ""
            met = "" if r["met"] else ", budget not met"
            cost = (f"{r['search_drop']:.2f}; {r['evaluations']}{reused}; {r['wall_s']} "
                    f"({r['assignment']}{met})")  # fmt: skip
        elif "search_drop" in r:
            cost = f"{r['search_drop']:.2f}"
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        metric_s = f"{r['metric']:.2f}" + (
            f" [{r['metric_ci'][0]:.2f}, {r['metric_ci'][1]:.2f}]" if r["metric_ci"] else ""
        )
        drop_s = f"{r['drop']:.2f}" + (
            f" [{r['drop_ci'][0]:.2f}, {r['drop_ci'][1]:.2f}]" if r["drop_ci"] else ""
        )
        int8_s = ""
        if also_int8:
            int8_s = (f" {r['drop_int8']:.2f} [{r['drop_int8_ci'][0]:.2f}, "
                      f"{r['drop_int8_ci'][1]:.2f}] |" if "drop_int8" in r else " |")  # fmt: skip
        print(f"| {r['row']} | {speed} | {metric_s} | {drop_s} |{int8_s} {cost} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float))


if __name__ == "__main__":
    main()
