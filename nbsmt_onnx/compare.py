"""Run a model (simulation, QDQ or float) on given inputs and compare it with a reference model.

The debugging loop users know from Polygraphy's ``run``: feed the same
samples to two models and see, per output, how far apart they are. The
simulation models need the NB-SMT library, which the session factory
registers, so this works where a generic runner cannot load them.

Outputs are collected through the executor (:class:`OutputCollector`) for a
small number of samples — the point is to look at them, not to score a data
set (that is ``evaluate``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from nbsmt_onnx.errors import UnsupportedModelError


@dataclass(frozen=True)
class OutputCollector:
    """Executor reducer: the named outputs of every batch, concatenated along the batch axis."""

    names: tuple[str, ...]

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.names

    def reduce(
        self, outputs: Sequence[np.ndarray], batch: Mapping[str, np.ndarray], first_sample: int
    ) -> dict[str, list[np.ndarray]]:
        return {n: [np.asarray(v)] for n, v in zip(self.names, outputs, strict=True)}

    def merge(
        self, left: dict[str, list[np.ndarray]], right: dict[str, list[np.ndarray]]
    ) -> dict[str, list[np.ndarray]]:
        return {n: left[n] + right[n] for n in self.names}


def concatenate(parts: Mapping[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """One array per output (batches joined on axis 0; a scalar output per batch is stacked)."""
    out = {}
    for name, arrays in parts.items():
        out[name] = np.stack(arrays) if arrays[0].ndim == 0 else np.concatenate(arrays, axis=0)
    return out


@dataclass(frozen=True)
class OutputComparison:
    """How far one output is from the reference's output of the same name (over all samples)."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    mean_abs_diff: float
    cosine: float | None
    sqnr_db: float | None
    #: fraction of samples with the same argmax, for [N, classes] outputs
    argmax_agreement: float | None

    def to_dict(self) -> dict[str, object]:
        return {
            "output": self.name,
            "shape": list(self.shape),
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff,
            "cosine": self.cosine,
            "sqnr_db": self.sqnr_db,
            "argmax_agreement": self.argmax_agreement,
        }


def compare_outputs(
    outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> list[OutputComparison]:
    """Compare every output present in both (same shapes required), in ``outputs`` order."""
    result = []
    for name, value in outputs.items():
        if name not in reference:
            continue
        ref = reference[name]
        if value.shape != ref.shape:
            raise UnsupportedModelError(
                f"output {name!r} has shape {list(value.shape)} but the reference's has "
                f"{list(ref.shape)}; compare models with the same outputs"
            )
        a, b = value.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
        diff = np.abs(a - b)
        signal, noise = float(np.sum(b * b)), float(np.sum((a - b) ** 2))
        norm = float(np.linalg.norm(a) * np.linalg.norm(b))
        agreement = None
        if value.ndim == 2 and value.shape[1] > 1:
            agreement = float(np.mean(np.argmax(value, axis=1) == np.argmax(ref, axis=1)))
        result.append(
            OutputComparison(
                name=name,
                shape=tuple(int(d) for d in value.shape),
                max_abs_diff=float(diff.max()) if diff.size else 0.0,
                mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
                cosine=float(np.dot(a, b) / norm) if norm > 0 else None,
                sqnr_db=(math.inf if noise == 0 else 10.0 * math.log10(signal / noise))
                if signal > 0
                else None,
                argmax_agreement=agreement,
            )
        )
    return result


def format_comparisons(comparisons: Sequence[OutputComparison]) -> str:
    """A small table: one line per output."""
    header = ["output", "shape", "max |diff|", "mean |diff|", "cosine", "SQNR dB", "argmax agree"]

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = [header] + [
        [
            c.name,
            "x".join(map(str, c.shape)),
            fmt(c.max_abs_diff, ".4g"),
            fmt(c.mean_abs_diff, ".4g"),
            fmt(c.cosine, ".6f"),
            fmt(c.sqnr_db, ".2f"),
            fmt(None if c.argmax_agreement is None else 100 * c.argmax_agreement, ".1f"),
        ]
        for c in comparisons
    ]
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in lines
    )
