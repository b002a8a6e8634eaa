"""The Python API: ``transform``, ``inspect``, ``evaluate``, ``run`` — the one place that orders the steps.

``transform(model, calib_data, config)``:

1. load the model once (``io.load_model``) and name every node;
2. open and validate the calibration data (the first batch is checked before
   any long pass starts);
3. plan the rewrite on the float model (what becomes NB-SMT, what not and why);
4. calibrate activation ranges on the float model (one streaming pass);
5. rewrite into the simulation model; check it (onnx.checker + shape inference);
6. recalibrate BatchNorm statistics under NB-SMT, or correct the layers of a
   BN-fused model, and fold the result into the ops' scales and biases
   (``calibration.recalibrate.recalibrate``; on by default) — estimated on the
   calibration samples minus a held-out part, on which the guard then keeps
   only the corrections that bring the outputs closer to float
   (``calibration.guard``);
7. verify and measure: run the simulation model once over the calibration
   data with the ``stats`` outputs exposed (outputs must be finite);
8. build the exports (QDQ from the final simulation model) and verify the QDQ
   model with stock ONNX Runtime against the ``threads=1`` simulation;
9. with an evaluation set (``eval_data``): score the simulation model against
   the float model (and the int8 model) on held-out data with ``evaluate``'s
   metric code and apply the pipeline gate (``max_drop`` / ``min_agreement``);
10. assemble the report.

Activation ranges (step 4) can be passed in (``ranges=``, e.g. the
``TransformResult.ranges`` of an earlier transform of the same model on the
same data): the float pass gives the same ranges whatever the NB-SMT
settings, so a sweep needs it once.

Nothing is written to disk here: :class:`TransformResult` holds the models
and the report; ``TransformResult.save`` writes them through ``io``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from nbsmt_onnx import io
from nbsmt_onnx._version import __version__
from nbsmt_onnx.calibration import guard as guard_mod
from nbsmt_onnx.calibration.data import (
    CalibrationData,
    InputSpec,
    model_inputs,
    open_calibration_data,
)
from nbsmt_onnx.calibration.ranges import ActivationRange, collect_ranges
from nbsmt_onnx.calibration.recalibrate import (
    TransformRecalibration,
    apply_recalibration,
    correction_units,
    fold_summary,
    recalibrate,
)
from nbsmt_onnx.compare import (
    OutputCollector,
    OutputComparison,
    compare_outputs,
    concatenate,
    format_comparisons,
)
from nbsmt_onnx.config import DataLayout, EvaluateConfig, ImagePreprocessing, TransformConfig
from nbsmt_onnx.errors import (
    EXIT_OK,
    ConfigError,
    DataError,
    InternalError,
    OutputError,
    UnsupportedModelError,
)
from nbsmt_onnx.evaluate import (
    EvaluationResult,
    EvaluationSet,
    ModelRow,
    RowSpec,
    check_disjoint_paths,
    evaluate_models,
    open_evaluation,
    plan_rows,
    variant_config,
    with_nbsmt_settings,
)
from nbsmt_onnx.graph.qdq import MIN_QDQ_OPSET, to_qdq
from nbsmt_onnx.graph.rewrite import (
    RewritePlan,
    RewriteResult,
    SkippedNode,
    ensure_node_names,
    plan_rewrite,
    prepare_model,
    rewrite_model,
)
from nbsmt_onnx.graph.threads import assign_threads, layer_macs
from nbsmt_onnx.ops import schema
from nbsmt_onnx.progress import Progress
from nbsmt_onnx.report import (
    StatsReducer,
    add_stats_outputs,
    build_report,
    report_kind,
    write_report,
)
from nbsmt_onnx.runtime.executor import Executor, FeedStream, Job, LocalExecutor
from nbsmt_onnx.runtime.library import get_library_path
from nbsmt_onnx.runtime.session import SessionOptions

log = logging.getLogger(__name__)


#: Below this many calibration samples recalibration gets a warning (its estimates are noise).
FEW_SAMPLES = 32

METADATA_VERSION_KEY = "nbsmt_onnx.version"
METADATA_SETTINGS_KEY = "nbsmt_onnx.settings"
METADATA_KIND_KEY = "nbsmt_onnx.kind"


def _version() -> str:
    return __version__


def _stem(path: Path) -> str:
    return path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name


def output_paths(
    source: Path | None,
    export: str,
    output: str | Path | None = None,
    qdq_output: str | Path | None = None,
) -> dict[str, Path]:
    """Where each export goes: ``{"sim": path, "qdq": path}`` for the exports configured.

    Default (no ``output``): ``<input stem>.nbsmt.onnx`` beside the input, or
    ``<input stem>.qdq.onnx`` for a QDQ-only export. With both exports the
    QDQ model goes to ``<output stem>.qdq.onnx`` unless ``qdq_output`` is given.
    """
    if output is None:
        if source is None:
            raise OutputError("the model was passed as a ModelProto; give an output path")
        suffix = ".qdq.onnx" if export == "qdq" else ".nbsmt.onnx"
        out = source.with_name(_stem(source) + suffix)
    else:
        out = Path(output)
    if export == "qdq":
        return {"qdq": Path(qdq_output) if qdq_output is not None else out}
    paths = {"sim": out}
    if export == "both":
        paths["qdq"] = (
            Path(qdq_output) if qdq_output is not None else out.with_name(_stem(out) + ".qdq.onnx")
        )
    return paths


@dataclass
class TransformResult:
    """What ``transform`` produced: the models (in memory) and the report dict.

    ``ranges``: the activation range of every rewritten node's input (pass
    them as ``transform(..., ranges=...)`` to skip the float calibration pass
    in another transform of the same model and data). ``evaluation``: the
    held-out evaluation and gate, when ``transform`` was given ``eval_data``.
    """

    sim_model: onnx.ModelProto
    qdq_model: onnx.ModelProto | None
    report: dict[str, Any]
    config: TransformConfig
    source_path: Path | None = None
    warnings: list[str] = field(default_factory=list)
    ranges: dict[str, ActivationRange] = field(default_factory=dict)
    evaluation: EvaluationResult | None = None

    @property
    def passed(self) -> bool:
        """False when the evaluation set's gate (``max_drop`` / ``min_agreement``) was missed."""
        return self.evaluation is None or self.evaluation.passed

    @property
    def exit_code(self) -> int:
        """0, or 3 when the gate was missed (the same code as ``nbsmt-onnx evaluate``)."""
        return EXIT_OK if self.evaluation is None else self.evaluation.exit_code

    def output_paths(
        self, output: str | Path | None = None, qdq_output: str | Path | None = None
    ) -> dict[str, Path]:
        """Where ``save`` writes each export (see :func:`output_paths`)."""
        return output_paths(self.source_path, self.config.export, output, qdq_output)

    def save(
        self,
        output: str | Path | None = None,
        *,
        qdq_output: str | Path | None = None,
        report_path: str | Path | None = None,
        force: bool = False,
    ) -> list[Path]:
        """Write the configured exports (and the report, if a path is given); all or nothing.

        The report is HTML (``html_report.write_html``: one self-contained page
        with plots) when ``report_path`` ends in ``.html`` / ``.htm``, JSON for
        ``.json``; other suffixes are refused. Every destination is checked before anything is written; if
        a later write fails, the files written by this call are removed again.
        """
        paths = self.output_paths(output, qdq_output)
        if report_path is not None:
            report_kind(report_path)
        protect = (self.source_path,) if self.source_path is not None else ()
        all_paths = [*paths.values(), *([Path(report_path)] if report_path is not None else [])]
        if len({p.resolve() for p in all_paths}) != len(all_paths):
            raise OutputError("two outputs would be written to the same path; give distinct paths")
        for p in all_paths:
            io.check_destination(p, force=force, protect=tuple(Path(x) for x in protect))
        written: list[Path] = []
        try:
            for kind, path in paths.items():
                model = self.sim_model if kind == "sim" else self.qdq_model
                if model is None:
                    raise OutputError(
                        f"no {kind} model was built; run transform with export={kind!r} or 'both'"
                    )
                written += io.save_model(model, path, force=force, protect=protect)
            if report_path is not None:
                written.append(write_report(self.report, report_path, force=force))
        except BaseException:  # a failed write or an interruption: all or nothing
            for p in written:
                p.unlink(missing_ok=True)
            raise
        return written


