"""Error types.

``NbsmtError`` and its subclasses are *user* errors: bad input, a missing
library, an unwritable path. Their message is one line that names the problem
and the fix; the CLI prints it without a traceback and exits non-zero.
``InternalError`` is a bug in nbsmt-onnx and keeps its traceback.
"""

from __future__ import annotations

#: Exit codes of the command-line tool (and of ``TransformResult`` / ``EvaluationResult``).
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: Python traceback
EXIT_USER_ERROR = 2  # NbsmtError.exit_code: bad option, data, model, path
EXIT_THRESHOLD = 3  # the run completed, a configuration missed --max-drop / --min-agreement


class NbsmtError(Exception):
    """A problem the user can fix. ``str(err)`` is a one-line message."""

    exit_code = EXIT_USER_ERROR


class LibraryNotFoundError(NbsmtError):
    """The compiled custom-op library cannot be found or loaded."""


class ModelError(NbsmtError):
    """The input model is malformed, unsupported or cannot be read/written."""


class UnsupportedModelError(ModelError):
    """The model uses an op, attribute or layout the tool does not support."""


class DataError(NbsmtError):
    """Calibration or evaluation data is missing, malformed or does not fit the model."""


class InferenceError(DataError):
    """ONNX Runtime failed to run a model on the given data (shapes, dtypes, a failing node)."""


class ConfigError(NbsmtError):
    """An option value is invalid or options contradict each other."""


class OutputError(NbsmtError):
    """An output path cannot be written (exists, unwritable, ...)."""


class InternalError(Exception):
    """A bug in nbsmt-onnx (an invariant was violated). Please report it."""
