"""Recalibration with real NbSmt ops in ONNX Runtime (needs the library; FAILS without it).

Moved unchanged from tests/unit/test_recalibrate.py (unit tests need no
library); the strategies' library-free tests and the shared helpers stay there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnx
import pytest

from nbsmt_onnx.calibration.recalibrate import (
    VarianceRatio,
    correct_fused_layers,
    recalibrate_batchnorm,
)
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
    to_nbsmt,
)
from tests.unit.test_recalibrate import RTOL, _bn_nodes


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


class _Config:
    """Duck-typed stand-in for config.RecalibrationConfig (owned by the transform module)."""

    def __init__(self, strategy: str, correction: str, fold: bool, shrink: float = 2.0) -> None:
        self.strategy, self.correction, self.fold = strategy, correction, fold
        self.shrink = shrink


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


def test_transform_step_rebatches_into_one_batch_and_matches_streaming(
    nbsmt_library: str,
) -> None:
    """CalibrationData in batches of 4: the step re-batches it into one batch (2 passes),
    and the result equals the level-by-level streamed route (``auto_batch=False``)."""
    from nbsmt_onnx.calibration.data import model_inputs, open_calibration_data
    from nbsmt_onnx.calibration.recalibrate import recalibrate

    clean, nb = _nbsmt_pair(True, image_batches(seed=46))
    rng = np.random.default_rng(47)
    arrays = {"x": np.abs(rng.normal(size=(14, 3, 6, 6)) + 0.3).astype(np.float32)}
    data = open_calibration_data(arrays, model_inputs(clean), num_samples=14, batch_size=4, seed=0)
    # Without shrinkage the one-batch route is exact: equal to streaming level by level.
    # With it, the in-graph pass applies upstream shifts unshrunk while measuring the
    # downstream levels (docs/recalibration.md §8.1), so only level 0 stays equal.
    for shrink in (0.0, 2.0):
        config = _Config("relative", "mean", False, shrink)
        runs = {
            auto: recalibrate(
                float_model=clean, sim_model=nb, data=data, config=config, auto_batch=auto
            )
            for auto in (True, False)
        }
        auto, streamed = runs[True], runs[False]
        assert auto.batches is not None and auto.batches.one_batch and auto.batches.samples == 14
        assert "batches" in auto.report and "batches" not in streamed.report
        assert auto.batchnorm is not None and streamed.batchnorm is not None
        assert (auto.batchnorm.passes, streamed.batchnorm.passes) == (2, 3)
        for a, b in zip(auto.batchnorm.updates, streamed.batchnorm.updates, strict=True):
            assert a.name == b.name and a.level == b.level
            if shrink and a.level > 0:
                continue
            np.testing.assert_allclose(a.new.mean, b.new.mean, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(a.new.var, b.new.var, rtol=1e-12)
            if shrink:
                assert a.shrink is not None and b.shrink is not None
                np.testing.assert_allclose(a.shrink, b.shrink, rtol=1e-9, atol=1e-12)


def test_variance_bound_of_the_config_reaches_relative(nbsmt_library: str) -> None:
    """RecalibrationConfig.variance_bound r = relative_ratio=VarianceRatio(bound=r); 1 = mean only."""
    from nbsmt_onnx.calibration.recalibrate import DEFAULT_RELATIVE_RATIO, recalibrate
    from nbsmt_onnx.config import RecalibrationConfig

    assert RecalibrationConfig().variance_bound == DEFAULT_RELATIVE_RATIO.bound == 1.0
    data = image_batches(seed=48)
    clean, nb = _nbsmt_pair(True, data)

    def run(config: RecalibrationConfig, ratio: VarianceRatio | None = None):  # type: ignore[no-untyped-def]
        out = recalibrate(
            float_model=clean, sim_model=nb, data=data, config=config, relative_ratio=ratio
        )
        assert out.batchnorm is not None
        return {u.name: u for u in out.batchnorm.updates}

    mean_only = run(RecalibrationConfig(fold=False))
    bounded = run(RecalibrationConfig(fold=False, variance_bound=4.0))
    explicit = run(RecalibrationConfig(fold=False), VarianceRatio(bound=4.0))
    for name, u in mean_only.items():
        np.testing.assert_array_equal(u.new.var, u.old.var)  # bound 1: variances untouched
        np.testing.assert_array_equal(bounded[name].new.var, explicit[name].new.var)
        np.testing.assert_array_equal(bounded[name].new.mean, explicit[name].new.mean)
    assert any(not np.array_equal(bounded[n].new.var, u.old.var) for n, u in mean_only.items())