# --------------------------------------------------------------------------- steps


def _load(model: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, Path | None]:
    """Load (or copy) the model, check it, and bring it into the form the steps assume."""
    if isinstance(model, onnx.ModelProto):
        loaded = onnx.ModelProto()
        loaded.CopyFrom(model)
        io.check_model(loaded, what="input model")
        path = None
    else:
        path = Path(model)
        loaded = io.load_model(path)
    prepared, notes = prepare_model(loaded)
    for note in notes:
        log.info("%s", note)
    return prepared, path


#: Opset the statistics probes of recalibration need (ReduceSum-style ops with axes inputs).
MIN_PROBE_OPSET = 11


def _upgrade_opset(model: onnx.ModelProto, minimum: int, why: str, fix: str) -> onnx.ModelProto:
    """Convert ``model`` to opset ``minimum`` with ``onnx.version_converter`` when it is older."""
    opset = io.default_opset(model)
    if opset >= minimum:
        return model
    from onnx import version_converter

    log.info("converting the model from opset %d to %d for %s", opset, minimum, why)
    try:
        converted = version_converter.convert_version(model, minimum)
        onnx.checker.check_model(converted)
    except Exception as err:
        raise UnsupportedModelError(
            f"{why} needs opset >= {minimum} and converting this opset-{opset} model failed "
            f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}); {fix}"
        ) from err
    return converted


def _upgrade_for_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    return _upgrade_opset(model, MIN_QDQ_OPSET, "QDQ export", "use --export sim")


def _register_schemas() -> None:
    from nbsmt_onnx.ops.onnx_schema import register_schemas

    register_schemas()


