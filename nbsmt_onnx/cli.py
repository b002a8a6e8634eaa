"""Command-line interface: a thin layer over the Python API.

User errors (``NbsmtError``) are printed as one line, without a traceback,
and turned into a non-zero exit code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from nbsmt_onnx import __version__
from nbsmt_onnx.config import (
    CORRECTION_CHOICES,
    QDQ_TYPES_CHOICES,
    RANGE_ESTIMATORS,
    STRATEGY_CHOICES,
    DataLayout,
    ImagePreprocessing,
    RangeConfig,
    RecalibrationConfig,
    Selection,
    TransformConfig,
)
from nbsmt_onnx.errors import ConfigError, NbsmtError

NO_CALIB_MESSAGE = (
    "calibration data is needed: NB-SMT quantizes every activation with a scale measured on real "
    "inputs, and the report's statistics come from running them. Pass --calib DATA (an .npz/.npy "
    "keyed by input name, a folder of .npy/.npz files or a folder of images), or --calib random "
    "for a smoke test only"
)


def _data_layout(batch_axes: tuple[str, ...], constants: tuple[str, ...]) -> DataLayout:
    """``--batch-axis NAME=AXIS`` and ``--constant NAME[=FILE]`` as a ``DataLayout``."""
    axes: dict[str, int] = {}
    for item in batch_axes:
        name, sep, axis = item.rpartition("=")
        if not sep or not name or not axis.strip().isdigit():
            raise ConfigError(
                f"--batch-axis takes NAME=AXIS with AXIS >= 0, e.g. state=1; got {item!r}"
            )
        axes[name] = int(axis)
    consts: dict[str, str | None] = {}
    for item in constants:
        name, sep, path = item.partition("=")
        if not name or (sep and not path):
            raise ConfigError(f"--constant takes NAME or NAME=FILE.npy; got {item!r}")
        consts[name] = path if sep else None
    return DataLayout(batch_axes=tuple(axes.items()), constants=tuple(consts.items()))


class _Interrupted(KeyboardInterrupt):
    """SIGTERM/SIGHUP turned into an exception, so cleanup (``finally``) runs as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise _Interrupted(signum)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        import signal

        # The default action of SIGTERM/SIGHUP kills the process at once, skipping the
        # cleanup of temporary files; as exceptions they unwind like Ctrl-C does.
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                previous[sig] = signal.signal(sig, _raise_interrupted)
        try:
            return super().invoke(ctx)
        except NbsmtError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt as err:
            signum = err.signum if isinstance(err, _Interrupted) else signal.SIGINT
            click.echo(
                f"error: interrupted ({signal.Signals(signum).name}); no output was written "
                "(files of a save in progress were removed)",
                err=True,
            )
            sys.exit(128 + int(signum))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="nbsmt-onnx: %(levelname)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("nbsmt_onnx").setLevel(level)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="nbsmt-onnx")
def main() -> None:
    """Simulate NB-SMT accelerators on ONNX models and recalibrate BatchNorm."""


@main.command("library-path")
def library_path() -> None:
    """Print the path of the NB-SMT custom-op library (for other ONNX Runtime users)."""
    from nbsmt_onnx.runtime.library import get_library_path

    click.echo(get_library_path())


