"""Recalibration strategies against brute-force references and analytic statistics.

Most tests emulate NB-SMT with standard ops: the "NB-SMT model" is the float
model with a known per-channel affine map (Mul/Add) inserted before each BN,
so the strategies are tested independently of the library, against

- brute force: every BN input of all data kept in memory (test-only), NumPy
  statistics over all of it, BNs updated one at a time in graph order;
- analytic values: the affine map moves mean and variance in a known way.

The tests at the end run real NbSmt ops and need the library (they FAIL
without it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from nbsmt_onnx.calibration.recalibrate import (
    PassProgress,
    VarianceRatio,
    correct_fused_layers,
    recalibrate_batchnorm,
)
from nbsmt_onnx.errors import ConfigError, DataError
from nbsmt_onnx.graph.fold import fold_batchnorm_into_nbsmt
from nbsmt_onnx.runtime.session import create_session
from tests.unit._bn_models import (
    Builder,
    activation_scales,
    channel_moments,
    collect,
    image_batches,
    image_input,
    initializer,
    plain_session,
    set_initializer,
    to_nbsmt,
)

BNS = ["bn1", "bn2", "bn3"]
# Brute force and the strategies see bit-identical float32 activations (same ORT
# kernels, optimisations off) and both reduce them in float64; only summation
# order differs (~1e-13 relative). 1e-9 catches any real deviation.
RTOL = 1e-9

# Per-channel perturbation before each BN: a (scale) and b (shift).
PERTURB = {
    "bn1": (np.array([1.2, 0.8, 1.0, 3.0]), np.array([0.1, -0.2, 0.0, 0.5])),
    "bn2": (np.array([0.9, 1.1, 1.3, 0.7, 1.0]), np.array([0.0, 0.3, -0.1, 0.2, 0.05])),
    "bn3": (np.array([1.05, 0.95, 1.5, 0.6]), np.array([-0.1, 0.1, 0.2, 0.0])),
}


def _chain(perturbed: bool) -> onnx.ModelProto:
    """x -> conv1 -> [affine] -> bn1 -> relu -> conv2 -> [affine] -> bn2 -> relu -> conv3 -> [affine] -> bn3."""
    b = Builder(seed=21)
    t = "x"
    for i, (cin, cout, k) in enumerate([(3, 4, 3), (4, 5, 1), (5, 4, 1)], start=1):
        t = b.conv(f"conv{i}", t, cin, cout, k=k)
        if perturbed:
            a, s = PERTURB[f"bn{i}"]
            t = b.affine(f"noise{i}", t, a, s)
        t = b.bn(f"bn{i}", t, cout)
        if i < 3:
            t = b.node("Relu", [t], [f"relu{i}.out"], f"relu{i}")
    return b.model([image_input()], [t])


def _bn_nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node if n.op_type == "BatchNormalization"}


def _stats(model: onnx.ModelProto, bn: str) -> tuple[np.ndarray, np.ndarray]:
    node = _bn_nodes(model)[bn]
    return initializer(model, node.input[3]).astype(np.float64), initializer(
        model, node.input[4]
    ).astype(np.float64)


def _brute_sequential(
    model: onnx.ModelProto,
    data: Callable[[], Iterator[dict[str, np.ndarray]]],
    update: Callable[[str, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    order: list[str],
    session_factory: Callable[[onnx.ModelProto], object] = plain_session,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """BNs in graph order, one at a time: measure its input on all data, update, continue."""
    current = onnx.ModelProto()
    current.CopyFrom(model)
    out = {}
    for bn in order:
        node = _bn_nodes(current)[bn]
        mu, var = channel_moments(
            collect(current, [node.input[0]], data, session_factory)[node.input[0]]
        )
        new_mean, new_var = update(bn, mu, var)
        set_initializer(current, node.input[3], new_mean)
        set_initializer(current, node.input[4], new_var)
        out[bn] = (new_mean, new_var)
    return out


def _assert_stats(result, expected, rtol=RTOL):  # type: ignore[no-untyped-def]
    assert set(result.statistics) == set(expected)
    for bn, (mean, var) in expected.items():
        got = result.statistics[bn]
        # atol for means that are ~0 by chance: relative to the channel std
        np.testing.assert_allclose(got.mean, mean, rtol=rtol, atol=rtol * np.sqrt(var).max())
        np.testing.assert_allclose(got.var, var, rtol=rtol)


def test_sequential_equals_brute_force_one_bn_at_a_time() -> None:
    nb = _chain(perturbed=True)
    data = image_batches(seed=22)
    result = recalibrate_batchnorm(
        nb, data, strategy="sequential", batchnorms=BNS, session_factory=plain_session
    )
    expected = _brute_sequential(nb, data, lambda bn, mu, var: (mu, var), BNS)
    _assert_stats(result, expected)
    assert result.passes == 3 and result.model_runs == 3  # 3 chained BNs: 3 levels
    assert [u.level for u in result.updates] == [0, 1, 2]
    # the returned model carries the new statistics
    for bn in BNS:
        mean, var = _stats(result.model, bn)
        np.testing.assert_array_equal(mean, expected[bn][0].astype(np.float32))
        np.testing.assert_array_equal(var, expected[bn][1].astype(np.float32))


def test_sequential_first_bn_recovers_analytic_statistics() -> None:
    """BN1's input is a*z + b of the clean input z: mean a*mu_z + b, variance a^2 var_z."""
    clean, nb = _chain(perturbed=False), _chain(perturbed=True)
    data = image_batches(seed=23)
    z = collect(clean, ["conv1.out"], data)["conv1.out"]
    mu_z, var_z = channel_moments(z)
    a, b = PERTURB["bn1"]
    result = recalibrate_batchnorm(
        nb, data, strategy="sequential", batchnorms=["bn1"], session_factory=plain_session
    )
    got = result.statistics["bn1"]
    # float32 Mul/Add round each element to 2^-24 relative; stats inherit ~1e-7.
    np.testing.assert_allclose(got.mean, a * mu_z + b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.var, a * a * var_z, rtol=1e-5)


