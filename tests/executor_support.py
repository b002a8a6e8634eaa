"""Reducers and a model for the executor tests (local and Ray), built here, no files.

The reducers are module-level classes so that Ray can pickle them; the Ray
tests register this module to be pickled by value, since workers do not have
``tests`` on their import path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from transform_models import conv_relu_gemm, make_model, value

from nbsmt_onnx.calibration.statistics import ChannelStatistics


def float_model(seed: int = 0) -> onnx.ModelProto:
    """``conv_relu_gemm`` with its first conv's output also exposed (a probed tensor)."""
    model = conv_relu_gemm(seed)  # 4 channels of 8x8
    model.graph.output.append(value("c1", ["N", 4, 8, 8]))
    return model


def identity_model() -> onnx.ModelProto:
    """y = x, so reducers see exactly the data the executor fed."""
    node = helper.make_node("Identity", ["x"], ["y"], name="id")
    return make_model([node], [value("x", ["N", 3, 8, 8])], [value("y", ["N", 3, 8, 8])])


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of one output (channel axis 1), merged with Chan's formula."""

    output: str

    @property
    def outputs(self) -> Sequence[str]:
        return (self.output,)

    def reduce(
        self, outputs: Sequence[np.ndarray], batch: dict[str, np.ndarray], first_sample: int
    ) -> ChannelStatistics:
        return ChannelStatistics.from_array(outputs[0], channel_axis=1)

    def merge(self, left: ChannelStatistics, right: ChannelStatistics) -> ChannelStatistics:
        return left.merge(right)


@dataclass(frozen=True)
class MinMax:
    """Min and max of one output."""

    output: str

    @property
    def outputs(self) -> Sequence[str]:
        return (self.output,)

    def reduce(
        self, outputs: Sequence[np.ndarray], batch: dict[str, np.ndarray], first_sample: int
    ) -> tuple[float, float]:
        return float(outputs[0].min()), float(outputs[0].max())

    def merge(self, left: tuple[float, float], right: tuple[float, float]) -> tuple[float, float]:
        return min(left[0], right[0]), max(left[1], right[1])


@dataclass(frozen=True)
class Trace:
    """Which samples each batch held, where and when: (first_sample, size, pid, start, end)."""

    output: str
    sleep: float = 0.0

    @property
    def outputs(self) -> Sequence[str]:
        return (self.output,)

    def reduce(
        self, outputs: Sequence[np.ndarray], batch: dict[str, np.ndarray], first_sample: int
    ) -> list[tuple[int, int, int, float, float]]:
        start = time.time()
        time.sleep(self.sleep)
        return [(first_sample, int(outputs[0].shape[0]), os.getpid(), start, time.time())]

    def merge(self, left: list, right: list) -> list:  # type: ignore[type-arg]
        return left + right


@dataclass(frozen=True)
class CrashOnce(ChannelStats):
    """Like ChannelStats, but the worker process dies the first time it reaches ``at_sample``.

    ``marker`` is a file that records the crash, so the retried shard succeeds.
    """

    marker: str = ""
    at_sample: int = 0

    def reduce(
        self, outputs: Sequence[np.ndarray], batch: dict[str, np.ndarray], first_sample: int
    ) -> ChannelStatistics:
        size = int(outputs[0].shape[0])
        if first_sample <= self.at_sample < first_sample + size and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(17)  # a lost worker: no exception, no cleanup
        return super().reduce(outputs, batch, first_sample)


def same_statistics(a: ChannelStatistics, b: ChannelStatistics) -> bool:
    """Bit-identical statistics (the executor merges in one fixed order everywhere)."""
    return all(
        np.array_equal(x, y) for x, y in ((a.count, b.count), (a.mean, b.mean), (a.m2, b.m2))
    )
