"""Settings of ``transform`` and friends: frozen dataclasses validated on construction.

An unknown option cannot be passed (dataclasses reject unknown keywords) and an
invalid value fails when the object is built, with a ``ConfigError`` that lists
the valid choices. Nothing downstream re-validates.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from nbsmt_onnx.errors import ConfigError
from nbsmt_onnx.ops import schema

RANGE_ESTIMATORS = ("max", "percentile")
EXPORT_CHOICES = ("sim", "qdq", "both")
#: QDQ integer typings (activations x weights; see nbsmt_onnx/graph/qdq.py), default first.
QDQ_TYPES_CHOICES = ("u8u8", "u8s8", "s8s8")
STRATEGY_CHOICES = ("train-mode", "sequential", "relative")
CORRECTION_CHOICES = ("none", "mean", "mean+var")
LAYOUT_CHOICES = ("NCHW", "NHWC")
CHANNEL_ORDER_CHOICES = ("RGB", "BGR")

#: Op types the rewrite pass can turn into NB-SMT ops (used to validate selections).
REWRITABLE_OP_TYPES = ("Conv", "MatMul", "Gemm")


def _choice(name: str, value: object, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{name} must be one of {valid}; got {value!r}")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _tuple_of_str(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(cast(Iterable[Any], value))
    except TypeError:
        raise ConfigError(f"{name} must be a list of strings; got {value!r}") from None
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{name} must be a list of strings; got item {item!r}")
    return items


@dataclass(frozen=True)
class Selection:
    """Which candidate nodes the rewrite pass may touch.

    A candidate is rewritten when it matches the include rules (no include
    rule = everything matches) and no exclude rule. ``names`` match node names
    exactly, ``regex`` with ``re.fullmatch`` on node names, ``op_types`` on the
    ONNX op type (Conv, MatMul, Gemm). ``keep_first`` / ``keep_last`` keep the
    first / last NB-SMT layer(s) in float (see docs/transform.md: a candidate
    is "first" when no other candidate is upstream of it and "last" when no
    other candidate is downstream).
    """

    include_names: tuple[str, ...] = ()
    include_regex: tuple[str, ...] = ()
    include_op_types: tuple[str, ...] = ()
    exclude_names: tuple[str, ...] = ()
    exclude_regex: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    keep_first: bool = False
    keep_last: bool = False

    def __post_init__(self) -> None:
        for attr in (
            "include_names",
            "include_regex",
            "include_op_types",
            "exclude_names",
            "exclude_regex",
            "exclude_op_types",
        ):
            object.__setattr__(self, attr, _tuple_of_str(attr, getattr(self, attr)))
        for attr in ("include_regex", "exclude_regex"):
            for pattern in getattr(self, attr):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ConfigError(
                        f"{attr}: invalid regular expression {pattern!r}: {err}"
                    ) from None
        for attr in ("include_op_types", "exclude_op_types"):
            for op_type in getattr(self, attr):
                _choice(attr, op_type, REWRITABLE_OP_TYPES)

    @property
    def has_include_rules(self) -> bool:
        return bool(self.include_names or self.include_regex or self.include_op_types)

    def exclusion_reason(self, node_name: str, op_type: str) -> str | None:
        """Why the user's rules exclude this node, or None if it is selected."""
        if self.has_include_rules:
            included = (
                node_name in self.include_names
                or op_type in self.include_op_types
                or any(re.fullmatch(p, node_name) for p in self.include_regex)
            )
            if not included:
                return "excluded by the user: matches no --include rule"
        if node_name in self.exclude_names:
            return f"excluded by the user: name {node_name!r} in --exclude"
        if op_type in self.exclude_op_types:
            return f"excluded by the user: op type {op_type} in --exclude-op-type"
        for pattern in self.exclude_regex:
            if re.fullmatch(pattern, node_name):
                return f"excluded by the user: name matches --exclude-regex {pattern!r}"
        return None


