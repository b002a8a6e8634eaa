"""The C++ ops under the runtime's conditions: thread counts, concurrent sessions,
a fresh process, ORT's own shape inference, and clean errors for bad models."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ops_cases import (
    Case,
    all_settings,
    build_model,
    compare,
    conv_case,
    large_conv_case,
    large_matmul_case,
    matmul_case,
    run_model,
    same_bits,
)

from nbsmt_onnx.ops import schema
from nbsmt_onnx.runtime.session import SessionOptions, create_session


def _medium_cases() -> list[Case]:
    """Cases big enough for the runtime to split the work over several threads."""
    cases = []
    for i, s in enumerate(all_settings()):
        c = large_conv_case(1000 + i) if i % 2 else large_matmul_case(1000 + i)
        c.attributes.update(s)
        c.with_stats = True
        cases.append(c)
    return cases


def test_intra_op_threads_do_not_change_results() -> None:
    cases = _medium_cases()
    model, feeds = build_model(cases)
    runs = {n: run_model(model, feeds, intra_op_threads=n) for n in (1, 2, 4)}
    for name, value in runs[1].items():
        for n in (2, 4):
            assert same_bits(runs[n][name], value), (
                f"{name}: intra_op_num_threads {n} differs from 1"
            )
    failures = [f for i, c in enumerate(cases) if (f := compare(c, i, runs[2])) is not None]
    assert not failures, "\n".join(failures)


def test_concurrent_sessions_agree() -> None:
    """Two sessions of the same model running at the same time in two Python threads."""
    cases = _medium_cases()
    model, feeds = build_model(cases)
    sessions = [create_session(model, SessionOptions(intra_op_threads=2)) for _ in range(2)]
    names = [o.name for o in sessions[0].get_outputs()]
    results: list[list[list[np.ndarray]]] = [[], []]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(index: int) -> None:
        try:
            start.wait()
            for _ in range(4):
                results[index].append(sessions[index].run(names, feeds))
        except BaseException as err:  # reported below; a thread cannot fail the test itself
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    first = dict(zip(names, results[0][0], strict=True))
    for run in results[0] + results[1]:
        for name, value in zip(names, run, strict=True):
            assert same_bits(value, first[name]), name
    failures = [f for i, c in enumerate(cases) if (f := compare(c, i, first)) is not None]
    assert not failures, "\n".join(failures)


def test_saved_model_runs_in_fresh_process(tmp_path: Path) -> None:
    """All settings live in node attributes: a saved model runs anywhere the library loads."""
    cases = [conv_case(s) for s in range(20)] + [matmul_case(s) for s in range(20)]
    model, feeds = build_model(cases)
    model_path, feeds_path, out_path = (
        tmp_path / "m.onnx",
        tmp_path / "feeds.npz",
        tmp_path / "out.npz",
    )
    onnx.save(model, model_path)
    np.savez(feeds_path, **feeds)
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from nbsmt_onnx.runtime.session import create_session
        model, feeds, out = sys.argv[1:4]
        session = create_session(model)
        feeds = dict(np.load(feeds))
        names = [o.name for o in session.get_outputs()]
        np.savez(out, **dict(zip(names, session.run(names, feeds))))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(model_path), str(feeds_path), str(out_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    fresh = dict(np.load(out_path))
    here = run_model(model, feeds)
    assert fresh.keys() == here.keys()
    for name, value in here.items():
        assert same_bits(fresh[name], value), name
    failures = [f for i, c in enumerate(cases) if (f := compare(c, i, fresh)) is not None]
    assert not failures, "\n".join(failures)


# ------------------------------------------------------- weights fed at run time
# Each node keeps its prepared weights across runs while the weight input's bytes
# are unchanged (custom_ops/src/ort/weight_cache.h). These tests change the bytes
# (and the shape) of Wq / Bq between runs of one session: a stale cache entry
# would return the previous weights' result.


def _runtime_weight_cases() -> list[Case]:
    """Every setting, Conv and MatMul, with Wq / Bq (and scales, bias) as graph inputs."""
    cases = _medium_cases()
    for c in cases:
        c.runtime_weights = True
    return cases


def _wq(case: Case) -> np.ndarray:
    """The case's Wq / Bq array (a required input, never None)."""
    w = case.inputs[1]
    assert w is not None
    return w


