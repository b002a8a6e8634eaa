"""Per-layer threads under an accuracy budget: which layers can run at T = 2 or 4, and what it buys.

``search(model, calib, data, config)`` answers a hardware researcher's
question for one model:

1. **Base.** The model is transformed once at the lowest thread choice
   (normally T = 1, i.e. exact int8) without recalibration: this fixes the
   activation ranges every candidate reuses and each layer's MACs per sample.
   The reference metric is the float model's or that int8 model's
   (``reference``); the metric is top-1 (with labels) or argmax agreement with
   the float model, in percent, on the search data.
2. **Sensitivity.** For every layer and every higher choice, the model with
   that layer alone moved up is built as ``transform`` builds it (recalibrated
   under that assignment unless ``sensitivity_recalibration=False``) and
   scored: its loss is the metric of the base minus its metric, in points
   (relative to the base, not to the reference, so a float32 reference above
   the int8 base does not charge the base's own drop to every layer).
3. **Order.** Moves are sorted by loss per cycle saved
   (``loss / (MACs_l * (1/T_old - 1/T_new))``, smallest first; a layer's moves
   are taken in increasing T). Applying them one after another gives a chain of
   nested assignments of growing speed-up; the predicted drop of each is the
   base's drop to the reference plus the sum of its layers' sensitivities
   (additivity is the assumption, and is not trusted: step 4 measures).
4. **Verification.** The longest prefix of the chain whose predicted loss is
   within the budget is built and scored for real. If it misses the budget,
   the search backs off by bisection along the chain (each step a real
   evaluation) to the longest prefix that meets it. Every verified assignment
   is kept: together with uniform T = 2 and T = 4 they form the Pareto table.

Searching the same model and data under several budgets: pass the first
result as ``reuse``. The base, the float and int8 predictions, the
sensitivities and every candidate already built and scored are taken from it
(the chain depends on the sensitivities only, so it is the same chain), and
only assignments the earlier search never built cost a transform and an
evaluation. ``model_evaluations`` counts the evaluations of this call,
``reused_evaluations`` those taken over.

The result holds the accepted assignment's transform (the model to deploy,
recalibrated under that assignment), every layer's MACs, threads and
sensitivity, and each verified assignment's speed-up and measured metric with
its 95 % interval and the paired interval of its drop. When no assignment
above the base meets the budget, every layer stays at the lowest choice (the
int8 reference itself: that model is returned) and ``exit_code`` is 3.

Greedy by loss per cycle is the knapsack heuristic for this problem (items =
layer moves, weight = loss, value = cycles saved); with additive losses it is
within one item of the optimum, and the verification step catches where
additivity fails. Candidate scoring runs through the executor, so a Ray
executor spreads it over workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from nbsmt_onnx._version import __version__
from nbsmt_onnx.api import TransformResult, prepare_for_transform, transform
from nbsmt_onnx.calibration.data import Feed
from nbsmt_onnx.config import (
    DataLayout,
    ImagePreprocessing,
    LayerThreads,
    RecalibrationConfig,
    TransformConfig,
)
from nbsmt_onnx.errors import EXIT_OK, EXIT_THRESHOLD, ConfigError, DataError
from nbsmt_onnx.evaluate import EvaluateConfig, open_evaluation
from nbsmt_onnx.graph.threads import LayerMacs, assign_threads, speedup
from nbsmt_onnx.html_report import SEARCH_FORMAT as SEARCH_REPORT_FORMAT
from nbsmt_onnx.metrics import (
    Interval,
    PairedDifference,
    as_classification,
    paired_proportion_difference,
    wilson_interval,
)
from nbsmt_onnx.ops import schema
from nbsmt_onnx.progress import Progress
from nbsmt_onnx.report import write_report
from nbsmt_onnx.runtime.executor import Executor, Job, LocalExecutor
from nbsmt_onnx.runtime.session import SessionOptions

log = logging.getLogger(__name__)

METRICS = ("agreement", "top1")
REFERENCES = ("int8", "float32")
BOUNDS = ("point", "pessimistic")


@dataclass(frozen=True)
class SearchConfig:
    """What to search and under which budget.

    ``max_drop``: the budget, in points of ``metric`` below the ``reference``
    (``int8``: the base model at the lowest choice; ``float32``). ``bound``:
    compare the point estimate of the drop (default) or the upper end of its
    95 % paired interval with the budget. ``transform`` carries everything else
    the candidates are built with (mapping, reduce, recalibration, data
    sampling); its ``threads`` / ``layer_threads`` are what the search sets.
    """

    max_drop: float = 1.0
    metric: str = "agreement"
    reference: str = "int8"
    choices: tuple[int, ...] = (1, 2, 4)
    bound: str = "point"
    sensitivity_recalibration: bool = True
    transform: TransformConfig = field(default_factory=TransformConfig)
    eval_samples: int | None = None
    eval_batch_size: int = 32
    eval_seed: int = 0
    output: str | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.max_drop, (int, float)) and self.max_drop >= 0):
            raise ConfigError(f"--max-drop must be a number >= 0 (points); got {self.max_drop!r}")
        for name, value, choices in (
            ("--metric", self.metric, METRICS),
            ("--reference", self.reference, REFERENCES),
            ("--bound", self.bound, BOUNDS),
        ):
            if value not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        picked = tuple(sorted(set(self.choices)))
        if len(picked) < 2 or any(c not in schema.THREADS_CHOICES for c in picked):
            raise ConfigError(
                f"--choices needs at least two of {', '.join(map(str, schema.THREADS_CHOICES))}; "
                f"got {', '.join(map(str, self.choices)) or 'none'}"
            )
        object.__setattr__(self, "choices", picked)
        if self.eval_batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1; got {self.eval_batch_size}")


@dataclass(frozen=True)
class ArgmaxReducer:
    """Executor reducer: the argmax class of every sample of one classification output."""

    output: str

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.output,)

    def reduce(self, outputs: Sequence[np.ndarray], batch: Feed, first_sample: int) -> np.ndarray:
        scores = as_classification(np.asarray(outputs[0]))
        if scores is None:
            raise DataError(
                f"output {self.output!r} is not a classification output [N, classes] "
                f"(shape {np.shape(outputs[0])}); search needs one (choose it with --output)"
            )
        return np.argmax(scores, axis=1).astype(np.int32)

    def merge(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return np.concatenate([left, right])


@dataclass(frozen=True)
class Score:
    """A model's metric on the search data (percent), its interval and its drop to the reference."""

    metric: float
    interval: Interval  # of the metric, as a proportion
    drop: float  # reference - metric, points
    difference: PairedDifference  # metric - reference, as a proportion

    @property
    def pessimistic_drop(self) -> float:
        """The drop at the unfavourable end of its paired 95 % interval, in points."""
        return -100.0 * self.difference.interval.lo

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "interval": [100.0 * self.interval.lo, 100.0 * self.interval.hi],
            "drop": self.drop,
            "drop_interval": [
                -100.0 * self.difference.interval.hi,
                -100.0 * self.difference.interval.lo,
            ],
            "p_value": self.difference.p_value,
        }