def _selection_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--include",
            "include_names",
            multiple=True,
            metavar="NAME",
            help="Rewrite only nodes with this name (repeatable).",
        ),
        click.option(
            "--include-regex",
            multiple=True,
            metavar="REGEX",
            help="Rewrite only nodes whose name fully matches (repeatable).",
        ),
        click.option(
            "--include-op-type",
            multiple=True,
            type=click.Choice(["Conv", "MatMul", "Gemm"]),
            help="Rewrite only this op type (repeatable).",
        ),
        click.option(
            "--exclude",
            "exclude_names",
            multiple=True,
            metavar="NAME",
            help="Keep this node in float (repeatable).",
        ),
        click.option(
            "--exclude-regex",
            multiple=True,
            metavar="REGEX",
            help="Keep nodes whose name fully matches in float (repeatable).",
        ),
        click.option(
            "--exclude-op-type",
            multiple=True,
            type=click.Choice(["Conv", "MatMul", "Gemm"]),
            help="Keep this op type in float (repeatable).",
        ),
        click.option(
            "--keep-first/--no-keep-first",
            default=False,
            show_default=True,
            help="Keep the first NB-SMT layer(s) in float.",
        ),
        click.option(
            "--keep-last/--no-keep-last",
            default=False,
            show_default=True,
            help="Keep the last NB-SMT layer(s) in float.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _selection(kw: dict[str, Any]) -> Selection:
    return Selection(
        include_names=kw.pop("include_names"),
        include_regex=kw.pop("include_regex"),
        include_op_types=kw.pop("include_op_type"),
        exclude_names=kw.pop("exclude_names"),
        exclude_regex=kw.pop("exclude_regex"),
        exclude_op_types=kw.pop("exclude_op_type"),
        keep_first=bool(kw.pop("keep_first")),
        keep_last=bool(kw.pop("keep_last")),
    )


def _size(value: str | None, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        parts = tuple(int(v) for v in value.lower().replace("x", ",").split(",") if v)
    except ValueError:
        raise ConfigError(f"--{name} takes N or HxW (e.g. 256 or 224x224); got {value!r}") from None
    return parts


def _floats(value: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--{name} takes 1 or 3 comma-separated numbers; got {value!r}") from None


def _options(*decorators: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Callable[..., Any]:
    """Bundle click options so that commands sharing them declare them once."""

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


# Defaults come from the config dataclasses: one source of truth for API and CLI.
_TC = TransformConfig()
_RC = RecalibrationConfig()
_RG = RangeConfig()
_IMG = ImagePreprocessing()

_calibration_options = _options(
    click.option(
        "--num-samples",
        type=int,
        default=_TC.num_samples,
        show_default=True,
        help="Calibration samples drawn (seeded).",
    ),
    click.option(
        "--batch-size",
        type=int,
        default=_TC.batch_size,
        show_default=True,
        help="Calibration batch size (a fixed model batch wins).",
    ),
    click.option(
        "--seed",
        type=int,
        default=_TC.seed,
        show_default=True,
        help="Seed of the calibration draw.",
    ),
    click.option(
        "--range-estimator",
        type=click.Choice(list(RANGE_ESTIMATORS)),
        default=_RG.estimator,
        show_default=True,
        help="Activation range estimator.",
    ),
    click.option(
        "--percentile",
        type=float,
        default=_RG.percentile,
        show_default=True,
        help="Percentile for --range-estimator percentile.",
    ),
)

_recalibration_options = _options(
    click.option(
        "--strategy",
        type=click.Choice(list(STRATEGY_CHOICES)),
        default=_RC.strategy,
        show_default=True,
        help="BatchNorm recalibration strategy (docs/recalibration.md).",
    ),
    click.option(
        "--fold/--no-fold",
        default=_RC.fold,
        show_default=True,
        help="Fold recalibrated BN into the NB-SMT op's scale and bias.",
    ),
    click.option(
        "--correction",
        type=click.Choice(list(CORRECTION_CHOICES)),
        default=_RC.correction,
        show_default=True,
        help="Correction of NB-SMT layers without a BN after them (BN-fused models).",
    ),
    click.option(
        "--variance-bound",
        type=click.FloatRange(min=1.0),
        default=_RC.variance_bound,
        show_default=True,
        help="relative: also transfer the NB-SMT/clean variance ratio, clipped to [1/R, R]; "
        "1 = mean shift only, 4 = SPEC rule (model-dependent: docs/recalibration.md §7).",
    ),
    click.option(
        "--recal-samples",
        type=click.IntRange(min=1),
        default=_RC.samples,
        help="Calibration samples recalibration uses [default: as many as fit in one batch "
        "of --recal-memory: the exact two-pass route; more are streamed, one pass per BN level].",
    ),
    click.option(
        "--recal-memory",
        type=click.IntRange(min=1),
        default=_RC.memory_mb,
        show_default=True,
        help="Activation memory (MB) one recalibration batch may use (estimated from the graph).",
    ),
)


def _recalibration_config(kw: dict[str, Any], enabled: bool = True) -> RecalibrationConfig:
    """Pop the ``_recalibration_options`` of ``kw`` into a RecalibrationConfig."""
    return RecalibrationConfig(
        enabled=enabled,
        strategy=str(kw.pop("strategy")),
        fold=bool(kw.pop("fold")),
        correction=str(kw.pop("correction")),
        samples=kw.pop("recal_samples"),
        memory_mb=int(kw.pop("recal_memory")),
        variance_bound=float(kw.pop("variance_bound")),
    )


_evaluation_options = _options(
    click.option(
        "--eval-samples",
        type=int,
        default=None,
        help="Evaluate a seeded random subset of N samples [default: all].",
    ),
    click.option(
        "--eval-batch-size", type=int, default=16, show_default=True, help="Evaluation batch size."
    ),
)

_gate_options = _options(
    click.option(
        "--reference",
        type=click.Choice(["float32", "int8"]),
        default="float32",
        show_default=True,
        help="Row --max-drop is measured against.",
    ),
    click.option(
        "--max-drop",
        type=float,
        default=None,
        help="Gate: max top-1 drop in points vs --reference (exit 3 if missed).",
    ),
    click.option(
        "--min-agreement",
        type=float,
        default=None,
        help="Gate: min top-1 agreement with float32, e.g. 0.95 (exit 3 if missed).",
    ),
)

_image_options = _options(
    click.option(
        "--resize", metavar="N|HxW", help="Images: resize the shorter side to N, or to HxW exactly."
    ),
    click.option("--center-crop", metavar="N|HxW", help="Images: center crop to N x N or HxW."),
    click.option(
        "--mean",
        default=",".join(f"{v:g}" for v in _IMG.mean),
        show_default=True,
        help="Images: per-channel mean (RGB order) after dividing by --pixel-scale.",
    ),
    click.option(
        "--std",
        default=",".join(f"{v:g}" for v in _IMG.std),
        show_default=True,
        help="Images: per-channel std (RGB order).",
    ),
    click.option(
        "--pixel-scale",
        type=float,
        default=_IMG.scale,
        show_default=True,
        help="Images: divide pixel values by this first.",
    ),
    click.option(
        "--layout",
        type=click.Choice(["NCHW", "NHWC"]),
        default=_IMG.layout,
        show_default=True,
        help="Images: model input layout.",
    ),
    click.option(
        "--channel-order",
        type=click.Choice(["RGB", "BGR"]),
        default=_IMG.channel_order,
        show_default=True,
        help="Images: channel order the model expects.",
    ),
)

_run_options = _options(
    click.option("--force", is_flag=True, help="Overwrite existing output files."),
    click.option(
        "--progress/--no-progress",
        default=None,
        help="Progress bars on stderr [default: when stderr is a terminal].",
    ),
    click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug)."),
)


@main.command("transform")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Output model [default: MODEL stem + .nbsmt.onnx beside MODEL].",
)
@click.option(
    "--qdq-output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="QDQ model path with --export both [default: OUTPUT stem + .qdq.onnx].",
)
@click.option(
    "--calib",
    "calib",
    metavar="DATA",
    help="Calibration data: .npz/.npy, a folder of arrays or images, or 'random' (smoke tests only).",
)
@click.option(
    "--batch-axis",
    "batch_axes",
    multiple=True,
    metavar="NAME=AXIS",
    help="Input NAME holds its samples along AXIS, e.g. state=1 for [layers, N, hidden] "
    "(repeatable; default 0).",
)
@click.option(
    "--constant",
    "constants",
    multiple=True,
    metavar="NAME[=FILE]",
    help="Input NAME is the same for every sample: its array in the data (or FILE, an .npy) "
    "has the input's exact shape and is fed with every batch (repeatable; scalars always are).",
)
@click.option(
    "--threads",
    type=click.Choice(["1", "2", "4"]),
    default="2",
    show_default=True,
    help="NB-SMT threads per MAC.",
)
@click.option(
    "--mapping",
    type=click.Choice(["channel", "interleave"]),
    default="channel",
    show_default=True,
    help="How the reduction axis is split among threads.",
)
@click.option(
    "--reduce",
    "reduce_",
    type=click.Choice(["activations", "weights"]),
    default="activations",
    show_default=True,
    help="Operand reduced on a 2-thread collision.",
)
@_calibration_options
@_selection_options
@click.option(
    "--export",
    type=click.Choice(["sim", "qdq", "both"]),
    default="sim",
    show_default=True,
    help="Models to write: NB-SMT simulation, standard QDQ, or both.",
)
@click.option(
    "--qdq-types",
    type=click.Choice(list(QDQ_TYPES_CHOICES)),
    default=_TC.qdq_types,
    show_default=True,
    help="Integer types of the QDQ model's activations x weights (same integers and scales): "
    "u8u8 stays exact in ONNX Runtime's fused kernels on CPUs without VNNI (docs/transform.md).",
)
@click.option(
    "--recalibrate/--no-recalibrate",
    default=_RC.enabled,
    show_default=True,
    help="Recalibrate BatchNorm statistics under NB-SMT (issue 3).",
)
@_recalibration_options
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the report here: HTML when PATH ends in .html/.htm, JSON otherwise.",
)
@click.option(
    "--eval-data",
    metavar="DATA",
    help="Held-out data: score the produced model against float32 (pipeline gate).",
)
@click.option(
    "--eval-labels",
    metavar="LABELS",
    help="Labels of --eval-data: .npy, .csv or 'folders' [default: agreement with float32].",
)
@_evaluation_options
@_gate_options
@_image_options
@_run_options
def transform_command(model: Path, **kw: Any) -> None:
    """Rewrite MODEL into an NB-SMT simulation model (and/or a QDQ model) with a report.

    With --eval-data, the produced model is also scored on held-out data
    (table printed, numbers in the report). Exit codes: 0 ok, 2 user error,
    3 a threshold (--max-drop/--min-agreement) was missed (outputs are written).
    """
    from nbsmt_onnx.api import output_paths, transform
    from nbsmt_onnx.io import check_destination

    _setup_logging(int(kw.pop("verbose")))
    calib = kw.pop("calib")
    if not calib:
        raise ConfigError(NO_CALIB_MESSAGE)
    progress = kw.pop("progress")
    config = TransformConfig(
        threads=int(kw.pop("threads")),
        mapping=str(kw.pop("mapping")),
        reduce=str(kw.pop("reduce_")),
        num_samples=kw.pop("num_samples"),
        batch_size=kw.pop("batch_size"),
        seed=kw.pop("seed"),
        ranges=RangeConfig(
            estimator=str(kw.pop("range_estimator")), percentile=kw.pop("percentile")
        ),
        selection=_selection(kw),
        export=str(kw.pop("export")),
        qdq_types=str(kw.pop("qdq_types")),
        recalibration=_recalibration_config(kw, enabled=bool(kw.pop("recalibrate"))),
        progress=sys.stderr.isatty() if progress is None else bool(progress),
    )
    images = ImagePreprocessing(
        resize=_size(kw.pop("resize"), "resize"),
        crop=_size(kw.pop("center_crop"), "center-crop"),
        mean=_floats(str(kw.pop("mean")), "mean"),
        std=_floats(str(kw.pop("std")), "std"),
        scale=kw.pop("pixel_scale"),
        layout=str(kw.pop("layout")),
        channel_order=str(kw.pop("channel_order")),
    )
    eval_config, eval_data, eval_labels = _transform_evaluation(kw, config.progress)
    force = bool(kw.pop("force"))
    report_path = kw.pop("report_path")
    paths = output_paths(model, config.export, kw.pop("output"), kw.pop("qdq_output"))
    # Refuse before the long passes: an existing output, the input itself, an unwritable directory.
    for p in [*paths.values(), *([report_path] if report_path else [])]:
        check_destination(Path(p), force=force, protect=(model,))
    if calib == "random":
        click.echo(
            "WARNING: --calib random: activation scales come from random numbers; the output is for "
            "smoke tests only and recalibration is skipped",
            err=True,
        )

    result = transform(
        model,
        calib,
        config,
        layout=_data_layout(kw.pop("batch_axes"), kw.pop("constants")),
        images=images,
        eval_data=eval_data,
        eval_labels=eval_labels,
        eval_config=eval_config,
    )
    written = result.save(
        paths.get("sim", paths.get("qdq")),
        qdq_output=paths.get("qdq") if "sim" in paths else None,
        report_path=report_path,
        force=force,
    )
    summary = result.report["summary"]
    click.echo(
        f"rewrote {summary['rewritten']} node(s) into NB-SMT ops, skipped {summary['skipped']}"
    )
    nbsmt = summary.get("nbsmt")
    if nbsmt:
        click.echo(
            f"T={config.threads}: MAC utilization {nbsmt['mac_utilization']:.3f}, "
            f"collision rate {nbsmt['collision_rate']:.3f}, "
            f"squeezed operands {nbsmt['squeezed_operand_fraction']:.3f}"
        )
    recal = result.report.get("recalibration")
    if recal:
        click.echo(_recalibration_line(recal))
    for path in written:
        click.echo(f"wrote {path}")
    if result.evaluation is not None:
        click.echo(result.evaluation.format_table())
        sys.exit(result.exit_code)


def _recalibration_line(recal: dict[str, Any]) -> str:
    """One line on what recalibration did (from the report's ``recalibration`` section)."""
    if "skipped" in recal and "strategy" not in recal:
        return f"recalibration skipped: {recal['skipped']}"
    parts = [f"{recal['strategy']} on {len(recal['batchnorms'])} BN(s), {recal['passes']} pass(es)"]
    correction = recal.get("correction")
    if correction:
        parts.append(
            f"{correction['variant']} correction of {len(correction['layers'])} layer(s), "
            f"{correction['passes']} pass(es)"
        )
    if "fold" in recal:
        parts.append(f"{len(recal['fold']['folded'])} BN(s) folded")
    batches = recal.get("batches")
    tail = f"; {batches['note']}" if batches else ""
    return "recalibration: " + ", ".join(parts) + tail


def _transform_evaluation(kw: dict[str, Any], progress: bool) -> tuple[Any, Any, Any]:
    """``transform``'s evaluation options -> (EvaluateConfig | None, eval data, labels)."""
    from nbsmt_onnx.evaluate import EvaluateConfig

    eval_data, eval_labels = kw.pop("eval_data"), kw.pop("eval_labels")
    options = {
        "eval_samples": kw.pop("eval_samples"),
        "eval_batch_size": kw.pop("eval_batch_size"),
        "reference": str(kw.pop("reference")),
        "max_drop": kw.pop("max_drop"),
        "min_agreement": kw.pop("min_agreement"),
    }
    if eval_data is None:
        given = [
            f"--{name.replace('_', '-')}"
            for name, value in (
                ("eval_labels", eval_labels),
                ("eval_samples", options["eval_samples"]),
                ("max_drop", options["max_drop"]),
                ("min_agreement", options["min_agreement"]),
                ("reference", None if options["reference"] == "float32" else "int8"),
            )
            if value is not None
        ]
        if given:
            raise ConfigError(f"{', '.join(given)} need(s) held-out data: add --eval-data DATA")
        return None, None, None
    return EvaluateConfig(progress=progress, **options), eval_data, eval_labels


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@_selection_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("-v", "--verbose", count=True, help="More log output.")
def inspect_command(model: Path, **kw: Any) -> None:
    """List what transform would rewrite in MODEL, what not and why, and its BatchNorm layers."""
    from nbsmt_onnx.api import inspect

    _setup_logging(int(kw.pop("verbose")))
    as_json = bool(kw.pop("as_json"))
    result = inspect(model, TransformConfig(selection=_selection(kw)))
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(f"{result.path} (opset {result.opset})")
    click.echo(f"rewritten ({len(result.rewritten)}):")
    for name, op_type, origin in result.rewritten:
        click.echo(f"  {name}  {op_type} -> NB-SMT  (weights: {origin})")
    click.echo(f"not rewritten ({len(result.skipped)}):")
    for s in result.skipped:
        click.echo(f"  {s.node_name}  {s.op_type}: {s.reason}")
    click.echo(f"BatchNormalization layers ({len(result.batchnorms)}):")
    for bn in result.batchnorms:
        after = f"after {bn.producer} ({bn.producer_op})" if bn.producer else "on a graph input"
        click.echo(f"  {bn.name}  {after}: {bn.note}")


def _csv_list(value: str, name: str, cast: type = str) -> tuple[Any, ...]:
    try:
        return tuple(cast(v.strip()) for v in value.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--{name} takes a comma-separated list; got {value!r}") from None


@main.command("evaluate")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--data",
    "data",
    required=True,
    metavar="DATA",
    help="Held-out evaluation data (.npz/.npy or a folder of arrays or images).",
)
@click.option(
    "--labels",
    metavar="LABELS",
    help="Labels: .npy, .csv, or 'folders' (class sub-folders of --data) [default: none, fidelity to float32 only].",
)
@click.option(
    "--calib", "calib", metavar="DATA", help="Calibration data (must not overlap --data)."
)
@click.option(
    "--rows",
    default=None,
    help="Row kinds: float32, int8, int8+recal, nbsmt, nbsmt+recal "
    "[default: float32,int8,nbsmt,nbsmt+recal].",
)
@click.option(
    "--threads", default="2,4", show_default=True, help="NB-SMT threads to sweep (comma-separated)."
)
@click.option(
    "--mapping",
    default="channel",
    show_default=True,
    help="Mappings to sweep: channel, interleave.",
)
@click.option(
    "--reduce",
    "reduce_",
    default="activations",
    show_default=True,
    help="Reduced operands to sweep: activations, weights.",
)
@_calibration_options
@_evaluation_options
@click.option(
    "--eval-seed", type=int, default=0, show_default=True, help="Seed of the evaluation subset."
)
@_selection_options
@_recalibration_options
@click.option(
    "--output", "output_name", metavar="NAME", help="Model output to score [default: the first]."
)
@click.option(
    "--output-kind",
    type=click.Choice(["auto", "logits", "probabilities"]),
    default="auto",
    show_default=True,
    help="How KL reads the output.",
)
@_gate_options
@click.option(
    "--gate",
    "gate_rows",
    default=None,
    help="Row kinds the gate checks [default: nbsmt+recal if present, else nbsmt].",
)
@click.option(
    "--layer-samples",
    type=int,
    default=256,
    show_default=True,
    help="Samples for per-layer SQNR vs int8 (0 = off).",
)
@_image_options
@click.option(
    "--json", "as_json", is_flag=True, help="Print the result as JSON on stdout (nothing else)."
)
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the table as CSV here.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the HTML report here.",
)
@_run_options
def evaluate_command(model: Path, **kw: object) -> None:
    """Evaluate float32, int8 and NB-SMT (with/without recalibration) on held-out data.

    Exit codes: 0 ok, 2 user error, 3 a threshold (--max-drop/--min-agreement) was missed.
    """
    from nbsmt_onnx.evaluate import EvaluateConfig, evaluate, write_text
    from nbsmt_onnx.html_report import write_html
    from nbsmt_onnx.io import check_destination

    _setup_logging(int(kw.pop("verbose")))  # type: ignore[call-overload]
    calib = kw.pop("calib")
    if not calib:
        raise ConfigError(
            "evaluate needs calibration data: pass --calib DATA (held out from --data). The int8 "
            "and NB-SMT rows quantize every activation with a scale measured on it, and "
            "recalibration re-estimates BatchNorm statistics on it"
        )
    progress = kw.pop("progress")
    progress = sys.stderr.isatty() if progress is None else bool(progress)
    gate_rows, rows = kw.pop("gate_rows"), kw.pop("rows")
    transform_config = TransformConfig(
        num_samples=kw.pop("num_samples"),  # type: ignore[arg-type]
        batch_size=kw.pop("batch_size"),  # type: ignore[arg-type]
        seed=kw.pop("seed"),  # type: ignore[arg-type]
        ranges=RangeConfig(
            estimator=str(kw.pop("range_estimator")),
            percentile=kw.pop("percentile"),  # type: ignore[arg-type]
        ),
        selection=_selection(kw),
        recalibration=_recalibration_config(kw),
        progress=progress,
    )
    config = EvaluateConfig(
        rows=_csv_list(str(rows), "rows") if rows else None,
        threads=_csv_list(str(kw.pop("threads")), "threads", int),
        mappings=_csv_list(str(kw.pop("mapping")), "mapping"),
        reduces=_csv_list(str(kw.pop("reduce_")), "reduce"),
        transform=transform_config,
        eval_samples=kw.pop("eval_samples"),  # type: ignore[arg-type]
        eval_batch_size=kw.pop("eval_batch_size"),  # type: ignore[arg-type]
        eval_seed=kw.pop("eval_seed"),  # type: ignore[arg-type]
        output=kw.pop("output_name"),  # type: ignore[arg-type]
        output_kind=str(kw.pop("output_kind")),
        reference=str(kw.pop("reference")),
        max_drop=kw.pop("max_drop"),  # type: ignore[arg-type]
        min_agreement=kw.pop("min_agreement"),  # type: ignore[arg-type]
        gate_rows=_csv_list(str(gate_rows), "gate") if gate_rows else None,
        layer_samples=kw.pop("layer_samples"),  # type: ignore[arg-type]
        progress=progress,
    )
    images = ImagePreprocessing(
        resize=_size(kw.pop("resize"), "resize"),  # type: ignore[arg-type]
        crop=_size(kw.pop("center_crop"), "center-crop"),  # type: ignore[arg-type]
        mean=_floats(str(kw.pop("mean")), "mean"),
        std=_floats(str(kw.pop("std")), "std"),
        scale=kw.pop("pixel_scale"),  # type: ignore[arg-type]
        layout=str(kw.pop("layout")),
        channel_order=str(kw.pop("channel_order")),
    )
    force = bool(kw.pop("force"))
    csv_path, report_path = kw.pop("csv_path"), kw.pop("report_path")
    outputs = [p for p in (csv_path, report_path) if p is not None]
    if len({Path(p).resolve() for p in outputs}) != len(outputs):  # type: ignore[arg-type]
        raise ConfigError("--csv and --report name the same file; give distinct paths")
    for p in outputs:  # refuse before the long passes
        check_destination(Path(p), force=force, protect=(model,))  # type: ignore[arg-type]

    result = evaluate(model, kw.pop("data"), calib, config, labels=kw.pop("labels"), images=images)
    if csv_path is not None:
        write_text(csv_path, result.to_csv(), force=force)  # type: ignore[arg-type]
    if report_path is not None:
        write_html(result.to_dict(), report_path, force=force)  # type: ignore[arg-type]
    if bool(kw.pop("as_json")):
        click.echo(result.to_json())
    else:
        click.echo(result.format_table())
        for p in outputs:
            click.echo(f"wrote {p}")
    sys.exit(result.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()