def _new_weights(old: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Other int8 weights of the same shape (about 30 % zeros, values in [-127, 127])."""
    w = rng.integers(-127, 128, old.shape) * (rng.random(old.shape) >= 0.3)
    return w.astype(np.int8)


def _differs(a: Case, b: Case) -> bool:
    """The reference results of two cases differ (else a stale cache would go unnoticed)."""
    (ya, sa), (yb, sb) = a.expected(), b.expected()
    return not (same_bits(ya, yb) and same_bits(sa, sb))


def _check(cases: list[Case], got: dict[str, np.ndarray], what: str) -> None:
    failures = [f for i, c in enumerate(cases) if (f := compare(c, i, got)) is not None]
    assert not failures, f"{what}:\n" + "\n".join(failures)


def test_weights_changed_in_place_between_runs() -> None:
    """Same session, same feed arrays: new Wq bytes give the new result, old bytes the old one."""
    cases = _runtime_weight_cases()
    model, feeds = build_model(cases)  # feeds hold the very arrays in case.inputs
    session = create_session(model, SessionOptions(intra_op_threads=2))
    names = [o.name for o in session.get_outputs()]

    def run() -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, feeds), strict=True))

    rng = np.random.default_rng(11)
    before = [
        dataclasses.replace(c, inputs=[c.inputs[0], _wq(c).copy(), *c.inputs[2:]]) for c in cases
    ]
    _check(cases, run(), "first run")
    for c in cases:
        _wq(c)[...] = _new_weights(_wq(c), rng)  # in place: same buffer, new bytes
    unchanged = [c.describe() for c, b in zip(cases, before, strict=True) if not _differs(c, b)]
    assert not unchanged, f"new weights do not change the reference result: {unchanged}"
    _check(cases, run(), "after changing the weights")
    for c, b in zip(cases, before, strict=True):
        _wq(c)[...] = _wq(b)
    _check(cases, run(), "after restoring the weights")


def _symbolic_weight_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every dim of the non-activation graph inputs symbolic."""
    for inp in model.graph.input:
        if inp.name.endswith(("_X", "_A")):
            continue
        for j, dim in enumerate(inp.type.tensor_type.shape.dim):
            dim.dim_param = f"{inp.name}_d{j}"
    return model


def _with_outputs(case: Case, outputs: int, rng: np.random.Generator) -> Case:
    """``case`` with another number of output channels / columns (new weights, scales, bias)."""
    x, wq, scale, w_scale, bias = case.inputs
    assert wq is not None and w_scale is not None
    shape = list(wq.shape)
    shape[0 if case.op == schema.CONV else 1] = outputs
    new_wq = _new_weights(np.empty(shape, np.int8), rng)
    new_scale = np.resize(w_scale, outputs).astype(np.float32)
    new_bias = None if bias is None else np.resize(bias, outputs).astype(np.float32)
    return dataclasses.replace(case, inputs=[x, new_wq, scale, new_scale, new_bias])


def test_weight_shape_changed_between_runs() -> None:
    """Same session, Wq / Bq of another shape (symbolic graph input dims): the new result."""
    conv, matmul = large_conv_case(3000), large_matmul_case(3001)
    conv.attributes["group"] = 1
    cases = [conv, matmul]
    for c in cases:
        c.runtime_weights = True
        c.with_stats = True
    model, _ = build_model(cases)
    session = create_session(_symbolic_weight_dims(model), SessionOptions(intra_op_threads=2))
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(12)
    for step in range(3):
        run_cases = cases if step != 1 else [_with_outputs(c, 7, rng) for c in cases]
        _, run_feeds = build_model(run_cases)
        got = dict(zip(names, session.run(names, run_feeds), strict=True))
        _check(run_cases, got, f"run {step}")


def test_one_session_two_threads_with_different_weights() -> None:
    """ORT may run one kernel concurrently: two Python threads share a session and feed
    different weights; every result must be the reference of the weights it was run with."""
    cases = _runtime_weight_cases()
    model, feeds_a = build_model(cases)
    rng = np.random.default_rng(13)
    other = [
        dataclasses.replace(c, inputs=[c.inputs[0], _new_weights(_wq(c), rng), *c.inputs[2:]])
        for c in cases
    ]
    _, feeds_b = build_model(other)
    session = create_session(model, SessionOptions(intra_op_threads=2))
    names = [o.name for o in session.get_outputs()]
    results: list[list[dict[str, np.ndarray]]] = [[], []]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(index: int, feeds: dict[str, np.ndarray]) -> None:
        try:
            start.wait()
            for _ in range(4):
                results[index].append(dict(zip(names, session.run(names, feeds), strict=True)))
        except BaseException as err:  # reported below; a thread cannot fail the test itself
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i, f)) for i, f in enumerate((feeds_a, feeds_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for index, (run_cases, runs) in enumerate(zip((cases, other), results, strict=True)):
        _check(run_cases, runs[0], f"thread {index}")
        for got in runs[1:]:
            assert all(same_bits(got[n], runs[0][n]) for n in names), f"thread {index}"


def _ort_version() -> tuple[int, int]:
    major, minor = ort.__version__.split(".")[:2]
    return int(major), int(minor)


@pytest.mark.skipif(
    _ort_version() < (1, 24),
    reason="the library registers InferOutputShape only on ORT >= 1.24 (older ORT crashes on '' inputs)",
)
def test_ort_infers_output_shapes() -> None:
    """ORT's own shape inference (the op's InferOutputShape) gives Y's static shape."""
    cases = [conv_case(s) for s in range(40)] + [matmul_case(s) for s in range(40)]
    model, _ = build_model(cases)  # graph outputs are declared without a shape
    session = create_session(model)
    shapes = {o.name: o.shape for o in session.get_outputs()}
    wrong = [
        f"{c.describe()}: ORT says {shapes[f'c{i}_Y']}, reference {list(c.expected()[0].shape)}"
        for i, c in enumerate(cases)
        if shapes[f"c{i}_Y"] != list(c.expected()[0].shape)
    ]
    assert not wrong, "\n".join(wrong)


# ----------------------------------------------------------------------------- errors


def _conv() -> Case:
    x = np.ones((1, 4, 5, 5), np.float32)
    return Case(
        schema.CONV,
        7,
        [
            x,
            np.ones((2, 4, 3, 3), np.int8),
            np.array(1.0, np.float32),
            np.ones(2, np.float32),
            None,
        ],
        {},
        True,
        "error",
    )


def _matmul() -> Case:
    x = np.ones((3, 6), np.float32)
    return Case(
        schema.MATMUL,
        7,
        [x, np.ones((6, 2), np.int8), np.array(1.0, np.float32), np.ones(2, np.float32), None],
        {},
        True,
        "error",
    )


def _with_attr(make, name, value):  # type: ignore[no-untyped-def]
    def build() -> Case:
        c = make()
        c.attributes[name] = value
        return c

    return build


def _with_input(make, index, value):  # type: ignore[no-untyped-def]
    def build() -> Case:
        c = make()
        c.inputs[index] = value
        return c

    return build


#: (id, case factory, shapes the message must mention)
ERROR_CASES = [
    ("conv-threads", _with_attr(_conv, "threads", 3), []),
    ("conv-mapping", _with_attr(_conv, "mapping", "rows"), []),
    ("conv-reduce", _with_attr(_conv, "reduce", "both"), []),
    ("conv-act_signed", _with_attr(_conv, "act_signed", 2), []),
    ("conv-auto_pad", _with_attr(_conv, "auto_pad", "SAME"), []),
    ("conv-strides", _with_attr(_conv, "strides", [0, 1]), []),
    ("conv-pads-length", _with_attr(_conv, "pads", [1, 1]), []),
    ("conv-dilations-length", _with_attr(_conv, "dilations", [1]), []),
    ("conv-kernel_shape", _with_attr(_conv, "kernel_shape", [2, 2]), [(2, 2), (3, 3)]),
    ("conv-group", _with_attr(_conv, "group", 3), [(1, 4, 5, 5), (2, 4, 3, 3)]),
    (
        "conv-channels",
        _with_input(_conv, 1, np.ones((2, 3, 3, 3), np.int8)),
        [(1, 4, 5, 5), (2, 3, 3, 3)],
    ),
    ("conv-rank", _with_input(_conv, 1, np.ones((2, 4, 3), np.int8)), [(1, 4, 5, 5), (2, 4, 3)]),
    ("conv-w_scale", _with_input(_conv, 3, np.ones(3, np.float32)), [(3,), (2, 4, 3, 3)]),
    ("conv-bias", _with_input(_conv, 4, np.ones(5, np.float32)), [(5,), (2, 4, 3, 3)]),
    ("conv-x_scale", _with_input(_conv, 2, np.ones(2, np.float32)), [(2,)]),
    ("conv-x_scale-zero", _with_input(_conv, 2, np.array(0.0, np.float32)), []),
    ("matmul-a_scale-nan", _with_input(_matmul, 2, np.array(np.nan, np.float32)), []),
    ("conv-x-rank", _with_input(_conv, 0, np.ones((4, 5), np.float32)), [(4, 5)]),
    ("conv-empty-output", _with_input(_conv, 0, np.ones((1, 4, 2, 2), np.float32)), []),
    ("matmul-threads", _with_attr(_matmul, "threads", 0), []),
    ("matmul-mapping", _with_attr(_matmul, "mapping", ""), []),
    ("matmul-k", _with_input(_matmul, 1, np.ones((5, 2), np.int8)), [(3, 6), (5, 2)]),
    ("matmul-b_scale", _with_input(_matmul, 3, np.ones(3, np.float32)), [(3,), (6, 2)]),
    ("matmul-bias", _with_input(_matmul, 4, np.ones(1, np.float32)), [(1,), (6, 2)]),
    ("matmul-a-scalar", _with_input(_matmul, 0, np.ones((), np.float32)), []),
    ("matmul-bq-rank", _with_input(_matmul, 1, np.ones((6, 2, 1), np.int8)), [(6, 2, 1)]),
]


def _mentions_shape(message: str, shape: tuple[int, ...]) -> bool:
    """True if ``message`` prints ``shape`` in any bracket style ([2,4], (2, 4), {2,4})."""
    flat = re.sub(r"\s", "", message)
    body = ",".join(str(d) for d in shape)
    return re.search(r"[\[({]" + re.escape(body) + r"[\])}]", flat) is not None


@pytest.mark.parametrize("runtime_weights", [False, True], ids=["constant", "runtime"])
@pytest.mark.parametrize(
    ("build", "shapes"), [(b, s) for _, b, s in ERROR_CASES], ids=[i for i, _, _ in ERROR_CASES]
)
def test_bad_model_is_an_ort_error_naming_the_node(build, shapes, runtime_weights: bool) -> None:  # type: ignore[no-untyped-def]
    case = build()
    case.runtime_weights = runtime_weights
    model, feeds = build_model([case])
    with pytest.raises(Exception) as info:  # ModelError at load or an ORT error at run
        run_model(model, feeds)
    message = str(info.value)
    assert "case0_seed7" in message, message
    missing = [s for s in shapes if not _mentions_shape(message, s)]
    assert not missing, f"message does not show shapes {missing}: {message}"
    # the process and the library survive: a good model still runs afterwards
    good = _conv()
    good_model, good_feeds = build_model([good])
    assert compare(good, 0, run_model(good_model, good_feeds)) is None
