"""nbsmt-onnx: simulate NB-SMT accelerators on ONNX models and recalibrate BatchNorm."""

from __future__ import annotations

__version__ = "0.1.0"

from nbsmt_onnx.api import InspectResult, TransformResult, inspect, transform
from nbsmt_onnx.config import (
    ImagePreprocessing,
    RangeConfig,
    RecalibrationConfig,
    Selection,
    TransformConfig,
)
from nbsmt_onnx.errors import NbsmtError
from nbsmt_onnx.evaluate import EvaluateConfig, EvaluationResult, evaluate
from nbsmt_onnx.runtime.library import get_library_path

__all__ = [
    "EvaluateConfig",
    "EvaluationResult",
    "ImagePreprocessing",
    "InspectResult",
    "NbsmtError",
    "RangeConfig",
    "RecalibrationConfig",
    "Selection",
    "TransformConfig",
    "TransformResult",
    "__version__",
    "evaluate",
    "get_library_path",
    "inspect",
    "transform",
]
