"""The one factory for every ONNX Runtime session nbsmt-onnx creates.

All sessions register the NB-SMT custom-op library. Graph optimisations are
disabled unless a caller asks for them explicitly: with optimisations on, ORT
folds BatchNormalization into Conv itself and would hide a wrong fold, and
calibration needs the graph exactly as written.

:func:`create_session` returns a :class:`Session`, a thin wrapper whose
``run`` turns ONNX Runtime's run-time failures (a shape the model's layers do
not accept, a wrong dtype, a node that fails on the data) into a one-line
:class:`~nbsmt_onnx.errors.InferenceError` that names the inputs with the
shapes given and declared, the node that failed (when ORT says) and a fix.
Session creation failures become :class:`~nbsmt_onnx.errors.ModelError`.
This is the only place that catches ONNX Runtime's exceptions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from nbsmt_onnx.errors import InferenceError, LibraryNotFoundError, ModelError
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


# ORT prefixes its messages with "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ".
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
# "Non-zero status code returned while running Conv node. Name:'conv1' Status Message: ..."
_NODE = re.compile(r"running (\S+) node\. Name:'([^']*)'(?: Status Message: )?(.*)", re.S)


_MAX_DETAIL = 400  # characters of ORT's own text kept in a message (some are pages long)


def _ort_message(err: BaseException) -> str:
    text = _ORT_PREFIX.sub("", " ".join(str(err).split())) or type(err).__name__
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def _is_ort_error(err: BaseException) -> bool:
    """True for the exceptions ONNX Runtime raises (its pybind types, or the Python layer's)."""
    module = type(err).__module__ or ""
    return module.startswith("onnxruntime") or isinstance(
        err, (RuntimeError, ValueError, TypeError, MemoryError)
    )


def _shape_text(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) and d >= 0 else "?" for d in shape) + ")"


def _declared(arg: Any) -> str:
    """An ORT NodeArg as ``name (dims) dtype``; symbolic dims keep their names."""
    dims = []
    for d in arg.shape or ():
        dims.append(str(d) if isinstance(d, int) else (d if isinstance(d, str) and d else "?"))
    kind = str(arg.type).replace("tensor(", "").rstrip(")")
    kind = {"float": "float32", "double": "float64", "float16": "float16"}.get(kind, kind)
    return f"{arg.name} ({', '.join(dims)}) {kind}"


def _given(name: str, value: Any) -> str:
    arr = value if isinstance(value, np.ndarray) else None
    if arr is None:
        try:
            arr = np.asarray(value)
        except Exception:  # a value numpy cannot read; name its type
            return f"{name} {type(value).__name__}"
    return f"{name} {_shape_text(arr.shape)} {arr.dtype}"


def _fix(message: str, node_op: str | None) -> str:
    low = message.lower()
    if "bad allocation" in low or "bad_alloc" in low or "failed to allocate" in low:
        return "reduce --batch-size (or --num-samples) so a batch fits in memory"
    if "data type" in low or ("type" in low and "expected" in low and "tensor(" in low):
        return "convert the data to the dtype the model declares"
    if "missing" in low and "input" in low:
        return "give an array for every model input (keyed by input name)"
    if "invalid input name" in low or "invalid feed input name" in low:
        return "key the data by the model's input names"
    if "invalid rank" in low:
        return "give each input the rank the model declares (samples along the batch axis)"
    if "dimension" in low or "shape" in low or "incompatible" in low or "mismatch" in low:
        return (
            "the data's shape does not fit the model's layers (e.g. images of another size than "
            "the model was built for): give data of the size the model expects "
            "(resize images with --resize/--center-crop)"
        )
    if node_op is not None:
        return f"check that the data is what the model expects at this {node_op} node"
    return "check that the data matches the model's inputs"


class Session:
    """An ONNX Runtime session whose ``run`` raises :class:`InferenceError` on user-caused failures.

    Everything else (``get_inputs``, ``get_outputs``, ...) is the wrapped
    ``onnxruntime.InferenceSession``'s, available as :attr:`inner` too.
    """

    def __init__(self, inner: ort.InferenceSession, what: str) -> None:
        self.inner = inner
        self.what = what

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run(
        self,
        output_names: Sequence[str] | None,
        feed: Mapping[str, Any],
        run_options: ort.RunOptions | None = None,
    ) -> list[Any]:
        """``InferenceSession.run``; failures become one-line :class:`InferenceError`."""
        try:
            return self.inner.run(
                list(output_names) if output_names is not None else None, dict(feed), run_options
            )
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:
            if not _is_ort_error(err):
                raise
            raise self.error(err, feed) from err

    def error(self, err: BaseException, feed: Mapping[str, Any]) -> InferenceError:
        """The user-facing error for ``err`` raised by a run on ``feed``."""
        message = _ort_message(err)
        node = _NODE.search(message)
        node_op = None
        if node is not None:
            node_op, node_name, detail = node.group(1), node.group(2), node.group(3).strip()
            where = f"node {node_name!r} ({node_op}) failed: {detail or 'no detail'}"
        else:
            where = message
        given = ", ".join(_given(k, v) for k, v in feed.items()) or "nothing"
        try:
            declared = ", ".join(_declared(a) for a in self.inner.get_inputs())
        except Exception:  # keep the original error if ORT cannot describe its inputs
            declared = "unknown"
        return InferenceError(
            f"ONNX Runtime cannot run the {self.what} on this data: {where}; "
            f"given {given}; the model declares {declared}; fix: {_fix(message, node_op)}"
        )


def create_session(
    model: onnx.ModelProto | bytes | str,
    options: SessionOptions = SessionOptions(),
    *,
    what: str | None = None,
) -> Session:
    """Create a :class:`Session` for ``model`` (a ModelProto, serialized bytes or a path).

    ``what`` names the model in run-time error messages ("float model",
    "simulation model", ...; default "model").
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if options.intra_op_threads:
        so.intra_op_num_threads = options.intra_op_threads
    # 4 = fatal only: ORT would also print each run-time failure to stderr itself,
    # a second, differently worded copy of the one-line error raised here.
    so.log_severity_level = 4
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
        inner = ort.InferenceSession(source, sess_options=so, providers=["CPUExecutionProvider"])
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        first = _ort_message(err)
        raise ModelError(
            f"ONNX Runtime cannot load the model: {first}; check the model with "
            "onnx.checker.check_model and that its ops exist in onnxruntime "
            f"{ort.__version__}"
        ) from err
    return Session(inner, what or "model")