def _recalibrate(
    float_model: onnx.ModelProto,
    sim: RewriteResult,
    data: CalibrationData,
    config: TransformConfig,
    guard_data: CalibrationData | None = None,
    executor: Executor | None = None,
) -> tuple[onnx.ModelProto, dict[str, Any] | None]:
    """Step 6 — recalibration (docs/spec.md §4-§5), validated on held-out samples by the guard.

    With the guard on, the corrections are estimated on the calibration samples
    minus a seeded held-out part (or on all of them when ``guard_data`` is
    given), and only the blocks of corrections that bring the held-out outputs
    closer to the float model's are kept (``calibration.guard``).
    """
    rc = config.recalibration
    if not rc.enabled:
        return sim.model, None
    if data.is_random:
        log.warning(
            "recalibration skipped: random calibration data would corrupt the BN statistics"
        )
        return sim.model, {"skipped": "random calibration data"}
    estimation, heldout, off = data, guard_data, None
    if rc.guard and heldout is None:
        parts = data.split(rc.guard_fraction, config.seed)
        if parts is None:
            off = (
                "the calibration data has no addressable samples to hold out (an iterable of "
                "feeds); pass guard data (--guard-data) to validate recalibration"
            )
        elif parts[1].num_samples < guard_mod.MIN_SAMPLES:
            off = (
                f"{parts[1].num_samples} held-out sample(s) are too few to validate recalibration "
                f"(need {guard_mod.MIN_SAMPLES}); pass more calibration samples or --guard-data"
            )
        else:
            estimation, heldout = parts
    result = recalibrate(
        float_model=float_model,
        sim_model=sim.model,
        data=estimation,
        config=rc,
        progress=config.progress,
        executor=executor,
    )
    report = dict(result.report)
    if not rc.guard:
        report["guard"] = {"decision": "off", "reason": "turned off (--no-guard)"}
        return result.model, report
    if heldout is None:
        log.warning("recalibration is not validated: %s", off)
        report["guard"] = {"decision": "off", "reason": off}
        return result.model, report
    decision = _guard(float_model, result, heldout, config, executor)
    retry = rc.guard_retry_shrink
    # Shrinkage changes `relative` BN shifts and fused-layer corrections only.
    shrinkable = rc.strategy == "relative" or result.correction is not None
    if decision is not None and not decision.kept and retry > rc.shrink and shrinkable:
        # Nothing of the corrections survived: try once more with noise-level shifts
        # shrunk away (docs/recalibration.md §8.2, step 5).
        log.info("recalibration guard kept nothing; retrying with --shrink %g", retry)
        shrunk = recalibrate(
            float_model=float_model,
            sim_model=sim.model,
            data=estimation,
            config=replace(rc, shrink=retry),
            progress=config.progress,
            executor=executor,
        )
        second = _guard(float_model, shrunk, heldout, config, executor)
        first_try = {"shrink": rc.shrink, "summary": decision.summary()}
        if second is not None and second.kept:
            result, decision, report = shrunk, second, dict(shrunk.report)
        report["guard_first_try"] = first_try
        report["guard_retry"] = {
            "shrink": retry,
            "kept": bool(second is not None and second.kept),
            "summary": None if second is None else second.summary(),
        }
    if decision is None:
        report["guard"] = {"decision": "none", "reason": "recalibration changed nothing"}
        return result.model, report
    model, folded = apply_recalibration(result, decision.kept, fold=rc.fold)
    report["guard"] = decision.to_dict()
    if "fold" in report:
        report["fold"] = fold_summary(folded)
    return model, report


def _guard(
    float_model: onnx.ModelProto,
    result: TransformRecalibration,
    heldout: CalibrationData,
    config: TransformConfig,
    executor: Executor | None = None,
) -> guard_mod.GuardResult | None:
    """The guard's decision on ``result``'s corrections (None: recalibration changed nothing)."""
    rc = config.recalibration
    units = correction_units(result)
    if not units:
        return None
    evaluations = 2 + len(guard_mod.split_blocks(units, rc.guard_blocks))
    with Progress("recalibration guard", evaluations, "models", enabled=config.progress) as bar:
        done = 0

        def step(what: str) -> None:
            nonlocal done
            bar.update(done)
            done += 1

        decision = guard_mod.guard(
            units,
            lambda keep: apply_recalibration(result, keep, fold=rc.fold)[0],
            float_model,
            heldout,
            blocks=rc.guard_blocks,
            margin=rc.guard_margin,
            check_margin=rc.guard_check_margin,
            progress=step,
            executor=executor,
        )
        bar.update(evaluations)
    return decision


def _run_with_stats(
    sim_model: onnx.ModelProto,
    data: CalibrationData,
    config: TransformConfig,
    executor: Executor | None = None,
) -> dict[str, np.ndarray] | None:
    """Run the simulation model over the data (or one batch) with ``stats`` exposed; sum them.

    Also the verification run: the model must load with the library and give
    finite outputs.
    """
    probe, stats_names = add_stats_outputs(sim_model)
    ops = tuple(stats_names)
    reducer = StatsReducer(
        tuple(o.name for o in sim_model.graph.output), ops, tuple(stats_names[n] for n in ops)
    )
    max_batches = None if config.collect_stats else 1
    total = data.num_batches if config.collect_stats else 1
    with Progress("NB-SMT statistics", total, enabled=config.progress) as bar:
        totals: dict[str, np.ndarray] = (executor or LocalExecutor()).run(
            Job(probe, data, reducer, max_batches=max_batches, what="simulation model"),
            lambda done, _total: bar.update(done),  # the total is the Progress's (max_batches)
        )
    return totals if config.collect_stats else None


def _set_threads(model: onnx.ModelProto, threads: int) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.domain == schema.DOMAIN:
            for attr in node.attribute:
                if attr.name == "threads":
                    attr.i = threads
    return out


