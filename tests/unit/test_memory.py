"""graph.memory (activation-memory estimate), calibration.data.rebatch and
calibration.recalibrate.plan_batches (how recalibration batches its data). No library."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from nbsmt_onnx.calibration.data import CalibrationData, open_calibration_data, rebatch
from nbsmt_onnx.calibration.recalibrate import plan_batches
from nbsmt_onnx.errors import DataError
from nbsmt_onnx.graph.memory import (
    SAFETY_FACTOR,
    ActivationMemory,
    estimate_activation_memory,
    execution_order,
    peak_activation_bytes,
)
from nbsmt_onnx.graph.probe import add_statistics_probes
from tests.unit._bn_models import Builder, activation_scales, image_batches, image_input, to_nbsmt

F32 = 4


def _chain(c: int = 4) -> onnx.ModelProto:
    """x -> Relu -> a ; a -> Neg -> b ; Add(a, b) -> y: ``a`` lives across Neg."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Neg", ["a"], ["b"], name="neg"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 8, 8])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_peak_counts_tensors_live_at_the_same_node() -> None:
    # At "add": a and b (inputs) and y (output) are live; x died after relu. At "neg":
    # x is dead, a and b live. The peak is at add: three tensors. The graph input x is
    # live only until relu, with a: two tensors there.
    n, c = 3, 4
    one = n * c * 8 * 8 * F32
    assert peak_activation_bytes(_chain(c), {"x": (n, c, 8, 8)}) == 3 * one
    est = estimate_activation_memory(_chain(c), {"x": (c, 8, 8)})
    assert est == ActivationMemory(per_sample=3 * c * 64 * F32, fixed=0)
    assert est.batch_bytes(n) == 3 * one


def test_graph_outputs_stay_live_to_the_end() -> None:
    m = _chain()
    m.graph.output.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, None))
    # a is live to the end as well: unchanged peak (a was live at add anyway) ...
    assert peak_activation_bytes(m, {"x": (1, 4, 8, 8)}) == 3 * 4 * 64 * F32
    # ... but an early output kept alive next to a later, bigger step adds up
    m.graph.output.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, None))
    assert peak_activation_bytes(m, {"x": (1, 4, 8, 8)}) == 4 * 4 * 64 * F32


def test_execution_order_runs_appended_probes_right_after_their_tensor() -> None:
    b = Builder(seed=1)
    t1 = b.conv("conv1", "x", 3, 8)
    t2 = b.conv("conv2", t1, 8, 8)
    t3 = b.conv("conv3", t2, 8, 8)
    model = b.model([image_input()], [t3])
    probed = add_statistics_probes(model, [t1, t2], only_statistics=True).model
    order = execution_order(probed.graph)
    names = [n.name for n in order]
    assert sorted(names) == sorted(n.name for n in probed.graph.node)
    seen: set[str] = {i.name for i in probed.graph.input} | {
        t.name for t in probed.graph.initializer
    }
    for node in order:  # a topological order
        assert all(i in seen or not i for i in node.input), node.name
        seen.update(node.output)
    # every node measuring t1 runs before conv2's successor conv3 would (conv3 is
    # pruned: only statistics are outputs) -- and before conv2 finishes its own probe
    first_t2_probe = min(k for k, n in enumerate(order) if t2 in n.input and n.name != "conv3")
    last_t1_probe = max(k for k, n in enumerate(order) if t1 in n.input and n.name != "conv2")
    assert last_t1_probe < first_t2_probe
    # so at most one probe's float64 copies are live at a time: the estimate of two
    # probes is that of one probe plus the second conv's output, not of both probes
    one = estimate_activation_memory(
        add_statistics_probes(model, [t1], only_statistics=True).model, {"x": (3, 16, 16)}
    )
    two = estimate_activation_memory(probed, {"x": (3, 16, 16)})
    assert two.per_sample < 2 * one.per_sample


def test_largest_batch_leaves_headroom() -> None:
    mem = ActivationMemory(per_sample=10 * 2**20, fixed=2**20)
    budget = 1000 * 2**20
    fit = mem.largest_batch(budget)
    assert mem.batch_bytes(fit) * SAFETY_FACTOR <= budget
    assert mem.batch_bytes(fit + 1) * SAFETY_FACTOR > budget
    assert mem.largest_batch(1) == 1  # never zero: one sample per batch at worst


def _feeds(sizes: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
    start = 0
    out = []
    for n in sizes:
        out.append(
            {
                "x": np.arange(start, start + n, dtype=np.float32)[:, None] * np.ones((1, 2)),
                "y": np.arange(start, start + n)[:, None],
            }
        )
        start += n
    return out


@pytest.mark.parametrize(
    ("sizes", "batch", "limit", "expected"),
    [
        ((3, 5, 2), 4, 9, (4, 4, 1)),
        ((3, 5, 2), 4, 100, (4, 4, 2)),
        ((3, 5, 2), 10, 10, (10,)),
        ((6,), 2, 5, (2, 2, 1)),
        ((1, 1, 1), 2, 3, (2, 1)),
    ],
)
def test_rebatch_regroups_samples_in_order(
    sizes: tuple[int, ...], batch: int, limit: int, expected: tuple[int, ...]
) -> None:
    feeds = _feeds(sizes)
    source = rebatch(lambda: iter(feeds), batch, limit)
    for _ in range(2):  # re-iterable
        got = list(source())
        assert tuple(len(g["x"]) for g in got) == expected
        total = sum(expected)
        for key in ("x", "y"):
            want = np.concatenate([f[key] for f in feeds])[:total]
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want)


