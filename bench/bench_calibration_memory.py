"""Peak memory of activation-range calibration vs. the number of calibration samples.

Claim under test (docs/spec.md §4): the range pass keeps two scalars per
probed tensor on the host, so peak RSS must not grow with the number of
samples. For each sample count the pass runs in a fresh process (so peaks do
not mix) on a stream of seeded random images fed batch by batch (the data
source is not what is measured); the script prints, per count, the peak RSS
of the process, the RSS right before the pass (model loaded, probe session
not yet built), and the ratio against the smallest count measured in the
same run.

    python bench/bench_calibration_memory.py --model build/models/mobilenetv2/mobilenetv2_bn.onnx
    python bench/bench_calibration_memory.py --model M.onnx --samples 100 2000 --batch-size 25

``--estimator percentile`` measures the histogram estimator (one batch of
every probed tensor leaves the graph at a time) instead of min/max.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(model_path: str, samples: int, batch_size: int, estimator: str) -> None:
    import numpy as np

    from nbsmt_onnx import io
    from nbsmt_onnx.calibration.data import CalibrationData, model_inputs
    from nbsmt_onnx.calibration.ranges import collect_ranges
    from nbsmt_onnx.config import RangeConfig, Selection
    from nbsmt_onnx.graph.rewrite import ensure_node_names, plan_rewrite

    model = io.load_model(model_path)
    ensure_node_names(model)
    plan = plan_rewrite(model, Selection())
    specs = model_inputs(model)
    shapes = {s.name: tuple(d or 224 for d in s.shape[1:]) for s in specs}

    def feeds():  # type: ignore[no-untyped-def]
        rng = np.random.default_rng(0)
        for start in range(0, samples, batch_size):
            n = min(batch_size, samples - start)
            yield {
                k: rng.standard_normal((n, *shape)).astype(np.float32)
                for k, shape in shapes.items()
            }

    data = CalibrationData(
        specs,
        feeds=feeds,
        num_samples=samples,
        batch_size=batch_size,
        seed=0,
        description="random stream",
    )
    before = _rss_mb()
    started = time.perf_counter()
    ranges = collect_ranges(model, plan.activation_tensors, data, RangeConfig(estimator=estimator))
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(
        json.dumps(
            {
                "samples": samples,
                "tensors": len(ranges),
                "rss_before_mb": before,
                "peak_rss_mb": peak,
                "seconds": elapsed,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--samples", type=int, nargs="+", default=[100, 2000])
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--estimator", choices=["max", "percentile"], default="max")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.model, args.samples[0], args.batch_size, args.estimator)
        return
    rows = []
    for n in sorted(args.samples):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--model",
            args.model,
            "--samples",
            str(n),
            "--batch-size",
            str(args.batch_size),
            "--estimator",
            args.estimator,
        ]
        out = (
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        rows.append(json.loads(out))
    base = rows[0]["peak_rss_mb"]
    print(
        f"model {args.model}, estimator {args.estimator}, batch {args.batch_size}, {rows[0]['tensors']} probed tensors"
    )
    print(
        f"{'samples':>8} {'rss before MB':>14} {'peak RSS MB':>12} {'vs first':>9} {'seconds':>8}"
    )
    for r in rows:
        print(
            f"{r['samples']:>8} {r['rss_before_mb']:>14.1f} {r['peak_rss_mb']:>12.1f} {r['peak_rss_mb'] / base:>9.3f} {r['seconds']:>8.1f}"
        )


if __name__ == "__main__":
    main()
