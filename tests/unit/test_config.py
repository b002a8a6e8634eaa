"""Settings are validated when built; invalid values name the valid choices."""

from __future__ import annotations

import dataclasses

import pytest

from nbsmt_onnx.config import (
    ImagePreprocessing,
    RangeConfig,
    RecalibrationConfig,
    Selection,
    TransformConfig,
)
from nbsmt_onnx.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threads": 3}, "threads must be one of 1, 2, 4; got 3"),
        ({"mapping": "rows"}, "mapping must be one of 'channel', 'interleave'; got 'rows'"),
        ({"reduce": "both"}, "reduce must be one of 'activations', 'weights'"),
        ({"export": "tflite"}, "export must be one of 'sim', 'qdq', 'both'"),
        ({"num_samples": 0}, "num_samples must be a positive integer"),
        ({"batch_size": True}, "batch_size must be a positive integer"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"ranges": "max"}, "ranges must be a RangeConfig"),
    ],
)
def test_transform_config_rejects(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TransformConfig(**kwargs)  # type: ignore[arg-type]


def test_unknown_option_cannot_be_passed_and_config_is_frozen() -> None:
    with pytest.raises(TypeError):
        TransformConfig(thread=2)  # type: ignore[call-arg]
    cfg = TransformConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.threads = 4  # type: ignore[misc]


def test_defaults_and_dict() -> None:
    cfg = TransformConfig()
    assert (cfg.threads, cfg.mapping, cfg.reduce, cfg.export) == (
        2,
        "channel",
        "activations",
        "sim",
    )
    # recalibration on by default with the measured choices (docs/recalibration.md)
    rc = cfg.recalibration
    assert (rc.enabled, rc.strategy, rc.correction, rc.fold) == (True, "relative", "mean", True)
    d = cfg.to_dict()
    assert d["ranges"]["estimator"] == "max" and "progress" not in d
    assert cfg.smt_attributes(True).act_signed == 1


def test_range_and_recalibration_choices() -> None:
    with pytest.raises(ConfigError, match="range estimator must be one of 'max', 'percentile'"):
        RangeConfig(estimator="mse")
    with pytest.raises(ConfigError, match="percentile must be in"):
        RangeConfig(estimator="percentile", percentile=20)
    with pytest.raises(
        ConfigError, match="strategy must be one of 'train-mode', 'sequential', 'relative'"
    ):
        RecalibrationConfig(strategy="eval")
    with pytest.raises(ConfigError, match="correction must be one of"):
        RecalibrationConfig(correction="var")


def test_selection_rules() -> None:
    sel = Selection(include_regex=("conv.*",), exclude_names=("conv2",))
    assert sel.exclusion_reason("conv1", "Conv") is None
    assert "in --exclude" in (sel.exclusion_reason("conv2", "Conv") or "")
    assert "no --include rule" in (sel.exclusion_reason("fc", "Gemm") or "")
    assert Selection(exclude_names="fc").exclude_names == ("fc",)  # one string is one name
    with pytest.raises(ConfigError, match="invalid regular expression"):
        Selection(exclude_regex=("conv[",))
    with pytest.raises(
        ConfigError, match="exclude_op_types must be one of 'Conv', 'MatMul', 'Gemm'"
    ):
        Selection(exclude_op_types=("Relu",))


def test_image_preprocessing() -> None:
    assert ImagePreprocessing(resize=256).resize == (256,)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="resize must be N or"):
        ImagePreprocessing(resize=(1, 2, 3))
    with pytest.raises(ConfigError, match="std must not contain zero"):
        ImagePreprocessing(std=(1.0, 0.0, 1.0))
    with pytest.raises(ConfigError, match="mean must have 1 or 3 values"):
        ImagePreprocessing(mean=(0.1, 0.2))
    with pytest.raises(ConfigError, match="layout must be one of 'NCHW', 'NHWC'"):
        ImagePreprocessing(layout="CHW")


@pytest.mark.parametrize("bound", [0.5, float("nan"), float("inf"), True, "4"])
def test_variance_bound_must_be_a_finite_number_from_1(bound: object) -> None:
    with pytest.raises(ConfigError, match="variance_bound must be a finite number >= 1"):
        RecalibrationConfig(variance_bound=bound)  # type: ignore[arg-type]
    assert RecalibrationConfig(variance_bound=4).variance_bound == 4