def test_rebatch_refuses_feeds_without_a_common_batch_axis() -> None:
    feeds = [{"x": np.zeros((2, 3)), "y": np.zeros((3, 3))}]
    with pytest.raises(DataError, match="common batch dimension"):
        list(rebatch(lambda: iter(feeds), 2, 4)())


def _nbsmt_model() -> tuple[onnx.ModelProto, CalibrationData]:
    b = Builder(seed=3)
    t = b.conv("conv1", "x", 3, 8)
    t = b.bn("bn1", t, 8)
    t = b.node("Relu", [t], ["relu1.out"], "relu1")
    t = b.conv("conv2", t, 8, 4, k=1)
    clean = b.model([image_input()], [t])
    nb = to_nbsmt(clean, activation_scales(clean, image_batches(seed=4)), threads=2)
    rng = np.random.default_rng(5)
    arrays = {"x": np.abs(rng.normal(size=(20, 3, 32, 32))).astype(np.float32)}
    data = open_calibration_data(arrays, (_spec(nb),), num_samples=20, batch_size=3, seed=0)
    return nb, data


def _spec(model: onnx.ModelProto):  # type: ignore[no-untyped-def]
    from nbsmt_onnx.calibration.data import model_inputs

    (spec,) = model_inputs(model)
    return spec


def _sizes(source) -> list[int]:  # type: ignore[no-untyped-def]
    return [len(f["x"]) for f in source.batches()]


def test_plan_puts_everything_in_one_batch_when_it_fits() -> None:
    model, data = _nbsmt_model()
    plan, source = plan_batches(model, data, None, memory_mb=64)
    assert plan.one_batch and plan.samples == plan.batch_size == plan.available == 20
    assert plan.fit is not None and plan.fit >= 20
    assert _sizes(source) == [20]
    got = np.concatenate([f["x"] for f in source.batches()])
    np.testing.assert_array_equal(got, np.concatenate([f["x"] for f in data.batches()]))


def test_plan_uses_what_fits_or_streams_what_was_asked() -> None:
    model, data = _nbsmt_model()
    per_sample = plan_batches(model, data, None, memory_mb=64)[0].bytes_per_sample
    assert per_sample is not None
    budget_mb = 1
    fit = ActivationMemory(per_sample, 0).largest_batch(budget_mb * 2**20)
    assert 1 <= fit < 20, "the test model must not fit 20 samples in 1 MB"
    plan, source = plan_batches(model, data, None, memory_mb=budget_mb)
    assert plan.one_batch and plan.samples == fit and _sizes(source) == [fit]
    assert f"{fit} of the 20" in plan.note and "--recal-memory" in plan.note
    # explicit samples beyond what fits: streamed in batches of what fits
    plan, source = plan_batches(model, data, 20, memory_mb=budget_mb)
    assert not plan.one_batch and plan.batch_size == fit and plan.samples == 20
    assert sum(_sizes(source)) == 20 and max(_sizes(source)) == fit
    assert "streamed" in plan.note
    # explicit samples that fit: one batch of them; more than available: all of them
    assert _sizes(plan_batches(model, data, 7, memory_mb=64)[1]) == [7]
    assert _sizes(plan_batches(model, data, 500, memory_mb=64)[1]) == [20]


def test_plan_counts_the_samples_of_feed_iterables() -> None:
    """Feeds have no known size: the plan counts them (the indexed case reads ``num_samples``)."""
    model, _ = _nbsmt_model()
    rng = np.random.default_rng(7)
    feeds = [{"x": np.abs(rng.normal(size=(n, 3, 32, 32))).astype(np.float32)} for n in (4, 4, 3)]
    data = open_calibration_data(feeds, (_spec(model),), num_samples=512, batch_size=4, seed=0)
    assert data.source is None
    plan, source = plan_batches(model, data, None, memory_mb=64)
    assert plan.available == plan.samples == 11 and _sizes(source) == [11]
    np.testing.assert_array_equal(
        np.concatenate([f["x"] for f in source.batches()]), np.concatenate([f["x"] for f in feeds])
    )


def test_plan_keeps_data_it_cannot_rebatch() -> None:
    model, _ = _nbsmt_model()
    source = image_batches(seed=6)
    plan, got = plan_batches(model, source, None, memory_mb=64)
    assert got.feeds is source and plan.samples is None and "CalibrationData" in plan.note
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    fixed_data = open_calibration_data(
        {"x": np.ones((8, 3, 6, 6), np.float32)},
        (_spec(fixed),),
        num_samples=8,
        batch_size=4,
        seed=0,
    )
    plan, got = plan_batches(fixed, fixed_data, None, memory_mb=64)
    assert plan.samples is None and "fixed batch" in plan.note
    assert _sizes(got) == [4, 4]


def test_plan_warns_when_the_machine_has_less_memory_than_the_batch_may_need(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import nbsmt_onnx.graph.memory as memory_module

    model, data = _nbsmt_model()
    monkeypatch.setattr(memory_module, "available_memory_bytes", lambda: 10**12)
    with caplog.at_level(logging.WARNING):
        plan, _ = plan_batches(model, data, None, memory_mb=64)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    monkeypatch.setattr(memory_module, "available_memory_bytes", lambda: 1024)
    with caplog.at_level(logging.WARNING):
        again, _ = plan_batches(model, data, None, memory_mb=64)
    assert again == plan, "the plan must not depend on the machine"
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "only 0 MB of memory is available" in warned[0]
    assert "--recal-memory" in warned[0]


def test_available_memory_is_read_on_linux() -> None:
    from nbsmt_onnx.graph.memory import available_memory_bytes

    got = available_memory_bytes()
    assert got is not None and got > 2**20
