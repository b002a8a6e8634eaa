"""Every kernel instruction set this CPU can run gives the reference's results.

The library picks its kernels once per process (``NBSMT_KERNEL_ISA`` or the
best the CPU supports), so each ISA runs in a subprocess of its own: random
Conv (dense, pointwise, depthwise, grouped) and MatMul cases through ONNX Runtime, compared
with the NumPy reference integer for integer (ops_cases.check_cases). ISAs the
CPU lacks are skipped (the C++ self-test, test_cpp_kernels.py, covers the
GEMM kernels of each ISA the same way).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

_SCRIPT = """
import sys
sys.path.insert(0, {here!r})
from ops_cases import check_cases, conv_case, grouped_conv_case, matmul_case, pointwise_conv_case
for start in range(0, 300, 100):
    check_cases([grouped_conv_case(s) for s in range(start, start + 100)],
                intra_op_threads=1 + start // 100 % 2)
for start in range(0, 300, 100):
    check_cases([pointwise_conv_case(s) for s in range(start, start + 100)],
                intra_op_threads=(1, 2, 4)[start // 100])
check_cases([conv_case(s) for s in range(300)], intra_op_threads=2)
check_cases([matmul_case(s) for s in range(200)])
print("ok")
"""


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return next(
                (set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")),
                set(),
            )
    except OSError:
        return set()


def _cpu_runs(isa: str) -> bool:
    flags = _cpu_flags()
    if isa == "generic":
        return True
    if isa == "avx2":
        return {"avx2", "fma", "bmi1", "bmi2", "popcnt"} <= flags
    return {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= flags


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_isa_equals_reference(isa: str) -> None:
    if not _cpu_runs(isa):
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(here=str(HERE))],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "NBSMT_KERNEL_ISA": isa},
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        f"NBSMT_KERNEL_ISA={isa}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
