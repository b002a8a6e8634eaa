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

from nbsmt_onnx.calibration.strategies import (
    CORRECTION_CHOICES,
    DEFAULT_CORRECTION,
    DEFAULT_STRATEGY,
    STRATEGY_CHOICES,
)
from nbsmt_onnx.errors import ConfigError
from nbsmt_onnx.metrics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, OUTPUT_KINDS
from nbsmt_onnx.ops import schema

RANGE_ESTIMATORS = ("max", "percentile")
EXPORT_CHOICES = ("sim", "qdq", "both")
#: QDQ integer typings (activations x weights; see nbsmt_onnx/graph/qdq.py), default first.
QDQ_TYPES_CHOICES = ("u8u8", "u8s8", "s8s8")
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
    """How activation ranges are estimated on the float model (docs/spec.md §2).

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


def _non_negative(option: str, value: object) -> None:
    """A finite number >= 0 (not a bool), else a ConfigError naming ``option``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value >= 0)
    ):
        raise ConfigError(f"{option} must be a finite number >= 0; got {value!r}")


@dataclass(frozen=True)
class RecalibrationConfig:
    """BatchNorm recalibration settings (docs/spec.md §4-§5).

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
    1 (default) transfers the mean shift only; 4 is the reference rule of
    docs/spec.md §4. Which is better depends on the model (docs/recalibration.md §7).

    ``shrink`` (K >= 0): each channel's mean correction d is multiplied by
    ``max(0, 1 - K**2 * SE**2 / d**2)``, SE the standard error of d from the
    per-sample paired differences (NB-SMT minus float on the same sample), so
    a shift within K standard errors of zero is not applied (0, the default:
    no shrinkage — measured to cost most of the gain on MobileNetV2 while the
    guard already keeps the output from getting worse; ``relative`` and the
    fused-layer correction; docs/recalibration.md §8.1).

    ``guard``: keep corrections only where they bring held-out outputs closer
    to the float model's (``calibration.guard``): ``guard_fraction`` of the
    calibration samples (seeded) are held out from estimation for that, unless
    the caller gives separate guard data; ``guard_blocks`` is how many
    contiguous blocks of corrections the prefixes are made of; the best prefix
    is kept only if it beats no correction by more than ``guard_margin``
    standard errors of the paired per-sample differences and makes none of
    the guard's check metrics (argmax disagreement, relative error, per-step
    KL / disagreement of sequence outputs) worse by more than
    ``guard_check_margin`` standard errors. When the guard keeps nothing and
    ``guard_retry_shrink`` (K) is above ``shrink``, recalibration is estimated
    once more with ``shrink=K`` and guarded again (0: no retry).
    """

    enabled: bool = True
    strategy: str = DEFAULT_STRATEGY
    fold: bool = True
    correction: str = DEFAULT_CORRECTION
    samples: int | None = None
    memory_mb: int = 4096
    variance_bound: float = 1.0
    shrink: float = 0.0
    guard: bool = True
    guard_fraction: float = 0.25
    guard_blocks: int = 8
    guard_margin: float = 2.0
    guard_check_margin: float = 1.0
    guard_retry_shrink: float = 2.0

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
        _non_negative("--shrink", self.shrink)
        fraction = self.guard_fraction
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not 0 < fraction < 1
        ):
            raise ConfigError(f"--guard-fraction must be between 0 and 1; got {fraction!r}")
        _non_negative("--guard-margin", self.guard_margin)
        _non_negative("--guard-check-margin", self.guard_check_margin)
        _non_negative("--guard-retry-shrink", self.guard_retry_shrink)
        if not _positive_int(self.guard_blocks):
            raise ConfigError(
                f"--guard-blocks must be a positive integer; got {self.guard_blocks!r}"
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


#: Row kinds: the float model, int8 (NB-SMT with T=1 = exact int8 GEMM), NB-SMT
#: at every swept setting, each optionally recalibrated.
ROW_KINDS = ("float32", "int8", "int8+recal", "nbsmt", "nbsmt+recal")
DEFAULT_ROWS = ("float32", "int8", "nbsmt", "nbsmt+recal")
REFERENCE_CHOICES = ("float32", "int8")
#: What the gate compares with its thresholds: the point estimate, or the
#: pessimistic end of its 95 % interval (docs/evaluate.md, "Pipeline gate").
GATE_BOUNDS = ("point", "pessimistic")


def _choices_tuple(name: str, value: object, choices: Sequence[Any]) -> tuple[Any, ...]:
    items = (value,) if isinstance(value, (str, int)) else tuple(value)  # type: ignore[arg-type]
    if not items:
        raise ConfigError(f"{name} must not be empty")
    for item in items:
        if item not in choices:
            valid = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{name} must contain only {valid}; got {item!r}")
    if len(set(items)) != len(items):
        raise ConfigError(f"{name} lists a value twice: {list(items)}")
    return items


def _optional_positive_int(name: str, value: object) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"{name} must be a positive integer; got {value!r}")


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything ``evaluate`` needs besides the model and the data; validated on construction.

    ``rows``: row kinds (:data:`ROW_KINDS`) in table order; None = :data:`DEFAULT_ROWS`,
    and then recalibrated rows that cannot be computed (random calibration data)
    are listed as unavailable instead of failing. ``threads`` x ``mappings`` x
    ``reduces`` is the NB-SMT sweep grid of the ``nbsmt`` / ``nbsmt+recal`` rows.
    ``transform``: calibration settings (samples, batch size, seed, ranges,
    selection, recalibration strategy / fold / correction); its threads,
    mapping, reduce, export and ``recalibration.enabled`` are set per row.
    ``eval_samples``: a seeded random subset (``eval_seed``) of the evaluation
    data, None = all. ``output``: the model output to score (default the
    first). ``output_kind``: how KL reads the output (:data:`metrics.OUTPUT_KINDS`).
    Gate: ``max_drop`` (percentage points of top-1 accuracy with labels, of
    top-1 agreement with the float model without, vs the ``reference`` row)
    and ``min_agreement`` (fraction) apply to the rows of kinds ``gate_rows``
    (None = the recalibrated NB-SMT rows if any, else the NB-SMT rows).
    ``gate_bound``: ``"point"`` compares the point estimates with the
    thresholds; ``"pessimistic"`` the upper end of the drop's paired 95 %
    interval and the lower end of the agreement's Wilson interval.
    ``bootstrap_resamples`` / ``bootstrap_seed``: the seeded paired bootstrap
    of the KL / cosine / SQNR intervals.
    ``layer_samples``: evaluation samples used for per-layer output SQNR vs int8
    (0 = off; memory grows with the batch's activations, not with this number).
    """

    rows: tuple[str, ...] | None = None
    threads: tuple[int, ...] = (2, 4)
    mappings: tuple[str, ...] = ("channel",)
    reduces: tuple[str, ...] = ("activations",)
    transform: TransformConfig = field(default_factory=TransformConfig)
    eval_samples: int | None = None
    eval_batch_size: int = 16
    eval_seed: int = 0
    output: str | None = None
    output_kind: str = "auto"
    reference: str = "float32"
    max_drop: float | None = None
    min_agreement: float | None = None
    gate_rows: tuple[str, ...] | None = None
    gate_bound: str = "point"
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES
    bootstrap_seed: int = BOOTSTRAP_SEED
    layer_samples: int = 256
    session_threads: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.rows is not None:
            rows = _choices_tuple("rows", self.rows, ROW_KINDS)
            if "float32" not in rows:
                raise ConfigError(
                    "rows must include 'float32' (the reference of every agreement metric)"
                )
            object.__setattr__(self, "rows", rows)
        object.__setattr__(
            self, "threads", _choices_tuple("threads", self.threads, schema.THREADS_CHOICES)
        )
        object.__setattr__(
            self, "mappings", _choices_tuple("mappings", self.mappings, schema.MAPPING_CHOICES)
        )
        object.__setattr__(
            self, "reduces", _choices_tuple("reduces", self.reduces, schema.REDUCE_CHOICES)
        )
        if not isinstance(self.transform, TransformConfig):
            raise ConfigError(f"transform must be a TransformConfig; got {self.transform!r}")
        _optional_positive_int("eval_samples", self.eval_samples)
        _optional_positive_int("eval_batch_size", self.eval_batch_size)
        if (
            not isinstance(self.eval_seed, int)
            or isinstance(self.eval_seed, bool)
            or self.eval_seed < 0
        ):
            raise ConfigError(f"eval_seed must be a non-negative integer; got {self.eval_seed!r}")
        if self.output_kind not in OUTPUT_KINDS:
            raise ConfigError(
                f"output_kind must be one of {', '.join(map(repr, OUTPUT_KINDS))}; got {self.output_kind!r}"
            )
        if self.reference not in REFERENCE_CHOICES:
            raise ConfigError(
                f"reference must be one of {', '.join(map(repr, REFERENCE_CHOICES))}; got {self.reference!r}"
            )
        if self.reference not in self.row_kinds:
            raise ConfigError(
                f"reference {self.reference!r} is not among the rows {list(self.row_kinds)}; add it"
            )
        if self.max_drop is not None and not (
            isinstance(self.max_drop, (int, float))
            and math.isfinite(self.max_drop)
            and self.max_drop >= 0
        ):
            raise ConfigError(f"max_drop must be a number of points >= 0; got {self.max_drop!r}")
        if self.min_agreement is not None and not (
            isinstance(self.min_agreement, (int, float)) and 0.0 <= self.min_agreement <= 1.0
        ):
            raise ConfigError(
                f"min_agreement must be a fraction in [0, 1] (e.g. 0.95); got {self.min_agreement!r}"
            )
        if self.gate_rows is not None:
            gate = _choices_tuple("gate_rows", self.gate_rows, ROW_KINDS)
            missing = [g for g in gate if g not in self.row_kinds]
            if missing:
                raise ConfigError(
                    f"gate_rows {missing} are not among the rows {list(self.row_kinds)}"
                )
            object.__setattr__(self, "gate_rows", gate)
        if self.gate_bound not in GATE_BOUNDS:
            raise ConfigError(
                f"gate_bound must be one of {', '.join(map(repr, GATE_BOUNDS))}; got {self.gate_bound!r}"
            )
        if (
            not isinstance(self.bootstrap_resamples, int)
            or isinstance(self.bootstrap_resamples, bool)
            or self.bootstrap_resamples < 100
        ):
            raise ConfigError(
                f"bootstrap_resamples must be an integer >= 100; got {self.bootstrap_resamples!r}"
            )
        if (
            not isinstance(self.bootstrap_seed, int)
            or isinstance(self.bootstrap_seed, bool)
            or self.bootstrap_seed < 0
        ):
            raise ConfigError(
                f"bootstrap_seed must be a non-negative integer; got {self.bootstrap_seed!r}"
            )
        if not isinstance(self.layer_samples, int) or self.layer_samples < 0:
            raise ConfigError(f"layer_samples must be an integer >= 0; got {self.layer_samples!r}")
        if not isinstance(self.session_threads, int) or self.session_threads < 0:
            raise ConfigError(
                f"session_threads must be an integer >= 0; got {self.session_threads!r}"
            )

    @property
    def row_kinds(self) -> tuple[str, ...]:
        return self.rows if self.rows is not None else DEFAULT_ROWS

    @property
    def gated_kinds(self) -> tuple[str, ...]:
        if self.gate_rows is not None:
            return self.gate_rows
        for kind in ("nbsmt+recal", "nbsmt"):
            if kind in self.row_kinds:
                return (kind,)
        return ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows"] = list(self.row_kinds)
        out["transform"] = self.transform.to_dict()
        out.pop("progress")
        return out
