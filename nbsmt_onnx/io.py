"""Model file I/O: the only place nbsmt-onnx reads or writes ``.onnx`` files.

- ``load_model`` reads a model with or without external data (also > 2 GB:
  the checker then works on the path, not on a serialized copy) and checks it.
  The input file is only ever opened for reading.
- ``save_model`` writes atomically: everything goes to a temporary directory
  inside the destination directory and is moved into place with
  ``os.replace``, external data first, the model file last. A failure leaves
  no partial file behind. An existing file is not overwritten without
  ``force``, and the input of the run is never overwritten at all.
- ``session_source`` hands a model to ONNX Runtime; for protos too large to
  serialize in one piece it writes a temporary external-data copy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from nbsmt_onnx.errors import ModelError, OutputError

log = logging.getLogger(__name__)

#: Protobuf cannot serialize a message of 2 GiB or more; stay clearly below.
PROTO_LIMIT = 2**31 - 2**26
#: Initializers at least this large go to the external data file when one is written.
EXTERNAL_DATA_THRESHOLD = 1024


def _external_data_name(path: Path) -> str:
    return path.name + ".data"


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(model.graph))


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_tensors(sub)


def check_model(model: onnx.ModelProto | str | Path, *, what: str = "model") -> None:
    """Run ``onnx.checker`` (with shape inference) and turn failures into ``ModelError``.

    ``full_check`` is tried first; if shape inference alone fails (some
    exporters write value_info that strict inference rejects), the structural
    check must still pass and the inference problem is logged.
    """
    if isinstance(model, onnx.ModelProto) and model.ByteSize() > PROTO_LIMIT:
        # The checker serializes protos; a > 2 GB one cannot be. Files are checked by path.
        log.warning("%s: larger than 2 GB in memory; onnx.checker skipped", what)
        return
    source = str(model) if isinstance(model, (str, Path)) else model
    try:
        onnx.checker.check_model(source, full_check=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ModelError(f"{what} fails onnx.checker: {_first_line(err)}") from err
    try:
        onnx.checker.check_model(source, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        log.warning("%s: strict shape inference failed (%s); continuing", what, _first_line(err))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("==>"):
            return line
    return type(err).__name__


def load_model(path: str | Path, *, check: bool = True) -> onnx.ModelProto:
    """Read ``path`` (with its external data, if any) and check it.

    Raises ``ModelError`` with a one-line message for a missing, unreadable,
    malformed or invalid file.
    """
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file {p} does not exist")
    if not p.is_file():
        raise ModelError(f"model path {p} is not a file")
    if not os.access(p, os.R_OK):
        raise ModelError(f"model file {p} is not readable (check its permissions)")
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise ModelError(
            f"{p} is not a valid ONNX model (protobuf parse failed: {_first_line(err)})"
        ) from err
    except OSError as err:
        raise ModelError(f"cannot read model file {p}: {err.strerror or err}") from err
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{p} is not a valid ONNX model (it has no graph)")
    external = _uses_external_data(model)
    if check:
        # Path-based checking follows external data references and works for > 2 GB models.
        check_model(p if external or p.stat().st_size > PROTO_LIMIT else model, what=str(p))
    if external:
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError) as err:
            raise ModelError(
                f"cannot read external data of {p}: {_first_line(err)}; keep the data file "
                "next to the model, at the location the model names"
            ) from err
    log.info("loaded %s (%d nodes, opset %s)", p, len(model.graph.node), default_opset(model))
    return model


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    raise ModelError("model does not import the default ONNX opset")


def check_destination(path: Path, *, force: bool, protect: tuple[Path, ...]) -> None:
    resolved = path.resolve()
    for p in protect:
        if p.resolve() == resolved:
            raise OutputError(
                f"refusing to overwrite the input model {p}; choose another output path"
            )
    parent = resolved.parent
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {parent} is not writable; choose another output path")
    if path.is_dir():
        raise OutputError(f"output path {path} is a directory; give a file name")
    if path.exists() and not force:
        raise OutputError(f"output file {path} exists; pass --force (force=True) to overwrite it")


def save_model(
    model: onnx.ModelProto,
    path: str | Path,
    *,
    force: bool = False,
    external_data: bool | None = None,
    protect: tuple[str | Path, ...] = (),
) -> list[Path]:
    """Write ``model`` to ``path`` atomically and return the files written.

    ``external_data``: None = only when the model is too large for one
    protobuf; True/False force it. External data go to ``<name>.data`` beside
    the model. ``protect`` lists paths that must never be overwritten (the
    input model). ``model`` itself is not modified.
    """
    dest = Path(path)
    protected = tuple(Path(p) for p in protect)
    check_destination(dest, force=force, protect=protected)
    data_dest = dest.with_name(_external_data_name(dest))
    if external_data is None:
        external_data = model.ByteSize() > PROTO_LIMIT
    if external_data:
        check_destination(data_dest, force=force, protect=protected)
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as err:
        raise OutputError(f"cannot write to {dest.parent}: {err.strerror or err}") from err
    written: list[Path] = []
    try:
        tmp_model = tmpdir / dest.name
        if external_data:
            to_save = onnx.ModelProto()
            to_save.CopyFrom(model)  # onnx.save converts tensors in place; keep the caller's intact
            onnx.save_model(
                to_save,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_dest.name,
                size_threshold=EXTERNAL_DATA_THRESHOLD,
            )
        else:
            onnx.save_model(model, str(tmp_model))
        for f in (tmpdir / data_dest.name, tmp_model):
            if f.exists():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if external_data and (tmpdir / data_dest.name).exists():
            os.replace(tmpdir / data_dest.name, data_dest)
            written.append(data_dest)
        os.replace(tmp_model, dest)
        written.append(dest)
    except (OSError, ValueError) as err:
        for f in written:
            with contextlib.suppress(OSError):
                f.unlink()
        raise OutputError(f"cannot write {dest}: {_first_line(err)}") from err
    except BaseException:  # interrupted (Ctrl-C, SIGTERM via the CLI): leave nothing partial
        for f in written:
            with contextlib.suppress(OSError):
                f.unlink()
        raise
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    log.info("wrote %s", ", ".join(str(w) for w in written))
    return written


@contextlib.contextmanager
def session_source(model: onnx.ModelProto) -> Iterator[bytes | str]:
    """Yield what ``create_session`` should get for ``model``.

    Small models go as serialized bytes. A model too large for one protobuf is
    written, with external data, to a temporary directory that is removed
    afterwards (ONNX Runtime then reads it by path).
    """
    if model.ByteSize() <= PROTO_LIMIT:
        yield model.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="nbsmt-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(model, path, external_data=True)
        yield str(path)


def write_text(path: str | Path, text: str, *, force: bool = False) -> Path:
    """Write ``text`` atomically (temp file + rename); refuse to overwrite without ``force``.

    The one writer of text outputs (JSON reports, CSV, HTML); see :func:`write_bytes`.
    """
    return write_bytes(path, text.encode("utf-8"), force=force)


def write_bytes(path: str | Path, data: bytes, *, force: bool = False) -> Path:
    """Write ``data`` atomically (temp file + rename); refuse to overwrite without ``force``.

    The temporary file is created with ``open(..., "xb")`` so the result gets
    the usual permissions (umask), unlike ``tempfile.mkstemp``'s 0600.
    """
    dest = Path(path)
    check_destination(dest, force=force, protect=())
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
        os.replace(tmp, dest)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {dest}: {err.strerror or err}") from err
    except BaseException:  # interrupted: no temporary file left behind
        tmp.unlink(missing_ok=True)
        raise
    return dest