def compare_qdq(
    sim_model: onnx.ModelProto,
    qdq_model: onnx.ModelProto,
    batch: dict[str, np.ndarray],
    *,
    optimize: bool = False,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Run the QDQ model (stock ORT, no library) and the ``threads=1`` simulation on one batch.

    Returns the largest absolute difference per output and relative to the
    output's peak magnitude (float32 rounding, see ``graph.qdq``). With
    ``optimize`` the QDQ model runs with ONNX Runtime's default graph
    optimisations — how it is deployed: ORT then fuses it into integer kernels.
    """
    one = FeedStream(lambda: [batch])
    names = tuple(o.name for o in sim_model.graph.output)
    qdq_names = tuple(o.name for o in qdq_model.graph.output)
    sim_run, qdq_run = (executor or LocalExecutor()).map(
        [
            Job(
                _set_threads(sim_model, 1), one, OutputCollector(names),
                what="threads=1 simulation model",
            ),
            Job(
                qdq_model, one, OutputCollector(qdq_names),
                SessionOptions(register_library=False, optimize=optimize), what="QDQ model",
            ),
        ]
    )  # fmt: skip
    sim_out = [sim_run[n][0] for n in names]
    qdq_out = [qdq_run[n][0] for n in qdq_names]
    result = {}
    for name, a, b in zip(names, sim_out, qdq_out, strict=True):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        peak = float(np.max(np.abs(a))) if a.size else 0.0
        result[name] = {"max_abs_diff": diff, "relative_to_peak": diff / peak if peak else diff}
    return result


#: Relative-to-peak difference of the QDQ model under ORT's default optimisations above which
#: the report warns (and at least this many times the difference with optimisations off).
#: The default u8u8 form stayed below 7e-3 on the models measured (docs/transform.md);
#: u8s8 without VNNI reached 5.5e-2 from int16 saturation.
DEPLOYED_QDQ_WARN = 1e-2
DEPLOYED_QDQ_WARN_RATIO = 2.0


def _deployed_qdq_warning(exports: dict[str, Any], qdq_types: str) -> str | None:
    """A warning when ORT's fused integer kernels move the QDQ model away from the simulation."""
    off = exports["qdq_vs_threads1_simulation"]
    on = exports["qdq_vs_threads1_simulation_ort_defaults"]
    worst = max(on, key=lambda name: on[name]["relative_to_peak"], default=None)
    if worst is None:
        return None
    diff, base = on[worst]["relative_to_peak"], off[worst]["relative_to_peak"]
    if diff <= DEPLOYED_QDQ_WARN or diff <= DEPLOYED_QDQ_WARN_RATIO * base:
        return None
    hint = "" if qdq_types == "u8u8" else "; --qdq-types u8u8 avoids the saturating kernels"
    return (
        f"the QDQ model ({qdq_types}) under ONNX Runtime's default optimisations differs from the "
        f"threads=1 simulation by {diff:.2g} of the peak of output {worst!r} (optimisations off: "
        f"{base:.2g}){hint}; see docs/transform.md"
    )


def _metadata(model: onnx.ModelProto, kind: str, settings: dict[str, Any]) -> None:
    entries = {
        METADATA_VERSION_KEY: _version(),
        METADATA_SETTINGS_KEY: json.dumps(settings, sort_keys=True),
        METADATA_KIND_KEY: kind,
    }
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value


def _no_candidates_error(plan: RewritePlan) -> UnsupportedModelError:
    if not plan.skipped:
        return UnsupportedModelError(
            "nothing to rewrite: the model has no Conv, MatMul or Gemm node"
        )
    reasons: dict[str, int] = {}
    for s in plan.skipped:
        reasons[s.reason] = reasons.get(s.reason, 0) + 1
    top = "; ".join(f"{n}x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
    return UnsupportedModelError(
        f"nothing to rewrite: every Conv/MatMul/Gemm was skipped ({top}); see 'nbsmt-onnx inspect'"
    )


# --------------------------------------------------------------------------- public API


def _given_ranges(
    ranges: Mapping[str, ActivationRange], tensors: Sequence[str]
) -> dict[str, ActivationRange]:
    """The caller's ranges for ``tensors``, checked (every tensor present, right type)."""
    if not isinstance(ranges, Mapping):
        raise ConfigError(
            f"ranges must be a mapping of tensor name -> ActivationRange (TransformResult.ranges); "
            f"got {type(ranges).__name__}"
        )
    missing = [t for t in tensors if t not in ranges]
    if missing:
        shown = ", ".join(repr(t) for t in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ConfigError(
            f"ranges has no range for {len(missing)} activation tensor(s) ({shown}); pass the "
            "TransformResult.ranges of a transform of the same model with the same selection"
        )
    out = {}
    for t in tensors:
        value = ranges[t]
        if not isinstance(value, ActivationRange):
            raise ConfigError(
                f"ranges[{t!r}] must be an ActivationRange; got {type(value).__name__}"
            )
        out[t] = value
    return out


def _produced_row(config: TransformConfig, recalibrated: bool) -> Any:
    """The evaluation row of the model ``transform`` produces (the gated row)."""

    base = "int8" if config.threads == 1 else "nbsmt"
    kind = base + ("+recal" if recalibrated else "")
    return RowSpec(kind, config.threads, config.mapping, config.reduce)


def _open_evaluation_set(
    float_model: onnx.ModelProto,
    source_path: Path | None,
    calib_data: Any,
    eval_data: Any,
    eval_labels: Any,
    eval_config: EvaluateConfig | None,
    produced_kind: str,
    images: ImagePreprocessing | None,
) -> EvaluationSet:
    """Open and check the held-out data before any long pass (step 9 uses it)."""

    if eval_config is None:
        eval_config = EvaluateConfig()
    if not isinstance(eval_config, EvaluateConfig):
        raise ConfigError(
            f"eval_config must be an EvaluateConfig; got {type(eval_config).__name__}"
        )
    check_disjoint_paths(eval_data, calib_data)
    kinds = ["float32"]
    if eval_config.reference == "int8" and produced_kind != "int8":
        kinds.append("int8")
    kinds.append(produced_kind)
    ev_config = replace(eval_config, rows=tuple(kinds), gate_rows=(produced_kind,))
    return open_evaluation(
        float_model,
        eval_data,
        ev_config,
        labels=eval_labels,
        images=images,
        model_name=str(source_path) if source_path else "<ModelProto>",
    )


def _evaluate_produced(
    evaluation_set: EvaluationSet,
    int8_model: onnx.ModelProto,
    sim_model: onnx.ModelProto,
    produced: Any,
    data: CalibrationData,
    recal_report: dict[str, Any] | None,
    prepare_s: float,
    executor: Executor | None = None,
) -> EvaluationResult:
    """Step 9: the produced model (and float32, int8 with --reference int8) on held-out data."""

    rows = [ModelRow(RowSpec("float32"), None, "float32")]
    if "int8" in evaluation_set.config.row_kinds and produced.kind != "int8":
        rows.append(
            ModelRow(RowSpec("int8", 1, "channel", "activations"), int8_model, "int8 (T=1)")
        )
    rows.append(
        ModelRow(
            produced, sim_model, produced.name({}), prepare_s=prepare_s,
            recalibration=recal_report if produced.recalibrated else None,
        )
    )  # fmt: skip
    return evaluate_models(
        evaluation_set, rows, int8_model=int8_model, calib=data, executor=executor
    )


@dataclass(frozen=True)
class PreparedModel:
    """The float model as every later step sees it, and the rewrite plan."""

    model: onnx.ModelProto
    source: Path | None
    plan: RewritePlan
    inputs: tuple[InputSpec, ...]
    threads: dict[str, int]  # every rewritten node -> the threads it will run at


def prepare_for_transform(
    model: str | Path | onnx.ModelProto,
    config: TransformConfig,
    layout: DataLayout | None = None,
) -> PreparedModel:
    """Steps 1 and 3 — every check ``transform`` makes of the model before it sees data.

    Load and check the model, convert what the configured steps need (opset
    for QDQ export and for the recalibration probes), name the nodes, read the
    inputs, plan the rewrite and resolve the per-layer threads. ``inspect``
    runs exactly this, so a model it accepts does not fail ``transform`` for a
    reason of the model's.
    """
    float_model, source_path = _load(model)
    if config.exports_qdq:
        float_model = _upgrade_for_qdq(float_model)
    if config.recalibration.enabled:
        float_model = _upgrade_opset(
            float_model, MIN_PROBE_OPSET, "recalibration (statistics probes)",
            "convert the model to a newer opset yourself or pass --no-recalibrate",
        )  # fmt: skip
    ensure_node_names(float_model)
    if layout is not None and not isinstance(layout, DataLayout):
        raise ConfigError(f"layout must be a DataLayout; got {type(layout).__name__}")
    inputs = model_inputs(float_model, layout)
    plan = plan_rewrite(float_model, config.selection)
    if not plan.candidates:
        raise _no_candidates_error(plan)
    threads = config.layer_threads.resolve([c.node_name for c in plan.candidates], config.threads)
    return PreparedModel(float_model, source_path, plan, inputs, threads)


def transform(
    model: str | Path | onnx.ModelProto,
    calib_data: Any,
    config: TransformConfig | None = None,
    *,
    images: ImagePreprocessing | None = None,
    ranges: Mapping[str, ActivationRange] | None = None,
    eval_data: Any = None,
    eval_labels: Any = None,
    eval_config: EvaluateConfig | None = None,
    layout: DataLayout | None = None,
    executor: Executor | None = None,
    guard_data: Any = None,
) -> TransformResult:
    """Rewrite ``model`` into an NB-SMT simulation model (and a QDQ model) — see the module doc.

    ``guard_data`` (the sources ``calib_data`` takes): samples the recalibration
    guard validates on; by default it holds out a seeded part of the calibration
    samples (``RecalibrationConfig.guard_fraction``) and estimates on the rest.

    ``layout`` (a ``DataLayout``): inputs whose samples lie along another axis
    than 0, and inputs that are constant for every sample (from the data or an
    ``.npy`` file); scalar inputs are always constant (docs/transform.md, "Calibration data").

    ``calib_data``: a path (.npz, .npy, folder of arrays or images), ``"random"``
    (smoke tests only), a dict of arrays, or an iterable of feed dicts.

    ``executor``: where the range pass and the statistics pass run
    (``runtime.executor``; in process by default, ``RayExecutor`` for workers —
    the results are identical).

    ``ranges``: activation ranges to use instead of the float calibration pass
    (``TransformResult.ranges`` of a transform of the same model, data and
    selection; every rewritten node's input must be present).

    ``eval_data`` (held-out data, the sources ``calib_data`` takes) turns on
    step 9: the produced simulation model is scored against the float model
    with ``evaluate``'s metrics (top-1/top-5 with ``eval_labels``, agreement,
    KL, cosine, SQNR), and the gate of ``eval_config`` (an ``EvaluateConfig``:
    ``max_drop`` vs its ``reference`` row, ``min_agreement``; also
    ``eval_samples``, ``eval_batch_size``, ``eval_seed``, ``output``,
    ``output_kind``, ``layer_samples``) is applied to it. Its rows are
    float32, int8 (when ``reference="int8"``) and the produced model; its
    ``rows``, ``gate_rows``, sweep and ``transform`` fields are not used. The
    result is in ``TransformResult.evaluation`` and ``report["evaluation"]``;
    a missed gate does not raise: ``TransformResult.exit_code`` is 3.
    """
    started = time.perf_counter()
    warnings: list[str] = []
    config = TransformConfig() if config is None else config
    if not isinstance(config, TransformConfig):
        raise ConfigError(f"config must be a TransformConfig; got {type(config).__name__}")
    if eval_data is None and (eval_labels is not None or eval_config is not None):
        raise ConfigError(
            "evaluation labels / thresholds need held-out evaluation data (eval_data, --eval-data)"
        )
    get_library_path()  # fail before any long pass if the library is missing
    _register_schemas()

    prepared = prepare_for_transform(model, config, layout)
    float_model, source_path, plan = prepared.model, prepared.source, prepared.plan

    specs = prepared.inputs

    def open_data(source: Any) -> CalibrationData:
        """Calibration-like data (calibration or guard samples) with the transform's settings."""
        return open_calibration_data(
            source,
            specs,
            num_samples=config.num_samples,
            batch_size=config.batch_size,
            seed=config.seed,
            images=images,
            layout=layout,
        )

    data = open_data(calib_data)
    if data.is_random:
        msg = (
            "calibration with RANDOM data: scales are meaningless for real inputs (smoke test only)"
        )
        log.warning(msg)
        warnings.append(msg)
    data.first_batch()

    recalibrates = config.recalibration.enabled and not data.is_random
    produced = _produced_row(config, recalibrates) if eval_data is not None else None
    evaluation_set = None
    if produced is not None:
        evaluation_set = _open_evaluation_set(
            float_model, source_path, calib_data, eval_data, eval_labels, eval_config,
            produced.kind, images,
        )  # fmt: skip

    if ranges is None:
        act_ranges = collect_ranges(
            float_model, plan.activation_tensors, data, config.ranges, progress=config.progress,
            executor=executor,
        )  # fmt: skip
    else:
        act_ranges = _given_ranges(ranges, plan.activation_tensors)
        log.info("using %d activation range(s) given by the caller", len(act_ranges))

    rewritten = rewrite_model(float_model, plan, act_ranges, config)
    io.check_model(rewritten.model, what="simulation model")
    # Per-layer threads before recalibration: it must see the arithmetic that will run.
    assigned = assign_threads(rewritten.model, config.layer_threads, config.threads)
    rewritten = replace(rewritten, model=assigned.model)

    if config.recalibration.enabled and not data.is_random and data.num_samples < FEW_SAMPLES:
        warnings.append(
            f"recalibration estimates per-channel statistics from {data.num_samples} calibration "
            f"sample(s); with fewer than {FEW_SAMPLES} they are mostly noise (pass more with "
            "--num-samples, or --no-recalibrate)"
        )
        log.warning(warnings[-1])
    guarded = None
    if guard_data is not None and config.recalibration.enabled and config.recalibration.guard:
        guarded = open_data(guard_data)
        guarded.first_batch()
    sim_model, recal_report = _recalibrate(
        float_model, rewritten, data, config, guarded, executor
    )

    stats = _run_with_stats(sim_model, data, config, executor)
    first = data.first_batch()
    try:
        macs = layer_macs(sim_model, {k: v.shape for k, v in first.items()}, data.samples_in(first))
    except InternalError as err:  # a reporting figure must not stop the transform
        macs = None
        warnings.append(f"speed-up figure unavailable: {err}")
        log.warning(warnings[-1])
    if macs is not None and macs.unknown:
        warnings.append(
            "speed-up figure unavailable: shapes unknown for " + ", ".join(macs.unknown[:5])
        )
        log.warning(warnings[-1])

    settings = config.to_dict()
    _metadata(sim_model, "simulation", settings)
    qdq_model = None
    exports: dict[str, Any] = {"sim": config.exports_sim, "qdq": config.exports_qdq}
    if config.exports_qdq:
        qdq_model = to_qdq(sim_model, config.qdq_types)
        io.check_model(qdq_model, what="QDQ model")
        _metadata(qdq_model, "qdq", settings)
        exports["qdq_types"] = config.qdq_types
        exports["qdq_vs_threads1_simulation"] = compare_qdq(
            sim_model, qdq_model, data.first_batch(), executor=executor
        )
        exports["qdq_vs_threads1_simulation_ort_defaults"] = compare_qdq(
            sim_model, qdq_model, data.first_batch(), optimize=True, executor=executor
        )
        deployed_warning = _deployed_qdq_warning(exports, config.qdq_types)
        if deployed_warning:
            log.warning("%s", deployed_warning)
            warnings.append(deployed_warning)

    evaluation = None
    if evaluation_set is not None:
        int8_model = with_nbsmt_settings(rewritten.model, 1, config.mapping, config.reduce)
        evaluation = _evaluate_produced(
            evaluation_set, int8_model, sim_model, produced, data, recal_report,
            time.perf_counter() - started, executor,
        )  # fmt: skip
        warnings.extend(w for w in evaluation.warnings if w not in warnings)

    report = build_report(
        version=_version(),
        settings=settings,
        source=str(source_path) if source_path else "<ModelProto>",
        data={
            "source": data.description,
            "samples": data.num_samples,
            "batch_size": data.batch_size,
            "seed": data.seed,
            "random": data.is_random,
            "activation_ranges": "calibrated" if ranges is None else "given by the caller",
        },
        rewritten=rewritten.rewritten,
        skipped=rewritten.skipped,
        stats=stats,
        threads=assigned.threads,
        macs=macs,
        recalibration=recal_report,
        exports=exports,
        warnings=warnings,
    )
    if evaluation is not None:
        # The transform's own settings are the report's; the sweep fields were not used.
        ev_dict = evaluation.to_dict()
        for key in ("transform", "threads", "mappings", "reduces"):
            ev_dict["settings"].pop(key, None)
        report["evaluation"] = {
            k: v for k, v in ev_dict.items() if k not in ("transform", "warnings")
        }
    report["wall_time_s"] = round(time.perf_counter() - started, 3)
    return TransformResult(
        sim_model,
        qdq_model,
        report,
        config,
        source_path,
        warnings,
        ranges=dict(act_ranges),
        evaluation=evaluation,
    )


@dataclass(frozen=True)
class BatchNormEntry:
    """A BN layer as ``inspect`` shows it."""

    name: str
    producer: str | None
    producer_op: str | None
    fold_target: str | None
    note: str


@dataclass(frozen=True)
class InspectResult:
    """What ``transform`` would do to a model, without calibration data."""

    path: str
    opset: int
    rewritten: tuple[tuple[str, str, str], ...]  # (node, op type, weight origin)
    skipped: tuple[SkippedNode, ...]
    batchnorms: tuple[BatchNormEntry, ...]
    threads: Mapping[str, int] = field(default_factory=dict)  # node -> T it would run at
    inputs: tuple[InputSpec, ...] = ()
    outputs: tuple[tuple[str, str, str], ...] = ()  # (name, dtype, shape)

    def data_layout(self) -> list[str]:
        """How calibration data for this model is written (one line per input)."""
        lines = []
        for s in self.inputs:
            if s.batch_axis is None:
                lines.append(f"{s.name}: {s.dtype} {s.describe()}, the same for every sample")
            else:
                lines.append(
                    f"{s.name}: {s.dtype} {s.describe()}, samples along axis {s.batch_axis}"
                )
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.path,
            "opset": self.opset,
            "inputs": [
                {
                    "name": s.name,
                    "dtype": str(s.dtype),
                    "shape": s.describe(),
                    "batch_axis": s.batch_axis,
                }
                for s in self.inputs
            ],
            "outputs": [{"name": n, "dtype": d, "shape": sh} for n, d, sh in self.outputs],
            "rewritten": [
                {"node": n, "op_type": o, "weight_origin": w, "threads": self.threads.get(n)}
                for n, o, w in self.rewritten
            ],
            "skipped": [
                {"node": s.node_name, "op_type": s.op_type, "reason": s.reason}
                for s in self.skipped
            ],
            "batchnorms": [b.__dict__ for b in self.batchnorms],
        }


def inspect(
    model: str | Path | onnx.ModelProto,
    config: TransformConfig | None = None,
    layout: DataLayout | None = None,
) -> InspectResult:
    """The preflight of ``transform``: its model checks (the same code), the inputs and
    outputs, what would be rewritten and at which threads, what not and why, the BN layers.

    Raises what ``transform`` would raise for the model (with the same ``config``).
    """
    config = config or TransformConfig()
    prepared = prepare_for_transform(model, config, layout)
    float_model, plan = prepared.model, prepared.plan
    bns: Sequence[BatchNormEntry] = ()
    if any(n.op_type == "BatchNormalization" for n in float_model.graph.node):
        bns = _inspect_batchnorms(float_model, plan, config)
    return InspectResult(
        path=str(prepared.source) if prepared.source else "<ModelProto>",
        opset=io.default_opset(float_model),
        rewritten=tuple((c.node_name, c.op_type, c.weight_origin) for c in plan.candidates),
        skipped=plan.skipped,
        batchnorms=tuple(bns),
        threads=prepared.threads,
        inputs=prepared.inputs,
        outputs=tuple(_describe_value(v) for v in float_model.graph.output),
    )


def _describe_value(vi: onnx.ValueInfoProto) -> tuple[str, str, str]:
    """(name, dtype, shape) of a graph input/output as text ("?" for unknown dims)."""
    if not vi.type.HasField("tensor_type"):
        return vi.name, "non-tensor", "?"
    tt = vi.type.tensor_type
    dtype = (
        str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))) if tt.elem_type else "?"
    )
    if not tt.HasField("shape"):
        return vi.name, dtype, "?"
    dims = [
        str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim
    ]
    return vi.name, dtype, "(" + ", ".join(dims) + ")"


