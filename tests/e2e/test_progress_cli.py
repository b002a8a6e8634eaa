"""The CLI reports progress as log lines when stderr is a pipe, and -q silences them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import transform_models as tm


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_prints_progress_lines_to_a_pipe_unless_quiet(
    tmp_path: Path, quiet: bool, nbsmt_library: str
) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(tm.conv_relu_gemm(0), model)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).random((8, 3, 8, 8), np.float32))
    cmd = [sys.executable, "-m", "nbsmt_onnx.cli", "transform", str(model), "--calib",
           str(tmp_path / "c.npz"), "--batch-size", "4", "-o", str(tmp_path / "o.onnx")]  # fmt: skip
    run = subprocess.run([*cmd, *(["-q"] if quiet else [])], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    if quiet:
        assert "activation ranges" not in run.stderr
    else:
        assert "nbsmt-onnx: activation ranges: started (0/2 batches)" in run.stderr
        assert "nbsmt-onnx: NB-SMT statistics: done (2/2 batches)" in run.stderr