@dataclass(frozen=True)
class RangeConfig:
    """How activation ranges are estimated on the float model (SPEC §2).

    ``max``: the exact minimum/maximum over all calibration samples.
    ``percentile``: the ``percentile``-th percentile of the values (and the
    ``100 - percentile``-th for the lower end of signed tensors), estimated from
    a fixed-size histogram of ``bins`` bins spanning the exact min/max, so
    memory does not depend on the number of samples.
    """

    estimator: str = "max"
    percentile: float = 99.99
    bins: int = 4096

    def __post_init__(self) -> None:
        _choice("range estimator", self.estimator, RANGE_ESTIMATORS)
        if not (50.0 < float(self.percentile) <= 100.0):
            raise ConfigError(f"percentile must be in (50, 100]; got {self.percentile!r}")
        if not (isinstance(self.bins, int) and 16 <= self.bins <= 1 << 20):
            raise ConfigError(f"bins must be an integer in [16, 1048576]; got {self.bins!r}")


@dataclass(frozen=True)
class RecalibrationConfig:
    """BatchNorm recalibration settings (SPEC §4-§5, issue 3).

    On by default. ``strategy`` (models with BN) and ``correction`` (layers
    without a BN after them, e.g. BN-fused models) default to what measured
    best on real models (docs/recalibration.md, "Measured").

    ``samples`` / ``memory_mb``: ``sequential``, ``relative`` and the
    correction are exact in two passes when their data is one batch, and need
    one pass per BN level otherwise. So they re-batch the calibration samples
    into one batch when its activations fit in ``memory_mb`` (estimated from
    the graph, ``graph.memory``). ``samples=None`` uses as many calibration
    samples as fit (all of them when they do); a number uses that many,
    streamed in batches of what fits when one batch would not.
    ``train-mode`` keeps the calibration batch size: it is part of the method.

    ``variance_bound`` (r >= 1): what ``relative`` transfers besides the mean
    shift — the per-channel NB-SMT/clean variance ratio, clipped to [1/r, r].
    1 (default) transfers the mean shift only; 4 is SPEC §4's rule. Which is
    better depends on the model (docs/recalibration.md §7).
    """

    enabled: bool = True
    strategy: str = "relative"
    fold: bool = True
    correction: str = "mean"
    samples: int | None = None
    memory_mb: int = 4096
    variance_bound: float = 1.0

    def __post_init__(self) -> None:
        _choice("strategy", self.strategy, STRATEGY_CHOICES)
        bound = self.variance_bound
        if (
            isinstance(bound, bool)
            or not isinstance(bound, (int, float))
            or not (math.isfinite(bound) and bound >= 1)
        ):
            raise ConfigError(
                f"recalibration variance_bound must be a finite number >= 1; got {bound!r}"
            )
        _choice("correction", self.correction, CORRECTION_CHOICES)
        if self.samples is not None and not _positive_int(self.samples):
            raise ConfigError(
                f"recalibration samples must be a positive integer; got {self.samples!r}"
            )
        if not _positive_int(self.memory_mb):
            raise ConfigError(
                f"recalibration memory_mb must be a positive integer; got {self.memory_mb!r}"
            )


@dataclass(frozen=True)
class ThreadRule:
    """One entry of a per-layer assignment: a node name or a regular expression, and T."""

    key: str
    threads: int

    def __post_init__(self) -> None:
        if isinstance(self.threads, bool) or self.threads not in schema.THREADS_CHOICES:
            raise ConfigError(
                f"layer threads for {self.key!r} must be one of "
                f"{', '.join(map(str, schema.THREADS_CHOICES))}; got {self.threads!r}"
            )
        try:
            re.compile(self.key)
        except re.error as err:
            raise ConfigError(
                f"layer-threads key {self.key!r} is neither a node name nor a valid regular "
                f"expression ({err})"
            ) from err


