"""The one factory for every ONNX Runtime session nbsmt-onnx creates.

All sessions register the NB-SMT custom-op library. Graph optimisations are
disabled unless a caller asks for them explicitly: with optimisations on, ORT
folds BatchNormalization into Conv itself and would hide a wrong fold, and
calibration needs the graph exactly as written.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnxruntime as ort

from nbsmt_onnx.errors import LibraryNotFoundError, ModelError
from nbsmt_onnx.runtime.library import get_library_path


@dataclass(frozen=True)
class SessionOptions:
    """How to build a session. Defaults are the ones calibration needs."""

    intra_op_threads: int = 0  # 0 = ONNX Runtime's default (all cores)
    optimize: bool = False
    register_library: bool = True
    # ORT's CPU arena keeps the largest blocks it ever allocated; with whole
    # calibration sets in one batch that doubled the peak (MobileNetV2, 126
    # images: 6.7 GB with the arena, 3.7 GB without), so recalibration turns it off.
    memory_arena: bool = True


def create_session(
    model: onnx.ModelProto | bytes | str, options: SessionOptions = SessionOptions()
) -> ort.InferenceSession:
    """Create an ``InferenceSession`` for ``model`` (a ModelProto, serialized bytes or a path)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if options.intra_op_threads:
        so.intra_op_num_threads = options.intra_op_threads
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = options.memory_arena
    if options.register_library:
        path = get_library_path()
        try:
            so.register_custom_ops_library(path)
        except Exception as err:  # ORT raises a generic RuntimeError/Fail
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise LibraryNotFoundError(
                f"cannot load NB-SMT op library {path} into onnxruntime {ort.__version__}: "
                f"{reason} (needs onnxruntime >= 1.17 and a library built for this machine; "
                "'pip install .' rebuilds it)"
            ) from err
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    try:
        return ort.InferenceSession(source, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"ONNX Runtime cannot load the model: {first}") from err
