"""nbsmt-onnx: simulate NB-SMT accelerators on ONNX models and recalibrate BatchNorm."""

from __future__ import annotations

from nbsmt_onnx.errors import NbsmtError
from nbsmt_onnx.runtime.library import get_library_path

__version__ = "0.1.0"

__all__ = ["NbsmtError", "__version__", "get_library_path"]