@dataclass(frozen=True)
class LayerThreads:
    """A per-layer thread assignment (empty: every layer takes the default).

    Keys are node names or regular expressions that must match a whole node
    name; the rules are in ``graph.threads`` (docs/transform.md).
    """

    rules: tuple[ThreadRule, ...] = ()

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> LayerThreads:
        if not isinstance(mapping, Mapping):
            raise ConfigError(
                f"layer threads must map node names or regular expressions to 1, 2 or 4; "
                f"got {type(mapping).__name__}"
            )
        return cls(tuple(ThreadRule(str(k), v) for k, v in mapping.items()))

    @classmethod
    def load(cls, path: str | Path) -> LayerThreads:
        """Read ``{"node or regex": threads, ...}`` from a JSON file."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read --layer-threads file {p}: {err.strerror}") from err
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"--layer-threads file {p} is not JSON ({err.msg} at line {err.lineno}); "
                'write an object like {"conv1": 1, "block[0-9]+/.*": 4}'
            ) from err
        if not isinstance(data, dict):
            raise ConfigError(
                f"--layer-threads file {p} must hold a JSON object of node name or regular "
                'expression -> threads, e.g. {"conv1": 1}'
            )
        return cls.from_mapping(data)

    def to_dict(self) -> dict[str, int]:
        return {r.key: r.threads for r in self.rules}

    def resolve(self, names: Sequence[str], default: int) -> dict[str, int]:
        """Threads of every node in ``names``; raises for a rule that matches none of them."""
        if default not in schema.THREADS_CHOICES:
            raise ConfigError(f"threads must be one of {schema.THREADS_CHOICES}; got {default!r}")
        out = {n: default for n in names}
        by_name = {r.key: r.threads for r in self.rules if r.key in out}
        patterns = [(re.compile(r.key), r) for r in self.rules if r.key not in out]
        used: set[str] = set(by_name)
        for name in names:
            if name in by_name:
                out[name] = by_name[name]
                continue
            for pattern, rule in patterns:
                if pattern.fullmatch(name):
                    out[name] = rule.threads
                    used.add(rule.key)
                    break
        unused = [r.key for r in self.rules if r.key not in used]
        if unused:
            shown = ", ".join(sorted(names)[:8]) + (" ..." if len(names) > 8 else "")
            raise ConfigError(
                f"layer-threads key(s) {', '.join(map(repr, unused))} match no NB-SMT layer; "
                f"the layers are: {shown} (keys are node names or full-match regular expressions)"
            )
        return out


@dataclass(frozen=True)
class TransformConfig:
    """Everything ``nbsmt_onnx.transform`` needs besides the model and the data."""

    threads: int = 2
    mapping: str = "channel"
    reduce: str = "activations"
    num_samples: int = 512
    batch_size: int = 16
    seed: int = 0
    ranges: RangeConfig = field(default_factory=RangeConfig)
    selection: Selection = field(default_factory=Selection)
    export: str = "sim"
    recalibration: RecalibrationConfig = field(default_factory=RecalibrationConfig)
    layer_threads: LayerThreads = field(default_factory=LayerThreads)
    collect_stats: bool = True
    progress: bool = False
    # How the QDQ export types its integers (graph.qdq.REPRESENTATIONS; same integers and
    # scales in all): "u8u8" is exact in ONNX Runtime's fused integer kernels on every x86 ISA.
    qdq_types: str = "u8u8"

    def __post_init__(self) -> None:
        _choice("threads", self.threads, schema.THREADS_CHOICES)
        _choice("qdq_types", self.qdq_types, QDQ_TYPES_CHOICES)
        _choice("mapping", self.mapping, schema.MAPPING_CHOICES)
        _choice("reduce", self.reduce, schema.REDUCE_CHOICES)
        _choice("export", self.export, EXPORT_CHOICES)
        for name in ("num_samples", "batch_size"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise ConfigError(f"{name} must be a positive integer; got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer; got {self.seed!r}")
        for name, cls in (
            ("ranges", RangeConfig),
            ("selection", Selection),
            ("recalibration", RecalibrationConfig),
            ("layer_threads", LayerThreads),
        ):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name} must be a {cls.__name__}; got {getattr(self, name)!r}")

    @property
    def exports_qdq(self) -> bool:
        return self.export in ("qdq", "both")

    @property
    def exports_sim(self) -> bool:
        return self.export in ("sim", "both")

    def smt_attributes(self, act_signed: bool) -> schema.SmtAttributes:
        return schema.SmtAttributes(
            threads=self.threads,
            mapping=self.mapping,
            reduce=self.reduce,
            act_signed=int(act_signed),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable settings (for the report and model metadata)."""
        out = asdict(self)
        out.pop("progress")
        return out


