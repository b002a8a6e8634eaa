"""Model I/O: loading and checking, atomic saving, external data, refusing to overwrite."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import transform_models as tm

from nbsmt_onnx import io
from nbsmt_onnx.errors import ModelError, OutputError


def _files(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


def test_load_roundtrip_and_input_untouched(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(tm.conv_relu_gemm(), path)
    before = path.read_bytes()
    model = io.load_model(path)
    assert model.graph.node[0].name == "conv1"
    assert path.read_bytes() == before


def test_load_missing_directory_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        io.load_model(tmp_path / "nope.onnx")
    with pytest.raises(ModelError, match="is not a file"):
        io.load_model(tmp_path)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 this is not a protobuf \xff\xff\xff")
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        io.load_model(bad)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        io.load_model(empty)


def test_load_rejects_model_failing_checker(tmp_path: Path) -> None:
    model = tm.matmul_chain()
    model.graph.node[0].input[1] = "undefined_tensor"
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelError, match=r"fails onnx\.checker"):
        io.load_model(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_load_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(tm.matmul_chain(), path)
    path.chmod(0)
    with pytest.raises(ModelError, match="not readable"):
        io.load_model(path)


def test_save_refuses_existing_without_force_and_protects_input(tmp_path: Path) -> None:
    model = tm.matmul_chain()
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    with pytest.raises(OutputError, match="exists; pass --force"):
        io.save_model(model, out)
    assert out.read_bytes() == b"old"
    io.save_model(model, out, force=True)
    assert onnx.load(out) == model
    with pytest.raises(OutputError, match="refusing to overwrite the input model"):
        io.save_model(model, out, force=True, protect=(out,))
    assert _files(tmp_path) == {"out.onnx"}  # no temporary left behind


def test_save_missing_or_unwritable_directory(tmp_path: Path) -> None:
    model = tm.matmul_chain()
    with pytest.raises(OutputError, match="does not exist"):
        io.save_model(model, tmp_path / "missing" / "out.onnx")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes")
        with pytest.raises(OutputError, match="not writable"):
            io.save_model(model, locked / "out.onnx")
        assert _files(locked) == set()
    finally:
        locked.chmod(0o700)


def test_save_unwritable_directory_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As root, permissions cannot make a directory unwritable; simulate what os.access reports."""
    real_access = os.access
    monkeypatch.setattr(
        io.os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode)
    )
    with pytest.raises(OutputError, match=f"output directory {tmp_path} is not writable"):
        io.save_model(tm.matmul_chain(), tmp_path / "out.onnx")
    assert _files(tmp_path) == set()


def test_save_failure_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tm.matmul_chain()
    calls = {"n": 0}
    real_replace = os.replace

    def failing_replace(src: object, dst: object) -> None:
        calls["n"] += 1
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "replace", failing_replace)
    with pytest.raises(OutputError, match="No space left"):
        io.save_model(model, tmp_path / "out.onnx")
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert calls["n"] == 1
    assert _files(tmp_path) == set()


def test_external_data_roundtrip(tmp_path: Path) -> None:
    model = tm.conv_relu_gemm(channels=16)  # weights above the external-data size threshold
    out = tmp_path / "ext.onnx"
    written = io.save_model(model, out, external_data=True)
    assert [p.name for p in written] == ["ext.onnx.data", "ext.onnx"]
    assert _files(tmp_path) == {"ext.onnx", "ext.onnx.data"}
    raw = onnx.load(out, load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in raw.graph.initializer)
    # the caller's proto is not converted in place
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    loaded = io.load_model(out)
    for a, b in zip(model.graph.initializer, loaded.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    with pytest.raises(OutputError, match="exists"):
        io.save_model(model, out, external_data=True)


def test_external_data_missing_file(tmp_path: Path) -> None:
    out = tmp_path / "ext.onnx"
    io.save_model(tm.conv_relu_gemm(channels=16), out, external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(ModelError):
        io.load_model(out)


def test_session_source_small_model_is_bytes() -> None:
    model = tm.matmul_chain()
    with io.session_source(model) as src:
        assert isinstance(src, bytes) and src == model.SerializeToString()


def test_session_source_large_model_goes_through_a_temporary_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(io, "PROTO_LIMIT", 100)  # pretend the model is too large for one protobuf
    model = tm.conv_relu_gemm(channels=16)
    with io.session_source(model) as src:
        assert isinstance(src, str)
        folder = Path(src).parent
        assert (folder / "model.onnx.data").is_file()
        assert onnx.load(src).graph.node[0].name == "conv1"
    assert not folder.exists()


def test_check_model_skips_protos_too_large_to_serialize(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tm.matmul_chain()
    model.graph.node[0].input[1] = "undefined_tensor"  # would fail the checker
    monkeypatch.setattr(io, "PROTO_LIMIT", 10)
    io.check_model(model)  # skipped (logged), not a crash of the protobuf serializer
    monkeypatch.undo()
    with pytest.raises(ModelError, match="fails onnx"):
        io.check_model(model)


def test_text_outputs_get_normal_permissions_and_no_temp_files(tmp_path: Path) -> None:
    from nbsmt_onnx.api import write_report

    umask = os.umask(0o022)
    try:
        report = write_report({"a": 1}, tmp_path / "report.json")
        text = io.write_text(tmp_path / "table.csv", "x\n")
    finally:
        os.umask(umask)
    for path in (report, text):
        assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert json.loads(report.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "table.csv"]
    with pytest.raises(OutputError, match="exists"):
        io.write_text(tmp_path / "table.csv", "y\n")
    assert (tmp_path / "table.csv").read_text() == "x\n"
