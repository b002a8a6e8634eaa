"""The transform report checks the QDQ model the way it is deployed (ORT's default optimisations)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import transform_models as tm
from onnx import helper

from nbsmt_onnx import TransformConfig, transform


@pytest.fixture(autouse=True)
def _library(nbsmt_library: str) -> str:
    return nbsmt_library


def _vnni() -> bool:
    """uint8 x int8 is exact (vpdpbusd) on CPUs with VNNI; without it vpmaddubsw saturates."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _saturating_mlp() -> tuple:  # type: ignore[type-arg]
    """Two MatMuls without bias (fused into QGemm / MatMulIntegerToFloat), large weights."""
    r = np.random.default_rng(0)
    w0 = (r.choice([-1.0, 1.0], (64, 48)) * r.uniform(0.6, 1.0, (64, 48))).astype(np.float32)
    w1 = (r.choice([-1.0, 1.0], (48, 10)) * r.uniform(0.6, 1.0, (48, 10))).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"], name="fc0"),
        helper.make_node("Relu", ["h0"], ["a0"], name="relu0"),
        helper.make_node("MatMul", ["a0", "w1"], ["y"], name="fc1"),
    ]
    model = tm.make_model(
        nodes, [tm.value("x", ["N", 64])], [tm.value("y", ["N", 10])], {"w0": w0, "w1": w1}
    )
    return model, r.uniform(0, 1, (64, 64)).astype(np.float32)


@pytest.mark.parametrize("qdq_types", ["u8u8", "u8s8"])
def test_report_checks_the_deployed_qdq_model(qdq_types: str) -> None:
    model, x = _saturating_mlp()
    config = TransformConfig(threads=1, num_samples=64, batch_size=64, export="both",
                             qdq_types=qdq_types)  # fmt: skip
    result = transform(model, {"x": x}, config)
    exports = result.report["exports"]
    fused = exports["qdq_vs_threads1_simulation_ort_defaults"]["y"]["relative_to_peak"]
    off = exports["qdq_vs_threads1_simulation"]["y"]["relative_to_peak"]
    assert off < 1e-5  # float32 rounding only (see tests/unit/test_qdq.py)
    warned = any("default optimisations" in w for w in result.warnings)
    if qdq_types == "u8u8" or _vnni():
        # Exact integer kernels; what is left is requantization rounding (one step where a
        # value is on a .5 boundary): far below the 1e-2 warning threshold.
        assert fused < 1e-2 and not warned, (fused, result.warnings)
    else:
        # uint8 x int8 on AVX2 without VNNI: int16 saturation, reported and warned about.
        assert fused > 1e-2 and warned, (fused, result.warnings)
        assert any("--qdq-types u8u8" in w for w in result.warnings)