def test_one_batch_sequential_shortcut_equals_level_passes() -> None:
    nb = _chain(perturbed=True)
    data = image_batches(seed=24, sizes=((6, 5),))
    shortcut = recalibrate_batchnorm(
        nb, data, strategy="sequential", batchnorms=BNS, session_factory=plain_session
    )
    passes = recalibrate_batchnorm(
        nb,
        data,
        strategy="sequential",
        batchnorms=BNS,
        session_factory=plain_session,
        single_batch_shortcut=False,
    )
    assert shortcut.passes == 1 and passes.passes == 3
    # Same float32 statistics reach every BN on both routes (see recalibrate docs):
    # identical up to float64 summation order.
    _assert_stats(shortcut, {bn: (s.mean, s.var) for bn, s in passes.statistics.items()}, 1e-12)


def test_one_batch_relative_equals_level_passes() -> None:
    """One batch: relative runs in 2 passes (clean, then shifted batch statistics in-graph)."""
    clean, nb = _chain(perturbed=False), _chain(perturbed=True)
    data = image_batches(seed=25, sizes=((6, 5),))
    # a bound the perturbation reaches (bn1 channel 3 has a = 3): clipping is exercised
    ratio = VarianceRatio(floor=0.05, bound=2.0)
    runs = {
        shortcut: recalibrate_batchnorm(
            nb,
            data,
            strategy="relative",
            float_model=clean,
            batchnorms=BNS,
            ratio=ratio,
            session_factory=plain_session,
            single_batch_shortcut=shortcut,
        )
        for shortcut in (True, False)
    }
    assert (runs[True].passes, runs[True].model_runs) == (2, 2)
    assert (runs[False].passes, runs[False].model_runs) == (3, 4)
    # The in-graph shift repeats the host's float64 operations in the same order and
    # both routes write float32 statistics: identical up to float64 summation order.
    _assert_stats(
        runs[True], {bn: (s.mean, s.var) for bn, s in runs[False].statistics.items()}, 1e-12
    )
    assert runs[True].statistics["bn1"].var[3] == pytest.approx(
        2.0 * _stats(nb, "bn1")[1][3], rel=1e-12
    )
    for u in runs[True].updates:
        assert u.reference is not None