@dataclass(frozen=True)
class Candidate:
    """One verified assignment: its threads, speed-up and measured score."""

    label: str
    threads: dict[str, int]
    speedup: float
    score: Score
    predicted_drop: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "speedup": self.speedup,
            "predicted_drop": self.predicted_drop,
            **self.score.to_dict(),
            "threads": dict(self.threads),
        }


@dataclass(frozen=True)
class ChainStep:
    """One assignment of the greedy chain: its speed-up and predicted drop (base + sensitivities)."""

    label: str
    threads: dict[str, int]
    speedup: float
    predicted_drop: float


@dataclass(frozen=True)
class LayerPlan:
    """One layer: MACs per sample, the threads it got, its sensitivity (loss vs the base per choice)."""

    name: str
    op_type: str
    macs: float
    threads: int
    sensitivity: dict[int, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op_type": self.op_type,
            "macs": self.macs,
            "threads": self.threads,
            "sensitivity": {str(k): v for k, v in self.sensitivity.items()},
        }


@dataclass
class _Memo:
    """What a search built and measured, for a later search of the same model, data and settings."""

    #: model, calibration and search data, labels (compared by path, else identity)
    sources: tuple[Any, ...]
    #: the config without budget, bound and reference; image preprocessing; layout
    settings: tuple[Any, ...]
    base: TransformResult
    float_pred: np.ndarray
    base_pred: np.ndarray
    sensitivity: dict[str, dict[int, float]]
    #: every recalibrated candidate: its predictions on the search data and its model
    built: dict[tuple[tuple[str, int], ...], tuple[np.ndarray, TransformResult]]

    @staticmethod
    def settings_of(config: SearchConfig, *more: Any) -> tuple[Any, ...]:
        # the budget, its bound and the reference only change which candidates pass
        neutral = replace(config, max_drop=0.0, bound="point", reference="int8", progress=False)
        return (neutral, *more)

    def matches(self, sources: tuple[Any, ...], settings: tuple[Any, ...]) -> bool:
        def same(a: Any, b: Any) -> bool:
            if isinstance(a, (str, Path)) and isinstance(b, (str, Path)):
                return str(a) == str(b)
            return a is b

        return self.settings == settings and all(
            same(a, b) for a, b in zip(self.sources, sources, strict=True)
        )


