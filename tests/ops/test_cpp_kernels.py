"""The C++ kernel self-test (custom_ops/tests/test_kernels.cc), built and run from pytest.

It compares the fast ``nbsmt::accumulate`` (every kernel implementation the CPU
can run: portable C++, AVX2, AVX-512 VNNI) with ``nbsmt::accumulate_scalar``,
the straightforward SPEC loop, integer for integer and stats included, over
random cases (odd shapes, tails, 0-95 % sparsity, saturated and all-zero
operands, K = 4608 and the largest K, any parallel split).

The executable is built with CMake in ``tmp_path``; set ``NBSMT_KERNEL_TESTS``
to an already built ``nbsmt_kernel_tests`` to skip the build.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = 500  # random cases per run (each is checked on every kernel implementation)


def _which(name: str) -> str | None:
    """``name`` from pip's cmake/ninja in the running environment or in the
    project's set-up venv (.venv, scripts/setup.sh), else from PATH. The op tests
    also run in throw-away venvs with other onnxruntime versions
    (scripts/check_ort_versions.sh) that have no build tools of their own."""
    dirs = [Path(sys.executable).parent, ROOT / ".venv" / "bin"]
    path = os.pathsep.join([*(str(d) for d in dirs), os.environ.get("PATH", "")])
    return shutil.which(name, path=path)


def _tool(name: str) -> str:
    found = _which(name)
    if found is None:
        pytest.fail(f"{name} not found; 'pip install {name}' or install it with apt", pytrace=False)
    return found


@pytest.fixture(scope="module")
def kernel_tests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prebuilt = os.environ.get("NBSMT_KERNEL_TESTS")
    if prebuilt:
        return Path(prebuilt)
    build = tmp_path_factory.mktemp("kernel-tests-build")
    cmake = _tool("cmake")
    configure = [
        cmake,
        "-S",
        str(ROOT / "custom_ops"),
        "-B",
        str(build),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DNBSMT_BUILD_TESTS=ON",
    ]
    ninja = _which("ninja")
    if ninja is not None:
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    for cmd in (configure, [cmake, "--build", str(build), "--target", "nbsmt_kernel_tests"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            pytest.fail(
                f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}",
                pytrace=False,
            )
    return build / "nbsmt_kernel_tests"


def _run(exe: Path, *args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(exe), *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
        timeout=1200,
    )
    if proc.returncode != 0:
        failures = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
        pytest.fail(
            f"kernel self-test failed (exit {proc.returncode}): "
            + "\n".join(failures[:20] or [proc.stdout[-2000:], proc.stderr[-2000:]]),
            pytrace=False,
        )
    return proc.stdout


@pytest.mark.parametrize("seed", [1, 2])
def test_fast_kernels_equal_scalar_loop(kernel_tests: Path, seed: int) -> None:
    out = _run(kernel_tests, str(CASES), str(seed))
    summary = out.strip().splitlines()[-1]
    match = re.fullmatch(r"(\d+) passed, (\d+) failed", summary)
    assert match is not None, f"unexpected last line {summary!r}"
    passed, failed = int(match[1]), int(match[2])
    assert failed == 0
    tested = re.search(r"tested=(.*)", out)
    assert tested is not None
    kernels = tested[1].split()
    assert "scalar" in kernels
    # every random case plus the fixed large-K cases ran on every implementation
    assert passed >= CASES * len(kernels)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_environment_variable_selects_the_kernel(kernel_tests: Path, isa: str) -> None:
    """NBSMT_KERNEL_ISA picks the default implementation (if this CPU can run it)."""
    out = _run(kernel_tests, "5", "3", env={"NBSMT_KERNEL_ISA": isa})
    tested = re.search(r"tested=(.*)", out)
    default = re.search(r"default=(\S+)", out)
    assert tested is not None and default is not None
    if isa not in tested[1].split():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    assert default[1] == ("generic" if isa == "scalar" else isa)