@dataclass(frozen=True)
class ImagePreprocessing:
    """How a folder of images becomes model input (only used for image folders).

    Steps, in order: decode (to RGB, or grayscale when the model has one
    channel), resize (``resize``: shorter side to N, or exact ``(H, W)``),
    center crop (``crop``: N or ``(H, W)``), divide by ``scale``, subtract
    ``mean`` and divide by ``std`` (per channel, in RGB order), reorder the
    channels (``channel_order``) and lay out as ``layout`` (batch axis added).
    """

    resize: tuple[int, ...] | None = None
    crop: tuple[int, ...] | None = None
    scale: float = 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, int):
                value = (value,)
            value = tuple(value)
            if len(value) not in (1, 2) or any(not isinstance(v, int) or v < 1 for v in value):
                raise ConfigError(
                    f"{name} must be N or (H, W) with positive integers; got {value!r}"
                )
            object.__setattr__(self, name, value)
        _choice("layout", self.layout, LAYOUT_CHOICES)
        _choice("channel order", self.channel_order, CHANNEL_ORDER_CHOICES)
        if not self.scale > 0:
            raise ConfigError(f"pixel scale must be positive; got {self.scale!r}")
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) not in (1, 3):
                raise ConfigError(f"{name} must have 1 or 3 values; got {value!r}")
            object.__setattr__(self, name, value)
        if any(s == 0 for s in self.std):
            raise ConfigError(f"std must not contain zero; got {self.std!r}")


@dataclass(frozen=True)
class DataLayout:
    """How each model input is laid out in the calibration data (default: samples along axis 0).

    ``batch_axes``: input name -> the axis that holds the samples (e.g. 1 for a
    recurrent state ``[layers, N, hidden]``); batches are stacked along it.
    ``constants``: input name -> ``None`` (the array in the data, with the
    input's exact shape, is fed unchanged with every batch) or the path of an
    ``.npy`` file holding that array. Scalar inputs are always constant, and
    an array whose shape is the input's exact (static) shape is taken as
    constant when the inputs would otherwise disagree on the sample count.
    Mappings are accepted and stored as sorted tuples (the object stays hashable).
    """

    batch_axes: tuple[tuple[str, int], ...] = ()
    constants: tuple[tuple[str, str | None], ...] = ()

    def __post_init__(self) -> None:
        axes = dict(
            self.batch_axes.items() if isinstance(self.batch_axes, dict) else self.batch_axes
        )
        consts = dict(
            self.constants.items() if isinstance(self.constants, dict) else self.constants
        )
        for name, axis in axes.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(
                    f"batch axis: input names must be non-empty strings; got {name!r}"
                )
            if isinstance(axis, bool) or not isinstance(axis, int) or axis < 0:
                raise ConfigError(
                    f"batch axis of input {name!r} must be a non-negative integer; got {axis!r}"
                )
        for name, path in consts.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"constant: input names must be non-empty strings; got {name!r}")
            if path is not None and not isinstance(path, str):
                path = str(path)
                consts[name] = path
        both = sorted(set(axes) & set(consts))
        if both:
            raise ConfigError(
                f"input(s) {', '.join(both)} are declared both constant and with a batch axis; "
                "choose one"
            )
        object.__setattr__(self, "batch_axes", tuple(sorted(axes.items())))
        object.__setattr__(self, "constants", tuple(sorted(consts.items())))

    @property
    def is_default(self) -> bool:
        return not self.batch_axes and not self.constants
