"""Hostile input: every mistake a user makes gets exit 2, one line, no traceback, no file.

Each case builds its model (onnx.helper) and data (numpy) itself and runs the
real ``nbsmt-onnx`` executable in a subprocess, so what ONNX Runtime's C++
code prints to the process's stderr is seen too. For each case: exit code 2,
exactly one ``error:`` line and nothing else but log lines, no traceback,
nothing new in the folder (no output model, report or ``.tmp`` leftover) and
the input files byte-identical (SHA-256) afterwards.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import transform_models as tm
from onnx import helper

EXE = Path(sys.executable).with_name("nbsmt-onnx")


@pytest.fixture(autouse=True)
def _library(nbsmt_library: str) -> str:
    return nbsmt_library


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _dynamic_conv_matmul() -> onnx.ModelProto:
    """Conv on (N, 3, H, W) -> Relu -> Flatten -> MatMul(4*6*6 rows): only 6x6 inputs fit."""
    r = _rng()
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "g"], ["y"], name="fc"),
    ]
    inits = {
        "w": r.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "g": r.standard_normal((4 * 6 * 6, 5)).astype(np.float32),
    }
    return tm.make_model(
        nodes, [tm.value("x", ["N", 3, "H", "W"])], [tm.value("y", ["N", 5])], inits
    )


def _reshape_model() -> onnx.ModelProto:
    """A Reshape to a fixed feature count after a dynamic-size Conv (fails inside Reshape)."""
    r = _rng()
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c", "shape"], ["f"], name="reshape"),
        helper.make_node("Gemm", ["f", "g"], ["y"], name="fc"),
    ]
    inits = {
        "w": r.standard_normal((2, 3, 3, 3)).astype(np.float32),
        "shape": np.array([-1, 2 * 5 * 5], np.int64),
        "g": r.standard_normal((50, 4)).astype(np.float32),
    }
    return tm.make_model(
        nodes, [tm.value("x", ["N", 3, "H", "W"])], [tm.value("y", ["N", 4])], inits
    )


def _unknown_op_model() -> onnx.ModelProto:
    """A model with an op of a domain nobody registers: ONNX Runtime cannot load it."""
    r = _rng()
    nodes = [
        helper.make_node("Frobnicate", ["x"], ["z"], name="frob", domain="com.example"),
        helper.make_node("MatMul", ["z", "g"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [tm.value("x", ["N", 6])],
        [tm.value("y", ["N", 5])],
        [onnx.numpy_helper.from_array(r.standard_normal((6, 5)).astype(np.float32), "g")],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
        ir_version=8,
    )


def _two_input_model() -> onnx.ModelProto:
    """y = (a + b) @ g with a, b of shape (N, 6)."""
    nodes = [
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        helper.make_node("MatMul", ["s", "g"], ["y"], name="fc"),
    ]
    inits = {"g": _rng().standard_normal((6, 5)).astype(np.float32)}
    return tm.make_model(
        nodes, [tm.value("a", ["N", 6]), tm.value("b", ["N", 6])], [tm.value("y", ["N", 5])], inits
    )


def _state_model() -> onnx.ModelProto:
    """y = x @ g and z = state @ g2 with state [2, N, 4] (layers, batch, hidden)."""
    r = _rng()
    nodes = [
        helper.make_node("MatMul", ["x", "g"], ["y"], name="fc"),
        helper.make_node("MatMul", ["state", "g2"], ["z"], name="fc_state"),
    ]
    inits = {
        "g": r.standard_normal((6, 5)).astype(np.float32),
        "g2": r.standard_normal((4, 3)).astype(np.float32),
    }
    return tm.make_model(
        nodes,
        [tm.value("x", ["N", 6]), tm.value("state", [2, "N", 4])],
        [tm.value("y", ["N", 5]), tm.value("z", [2, "N", 3])],
        inits,
    )


def _images(n: int, size: int) -> np.ndarray:
    return _rng().standard_normal((n, 3, size, size)).astype(np.float32)


@dataclass(frozen=True)
class Case:
    """A hostile case: files to write, the CLI arguments, words the error line must contain."""

    name: str
    files: Callable[[Path], None]
    args: tuple[str, ...]
    expect: tuple[str, ...]


def _save_model(model: onnx.ModelProto) -> Callable[[Path], None]:
    return lambda d: onnx.save(model, d / "model.onnx")


def _with(*writers: Callable[[Path], None]) -> Callable[[Path], None]:
    def write(d: Path) -> None:
        for w in writers:
            w(d)

    return write


def _npz(name: str, **arrays: np.ndarray) -> Callable[[Path], None]:
    return lambda d: np.savez(d / name, **arrays)  # type: ignore[arg-type]


def _bytes(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


GOOD = tm.conv_relu_gemm()
GOOD_X = _images(16, 8)
NAN_X = GOOD_X.copy()
NAN_X[3, 1, 2, 2] = np.nan
TRANSFORM = ("transform", "model.onnx", "-o", "out.onnx", "--num-samples", "16")

CASES = [
    Case(
        "garbage model file",
        _with(_bytes("model.onnx", b"\x00not an onnx model" * 10), _npz("c.npz", x=GOOD_X)),
        (*TRANSFORM, "--calib", "c.npz"),
        ("model.onnx",),
    ),
    Case(
        "truncated model file",
        _with(_bytes("model.onnx", GOOD.SerializeToString()[:200]), _npz("c.npz", x=GOOD_X)),
        (*TRANSFORM, "--calib", "c.npz"),
        ("model.onnx",),
    ),
    Case(
        "model ONNX Runtime cannot load (unknown op domain)",
        _with(
            _save_model(_unknown_op_model()),
            _npz("c.npz", x=_rng().standard_normal((16, 6)).astype(np.float32)),
        ),
        (*TRANSFORM, "--calib", "c.npz"),
        ("Frobnicate",),
    ),
    Case(
        "data keyed by a wrong input name",
        _with(_save_model(GOOD), _npz("c.npz", image=GOOD_X, extra=GOOD_X)),
        (*TRANSFORM, "--calib", "c.npz"),
        ("no array for model input(s) x",),
    ),
    Case(
        "wrong channel count for a static model",
        _with(_save_model(GOOD), _npz("c.npz", x=_rng().standard_normal((16, 4, 8, 8)))),
        (*TRANSFORM, "--calib", "c.npz"),
        ("'x'", "(4, 8, 8)", "(3, 8, 8)"),
    ),
    Case(
        "wrong spatial size for a static model",
        _with(_save_model(GOOD), _npz("c.npz", x=_images(16, 9))),
        (*TRANSFORM, "--calib", "c.npz"),
        ("'x'", "(3, 9, 9)", "(3, 8, 8)"),
    ),
    Case(
        "wrong rank",
        _with(_save_model(GOOD), _npz("c.npz", x=_rng().standard_normal((16, 64)))),
        (*TRANSFORM, "--calib", "c.npz"),
        ("'x'", "(16, 64)"),
    ),
    Case(
        "NaN in the data",
        _with(_save_model(GOOD), _npz("c.npz", x=NAN_X)),
        (*TRANSFORM, "--calib", "c.npz"),
        ("NaN",),
    ),
    Case(
        "integer data for a float model",
        _with(_save_model(GOOD), _npz("c.npz", x=np.zeros((16, 3, 8, 8), np.int32))),
        (*TRANSFORM, "--calib", "c.npz"),
        ("dtype int32",),
    ),
    Case(
        "inputs with different sample counts",
        _with(
            _save_model(_two_input_model()),
            _npz(
                "c.npz",
                a=_rng().standard_normal((16, 6)).astype(np.float32),
                b=_rng().standard_normal((15, 6)).astype(np.float32),
            ),
        ),
        (*TRANSFORM, "--calib", "c.npz"),
        ("different numbers of samples",),
    ),
    Case(
        "a recurrent state batched along axis 1 without --batch-axis",
        _with(
            _save_model(_state_model()),
            _npz(
                "c.npz",
                x=_rng().standard_normal((16, 6)).astype(np.float32),
                state=_rng().standard_normal((2, 16, 4)).astype(np.float32),
            ),
        ),
        (*TRANSFORM, "--calib", "c.npz"),
        ("--batch-axis NAME=AXIS", "state=2"),
    ),
    Case(
        "a declared constant of the wrong shape",
        _with(
            _save_model(_state_model()),
            _npz(
                "c.npz",
                x=_rng().standard_normal((16, 6)).astype(np.float32),
                state=_rng().standard_normal((3, 3, 4)).astype(np.float32),
            ),
        ),
        (*TRANSFORM, "--calib", "c.npz", "--constant", "state"),
        ("'state'", "(3, 3, 4)", "(2, ?, 4)"),
    ),
    Case(
        "empty .npz",
        _with(_save_model(GOOD), _npz("c.npz")),
        (*TRANSFORM, "--calib", "c.npz"),
        ("no arrays",),
    ),
    Case(
        "calibration file that is not an archive",
        _with(_save_model(GOOD), _bytes("c.npz", b"PK\x03\x04 broken")),
        (*TRANSFORM, "--calib", "c.npz"),
        ("cannot read",),
    ),
    Case(
        "wrong spatial size for a dynamic-shape model (fails inside ONNX Runtime)",
        _with(_save_model(_dynamic_conv_matmul()), _npz("c.npz", x=_images(16, 7))),
        (*TRANSFORM, "--calib", "c.npz"),
        ("node 'fc' (MatMul)", "given x (16, 3, 7, 7) float32", "declares x (N, 3, H, W)", "fix:"),
    ),
    Case(
        "wrong spatial size before a fixed Reshape (fails inside ONNX Runtime)",
        _with(_save_model(_reshape_model()), _npz("c.npz", x=_images(16, 6))),
        (*TRANSFORM, "--calib", "c.npz"),
        ("node 'reshape' (Reshape)", "given x (16, 3, 6, 6)", "fix:"),
    ),
    Case(
        "evaluate: held-out data of the wrong spatial size for a dynamic-shape model",
        _with(
            _save_model(_dynamic_conv_matmul()),
            _npz("c.npz", x=_images(16, 6)),
            _npz("e.npz", x=_images(16, 5)),
        ),
        ("evaluate", "model.onnx", "--data", "e.npz", "--calib", "c.npz", "--num-samples", "16"),
        ("node 'fc' (MatMul)", "given x (16, 3, 5, 5) float32", "fix:"),
    ),
    Case(
        "a model without Conv/MatMul/Gemm",
        _with(
            _save_model(
                tm.make_model(
                    [helper.make_node("Relu", ["x"], ["y"], name="relu")],
                    [tm.value("x", ["N", 4])],
                    [tm.value("y", ["N", 4])],
                )
            ),
            _npz("c.npz", x=_rng().standard_normal((16, 4)).astype(np.float32)),
        ),
        (*TRANSFORM, "--calib", "c.npz"),
        ("nothing to rewrite",),
    ),
    Case(
        "output path equals the input path",
        _with(_save_model(GOOD), _npz("c.npz", x=GOOD_X)),
        ("transform", "model.onnx", "-o", "model.onnx", "--calib", "c.npz", "--force"),
        ("model.onnx",),
    ),
]


def _hashes(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_gives_one_line_error_and_leaves_nothing(tmp_path: Path, case: Case) -> None:
    case.files(tmp_path)
    before_tree, before_hash = _tree(tmp_path), _hashes(tmp_path)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [str(EXE), *case.args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    stderr_lines = proc.stderr.splitlines()
    errors = [line for line in stderr_lines if line.startswith("error: ")]
    other = [line for line in stderr_lines if not line.startswith(("error: ", "nbsmt-onnx: "))]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1, proc.stderr
    assert other == [], proc.stderr  # no traceback, no ONNX Runtime log, no stray output
    assert "Traceback" not in proc.stderr + proc.stdout
    for word in case.expect:
        assert word in errors[0], errors[0]
    assert _tree(tmp_path) == before_tree  # no output model, report or .tmp leftover
    assert _hashes(tmp_path) == before_hash  # the inputs are untouched
