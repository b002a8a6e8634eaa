"""How a pass scales over executor workers: local vs Ray with 1 and 2 workers, same run.

The pass is the transform's statistics / verification pass (every NB-SMT
op's ``stats`` summed, outputs checked) of a simulation model over N samples
read from an ``.npz`` by the workers themselves (``DataSpec``): the kind of
pass an evaluation table is made of. Timings are interleaved (each repeat runs
every configuration once) and the minimum and median are printed, with ratios
against the local run of the same repeat. From the 1- and 2-worker times the
script fits ``t(W) = fixed + N * c / W`` and prints the per-sample cost ``c``
and the fixed part (session creation, sharding, driver merge), which is what
the scale model in docs/architecture.md is built from.

Ray needs a loopback-only network namespace here:

    bash scripts/loopback.sh .venv/bin/python bench/bench_executor.py --samples 2000

Models: the bundled Fashion-MNIST ResNet (default) or ``--model M.onnx`` with
``--input-shape`` for its one input (random data, seeded).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import nbsmt_onnx as nb
from nbsmt_onnx.report import StatsReducer, add_stats_outputs
from nbsmt_onnx.runtime.executor import DataSpec, Job, LocalExecutor, RayExecutor
from nbsmt_onnx.runtime.session import SessionOptions

ROOT = Path(__file__).resolve().parents[1]


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models/fashion_mnist/fmnist_resnet.onnx"))
    ap.add_argument("--input-shape", default="1,28,28", help="one sample's shape (no batch axis)")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, choices=(1, 2, 4))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    shape = tuple(int(v) for v in args.input_shape.split(","))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "data.npz"
        import onnx

        float_model = onnx.load(args.model)
        (name,) = [i.name for i in float_model.graph.input if i.name not in
                   {t.name for t in float_model.graph.initializer}]  # fmt: skip
        np.savez(data_path, **{name: rng.random((args.samples, *shape), dtype=np.float32)})
        sim = nb.transform(
            float_model,
            str(data_path),
            nb.TransformConfig(
                threads=args.threads,
                num_samples=min(256, args.samples),
                recalibration=nb.RecalibrationConfig(enabled=False),
                collect_stats=False,
            ),
        ).sim_model
        probe, names = add_stats_outputs(sim)
        ops = tuple(names)
        reducer = StatsReducer(
            tuple(o.name for o in sim.graph.output), ops, tuple(names[n] for n in ops)
        )
        spec = DataSpec(str(data_path), num_samples=args.samples, batch_size=args.batch_size)
        job = Job(probe, spec, reducer, SessionOptions(intra_op_threads=1))

        print(f"CPU: {_cpu()} ({os.cpu_count()} logical cores); NBSMT_KERNEL_ISA="
              f"{os.environ.get('NBSMT_KERNEL_ISA', 'auto')}")  # fmt: skip
        print(f"model {Path(args.model).name}, T={args.threads}, {args.samples} samples in "
              f"batches of {args.batch_size}; 1 intra-op thread per session")  # fmt: skip
        makers = {
            "local": LocalExecutor,
            "ray-1": lambda: RayExecutor(1),
            "ray-2": lambda: RayExecutor(2),
        }
        times: dict[str, list[float]] = {k: [] for k in makers}
        results = {}
        for _ in range(args.repeats):
            for key, make in makers.items():
                with make() as ex:  # starting Ray is not timed; its workers' sessions are
                    start = time.perf_counter()
                    results[key] = ex.run(job)
                    times[key].append(time.perf_counter() - start)

        same = all(
            all(np.array_equal(results["local"][op], results[k][op]) for op in ops)
            for k in results
        )
        print(f"identical stats on every backend: {same}")
        base = min(times["local"])
        print(f"{'backend':8} {'min s':>8} {'median s':>9} {'vs local (min)':>15}")
        for key, ts in times.items():
            print(f"{key:8} {min(ts):8.2f} {statistics.median(ts):9.2f} {min(ts) / base:15.2f}")
        t1, t2 = min(times["ray-1"]), min(times["ray-2"])
        per_sample = 2 * (t1 - t2) / args.samples  # t(W) = fixed + N c / W
        fixed = t1 - args.samples * per_sample
        print(f"fit t(W) = fixed + N*c/W: c = {per_sample * 1e3:.3f} ms/sample, fixed = "
              f"{fixed:.2f} s; speed-up 2 vs 1 worker = {t1 / t2:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