@dataclass
class SearchResult:
    """What :func:`search` found. ``transform`` is the accepted (or best) model, ready to save."""

    config: SearchConfig
    reference_metric: float
    best: Candidate
    met_budget: bool
    layers: list[LayerPlan]
    tried: list[Candidate]  # every verified assignment, uniform T included
    transform: TransformResult
    model_evaluations: int
    wall_s: float
    #: every assignment of the greedy chain, verified or not (in chain order)
    chain: list[ChainStep] = field(default_factory=list)
    #: where the model and the search data came from (for the report)
    model: str | None = None
    data: str | None = None
    samples: int = 0
    #: evaluations taken over from ``search(..., reuse=...)`` instead of run again
    reused_evaluations: int = 0
    _memo: _Memo | None = field(default=None, repr=False, compare=False)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.met_budget else EXIT_THRESHOLD

    def pareto(self) -> list[Candidate]:
        """The tried assignments no other beats in both speed-up and metric, by speed-up."""
        front: list[Candidate] = []
        for c in sorted(self.tried, key=lambda c: (-c.speedup, -c.score.metric)):
            if not front or c.score.metric > front[-1].score.metric:
                front.append(c)
        return sorted(front, key=lambda c: c.speedup)

    def plan(self) -> dict[str, Any]:
        """The ``--plan`` document: settings, budget, result, every layer, the assignments tried."""
        return {
            "format": "nbsmt-onnx/search-plan",
            "format_version": 1,
            "metric": self.config.metric,
            "reference": self.config.reference,
            "reference_metric": self.reference_metric,
            "max_drop": self.config.max_drop,
            "bound": self.config.bound,
            "choices": list(self.config.choices),
            "met_budget": self.met_budget,
            "best": self.best.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
            "tried": [c.to_dict() for c in self.tried],
            "pareto": [c.label for c in self.pareto()],
            "model_evaluations": self.model_evaluations,
            "reused_evaluations": self.reused_evaluations,
            "wall_time_s": round(self.wall_s, 3),
        }

    def pareto_table(self) -> list[dict[str, Any]]:
        """Every assignment tried, by speed-up: the verified ones with their measured metric and
        intervals (``evaluated``), and the chain's unverified ones with the metric the base's
        and their layers' sensitivities predict (``predicted``, no interval). ``pareto`` marks the
        verified assignments on the front; ``chosen`` the accepted one. An assignment evaluated
        twice (the chain's end is also uniform at the highest choice) is one row."""
        front = {id(c) for c in self.pareto()}
        steps = {_key(s.threads): k for k, s in enumerate(self.chain)}
        rows: list[dict[str, Any]] = []
        seen: dict[tuple[tuple[str, int], ...], dict[str, Any]] = {}
        for c in self.tried:
            if _key(c.threads) in seen:
                row = seen[_key(c.threads)]
                row["pareto"] = row["pareto"] or id(c) in front
                row["chosen"] = row["chosen"] or c is self.best
                continue
            rows.append({
                "label": c.label, "step": steps.get(_key(c.threads)), "speedup": c.speedup,
                "status": "evaluated", **c.score.to_dict(), "predicted_drop": c.predicted_drop,
                "pareto": id(c) in front, "chosen": c is self.best, "threads": dict(c.threads),
            })  # fmt: skip
            seen[_key(c.threads)] = rows[-1]
        for k, step in enumerate(self.chain):
            if _key(step.threads) in seen:
                continue
            rows.append({
                "label": step.label, "step": k, "speedup": step.speedup, "status": "predicted",
                "metric": self.reference_metric - step.predicted_drop, "interval": None,
                "drop": step.predicted_drop, "drop_interval": None, "p_value": None,
                "predicted_drop": step.predicted_drop, "pareto": False, "chosen": False,
                "threads": dict(step.threads),
            })  # fmt: skip
        rows.sort(key=lambda r: (r["speedup"], r["status"] != "evaluated"))
        return rows

    def report(self) -> dict[str, Any]:
        """The ``--report`` document: the plan, the Pareto table (evaluated and predicted
        assignments) and the verified accuracy of the accepted assignment."""
        doc = self.plan()
        doc["format"] = SEARCH_REPORT_FORMAT
        doc["format_version"] = 1
        best = self.best.score.to_dict()
        doc.update(
            model=self.model,
            search_data={"source": self.data, "samples": self.samples},
            tool_version=__version__,
            final={
                "label": self.best.label,
                "speedup": self.best.speedup,
                "verified": True,
                "met_budget": self.met_budget,
                **best,
                "threads": dict(self.best.threads),
            },
            pareto_table=self.pareto_table(),
        )
        return doc

    def write_report(self, path: str | Path, *, force: bool = False) -> Path:
        """Write :meth:`report` atomically: HTML for ``.html`` / ``.htm``, JSON for ``.json``."""
        return write_report(self.report(), path, force=force)

    def built(self, candidate: Candidate) -> TransformResult:
        """The model ``candidate`` (one of ``tried``) was scored with, recalibrated as deployed."""
        if self._memo is not None and _key(candidate.threads) in self._memo.built:
            return self._memo.built[_key(candidate.threads)][1]
        if self._memo is not None and candidate is self.tried[0]:  # the base (not recalibrated)
            return self._memo.base
        if _key(candidate.threads) == _key(self.best.threads):
            return self.transform
        raise ConfigError(f"{candidate.label} was not built by this search")

    def layer_threads(self) -> dict[str, int]:
        """The accepted assignment, as a ``--layer-threads`` file holds it."""
        return dict(self.best.threads)

    def format_table(self) -> str:
        """The Pareto table as text (speed-up, metric with interval, drop with paired interval)."""
        name = "top-1" if self.config.metric == "top1" else "agreement"
        lines = [
            f"reference ({self.config.reference}): {name} {self.reference_metric:.2f} %; "
            f"budget: drop <= {self.config.max_drop:g} points ({self.config.bound} estimate)",
            f"{'assignment':<28} {'speed-up':>8} {name + ' %':>12} {'95% interval':>17} "
            f"{'drop':>7} {'drop 95% interval':>18}",
        ]
        front = {c.label for c in self.pareto()}
        for c in sorted(self.tried, key=lambda c: c.speedup):
            s = c.score.to_dict()
            mark = "*" if c.label == self.best.label else ("+" if c.label in front else " ")
            lines.append(
                f"{mark}{c.label:<27} {c.speedup:7.2f}x {s['metric']:11.2f} "
                f"[{s['interval'][0]:6.2f}, {s['interval'][1]:6.2f}] {s['drop']:7.2f} "
                f"[{s['drop_interval'][0]:6.2f}, {s['drop_interval'][1]:6.2f}]"
            )
        lines.append("* chosen; + on the Pareto front")
        return "\n".join(lines)