def _inspect_batchnorms(
    model: onnx.ModelProto, plan: RewritePlan, config: TransformConfig
) -> list[BatchNormEntry]:
    """BN layers of the model as they would be after the rewrite (fold targets, blockers)."""
    from nbsmt_onnx.graph.bn import find_batchnorms

    # Placeholder ranges: only the graph structure matters here, not the scales.
    preview = rewrite_model(
        model, plan, {t: ActivationRange(0.0, 1.0, False) for t in plan.activation_tensors}, config
    ).model
    out = []
    for info in find_batchnorms(preview):
        if info.fold_target:
            note = f"folds into {info.fold_target}"
        elif not info.affected:
            note = "not affected by NB-SMT (no NB-SMT op upstream)"
        else:
            note = (
                f"kept, recalibrated in place: {info.fold_blocker}"
                if info.recalibratable
                else (f"not recalibrated: {info.recalibration_blocker}")
            )
        out.append(
            BatchNormEntry(info.name, info.producer, info.producer_op, info.fold_target, note)
        )
    return out


def evaluate(
    model: str | Path | onnx.ModelProto,
    eval_data: Any,
    calib_data: Any,
    config: EvaluateConfig | None = None,
    *,
    labels: Any = None,
    images: ImagePreprocessing | None = None,
    executor: Executor | None = None,
) -> EvaluationResult:
    """Evaluate float32 / int8 / NB-SMT (with and without recalibration) on held-out data.

    ``eval_data`` / ``calib_data``: what ``transform`` accepts as calibration
    data (paths, mappings of arrays, feed iterables; ``"random"`` only for
    calibration, smoke tests). ``labels``: a ``.npy`` / ``.csv`` path, an
    array, ``"folders"`` (class sub-folders of an image folder), or None for
    fidelity metrics only. ``images``: preprocessing of image folders (both sets).
    ``executor``: where the transforms' range and statistics passes run (see ``transform``).
    """
    started = time.perf_counter()
    config = EvaluateConfig() if config is None else config
    if not isinstance(config, EvaluateConfig):
        raise ConfigError(f"config must be an EvaluateConfig; got {type(config).__name__}")
    warnings: list[str] = []
    if isinstance(eval_data, str) and eval_data == "random":
        raise DataError("evaluation data cannot be 'random'; pass held-out data with --data")
    check_disjoint_paths(eval_data, calib_data)
    get_library_path()  # fail before any long pass if the library is missing

    if isinstance(model, onnx.ModelProto):
        float_model = onnx.ModelProto()
        float_model.CopyFrom(model)
        io.check_model(float_model, what="input model")
        model_name = "<ModelProto>"
    else:
        float_model = io.load_model(Path(model))
        model_name = str(model)
    if config.output is not None and config.output not in {
        o.name for o in float_model.graph.output
    }:
        names = ", ".join(o.name for o in float_model.graph.output)
        raise ConfigError(f"model has no output {config.output!r}; its outputs are {names}")

    specs = model_inputs(float_model)
    tc = config.transform
    calib = open_calibration_data(
        calib_data, specs, num_samples=tc.num_samples, batch_size=tc.batch_size, seed=tc.seed,
        images=images,
    )  # fmt: skip
    evaluation = open_evaluation(
        float_model, eval_data, config, labels=labels, images=images, model_name=model_name
    )

    swept = {"mapping": len(config.mappings) > 1, "reduce": len(config.reduces) > 1}
    planned = plan_rows(config)
    unavailable: dict[str, str] = {}
    for spec in planned:
        if not spec.recalibrated:
            continue
        reason = None
        if calib.is_random:
            reason = "random calibration data (recalibration needs real data)"
        if reason is not None:
            if config.rows is not None:
                raise ConfigError(f"row {spec.kind!r} cannot be computed: {reason}")
            unavailable[spec.id] = reason
            warnings.append(f"{spec.name(swept)}: unavailable: {reason}")

    # --- models: one int8 transform, attribute edits, one transform per recalibrated row.
    # The recalibrated rows reuse the int8 transform's activation ranges (the float pass
    # over the calibration data gives the same ranges for every variant).
    t0 = time.perf_counter()
    int8_spec = RowSpec("int8", 1, "channel", "activations")
    base = transform(float_model, calib, variant_config(tc, int8_spec), executor=executor)
    base_s = time.perf_counter() - t0
    warnings.extend(w for w in base.warnings if w not in warnings)
    int8_model = base.sim_model
    rows: list[ModelRow] = []
    for spec in planned:
        name = spec.name(swept)
        if spec.id in unavailable:
            rows.append(ModelRow(spec, None, name, available=False, note=unavailable[spec.id]))
        elif spec.is_float:
            rows.append(ModelRow(spec, None, name))
        elif not spec.recalibrated:
            assert spec.threads and spec.mapping and spec.reduce
            model_t = with_nbsmt_settings(int8_model, spec.threads, spec.mapping, spec.reduce)
            rows.append(
                ModelRow(spec, model_t, name, prepare_s=base_s if spec.kind == "int8" else 0.0)
            )
        else:
            log.info("transform with recalibration: %s", name)
            t0 = time.perf_counter()
            res = transform(
                float_model, calib, variant_config(tc, spec), ranges=base.ranges, executor=executor
            )
            rows.append(
                ModelRow(
                    spec, res.sim_model, name, prepare_s=time.perf_counter() - t0,
                    recalibration=res.report.get("recalibration"),
                )
            )  # fmt: skip
    return evaluate_models(
        evaluation,
        rows,
        int8_model=int8_model,
        calib=calib,
        warnings=warnings,
        transform_report=base.report,
        started=started,
        executor=executor,
    )


