"""Recalibration strategies against brute-force references and analytic statistics.

Most tests emulate NB-SMT with standard ops: the "NB-SMT model" is the float
model with a known per-channel affine map (Mul/Add) inserted before each BN,
so the strategies are tested independently of the library, against

- brute force: every BN input of all data kept in memory (test-only), NumPy
  statistics over all of it, BNs updated one at a time in graph order;
- analytic values: the affine map moves mean and variance in a known way.

The tests that run real NbSmt ops need the library and live in
tests/e2e/test_recalibrate_onnxruntime.py (unit tests need no library).
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
    recalibrate_batchnorm,
)
from nbsmt_onnx.errors import ConfigError, DataError
from tests.unit._bn_models import (
    Builder,
    channel_moments,
    collect,
    image_batches,
    image_input,
    initializer,
    plain_session,
    set_initializer,
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
    result = recalibrate_batchnorm(nb, data, strategy="sequential", batchnorms=BNS)
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
    result = recalibrate_batchnorm(nb, data, strategy="sequential", batchnorms=["bn1"])
    got = result.statistics["bn1"]
    # float32 Mul/Add round each element to 2^-24 relative; stats inherit ~1e-7.
    np.testing.assert_allclose(got.mean, a * mu_z + b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.var, a * a * var_z, rtol=1e-5)


def test_one_batch_sequential_shortcut_equals_level_passes() -> None:
    nb = _chain(perturbed=True)
    data = image_batches(seed=24, sizes=((6, 5),))
    shortcut = recalibrate_batchnorm(nb, data, strategy="sequential", batchnorms=BNS)
    passes = recalibrate_batchnorm(
        nb,
        data,
        strategy="sequential",
        batchnorms=BNS,
        single_batch_shortcut=False,
    )
    assert shortcut.passes == 1 and passes.passes == 3
    # Same float32 statistics reach every BN on both routes (see recalibrate docs):
    # identical up to float64 summation order.
    _assert_stats(shortcut, {bn: (s.mean, s.var) for bn, s in passes.statistics.items()}, 1e-12)


@pytest.mark.parametrize("amplify_only", [False, True], ids=["two-sided", "amplify-only"])
def test_one_batch_relative_equals_level_passes(amplify_only: bool) -> None:
    """One batch: relative runs in 2 passes (clean, then shifted batch statistics in-graph)."""
    clean, nb = _chain(perturbed=False), _chain(perturbed=True)
    data = image_batches(seed=25, sizes=((6, 5),))
    # a bound the perturbation reaches (bn1 channel 3 has a = 3): clipping is exercised
    ratio = VarianceRatio(floor=0.05, bound=2.0, amplify_only=amplify_only)
    runs = {
        shortcut: recalibrate_batchnorm(
            nb,
            data,
            strategy="relative",
            float_model=clean,
            batchnorms=BNS,
            ratio=ratio,
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
    # channel 3's variance grew 9x: clipped to the bound, or (amplify-only) not moved at all
    assert runs[True].statistics["bn1"].var[3] == pytest.approx(
        (1.0 if amplify_only else 2.0) * _stats(nb, "bn1")[1][3], rel=1e-12
    )
    # channel 1 (a = 0.8) shrank: its variance follows in both modes
    assert runs[True].statistics["bn1"].var[1] < _stats(nb, "bn1")[1][1]
    for u in runs[True].updates:
        assert u.reference is not None


def test_one_batch_relative_differs_from_one_pass_replacement() -> None:
    """Guard: the shortcut must move the *old* statistics, not replace them by batch statistics."""
    clean, nb = _chain(perturbed=False), _chain(perturbed=True)
    data = image_batches(seed=25, sizes=((6, 5),))
    rel = recalibrate_batchnorm(
        nb,
        data,
        strategy="relative",
        float_model=clean,
        batchnorms=BNS,
    )
    seq = recalibrate_batchnorm(nb, data, strategy="sequential", batchnorms=BNS)
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
    result = recalibrate_batchnorm(nb, data, strategy="train-mode", batchnorms=BNS)
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
    seq = recalibrate_batchnorm(nb, data, strategy="sequential", batchnorms=BNS)
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
    result = recalibrate_batchnorm(nb, data, strategy="one-pass", batchnorms=BNS)
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
        progress=events.append,
    )
    assert result.passes == 2
    assert {u.name: u.level for u in result.updates} == {"bn_a": 0, "bn_b": 0, "bn_c": 1}
    finished = [e for e in events if e.finished]
    assert [(e.pass_index, e.total_passes, e.batches) for e in finished] == [(1, 2, 4), (2, 2, 4)]
    # one at the start of each pass, one per batch, one per finished pass
    assert len(events) == 2 * (1 + 4 + 1)
    started = [e for e in events if e.batches == 0]
    assert [(e.pass_index, e.expected) for e in started] == [(1, None), (2, 4)]
    expected = _brute_sequential(nb, data, lambda bn, mu, var: (mu, var), ["bn_a", "bn_b", "bn_c"])
    _assert_stats(result, expected)


def test_default_selection_skips_bns_without_nbsmt_upstream() -> None:
    result = recalibrate_batchnorm(
        _chain(perturbed=True),
        image_batches(seed=30),
        strategy="sequential",
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
        )
    calls = iter([image_batches(seed=1), image_batches(seed=2, sizes=((1, 4), (2, 4)))] * 3)
    with pytest.raises(DataError, match="changed between passes"):
        recalibrate_batchnorm(
            nb,
            lambda: next(calls)(),
            strategy="sequential",
            batchnorms=BNS,
        )
    with pytest.raises(ConfigError, match="bound"):
        VarianceRatio(bound=0.5)


def test_default_relative_moves_the_mean_only() -> None:
    """Default (measured): relative transfers the mean shift, the variance is kept."""
    clean, nb = _chain(perturbed=False), _chain(perturbed=True)
    result = recalibrate_batchnorm(
        nb,
        image_batches(seed=32),
        strategy="relative",
        float_model=clean,
        batchnorms=BNS,
    )
    for u in result.updates:
        np.testing.assert_array_equal(u.new.var, u.old.var)
        assert u.mean_shift > 0


def test_variance_ratio_limits() -> None:
    two, amp = VarianceRatio(bound=4.0), VarianceRatio(bound=4.0, amplify_only=True)
    assert two.relative_limits() == two.correction_limits() == (0.25, 4.0)
    # relative: var' = var * (var_n / var_c) may only go down (BN then amplifies);
    # mean+var: a^2 = var_c / var_n may only go up
    assert amp.relative_limits() == (0.25, 1.0) and amp.correction_limits() == (1.0, 4.0)
    var_c, var_n = np.array([1.0, 1.0]), np.array([0.5, 2.0])
    np.testing.assert_allclose(
        amp(var_n, var_c, var_c, limits=amp.relative_limits()), [0.51 / 1.01, 1.0], rtol=1e-12
    )
    np.testing.assert_allclose(
        amp(var_c, var_n, var_c, limits=amp.correction_limits()), [1.01 / 0.51, 1.0], rtol=1e-12
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