class _Scorer:
    """Scores models on the search data through the executor (argmax per sample)."""

    def __init__(
        self, data: Any, labels: np.ndarray | None, output: str, executor: Executor
    ) -> None:
        self.data, self.labels, self.output, self.executor = data, labels, output, executor
        self.evaluations = 0
        self.float_pred: np.ndarray | None = None
        self.reference_correct: np.ndarray | None = None

    def predictions(self, models: Sequence[onnx.ModelProto]) -> list[np.ndarray]:
        jobs = [
            Job(m, self.data, ArgmaxReducer(self.output), SessionOptions(), what="candidate model")
            for m in models
        ]
        self.evaluations += len(jobs)
        return list(self.executor.map(jobs))

    def correct(self, pred: np.ndarray, metric: str) -> np.ndarray:
        if metric == "top1":
            assert self.labels is not None
            return pred == self.labels
        assert self.float_pred is not None
        return pred == self.float_pred

    def score(self, pred: np.ndarray, metric: str) -> Score:
        assert self.reference_correct is not None
        ok = self.correct(pred, metric)
        n = int(ok.size)
        diff = paired_proportion_difference(ok, self.reference_correct)
        metric_value = 100.0 * float(ok.mean())
        reference = 100.0 * float(self.reference_correct.mean())
        return Score(
            metric_value, wilson_interval(int(ok.sum()), n), reference - metric_value, diff
        )


