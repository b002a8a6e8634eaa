"""nbsmt-onnx: simulate NB-SMT accelerators on ONNX models and recalibrate BatchNorm."""

from __future__ import annotations

from nbsmt_onnx._version import __version__
from nbsmt_onnx.api import (
    InspectResult,
    RunResult,
    TransformResult,
    evaluate,
    inspect,
    run,
    transform,
)
from nbsmt_onnx.config import (
    EvaluateConfig,
    ImagePreprocessing,
    RangeConfig,
    RecalibrationConfig,
    Selection,
    TransformConfig,
)
from nbsmt_onnx.errors import NbsmtError
from nbsmt_onnx.evaluate import EvaluationResult
from nbsmt_onnx.runtime.library import get_library_path

__all__ = [
    "EvaluateConfig",
    "EvaluationResult",
    "ImagePreprocessing",
    "InspectResult",
    "NbsmtError",
    "RangeConfig",
    "RecalibrationConfig",
    "RunResult",
    "Selection",
    "TransformConfig",
    "TransformResult",
    "__version__",
    "evaluate",
    "get_library_path",
    "inspect",
    "run",
    "transform",
]
