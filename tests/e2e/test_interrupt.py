"""SIGINT / SIGTERM at any stage, the final save included, leave nothing behind.

The CLI runs in a subprocess through a small wrapper that pauses it at a chosen
stage (after the first save has finished and while the second one has its
temporary directory open, or during calibration) and touches a marker file;
the test then sends the signal and checks the exit code, the one-line message,
and that the folder holds exactly the input files again (no model, no report,
no ``.tmp`` file or directory).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import transform_models as tm

WRAPPER = """
import sys, time, pathlib
import onnx
marker, stage = pathlib.Path(sys.argv[1]), sys.argv[2]

def pause():
    marker.write_text(stage)
    time.sleep(120)

if stage == "second-save":
    real, calls = onnx.save_model, []
    def save_model(*args, **kwargs):
        real(*args, **kwargs)  # the temporary file is complete; os.replace has not run
        calls.append(1)
        if len(calls) == 2:
            pause()
    onnx.save_model = save_model
elif stage == "calibration":
    import nbsmt_onnx.api as api
    real_ranges = api.collect_ranges
    def collect_ranges(*args, **kwargs):
        pause()
        return real_ranges(*args, **kwargs)
    api.collect_ranges = collect_ranges
from nbsmt_onnx.cli import main
sys.argv = ["nbsmt-onnx", *sys.argv[3:]]
main()
"""


@pytest.fixture(autouse=True)
def _library(nbsmt_library: str) -> str:
    return nbsmt_library


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("stage", ["second-save", "calibration"])
def test_interrupted_transform_leaves_nothing(tmp_path: Path, stage: str, sig: int) -> None:
    work = tmp_path / "work"
    work.mkdir()
    onnx.save(tm.conv_relu_gemm(), work / "model.onnx")
    np.savez(work / "calib.npz", x=np.random.default_rng(0).standard_normal((8, 3, 8, 8)))
    before = sorted(p.name for p in work.iterdir())
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    marker = tmp_path / "paused"
    proc = subprocess.Popen(
        [
            sys.executable, str(tmp_path / "wrapper.py"), str(marker), stage,
            "transform", "model.onnx", "--calib", "calib.npz", "--num-samples", "8",
            "--export", "both", "--report", "report.json", "-o", "out.onnx",
        ],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached the stage"
            time.sleep(0.05)
        if stage == "second-save":  # the first model is on disk, the second one in a .tmp dir
            names = {p.name for p in work.iterdir()}
            assert "out.onnx" in names and any(n.endswith(".tmp") for n in names), names
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "interrupted" in errors[0], stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in work.iterdir()) == before
