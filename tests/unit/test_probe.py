"""In-graph statistic probes: correctness against NumPy, dynamic shapes, opsets, graph hygiene."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from nbsmt_onnx.calibration.statistics import ChannelStatistics
from nbsmt_onnx.errors import InternalError
from nbsmt_onnx.graph.probe import (
    CHANNEL_LAST,
    ProbeSpec,
    add_statistics_probes,
    use_batch_statistics,
)
from tests.unit._bn_models import (
    Builder,
    channel_moments,
    collect,
    image_batches,
    image_input,
    plain_session,
    with_outputs,
)

# Probes reduce in float64 the exact float32 activations, like the NumPy reference,
# so the only differences are float64 summation order: ~1e-13 relative. 1e-9 is the
# issue's bound and still 5+ orders of magnitude below any real mistake.
RTOL = 1e-9


def _conv_bn_model(opset: int = 17) -> onnx.ModelProto:
    b = Builder(seed=1)
    c1 = b.conv("conv1", "x", 3, 4)
    y = b.bn("bn1", c1, 4)
    r = b.node("Relu", [y], ["relu1.out"], "relu1")
    c2 = b.conv("conv2", r, 4, 6, k=1)
    return b.model([image_input()], [c2], opset=opset)


def _probe_stats(result, data, tensors):  # type: ignore[no-untyped-def]
    session = plain_session(result.model)
    totals = {t: None for t in tensors}
    for feed in data():
        names = result.output_names
        values = dict(zip(names, session.run(names, feed), strict=True))
        for t in tensors:
            s = result.outputs[t].statistics(values)
            totals[t] = s if totals[t] is None else totals[t].merge(s)
    return totals


@pytest.mark.parametrize("opset", [11, 13, 17, 18])
def test_probe_matches_numpy_over_all_data(opset: int) -> None:
    model = _conv_bn_model(opset)
    data = image_batches(seed=2)
    tensors = ["conv1.out", "relu1.out", "conv2.out"]
    result = add_statistics_probes(model, tensors)
    got = _probe_stats(result, data, tensors)
    ref = collect(model, tensors, data)
    for t in tensors:
        mean, var = channel_moments(ref[t])
        np.testing.assert_allclose(got[t].mean, mean, rtol=RTOL, atol=1e-12)
        np.testing.assert_allclose(got[t].variance, var, rtol=RTOL, atol=0)
        n_expected = sum(b.size for b in ref[t]) // mean.size
        assert got[t].total_count == n_expected


def test_probe_channel_last_of_rank_2_and_3() -> None:
    b = Builder(seed=3)
    w = b.init("W", b.rng.normal(size=(5, 3)).astype(np.float32))
    b.node("MatMul", ["a", w], ["mm.out"], "mm")
    inp = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["B", "T", 5])
    model = b.model([inp], ["mm.out"], rank=3)
    rng = np.random.default_rng(4)
    batches = [rng.normal(size=s).astype(np.float32) + 2 for s in [(2, 3, 5), (1, 7, 5), (4, 1, 5)]]

    def data():  # type: ignore[no-untyped-def]
        for a in batches:
            yield {"a": a}

    result = add_statistics_probes(model, [ProbeSpec("mm.out", CHANNEL_LAST), ProbeSpec("a", 1)])
    got = _probe_stats(result, data, ["mm.out"])["mm.out"]
    ref = collect(model, ["mm.out"], data)["mm.out"]
    mean, var = channel_moments(ref, axis=-1)
    assert got.channels == 3
    np.testing.assert_allclose(got.mean, mean, rtol=RTOL)
    np.testing.assert_allclose(got.variance, var, rtol=RTOL)
    # rank 2: [N, K] input
    inp2 = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 5])
    b2 = Builder(seed=3)
    b2.init("W", onnx.numpy_helper.to_array(model.graph.initializer[0]))
    b2.node("MatMul", ["a", "W"], ["mm.out"], "mm")
    model2 = b2.model([inp2], ["mm.out"], rank=2)
    flat = [a.reshape(-1, 5) for a in batches]

    def data2():  # type: ignore[no-untyped-def]
        for a in flat:
            yield {"a": a}

    result2 = add_statistics_probes(model2, [ProbeSpec("mm.out", CHANNEL_LAST)])
    got2 = _probe_stats(result2, data2, ["mm.out"])["mm.out"]
    np.testing.assert_allclose(got2.mean, mean, rtol=RTOL)
    np.testing.assert_allclose(got2.variance, var, rtol=RTOL)


@pytest.mark.parametrize("opset", [11, 18])
def test_per_sample_channel_means_match_numpy(opset: int) -> None:
    """The [N, C] per-sample means behind the paired shrinkage, channel-first and -last."""
    model = _conv_bn_model(opset)
    data = image_batches(seed=6)
    result = add_statistics_probes(model, ["conv1.out", "conv2.out"])
    session = plain_session(result.model)
    ref = collect(model, ["conv1.out", "conv2.out"], data)
    for i, feed in enumerate(data()):
        names = result.output_names
        values = dict(zip(names, session.run(names, feed), strict=True))
        for t in ("conv1.out", "conv2.out"):
            x = ref[t][i].astype(np.float64)
            want = x.reshape(x.shape[0], x.shape[1], -1).mean(axis=2)
            got = result.outputs[t].sample_means(values)
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-12)
    b = Builder(seed=3)
    w = b.init("W", b.rng.normal(size=(5, 3)).astype(np.float32))
    b.node("MatMul", ["a", w], ["mm.out"], "mm")
    inp = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["B", "T", 5])
    mm = b.model([inp], ["mm.out"], rank=3, opset=opset)
    a = np.random.default_rng(7).normal(size=(4, 6, 5)).astype(np.float32)
    probed = add_statistics_probes(mm, [ProbeSpec("mm.out", CHANNEL_LAST)])
    names = probed.output_names
    values = dict(zip(names, plain_session(probed.model).run(names, {"a": a}), strict=True))
    want = (a.astype(np.float64) @ onnx.numpy_helper.to_array(mm.graph.initializer[0])).mean(axis=1)
    got = probed.outputs["mm.out"].sample_means(values)
    np.testing.assert_allclose(got, want, rtol=1e-6)  # float32 MatMul vs float64 product


def test_probe_leaves_input_model_untouched_and_names_unique() -> None:
    b = Builder(seed=5)
    c1 = b.conv("conv1", "x", 3, 4)
    # a tensor already called like the probe's first new name must not be clobbered
    b.node("Identity", [c1], ["conv1.out/f64"], "conv1.out/Cast")
    model = b.model([image_input()], ["conv1.out/f64"])
    before = model.SerializeToString()
    result = add_statistics_probes(model, ["conv1.out"])
    assert model.SerializeToString() == before
    names = [o for n in result.model.graph.node for o in n.output]
    assert len(names) == len(set(names))
    node_names = [n.name for n in result.model.graph.node]
    assert len(node_names) == len(set(node_names))
    outs = result.outputs["conv1.out"]
    assert outs.tensor == "conv1.out" and len(set(outs.names)) == 4
    assert result.model.graph.output[0].name == "conv1.out/f64"
    onnx.checker.check_model(result.model)


def test_only_statistics_prunes_downstream_nodes() -> None:
    model = _conv_bn_model()
    result = add_statistics_probes(model, ["conv1.out"], only_statistics=True)
    ops = {n.name for n in result.model.graph.node}
    assert "conv2" not in ops and "bn1" not in ops and "conv1" in ops
    assert {o.name for o in result.model.graph.output} == set(result.output_names)
    assert {t.name for t in result.model.graph.initializer} >= {"conv1.W", "conv1.B"}
    assert "conv2.W" not in {t.name for t in result.model.graph.initializer}
    data = image_batches(seed=6)
    got = _probe_stats(result, data, ["conv1.out"])["conv1.out"]
    mean, var = channel_moments(collect(model, ["conv1.out"], data)["conv1.out"])
    np.testing.assert_allclose(got.mean, mean, rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(got.variance, var, rtol=RTOL)


def test_probe_of_missing_tensor_is_an_error() -> None:
    with pytest.raises(InternalError, match="nope"):
        add_statistics_probes(_conv_bn_model(), ["nope"])


def test_use_batch_statistics_normalises_each_batch() -> None:
    model = _conv_bn_model()
    b_params = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    gamma, beta = b_params["bn1.scale"], b_params["bn1.B"]
    result = use_batch_statistics(model, ["bn1"])
    session = plain_session(with_outputs(result.model, ["bn1.out"]))
    probe = result.outputs["conv1.out"]
    data = image_batches(seed=7)
    for feed in data():
        names = ["bn1.out", *probe.names]
        values = dict(zip(names, session.run(names, feed), strict=True))
        z = (values["bn1.out"].astype(np.float64) - beta[None, :, None, None]) / gamma[
            None, :, None, None
        ]
        stats = ChannelStatistics.from_array(z)
        x_stats = probe.statistics(values)
        # BN(x) with the batch's own statistics: mean 0, variance var/(var + eps).
        # Tolerance: float32 BN arithmetic on O(1) values, ~1e-6 relative.
        np.testing.assert_allclose(stats.mean, 0, atol=1e-5)
        np.testing.assert_allclose(
            stats.variance, x_stats.variance / (x_stats.variance + 1e-3), rtol=1e-5
        )


def test_use_batch_statistics_unknown_bn_is_an_error() -> None:
    with pytest.raises(InternalError, match="bnX"):
        use_batch_statistics(_conv_bn_model(), ["bnX"])
