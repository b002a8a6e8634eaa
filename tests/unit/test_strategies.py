"""The strategy registry is the one list of recalibration strategies and corrections.

The configuration and the command line offer exactly its user-facing entries;
every entry's rule has both halves (host and in-graph).
"""

from __future__ import annotations

import click
import numpy as np
import pytest

from nbsmt_onnx import config
from nbsmt_onnx.calibration.statistics import ChannelStatistics
from nbsmt_onnx.calibration.strategies import (
    CORRECTION_CHOICES,
    CORRECTIONS,
    STRATEGIES,
    STRATEGY_CHOICES,
    VarianceRatio,
    correction,
    strategy,
)
from nbsmt_onnx.cli import main
from nbsmt_onnx.errors import ConfigError
from nbsmt_onnx.graph.bn import BatchNormStatistics


def _choices(command: str, option: str) -> list[str]:
    cmd = main.commands[command]
    assert isinstance(cmd, click.Command)
    param = next(p for p in cmd.params if p.name == option)
    assert isinstance(param.type, click.Choice)
    return list(param.type.choices)


def test_config_and_cli_offer_the_registry_entries() -> None:
    assert STRATEGY_CHOICES == tuple(n for n, s in STRATEGIES.items() if s.choice)
    assert "one-pass" in STRATEGIES and "one-pass" not in STRATEGY_CHOICES
    assert CORRECTION_CHOICES == ("none", *CORRECTIONS)
    for name in STRATEGY_CHOICES:
        assert config.RecalibrationConfig(strategy=name).strategy == name
    with pytest.raises(ConfigError, match="strategy must be one of"):
        config.RecalibrationConfig(strategy="one-pass")
    for command in ("transform", "evaluate"):
        assert _choices(command, "strategy") == list(STRATEGY_CHOICES)
        assert _choices(command, "correction") == list(CORRECTION_CHOICES)


def test_unknown_names_list_the_registry() -> None:
    with pytest.raises(ConfigError, match="train-mode, sequential, relative, one-pass"):
        strategy("magic")
    with pytest.raises(ConfigError, match="mean, mean\\+var"):
        correction("magic")


def test_every_rule_has_a_host_and_an_in_graph_half() -> None:
    measured = ChannelStatistics.from_moments(10, np.array([1.0, 2.0]), np.array([20.0, 40.0]))
    clean = ChannelStatistics.from_moments(10, np.array([0.5, 2.5]), np.array([10.0, 40.0]))
    old = BatchNormStatistics(np.array([0.1, 0.2]), np.array([1.0, 3.0]))
    ratio = VarianceRatio(bound=4.0)
    for entry in STRATEGIES.values():
        new = entry.rule.new_statistics(old, measured, clean, ratio, 1e-5)
        assert new.mean.shape == new.var.shape == (2,)
        form = entry.rule.batch_form(old, clean, ratio, 1e-5)
        assert (form is None) == (not entry.needs_clean)
    relative = STRATEGIES["relative"].rule.new_statistics(old, measured, clean, ratio, 1e-5)
    np.testing.assert_allclose(relative.mean, old.mean + (measured.mean - clean.mean))
    for rule in CORRECTIONS.values():
        affine = rule.affine(measured, clean, ratio)
        assert affine.scale.shape == affine.shift.shape == (2,)
        assert rule.batch_form(clean, ratio).scale == rule.scale