@dataclass(frozen=True)
class RunResult:
    """What ``run`` produced: every output of the model on the samples, and the comparison."""

    outputs: dict[str, np.ndarray]
    samples: int
    comparisons: list[OutputComparison]
    reference: str | None

    def format_table(self) -> str:
        if not self.comparisons:
            lines = [f"{n}: shape {list(v.shape)}, {v.dtype}" for n, v in self.outputs.items()]
            return "\n".join(lines)
        return format_comparisons(self.comparisons)


def run(
    model: str | Path | onnx.ModelProto,
    data: Any,
    *,
    reference: str | Path | onnx.ModelProto | None = None,
    num_samples: int = 16,
    batch_size: int = 16,
    seed: int = 0,
    images: ImagePreprocessing | None = None,
    layout: DataLayout | None = None,
    executor: Executor | None = None,
) -> RunResult:
    """Run ``model`` (a simulation, QDQ or float model) on ``num_samples`` samples of ``data``.

    With ``reference`` (e.g. the float model the simulation was made from), the
    same samples go through it too and every output of the same name is
    compared (max/mean absolute difference, cosine, SQNR, argmax agreement).
    Sessions come from the one factory, so simulation models get the NB-SMT
    library registered.
    """
    loaded = model if isinstance(model, onnx.ModelProto) else io.load_model(Path(model))
    ref_model = None
    if reference is not None:
        ref_model = (
            reference if isinstance(reference, onnx.ModelProto) else io.load_model(Path(reference))
        )
    if any(op.domain == schema.DOMAIN for op in loaded.opset_import):
        get_library_path()  # one-line error if the library is missing, before any run
    specs = model_inputs(loaded, layout)
    opened = open_calibration_data(
        data, specs, num_samples=num_samples, batch_size=batch_size, seed=seed, images=images,
        layout=layout,
    )  # fmt: skip
    executor = executor or LocalExecutor()
    names = tuple(o.name for o in loaded.graph.output)
    jobs = [Job(loaded, opened, OutputCollector(names), what="model")]
    if ref_model is not None:
        ref_names = tuple(o.name for o in ref_model.graph.output)
        if not set(names) & set(ref_names):
            raise ConfigError(
                f"the model's outputs {list(names)} and the reference's {list(ref_names)} share "
                "no name; compare a model with the one it was made from"
            )
        jobs.append(Job(ref_model, opened, OutputCollector(ref_names), what="reference model"))
    results = [concatenate(r) for r in executor.map(jobs)]
    comparisons = compare_outputs(results[0], results[1]) if ref_model is not None else []
    return RunResult(
        outputs=results[0],
        samples=opened.num_samples,
        comparisons=comparisons,
        reference=(
            None
            if reference is None
            else "<ModelProto>"
            if isinstance(reference, onnx.ModelProto)
            else str(reference)
        ),
    )