def _key(threads: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(threads.items()))


def _label(threads: Mapping[str, int]) -> str:
    counts = {t: sum(1 for v in threads.values() if v == t) for t in sorted(set(threads.values()))}
    if len(counts) == 1:
        return f"uniform T={next(iter(counts))}"
    return "mixed " + "/".join(f"{counts[t]}xT{t}" for t in counts)


def search(
    model: str | Path | onnx.ModelProto,
    calib_data: Any,
    eval_data: Any,
    config: SearchConfig | None = None,
    *,
    labels: Any = None,
    images: ImagePreprocessing | None = None,
    layout: DataLayout | None = None,
    executor: Executor | None = None,
    reuse: SearchResult | None = None,
) -> SearchResult:
    """Search per-layer threads that maximise the speed-up within ``config.max_drop`` (module doc).

    ``reuse``: an earlier result for the same model, data, labels and config
    except ``max_drop`` / ``bound``; what it built and measured is not redone.
    """
    started = time.perf_counter()
    config = config or SearchConfig()
    executor = executor or LocalExecutor()
    if config.metric == "top1" and labels is None:
        raise ConfigError("--metric top1 needs --labels; without labels use --metric agreement")
    sources = (model, calib_data, eval_data, labels)
    settings = _Memo.settings_of(config, images, layout)
    memo = None if reuse is None else reuse._memo
    if reuse is not None and (memo is None or not memo.matches(sources, settings)):
        raise ConfigError(
            "reuse: the earlier search used another model, data, labels or settings "
            "(only the budget and its bound may differ)"
        )
    reused = 0
    base_t = config.choices[0]
    tcfg = replace(config.transform, export="sim", collect_stats=False, progress=False)
    float_model = prepare_for_transform(model, tcfg, layout).model

    evaluation = open_evaluation(
        float_model,
        eval_data,
        EvaluateConfig(
            transform=tcfg,
            eval_samples=config.eval_samples,
            eval_batch_size=config.eval_batch_size,
            eval_seed=config.eval_seed,
            output=config.output,
        ),
        labels=labels,
        images=images,
    )
    if not evaluation.classification:
        raise DataError(
            f"search scores argmax predictions; output {evaluation.output!r} is not a "
            "classification output [N, classes] (choose one with --output)"
        )
    scorer = _Scorer(evaluation.stream.data, evaluation.stream.labels, evaluation.output, executor)

    def build(threads: Mapping[str, int], recalibrate: bool) -> TransformResult | onnx.ModelProto:
        """A candidate as ``transform`` builds it (recalibrated), or by editing the base."""
        rules = LayerThreads.from_mapping({k: v for k, v in threads.items() if v != base_t})
        if not recalibrate:
            return assign_threads(base.sim_model, rules, base_t).model
        cfg = replace(tcfg, threads=base_t, layer_threads=rules)
        return transform(
            model, calib_data, cfg, images=images, ranges=base.ranges, layout=layout,
            executor=executor,
        )  # fmt: skip

    # 1. the base: ranges, MACs, int8 predictions
    if memo is not None:
        base = memo.base
    else:
        base_cfg = replace(
            tcfg, threads=base_t, recalibration=RecalibrationConfig(enabled=False),
            collect_stats=True,
        )  # fmt: skip
        base = transform(
            model, calib_data, base_cfg, images=images, layout=layout, executor=executor
        )
    macs = {
        layer["node"]: float(layer["macs_per_sample"] or 0.0) for layer in base.report["layers"]
    }
    floats = [
        LayerMacs(m["name"], m["op_type"], float(m["macs"]), 1)
        for m in (base.report["summary"].get("speedup") or {}).get("layers", [])
        if m["name"] not in macs
    ]
    ops = {layer["node"]: layer["op_type"] for layer in base.report["layers"]}
    names = list(macs)
    if memo is not None:
        float_pred, base_pred = memo.float_pred, memo.base_pred
        reused += 2
    else:
        float_pred, base_pred = scorer.predictions([float_model, base.sim_model])
    scorer.float_pred = float_pred
    if config.metric == "top1" and config.reference == "float32":
        reference_correct = scorer.correct(float_pred, "top1")
    elif config.reference == "float32":
        reference_correct = np.ones_like(float_pred, dtype=bool)
    else:
        reference_correct = scorer.correct(base_pred, config.metric)
    scorer.reference_correct = reference_correct
    reference_metric = 100.0 * float(reference_correct.mean())

    def figure(threads: Mapping[str, int]) -> float:
        layers = [LayerMacs(n, ops[n], macs[n], threads[n]) for n in names]
        return speedup(layers + floats)

    base_score = scorer.score(base_pred, config.metric)

    # 2. sensitivity: every layer alone at every higher choice
    moves = [(n, t) for n in names for t in config.choices[1:]]
    sensitivity: dict[str, dict[int, float]] = {n: {} for n in names}
    if memo is not None:
        sensitivity = {n: dict(memo.sensitivity[n]) for n in names}
        reused += len(moves)
    chunk = 8
    with Progress(
        "sensitivity", len(moves), "candidates", enabled=config.progress and memo is None
    ) as bar:
        for start in range(0, len(moves) if memo is None else 0, chunk):
            part = moves[start : start + chunk]
            built = [
                build({**dict.fromkeys(names, base_t), n: t}, config.sensitivity_recalibration)
                for n, t in part
            ]
            preds = scorer.predictions(
                [b.sim_model if isinstance(b, TransformResult) else b for b in built]
            )
            for (n, t), pred in zip(part, preds, strict=True):
                # the loss of this move alone, relative to the base (not to the reference: with
                # a float32 reference the base's own drop would be counted once per move)
                sensitivity[n][t] = scorer.score(pred, config.metric).drop - base_score.drop
            bar.update(start + len(part))

    # 3. the chain of nested assignments, by loss per cycle saved
    def cost(n: str, t_old: int, t_new: int) -> float:
        loss = sensitivity[n][t_new] - (sensitivity[n][t_old] if t_old != base_t else 0.0)
        saved = macs[n] * (1.0 / t_old - 1.0 / t_new)
        return loss / saved if saved > 0 else float("inf")

    current = dict.fromkeys(names, base_t)
    chain: list[tuple[dict[str, int], float]] = []
    pending = {n: list(config.choices[1:]) for n in names}
    while any(pending.values()):
        n, t = min(
            ((n, ts[0]) for n, ts in pending.items() if ts),
            key=lambda nt: (cost(nt[0], current[nt[0]], nt[1]), nt[0]),
        )
        pending[n].pop(0)
        current[n] = t
        predicted = base_score.drop + sum(
            sensitivity[m][current[m]] for m in names if current[m] != base_t
        )
        chain.append((dict(current), predicted))

    # 4. verify the longest prefix within the budget; bisect back when it misses
    def meets(c: Candidate) -> bool:
        drop = c.score.pessimistic_drop if config.bound == "pessimistic" else c.score.drop
        return drop <= config.max_drop

    tried: dict[int, tuple[Candidate, TransformResult]] = {}
    known: dict[tuple[tuple[str, int], ...], tuple[np.ndarray, TransformResult]] = (
        dict(memo.built) if memo is not None else {}
    )
    scored: dict[tuple[tuple[str, int], ...], tuple[Candidate, TransformResult]] = {}

    def built_and_scored(
        label: str, threads: dict[str, int], predicted: float | None
    ) -> tuple[Candidate, TransformResult]:
        """Build (recalibrated) and score an assignment once per search (and across ``reuse``)."""
        nonlocal reused
        key = _key(threads)
        if key not in scored:
            if key in known:  # built by the search reused: score its predictions again
                reused += 1
            else:
                made = build(threads, True)
                assert isinstance(made, TransformResult)
                (pred,) = scorer.predictions([made.sim_model])
                known[key] = (pred, made)
            pred, made = known[key]
            score = scorer.score(pred, config.metric)
            scored[key] = (Candidate(label, threads, figure(threads), score, predicted), made)
        return scored[key]

    def verify(k: int) -> Candidate:
        if k not in tried:
            threads, predicted = chain[k]
            tried[k] = built_and_scored(_label(threads), threads, predicted)
        return tried[k][0]

    # The chain is assumed monotone in its measured drop (each step adds a move); the
    # prediction only picks the first probe. Bisection finds the longest prefix that meets.
    within = [k for k, (_, p) in enumerate(chain) if p <= config.max_drop]
    first = within[-1] if within else 0
    last = len(chain) - 1
    with Progress("verification", None, "evaluations", enabled=config.progress) as bar:
        if meets(verify(first)):
            lo, hi = (
                first,
                last + 1,
            )  # invariant: chain[lo] meets; chain[hi] misses (or is past the end)
            if first != last and meets(verify(last)):
                lo = last
        else:
            lo, hi = -1, first
        while hi - lo > 1:
            mid = (lo + hi) // 2
            bar.update(len(tried))
            if meets(verify(mid)):
                lo = mid
            else:
                hi = mid
        bar.update(len(tried))
    # uniform assignments: compared in the Pareto table, and candidates themselves
    uniform: list[tuple[Candidate, TransformResult]] = []
    for t in config.choices[1:]:
        uniform.append(built_and_scored(f"uniform T={t}", dict.fromkeys(names, t), None))
    base_candidate = Candidate(
        f"uniform T={base_t}", dict.fromkeys(names, base_t), figure(dict.fromkeys(names, base_t)),
        base_score,
    )  # fmt: skip

    # The fastest verified assignment above the base that meets the budget (uniform ones
    # included). If none does, every layer stays at the lowest choice (the int8 reference
    # itself) and the caller exits with 3.
    passing = [cv for cv in [*tried.values(), *uniform] if meets(cv[0])]
    if passing:
        best, best_transform = max(passing, key=lambda cv: (cv[0].speedup, cv[0].score.metric))
    else:
        best, best_transform = base_candidate, base
    layers = [LayerPlan(n, ops[n], macs[n], best.threads[n], dict(sensitivity[n])) for n in names]
    steps = [ChainStep(_label(t), dict(t), figure(t), p) for t, p in chain]
    result = SearchResult(
        config=config,
        reference_metric=reference_metric,
        best=best,
        met_budget=bool(passing),
        layers=layers,
        # an assignment verified on the chain and uniform too (its end) is one candidate
        tried=list(
            {
                id(c): c
                for c in [base_candidate, *(c for c, _ in tried.values()), *(c for c, _ in uniform)]
            }.values()
        ),
        transform=best_transform,
        model_evaluations=scorer.evaluations,
        wall_s=time.perf_counter() - started,
        chain=steps,
        model=None if isinstance(model, onnx.ModelProto) else str(model),
        data=str(eval_data) if isinstance(eval_data, (str, Path)) else None,
        samples=len(float_pred),
        reused_evaluations=reused,
        _memo=_Memo(sources, settings, base, float_pred, base_pred, sensitivity, known),
    )
    log.info(
        "search: %s, speed-up %.2fx, %s %.2f %% (drop %.2f points), %d model evaluations",
        best.label, best.speedup, config.metric, best.score.metric, best.score.drop,
        scorer.evaluations,
    )  # fmt: skip
    return result