def test_one_batch_relative_differs_from_one_pass_replacement() -> None:
    """Guard: the shortcut must move the *old* statistics, not replace them by batch statistics."""
    clean, nb = _chain(perturbed=False), _chain(perturbed=True)
    data = image_batches(seed=25, sizes=((6, 5),))
    rel = recalibrate_batchnorm(
        nb, data, strategy="relative", float_model=clean, batchnorms=BNS,
        session_factory=plain_session,
    )  # fmt: skip
    seq = recalibrate_batchnorm(
        nb, data, strategy="sequential", batchnorms=BNS, session_factory=plain_session
    )
    for bn in BNS:
        assert not np.allclose(rel.statistics[bn].mean, seq.statistics[bn].mean, rtol=1e-3)


def _train_mode_reference(model: onnx.ModelProto, bns: list[str]) -> onnx.ModelProto:
    """Each BN rewritten with explicit float32 ops normalising by batch statistics.

    Independent of ``graph.probe`` (different ops, float32 instead of float64).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for n in out.graph.node:
        if n.name not in bns:
            nodes.append(n)
            continue
        x, s, bb, _, _ = n.input
        eps = next(a.f for a in n.attribute if a.name == "epsilon")
        eps_name = f"{n.name}.ref_eps"
        out.graph.initializer.append(numpy_helper.from_array(np.array(eps, np.float32), eps_name))
        p = f"{n.name}.ref"
        shape4 = f"{p}.shape4"
        out.graph.initializer.append(
            numpy_helper.from_array(np.array([1, -1, 1, 1], np.int64), shape4)
        )
        nodes += [
            helper.make_node("ReduceMean", [x], [f"{p}.m"], axes=[0, 2, 3], keepdims=1),
            helper.make_node("Sub", [x, f"{p}.m"], [f"{p}.d"]),
            helper.make_node("Mul", [f"{p}.d", f"{p}.d"], [f"{p}.d2"]),
            helper.make_node("ReduceMean", [f"{p}.d2"], [f"{p}.v"], axes=[0, 2, 3], keepdims=1),
            helper.make_node("Add", [f"{p}.v", eps_name], [f"{p}.ve"]),
            helper.make_node("Sqrt", [f"{p}.ve"], [f"{p}.sd"]),
            helper.make_node("Div", [f"{p}.d", f"{p}.sd"], [f"{p}.z"]),
            helper.make_node("Reshape", [s, shape4], [f"{p}.s4"]),
            helper.make_node("Reshape", [bb, shape4], [f"{p}.b4"]),
            helper.make_node("Mul", [f"{p}.z", f"{p}.s4"], [f"{p}.zs"]),
            helper.make_node("Add", [f"{p}.zs", f"{p}.b4"], list(n.output[:1])),
        ]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    onnx.checker.check_model(out)
    return out


def test_train_mode_equals_float32_batch_statistics_reference() -> None:
    nb = _chain(perturbed=True)
    data = image_batches(seed=25)
    result = recalibrate_batchnorm(
        nb, data, strategy="train-mode", batchnorms=BNS, session_factory=plain_session
    )
    assert result.passes == 1 and result.model_runs == 1
    ref_model = _train_mode_reference(nb, BNS)
    inputs = [_bn_nodes(nb)[bn].input[0] for bn in BNS]
    got = collect(ref_model, inputs, data)
    expected = {bn: channel_moments(got[t]) for bn, t in zip(BNS, inputs, strict=True)}
    # The reference normalises with float32 batch statistics, the tool with float64
    # ones cast to float32; differences of ~1e-7 relative propagate through three
    # layers. 1e-4 is far below what a semantic error would cause (running instead
    # of batch statistics: O(1); unbiased instead of population variance: >= 1/(2*7*7) = 1%).
    _assert_stats(result, expected, rtol=1e-4)
    # and it is not the sequential answer on multi-batch data (BN2/3 inputs differ)
    seq = recalibrate_batchnorm(
        nb, data, strategy="sequential", batchnorms=BNS, session_factory=plain_session
    )
    assert not np.allclose(seq.statistics["bn3"].var, result.statistics["bn3"].var, rtol=1e-3)


def test_relative_equals_brute_force_and_analytic_first_layer() -> None:
    clean, nb = _chain(perturbed=False), _chain(perturbed=True)
    data = image_batches(seed=26)
    ratio = VarianceRatio(floor=0.01, bound=4.0)
    result = recalibrate_batchnorm(
        nb,
        data,
        strategy="relative",
        float_model=clean,
        batchnorms=BNS,
        ratio=ratio,
        session_factory=plain_session,
    )
    assert result.passes == 3 and result.model_runs == 4  # clean model rides along in pass 1
    clean_inputs = {bn: _bn_nodes(clean)[bn].input[0] for bn in BNS}
    clean_batches = collect(clean, list(clean_inputs.values()), data)
    ref = {bn: channel_moments(clean_batches[t]) for bn, t in clean_inputs.items()}
    eps = float(np.float32(1e-3))  # the attribute is stored as float32

    def update(bn: str, mu_n: np.ndarray, var_n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean0, var0 = _stats(nb, bn)
        mu_c, var_c = ref[bn]
        e = eps + 0.01 * var_c.mean()
        k = np.clip((var_n + e) / (var_c + e), 0.25, 4.0)
        return mean0 + (mu_n - mu_c), var0 * k

    expected = _brute_sequential(nb, data, update, BNS)
    _assert_stats(result, expected)
    # analytic for BN1: mu_n - mu_c = (a-1) mu_c + b, var_n = a^2 var_c; channel 3 has
    # a = 3, ratio ~9, clipped to the bound 4
    a, b = PERTURB["bn1"]
    mean0, var0 = _stats(nb, "bn1")
    mu_c, var_c = ref["bn1"]
    got = result.statistics["bn1"]
    np.testing.assert_allclose(got.mean, mean0 + (a - 1) * mu_c + b, rtol=1e-5, atol=1e-6)
    e = eps + 0.01 * var_c.mean()
    np.testing.assert_allclose(
        got.var, var0 * np.clip((a * a * var_c + e) / (var_c + e), 0.25, 4), rtol=1e-5
    )
    assert got.var[3] == pytest.approx(4 * var0[3], rel=1e-12)
    update1 = result.updates[0]
    assert update1.reference is not None and update1.mean_shift > 0


def test_one_pass_measures_everything_on_the_old_model() -> None:
    nb = _chain(perturbed=True)
    data = image_batches(seed=27)
    result = recalibrate_batchnorm(
        nb, data, strategy="one-pass", batchnorms=BNS, session_factory=plain_session
    )
    assert result.passes == 1
    inputs = [_bn_nodes(nb)[bn].input[0] for bn in BNS]
    got = collect(nb, inputs, data)
    _assert_stats(result, {bn: channel_moments(got[t]) for bn, t in zip(BNS, inputs, strict=True)})


def _branchy(perturbed: bool) -> onnx.ModelProto:
    b = Builder(seed=28)
    outs = []
    for name in ("a", "b"):
        t = b.conv(f"conv_{name}", "x", 3, 4)
        if perturbed:
            t = b.affine(f"noise_{name}", t, np.full(4, 1.5), np.full(4, 0.2))
        outs.append(b.bn(f"bn_{name}", t, 4))
    s = b.node("Add", outs, ["add.out"], "add")
    t = b.conv("conv_c", s, 4, 4, k=1)
    t = b.bn("bn_c", t, 4)
    return b.model([image_input()], [t])


def test_independent_bns_share_a_pass_and_progress_is_reported() -> None:
    nb = _branchy(perturbed=True)
    data = image_batches(seed=29)
    events: list[PassProgress] = []
    result = recalibrate_batchnorm(
        nb,
        data,
        strategy="sequential",
        batchnorms=["bn_a", "bn_b", "bn_c"],
        session_factory=plain_session,
        progress=events.append,
    )
    assert result.passes == 2
    assert {u.name: u.level for u in result.updates} == {"bn_a": 0, "bn_b": 0, "bn_c": 1}
    finished = [e for e in events if e.finished]
    assert [(e.pass_index, e.total_passes, e.batches) for e in finished] == [(1, 2, 4), (2, 2, 4)]
    assert len(events) == 2 * 4 + 2  # one per batch plus one per finished pass
    expected = _brute_sequential(nb, data, lambda bn, mu, var: (mu, var), ["bn_a", "bn_b", "bn_c"])
    _assert_stats(result, expected)


def test_default_selection_skips_bns_without_nbsmt_upstream() -> None:
    result = recalibrate_batchnorm(
        _chain(perturbed=True),
        image_batches(seed=30),
        strategy="sequential",
        session_factory=plain_session,
    )
    assert result.passes == 0 and not result.updates
    assert [s.node for s in result.skipped] == BNS
    assert all("no NbSmt op upstream" in s.reason for s in result.skipped)


def test_configuration_and_data_errors() -> None:
    nb = _chain(perturbed=True)
    data = image_batches(seed=31)
    with pytest.raises(ConfigError, match="train-mode, sequential, relative"):
        recalibrate_batchnorm(nb, data, strategy="magic", batchnorms=BNS)
    with pytest.raises(ConfigError, match="float model"):
        recalibrate_batchnorm(nb, data, strategy="relative", batchnorms=BNS)
    with pytest.raises(ConfigError, match="bnX"):
        recalibrate_batchnorm(nb, data, strategy="sequential", batchnorms=["bnX"])
    once = iter(list(data()))
    with pytest.raises(DataError, match="fresh iterator"):
        recalibrate_batchnorm(
            nb,
            lambda: once,
            strategy="sequential",
            batchnorms=BNS,
            session_factory=plain_session,
        )
    calls = iter([image_batches(seed=1), image_batches(seed=2, sizes=((1, 4), (2, 4)))] * 3)
    with pytest.raises(DataError, match="changed between passes"):
        recalibrate_batchnorm(
            nb,
            lambda: next(calls)(),
            strategy="sequential",
            batchnorms=BNS,
            session_factory=plain_session,
        )
    with pytest.raises(ConfigError, match="bound"):
        VarianceRatio(bound=0.5)


# --------------------------------------------------------------------------- with the library


def _float_net(with_bn: bool) -> onnx.ModelProto:
    b = Builder(seed=40)
    t = b.conv("conv1", "x", 3, 8)
    if with_bn:
        t = b.bn("bn1", t, 8)
    t = b.node("Relu", [t], ["relu1.out"], "relu1")
    t = b.conv("conv2", t, 8, 8, group=8)  # depthwise
    if with_bn:
        t = b.bn("bn2", t, 8)
    t = b.node("Relu", [t], ["relu2.out"], "relu2")
    t = b.conv("conv3", t, 8, 6, k=1)
    if with_bn:
        t = b.bn("bn3", t, 6)
    return b.model([image_input()], [t])


def _nbsmt_pair(with_bn: bool, data):  # type: ignore[no-untyped-def]
    clean = _float_net(with_bn)
    return clean, to_nbsmt(clean, activation_scales(clean, data), threads=2)


def test_recalibrated_then_folded_matches_unfolded_with_library(nbsmt_library: str) -> None:
    data = image_batches(seed=41, sizes=((4, 6), (4, 6), (3, 6)))
    clean, nb = _nbsmt_pair(True, data)
    result = recalibrate_batchnorm(nb, data, strategy="sequential", float_model=clean)
    assert {u.name for u in result.updates} == {"bn1", "bn2", "bn3"}  # all affected by NbSmt ops
    assert result.passes == 3
    # self-consistency of "sequential": each BN's input, on the recalibrated model,
    # has exactly the new running statistics
    inputs = {bn: _bn_nodes(nb)[bn].input[0] for bn in ("bn1", "bn2", "bn3")}
    got = collect(result.model, list(inputs.values()), data, create_session)
    for bn, t in inputs.items():
        mu, var = channel_moments(got[t])
        np.testing.assert_allclose(result.statistics[bn].mean, mu, rtol=RTOL, atol=1e-12)
        np.testing.assert_allclose(result.statistics[bn].var, var, rtol=RTOL)
    folded = fold_batchnorm_into_nbsmt(result.model)
    assert folded.count == 3 and not folded.skipped
    assert not any(n.op_type == "BatchNormalization" for n in folded.model.graph.node)
    out = result.model.graph.output[0].name
    unfolded_out = collect(result.model, [out], data, create_session)[out]
    folded_out = collect(folded.model, [out], data, create_session)[out]
    for u, f in zip(unfolded_out, folded_out, strict=True):
        # Float32 rounding only, but a rounding difference in an intermediate layer
        # can flip one activation's quantization (round half even at a boundary);
        # such a flip moves an output by at most one quantization step times a weight
        # (~1e-2 here). Require nearly all elements within float32 rounding and all
        # within one step.
        close = np.abs(u - f) <= 1e-5 * (1 + np.abs(u))
        assert close.mean() > 0.999
        assert np.max(np.abs(u - f)) < 0.05


def test_fused_correction_matches_clean_statistics_with_library(nbsmt_library: str) -> None:
    data = image_batches(seed=42, sizes=((4, 6), (4, 6), (3, 6)))
    clean, nb = _nbsmt_pair(False, data)
    layers = ["conv1", "conv2", "conv3"]
    clean_out = collect(clean, [f"{c}.out" for c in layers], data)
    for variant in ("mean", "mean+var"):
        result = correct_fused_layers(
            nb, clean, data, variant=variant, ratio=VarianceRatio(floor=0.0, bound=100.0)
        )
        assert [c.name for c in result.corrections] == layers
        assert result.passes == 3 and result.model_runs == 4
        got = collect(result.model, [f"{c}.out" for c in layers], data, create_session)
        for c in layers:
            mu_c, var_c = channel_moments(clean_out[f"{c}.out"])
            mu, var = channel_moments(got[f"{c}.out"])
            scale = np.sqrt(var_c).max()
            # corrected outputs are a*y+b computed by the op in float32 (w_scale*a, B*a+b
            # rounded once): statistics agree to ~1e-6 of the channel scale.
            np.testing.assert_allclose(mu, mu_c, rtol=0, atol=1e-5 * scale)
            if variant == "mean+var":
                np.testing.assert_allclose(var, var_c, rtol=1e-5)
        # integer weights are never changed
        for c in layers:
            np.testing.assert_array_equal(
                initializer(result.model, f"{c}.Wq"), initializer(nb, f"{c}.Wq")
            )


@pytest.mark.parametrize("variant", ["mean", "mean+var"])
def test_one_batch_fused_correction_equals_level_passes(nbsmt_library: str, variant: str) -> None:
    """One batch: the correction runs in 2 passes (clean, then in-graph corrected op copies)."""
    data = image_batches(seed=45, sizes=((9, 6),))
    clean, nb = _nbsmt_pair(False, data)
    ratio = VarianceRatio(floor=0.01, bound=1.005)  # tight bound: some channels clip
    runs = {
        shortcut: correct_fused_layers(
            nb, clean, data, variant=variant, ratio=ratio, single_batch_shortcut=shortcut
        )
        for shortcut in (True, False)
    }
    assert (runs[True].passes, runs[True].model_runs) == (2, 2)
    assert (runs[False].passes, runs[False].model_runs) == (3, 4)
    assert [c.name for c in runs[True].corrections] == ["conv1", "conv2", "conv3"]
    for a, b in zip(runs[True].corrections, runs[False].corrections, strict=True):
        assert a.level == b.level
        # The corrected op copies compute w_scale*a and B*a+b exactly as the fold does,
        # so every layer sees bit-identical inputs on both routes: the statistics agree
        # up to float64 summation order.
        np.testing.assert_allclose(a.measured.mean, b.measured.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(a.measured.variance, b.measured.variance, rtol=1e-12)
        np.testing.assert_allclose(a.correction.scale, b.correction.scale, rtol=1e-12)
        np.testing.assert_allclose(a.correction.shift, b.correction.shift, rtol=1e-12, atol=1e-12)
    if variant == "mean+var":
        scales = np.concatenate([c.correction.scale for c in runs[True].corrections])
        clipped = np.isclose(scales, np.sqrt(1.005), rtol=1e-12) | np.isclose(
            scales, np.sqrt(1 / 1.005), rtol=1e-12
        )
        assert clipped.any() and not clipped.all()
    for c in ("conv1", "conv2", "conv3"):
        np.testing.assert_array_equal(
            initializer(runs[True].model, f"{c}.Wq"), initializer(nb, f"{c}.Wq")
        )


def test_variance_ratio_regularisation() -> None:
    ratio = VarianceRatio(floor=0.1, bound=4.0)
    var_c = np.array([1.0, 1.0, 0.0, 1.0])
    var_n = np.array([2.0, 100.0, 0.05, 0.0])
    k = ratio(var_n, var_c, var_c, eps=0.0)
    e = 0.1 * 0.75
    np.testing.assert_allclose(
        k, [(2 + e) / (1 + e), 4.0, (0.05 + e) / e, max(e / (1 + e), 0.25)], rtol=1e-12
    )


class _Config:
    """Duck-typed stand-in for config.RecalibrationConfig (owned by the transform module)."""

    def __init__(self, strategy: str, correction: str, fold: bool) -> None:
        self.strategy, self.correction, self.fold = strategy, correction, fold


class _Data:
    def __init__(self, source: Callable[[], Iterator[dict[str, np.ndarray]]]) -> None:
        self.batches = source


def test_transform_step_with_bn_kept_folds_and_reports(nbsmt_library: str) -> None:
    from nbsmt_onnx.calibration.recalibrate import recalibrate

    data = image_batches(seed=43, sizes=((4, 6), (3, 6)))
    clean, nb = _nbsmt_pair(True, data)
    out = recalibrate(
        float_model=clean,
        sim_model=nb,
        data=_Data(data),
        config=_Config("relative", "mean+var", True),
    )
    assert not any(n.op_type == "BatchNormalization" for n in out.model.graph.node)
    assert out.correction is None  # every op feeds a recalibrated BN: nothing left to correct
    report = out.report
    assert report["strategy"] == "relative" and report["passes"] == 3
    assert [b["name"] for b in report["batchnorms"]] == ["bn1", "bn2", "bn3"]
    assert {f["batchnorm"] for f in report["fold"]["folded"]} == {"bn1", "bn2", "bn3"}
    assert all("clean" in b for b in report["batchnorms"])


def test_transform_step_on_fused_model_corrects_every_layer(nbsmt_library: str) -> None:
    from nbsmt_onnx.calibration.recalibrate import recalibrate

    data = image_batches(seed=44, sizes=((4, 6), (3, 6)))
    clean, nb = _nbsmt_pair(False, data)
    out = recalibrate(
        float_model=clean, sim_model=nb, data=data, config=_Config("sequential", "mean", True)
    )
    assert out.batchnorm is not None and out.batchnorm.passes == 0
    assert out.correction is not None
    assert [c["name"] for c in out.report["correction"]["layers"]] == ["conv1", "conv2", "conv3"]
    assert out.fold is not None and out.fold.count == 0
