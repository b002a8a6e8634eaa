"""Command-line interface: a thin layer over the Python API.

User errors (``NbsmtError``) are printed as one line, without a traceback,
and turned into a non-zero exit code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from nbsmt_onnx._version import __version__
from nbsmt_onnx.config import (
    CORRECTION_CHOICES,
    QDQ_TYPES_CHOICES,
    RANGE_ESTIMATORS,
    ROW_KINDS,
    STRATEGY_CHOICES,
    DataLayout,
    ImagePreprocessing,
    LayerThreads,
    RangeConfig,
    RecalibrationConfig,
    Selection,
    TransformConfig,
)
from nbsmt_onnx.errors import ConfigError, NbsmtError
from nbsmt_onnx.ops import schema

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


def _setup_logging(verbose: int, quiet: bool = False) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="nbsmt-onnx: %(levelname)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("nbsmt_onnx").setLevel(level)
    # Progress lines (when stderr is not a terminal) are shown unless -q, without a level.
    progress = logging.getLogger("nbsmt_onnx.progress")
    progress.setLevel(logging.WARNING if quiet else min(level, logging.INFO))
    if not progress.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("nbsmt-onnx: %(message)s"))
        progress.addHandler(handler)
        progress.propagate = False


#: --help sections: option destination -> section title, in display order.
_HELP_SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Inputs and outputs", (
        "calib", "data", "labels", "eval_data", "eval_labels", "output", "qdq_output", "export",
        "qdq_types", "plan_path", "report_path", "csv_path", "save_path", "as_json", "force",
    )),
    ("NB-SMT", (
        "threads", "layer_threads", "mapping", "reduce_", "rows", "choices",
    )),
    ("Calibration", ("num_samples", "batch_size", "seed", "range_estimator", "percentile")),
    ("Layers", (
        "include_names", "include_regex", "include_op_type", "exclude_names", "exclude_regex",
        "exclude_op_type", "keep_first", "keep_last",
    )),
    ("Recalibration", (
        "recalibrate", "strategy", "fold", "correction", "variance_bound", "recal_samples",
        "recal_memory", "shrink", "guard", "guard_fraction", "guard_blocks", "guard_margin",
        "guard_check_margin", "guard_retry_shrink",
        "guard_data",
        "sensitivity_recal",
    )),
    ("Evaluation, gate and search", (
        "eval_samples", "eval_batch_size", "eval_seed", "output_name", "output_kind", "reference",
        "max_drop", "min_agreement", "gate_bound", "gate_rows", "layer_samples", "metric", "bound",
    )),
    ("Data layout and image preprocessing", (
        "batch_axes", "constants", "resize", "center_crop", "mean", "std", "pixel_scale", "layout",
        "channel_order",
    )),
    ("Execution and messages", (
        "executor", "workers", "ray_address", "progress", "verbose", "quiet", "help",
    )),
)  # fmt: skip


class _SectionedCommand(click.Command):
    """``--help`` lists the options in titled sections (:data:`_HELP_SECTIONS`)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows: dict[str, list[tuple[str, str]]] = {}
        order = {name: title for title, names in _HELP_SECTIONS for name in names}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None or not isinstance(param, click.Option):
                continue  # arguments are in the usage line
            name = "help" if "--help" in param.opts else param.name or ""
            title = order.get(name, "Other options")
            rows.setdefault(title, []).append(record)
        titles = [t for t, _ in _HELP_SECTIONS] + ["Other options"]
        for title in titles:
            if title in rows:
                with formatter.section(title):
                    formatter.write_dl(rows[title])


_Group.command_class = _SectionedCommand


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


class _CommaList(click.ParamType):
    """A comma-separated list: each item converted by ``item`` and, with ``choices``, checked.

    Errors name the flag (click's "Invalid value for '--threads'").
    """

    def __init__(
        self,
        item: Callable[[str], Any] = str,
        choices: Sequence[Any] | None = None,
        *,
        name: str = "LIST",
        lengths: tuple[int, ...] | None = None,
        separators: str = ",",
    ) -> None:
        self.item, self.choices, self.name = item, choices, name
        self.lengths, self.separators = lengths, separators

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[Any, ...]:
        if isinstance(value, tuple):
            return value
        text = str(value)
        for sep in self.separators[1:]:
            text = text.replace(sep, self.separators[0])
        parts = [v.strip() for v in text.split(self.separators[0]) if v.strip()]
        try:
            out = tuple(self.item(v) for v in parts)
        except ValueError:
            self.fail(f"{value!r} is not a list of {self.name}", param, ctx)
        if not out:
            self.fail("the list is empty", param, ctx)
        if self.choices is not None:
            bad = [v for v in out if v not in self.choices]
            if bad:
                valid = ", ".join(map(str, self.choices))
                self.fail(f"{', '.join(map(str, bad))} not among {valid}", param, ctx)
            if len(set(out)) != len(out):
                self.fail(f"{value!r} lists a value twice", param, ctx)
        if self.lengths is not None and len(out) not in self.lengths:
            counts = " or ".join(map(str, self.lengths))
            self.fail(f"takes {counts} values; got {value!r}", param, ctx)
        return out


_SIZE = _CommaList(int, name="N|HxW", lengths=(1, 2), separators=",xX")
_CHANNEL_VALUES = _CommaList(float, name="numbers", lengths=(1, 3))


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
        "1 = mean shift only, 4 = the reference rule of docs/spec.md §4 (model-dependent: docs/recalibration.md §7).",
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
    click.option(
        "--shrink",
        type=click.FloatRange(min=0.0),
        default=_RC.shrink,
        show_default=True,
        help="Shrink each channel's mean correction d by max(0, 1 - K^2 SE^2 / d^2), SE its "
        "per-sample standard error: shifts within K standard errors of 0 are not applied "
        "(0 = off; e.g. 2 for a conservative correction).",
    ),
    click.option(
        "--guard/--no-guard",
        default=_RC.guard,
        show_default=True,
        help="Keep recalibration only where it brings held-out outputs closer to float32 "
        "(--no-guard: apply every correction, the plain procedure).",
    ),
    click.option(
        "--guard-fraction",
        type=click.FloatRange(min=0.0, max=1.0, min_open=True, max_open=True),
        default=_RC.guard_fraction,
        show_default=True,
        help="Share of the calibration samples held out (seeded) to validate recalibration.",
    ),
    click.option(
        "--guard-blocks",
        type=click.IntRange(min=1),
        default=_RC.guard_blocks,
        show_default=True,
        help="Corrections are kept or rejected in this many contiguous blocks (graph order).",
    ),
    click.option(
        "--guard-margin",
        type=click.FloatRange(min=0.0),
        default=_RC.guard_margin,
        show_default=True,
        help="Keep recalibration only if it lowers the held-out loss by more than this many "
        "paired standard errors.",
    ),
    click.option(
        "--guard-check-margin",
        type=click.FloatRange(min=0.0),
        default=_RC.guard_check_margin,
        show_default=True,
        help="Kept recalibration may make no check metric (argmax disagreement, relative "
        "error, per-step KL) worse by more than this many paired standard errors.",
    ),
    click.option(
        "--guard-retry-shrink",
        type=click.FloatRange(min=0.0),
        default=_RC.guard_retry_shrink,
        show_default=True,
        help="When the guard keeps nothing, estimate once more with --shrink K and guard "
        "again (0 = no retry).",
    ),
)


def _images(kw: dict[str, Any]) -> ImagePreprocessing:
    """Pop the ``_image_options`` of ``kw`` into an ImagePreprocessing."""
    return ImagePreprocessing(
        resize=kw.pop("resize"),
        crop=kw.pop("center_crop"),
        mean=kw.pop("mean"),
        std=kw.pop("std"),
        scale=kw.pop("pixel_scale"),
        layout=str(kw.pop("layout")),
        channel_order=str(kw.pop("channel_order")),
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
        shrink=float(kw.pop("shrink")),
        guard=bool(kw.pop("guard")),
        guard_fraction=float(kw.pop("guard_fraction")),
        guard_blocks=int(kw.pop("guard_blocks")),
        guard_margin=float(kw.pop("guard_margin")),
        guard_check_margin=float(kw.pop("guard_check_margin")),
        guard_retry_shrink=float(kw.pop("guard_retry_shrink")),
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
    click.option(
        "--gate-bound",
        type=click.Choice(["point", "pessimistic"]),
        default="point",
        show_default=True,
        help="Gate on the point estimates, or on the pessimistic ends of their 95% intervals "
        "(the drop's paired upper bound, the agreement's Wilson lower bound).",
    ),
)

_image_options = _options(
    click.option(
        "--resize", type=_SIZE, metavar="N|HxW", help="Images: resize the shorter side to N, or to HxW exactly."
    ),
    click.option("--center-crop", type=_SIZE, metavar="N|HxW", help="Images: center crop to N x N or HxW."),
    click.option(
        "--mean",
        type=_CHANNEL_VALUES,
        metavar="M|R,G,B",
        default=",".join(f"{v:g}" for v in _IMG.mean),
        show_default=True,
        help="Images: per-channel mean (RGB order) after dividing by --pixel-scale.",
    ),
    click.option(
        "--std",
        type=_CHANNEL_VALUES,
        metavar="S|R,G,B",
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

_layout_options = _options(
    click.option(
        "--batch-axis",
        "batch_axes",
        multiple=True,
        metavar="NAME=AXIS",
        help="Input NAME holds its samples along AXIS, e.g. state=1 for [layers, N, hidden] "
        "(repeatable; default 0).",
    ),
    click.option(
        "--constant",
        "constants",
        multiple=True,
        metavar="NAME[=FILE]",
        help="Input NAME is the same for every sample: its array in the data (or FILE, an .npy) "
        "has the input's exact shape and is fed with every batch (repeatable; scalars always are).",
    ),
)

_threads_options = _options(
    click.option(
        "--threads",
        type=click.Choice(["1", "2", "4"]),
        default="2",
        show_default=True,
        help="NB-SMT threads per MAC (every layer --layer-threads does not set).",
    ),
    click.option(
        "--layer-threads",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        metavar="FILE.json",
        help='Per-layer threads: a JSON object of node name or full-match regular expression -> 1, 2 or 4, e.g. {"conv1": 1, "block.*": 4}.',
    ),
)

_export_options = _options(
    click.option(
        "--export",
        type=click.Choice(["sim", "qdq", "both"]),
        default="sim",
        show_default=True,
        help="Models to write: NB-SMT simulation, standard QDQ, or both.",
    ),
)

_recalibrate_option = _options(
    click.option(
        "--recalibrate/--no-recalibrate",
        default=_RC.enabled,
        show_default=True,
        help="Recalibrate BatchNorm statistics under NB-SMT (docs/recalibration.md).",
    ),
)

_run_options = _options(
    click.option("--force", is_flag=True, help="Overwrite existing output files."),
    click.option(
        "--progress/--no-progress",
        default=True,
        show_default=True,
        help="Progress on stderr: bars with ETA on a terminal, a log line every 10 s otherwise.",
    ),
    click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug)."),
    click.option(
        "-q", "--quiet", is_flag=True, help="No progress and no info lines; warnings and errors only."
    ),
)


_executor_options = _options(
    click.option(
        "--executor",
        type=click.Choice(["local", "ray"]),
        default="local",
        show_default=True,
        help="Where model passes run: in this process, or on Ray workers (the 'ray' extra).",
    ),
    click.option(
        "--workers", type=click.IntRange(min=1), default=2, show_default=True,
        help="Ray workers (--executor ray).",
    ),
    click.option(
        "--ray-address",
        metavar="ADDR",
        help="A running Ray cluster [default: start a private one for the run, stop it after].",
    ),
)  # fmt: skip


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
    help="[required] Calibration data: .npz/.npy, a folder of arrays or images, or 'random' "
    "(smoke tests only).",
)
@_layout_options
@_threads_options
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
@_export_options
@click.option(
    "--qdq-types",
    type=click.Choice(list(QDQ_TYPES_CHOICES)),
    default=_TC.qdq_types,
    show_default=True,
    help="Integer types of the QDQ model's activations x weights (same integers and scales): "
    "u8u8 stays exact in ONNX Runtime's fused kernels on CPUs without VNNI (docs/transform.md).",
)
@_recalibrate_option
@_recalibration_options
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the report here: HTML for .html/.htm (one page with plots), JSON for .json.",
)
@click.option(
    "--guard-data",
    metavar="DATA",
    help="Samples the recalibration guard validates on [default: a held-out part of --calib "
    "(--guard-fraction)]; keep --eval-data separate so its figures stay unbiased.",
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
@_executor_options
@_run_options
def transform_command(model: Path, **kw: Any) -> None:
    """Rewrite MODEL into an NB-SMT simulation model (and/or a QDQ model) with a report.

    With --eval-data, the produced model is also scored on held-out data
    (table printed, numbers in the report). Exit codes: 0 ok, 2 user error,
    3 a threshold (--max-drop/--min-agreement) was missed (outputs are written).

    \b
    Examples:
      nbsmt-onnx transform model.onnx --calib calib.npz -o model.nbsmt.onnx
      nbsmt-onnx transform model.onnx --calib images/ --resize 256 --center-crop 224 \\
          --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --threads 4 \\
          --export both --report report.html
      nbsmt-onnx transform model.onnx --calib calib.npz --layer-threads threads.json \\
          --eval-data val.npz --eval-labels val.npy --max-drop 1
    """
    from nbsmt_onnx.api import output_paths, transform
    from nbsmt_onnx.io import check_destination
    from nbsmt_onnx.report import report_kind

    quiet = bool(kw.pop("quiet"))
    _setup_logging(int(kw.pop("verbose")), quiet)
    calib = kw.pop("calib")
    if not calib:
        raise ConfigError(NO_CALIB_MESSAGE)
    progress = kw.pop("progress")
    layer_threads = kw.pop("layer_threads")
    config = TransformConfig(
        threads=int(kw.pop("threads")),
        layer_threads=LayerThreads.load(layer_threads) if layer_threads else LayerThreads(),
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
        progress=bool(progress) and not quiet,
    )
    images = _images(kw)
    eval_config, eval_data, eval_labels = _transform_evaluation(kw, config.progress)
    force = bool(kw.pop("force"))
    report_path = kw.pop("report_path")
    paths = output_paths(model, config.export, kw.pop("output"), kw.pop("qdq_output"))
    # Refuse before the long passes: an unknown report format, an existing output, the input
    # itself, an unwritable directory.
    if report_path:
        report_kind(report_path)
    for p in [*paths.values(), *([report_path] if report_path else [])]:
        check_destination(Path(p), force=force, protect=(model,))
    if calib == "random":
        click.echo(
            "WARNING: --calib random: activation scales come from random numbers; the output is for "
            "smoke tests only and recalibration is skipped",
            err=True,
        )

    from nbsmt_onnx.runtime.executor import create_executor

    with create_executor(
        str(kw.pop("executor")), int(kw.pop("workers")), kw.pop("ray_address")
    ) as executor:
        result = transform(
            model,
            calib,
            config,
            layout=_data_layout(kw.pop("batch_axes"), kw.pop("constants")),
            images=images,
            eval_data=eval_data,
            eval_labels=eval_labels,
            eval_config=eval_config,
            executor=executor,
            guard_data=kw.pop("guard_data"),
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
            f"{_threads_label(result.report)}: MAC utilization {nbsmt['mac_utilization']:.3f}, "
            f"collision rate {nbsmt['collision_rate']:.3f}, "
            f"squeezed operands {nbsmt['squeezed_operand_fraction']:.3f}"
        )
    speed = summary.get("speedup") or {}
    if speed.get("speedup") is not None:
        click.echo(
            f"speed-up over an 8-bit array without NB-SMT: {speed['speedup']:.2f}x "
            f"({speed['total_macs'] / 1e6:.1f} M MACs per sample; MAC-weighted, memory not modelled)"
        )
    recal = result.report.get("recalibration")
    if recal:
        click.echo(_recalibration_line(recal))
        guard = recal.get("guard")
        if guard:
            click.echo(_guard_line(guard, recal.get("guard_retry")))
    for path in written:
        click.echo(f"wrote {path}")
    if result.evaluation is not None:
        click.echo(result.evaluation.format_table())
        sys.exit(result.exit_code)


def _threads_label(report: dict[str, Any]) -> str:
    """``T=2``, or ``T=1/2/4 per layer (3/10/7 layers)`` for a mixed assignment."""
    counts: dict[int, int] = {}
    for layer in report.get("layers", []):
        counts[layer["threads"]] = counts.get(layer["threads"], 0) + 1
    if len(counts) == 1:
        return f"T={next(iter(counts))}"
    keys = sorted(counts)
    return (
        f"T={'/'.join(map(str, keys))} per layer ({'/'.join(str(counts[k]) for k in keys)} layers)"
    )


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


def _guard_line(guard: dict[str, Any], retry: dict[str, Any] | None = None) -> str:
    """One line on what the held-out guard kept (the report's ``guard`` and ``guard_retry``)."""
    if "summary" not in guard:
        return f"recalibration guard: {guard['decision']} ({guard.get('reason', '')})"
    if retry is None:
        return f"recalibration guard: {guard['summary']}"
    k = f"--shrink {retry.get('shrink'):g}"
    note = (
        f"estimated with {k} after the unshrunk corrections kept nothing"
        if retry.get("kept")
        else f"nothing kept with {k} either"
    )
    return f"recalibration guard: {guard['summary']} [{note}]"


def _transform_evaluation(kw: dict[str, Any], progress: bool) -> tuple[Any, Any, Any]:
    """``transform``'s evaluation options -> (EvaluateConfig | None, eval data, labels)."""
    from nbsmt_onnx.config import EvaluateConfig

    eval_data, eval_labels = kw.pop("eval_data"), kw.pop("eval_labels")
    options = {
        "eval_samples": kw.pop("eval_samples"),
        "eval_batch_size": kw.pop("eval_batch_size"),
        "reference": str(kw.pop("reference")),
        "max_drop": kw.pop("max_drop"),
        "min_agreement": kw.pop("min_agreement"),
        "gate_bound": str(kw.pop("gate_bound")),
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
                ("gate_bound", None if options["gate_bound"] == "point" else "pessimistic"),
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
@_threads_options
@_export_options
@_recalibrate_option
@_layout_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("-v", "--verbose", count=True, help="More log output.")
def inspect_command(model: Path, **kw: Any) -> None:
    """Preflight MODEL: the checks transform runs (same options, same code), the inputs and
    outputs with the data layout calibration needs, what would be rewritten at which threads,
    what not and why, and the BatchNorm layers. Exit 2 when transform would refuse the model.

    \b
    Example:
      nbsmt-onnx inspect model.onnx --threads 4 --exclude-op-type MatMul
    """
    from nbsmt_onnx.api import inspect

    _setup_logging(int(kw.pop("verbose")))
    as_json = bool(kw.pop("as_json"))
    layer_threads = kw.pop("layer_threads")
    config = TransformConfig(
        selection=_selection(kw),
        threads=int(kw.pop("threads")),
        layer_threads=LayerThreads.load(layer_threads) if layer_threads else LayerThreads(),
        export=str(kw.pop("export")),
        recalibration=RecalibrationConfig(enabled=bool(kw.pop("recalibrate"))),
    )
    result = inspect(model, config, _data_layout(kw.pop("batch_axes"), kw.pop("constants")))
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(f"{result.path} (opset {result.opset}): transform's model checks passed")
    click.echo("inputs (calibration data: an .npz with one array per input, keyed by name):")
    for line in result.data_layout():
        click.echo(f"  {line}")
    click.echo("outputs:")
    for name, dtype, shape in result.outputs:
        click.echo(f"  {name}: {dtype} {shape}")
    click.echo(f"rewritten ({len(result.rewritten)}):")
    for name, op_type, origin in result.rewritten:
        click.echo(f"  {name}  {op_type} -> NB-SMT T={result.threads[name]}  (weights: {origin})")
    click.echo(f"not rewritten ({len(result.skipped)}):")
    for s in result.skipped:
        click.echo(f"  {s.node_name}  {s.op_type}: {s.reason}")
    click.echo(f"BatchNormalization layers ({len(result.batchnorms)}):")
    for bn in result.batchnorms:
        after = f"after {bn.producer} ({bn.producer_op})" if bn.producer else "on a graph input"
        click.echo(f"  {bn.name}  {after}: {bn.note}")




@main.command("search")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--calib", "calib", required=True, metavar="DATA", help="Calibration data.")
@click.option(
    "--data", "data", required=True, metavar="DATA",
    help="Search data: held out from --calib; candidates are scored on it.",
)
@click.option("--labels", metavar="LABELS", help="Labels of --data (for --metric top1).")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
    help="The model with the chosen per-layer threads [default: MODEL stem + .search.onnx].",
)
@click.option(
    "--plan", "plan_path", type=click.Path(dir_okay=False, path_type=Path),
    help="Write the plan (every layer's threads, MACs, sensitivity; assignments tried) as JSON.",
)
@click.option(
    "--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
    help="Write the report here: HTML for .html/.htm (Pareto front and sensitivities plotted), "
    "JSON for .json (the plan, the Pareto table, the verified accuracy).",
)
@click.option(
    "--max-drop", type=click.FloatRange(min=0), default=1.0, show_default=True,
    help="Accuracy budget: points of --metric below --reference.",
)
@click.option(
    "--reference", type=click.Choice(["int8", "float32"]), default="int8", show_default=True,
    help="What the drop is measured against (int8 = every layer at the lowest choice).",
)
@click.option(
    "--metric", type=click.Choice(["top1", "agreement"]), default=None,
    help="top1 (needs --labels) or argmax agreement with float32 [default: top1 with labels].",
)
@click.option(
    "--choices", type=_CommaList(int, schema.THREADS_CHOICES, name="thread counts"), default="1,2,4", show_default=True,
    help="Thread counts a layer may get (comma-separated).",
)
@click.option(
    "--bound", type=click.Choice(["point", "pessimistic"]), default="point", show_default=True,
    help="Budget check on the drop's point estimate or on the upper end of its 95 % interval.",
)
@click.option(
    "--sensitivity-recal/--no-sensitivity-recal", default=True, show_default=True,
    help="Recalibrate every sensitivity candidate as transform would (slower, as deployed).",
)
@click.option("--mapping", type=click.Choice(["channel", "interleave"]), default="channel",
              show_default=True, help="How the reduction axis is split among threads.")
@click.option("--reduce", "reduce_", type=click.Choice(["activations", "weights"]),
              default="activations", show_default=True,
              help="Operand reduced on a 2-thread collision.")
@click.option("--output-name", "output_name", metavar="NAME",
              help="The classification output to score [default: the first output].")
@_calibration_options
@_recalibration_options
@_evaluation_options
@_layout_options
@_image_options
@_executor_options
@_run_options
def search_command(model: Path, **kw: Any) -> None:
    """Find per-layer threads with the largest speed-up within an accuracy budget.

    Every layer's sensitivity is measured (alone at each higher thread count),
    layers are moved up greedily by loss per cycle saved, and the result is
    verified by a real evaluation, backing off when it misses the budget.
    Writes the model (recalibrated under the chosen assignment), with --plan
    the plan, with --report the report (JSON, or HTML with the Pareto front
    and the per-layer sensitivities plotted). Exit codes: 0 ok, 2 user error, 3 no assignment above the
    lowest choice met the budget (the best one is still written).

    \b
    Example:
      nbsmt-onnx search model.onnx --calib calib.npz --data val.npz --labels val.npy \\
          --max-drop 1 -o model.search.onnx --plan plan.json --report search.html
    """
    from nbsmt_onnx.api import output_paths
    from nbsmt_onnx.io import check_destination, write_text
    from nbsmt_onnx.report import report_kind
    from nbsmt_onnx.runtime.executor import create_executor
    from nbsmt_onnx.search import SearchConfig, search

    quiet = bool(kw.pop("quiet"))
    _setup_logging(int(kw.pop("verbose")), quiet)
    progress = bool(kw.pop("progress")) and not quiet
    labels = kw.pop("labels")
    metric = kw.pop("metric") or ("top1" if labels else "agreement")
    transform_config = TransformConfig(
        mapping=str(kw.pop("mapping")),
        reduce=str(kw.pop("reduce_")),
        num_samples=kw.pop("num_samples"),
        batch_size=kw.pop("batch_size"),
        seed=kw.pop("seed"),
        ranges=RangeConfig(
            estimator=str(kw.pop("range_estimator")), percentile=kw.pop("percentile")
        ),
        recalibration=_recalibration_config(kw),
    )
    config = SearchConfig(
        max_drop=float(kw.pop("max_drop")),
        metric=metric,
        reference=str(kw.pop("reference")),
        choices=kw.pop("choices"),
        bound=str(kw.pop("bound")),
        sensitivity_recalibration=bool(kw.pop("sensitivity_recal")),
        transform=transform_config,
        eval_samples=kw.pop("eval_samples"),
        eval_batch_size=kw.pop("eval_batch_size"),
        output=kw.pop("output_name"),
        progress=progress,
    )
    images = _images(kw)
    layout = _data_layout(kw.pop("batch_axes"), kw.pop("constants"))
    force = bool(kw.pop("force"))
    out = output_paths(model, "sim", kw.pop("output") or model.with_name(
        (model.name[:-5] if model.name.endswith(".onnx") else model.name) + ".search.onnx"
    ))["sim"]  # fmt: skip
    plan_path, report_path = kw.pop("plan_path"), kw.pop("report_path")
    if report_path:
        report_kind(report_path)
    for p in [out, *(p for p in (plan_path, report_path) if p)]:
        check_destination(Path(p), force=force, protect=(model,))
    with create_executor(
        str(kw.pop("executor")), int(kw.pop("workers")), kw.pop("ray_address")
    ) as executor:
        result = search(
            model, kw.pop("calib"), kw.pop("data"), config, labels=labels, images=images,
            layout=layout, executor=executor,
        )  # fmt: skip
    written = result.transform.save(out, force=force)
    if plan_path:
        written.append(write_text(plan_path, json.dumps(result.plan(), indent=2) + "\n", force=force))
    if report_path:
        written.append(result.write_report(report_path, force=force))
    click.echo(result.format_table())
    best = result.best
    click.echo(
        f"{'chosen' if result.met_budget else 'NO assignment met the budget; best'}: {best.label}, "
        f"speed-up {best.speedup:.2f}x, drop {best.score.drop:.2f} points "
        f"({result.model_evaluations} model evaluations, {result.wall_s:.0f} s)"
    )
    for path in written:
        click.echo(f"wrote {path}")
    sys.exit(result.exit_code)


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
    "--calib", "calib", metavar="DATA",
    help="[required] Calibration data (must not overlap --data).",
)
@click.option(
    "--rows",
    type=_CommaList(choices=ROW_KINDS, name="row kinds"),
    default=None,
    help="Row kinds: float32, int8, int8+recal, nbsmt, nbsmt+recal "
    "[default: float32,int8,nbsmt,nbsmt+recal].",
)
@click.option(
    "--threads",
    type=_CommaList(int, schema.THREADS_CHOICES, name="thread counts"),
    default="2,4",
    show_default=True,
    help="NB-SMT threads to sweep: a comma-separated list of 1, 2, 4.",
)
@click.option(
    "--mapping",
    type=_CommaList(choices=schema.MAPPING_CHOICES, name="mappings"),
    default="channel",
    show_default=True,
    help="Mappings to sweep: channel, interleave (comma-separated).",
)
@click.option(
    "--reduce",
    "reduce_",
    type=_CommaList(choices=schema.REDUCE_CHOICES, name="operands"),
    default="activations",
    show_default=True,
    help="Reduced operands to sweep: activations, weights (comma-separated).",
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
    type=_CommaList(choices=ROW_KINDS, name="row kinds"),
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
    help="Write the report here: HTML for .html/.htm (one page with plots), JSON for .json.",
)
@_executor_options
@_run_options
def evaluate_command(model: Path, **kw: object) -> None:
    """Evaluate float32, int8 and NB-SMT (with/without recalibration) on held-out data.

    Exit codes: 0 ok, 2 user error, 3 a threshold (--max-drop/--min-agreement) was missed.

    \b
    Examples:
      nbsmt-onnx evaluate model.onnx --data val.npz --labels val.npy --calib calib.npz
      nbsmt-onnx evaluate model.onnx --data val/ --labels folders --calib calib/ \\
          --threads 2,4 --mapping channel,interleave --report table.html --csv table.csv
    """
    from nbsmt_onnx.api import evaluate
    from nbsmt_onnx.config import EvaluateConfig
    from nbsmt_onnx.evaluate import write_text
    from nbsmt_onnx.io import check_destination
    from nbsmt_onnx.report import report_kind, write_report

    quiet = bool(kw.pop("quiet"))
    _setup_logging(int(kw.pop("verbose")), quiet)  # type: ignore[call-overload]
    calib = kw.pop("calib")
    if not calib:
        raise ConfigError(
            "evaluate needs calibration data: pass --calib DATA (held out from --data). The int8 "
            "and NB-SMT rows quantize every activation with a scale measured on it, and "
            "recalibration re-estimates BatchNorm statistics on it"
        )
    progress = bool(kw.pop("progress")) and not quiet
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
        rows=rows,  # type: ignore[arg-type]
        threads=kw.pop("threads"),  # type: ignore[arg-type]
        mappings=kw.pop("mapping"),  # type: ignore[arg-type]
        reduces=kw.pop("reduce_"),  # type: ignore[arg-type]
        transform=transform_config,
        eval_samples=kw.pop("eval_samples"),  # type: ignore[arg-type]
        eval_batch_size=kw.pop("eval_batch_size"),  # type: ignore[arg-type]
        eval_seed=kw.pop("eval_seed"),  # type: ignore[arg-type]
        output=kw.pop("output_name"),  # type: ignore[arg-type]
        output_kind=str(kw.pop("output_kind")),
        reference=str(kw.pop("reference")),
        max_drop=kw.pop("max_drop"),  # type: ignore[arg-type]
        min_agreement=kw.pop("min_agreement"),  # type: ignore[arg-type]
        gate_rows=gate_rows,  # type: ignore[arg-type]
        gate_bound=str(kw.pop("gate_bound")),
        layer_samples=kw.pop("layer_samples"),  # type: ignore[arg-type]
        progress=progress,
    )
    images = _images(kw)
    force = bool(kw.pop("force"))
    csv_path, report_path = kw.pop("csv_path"), kw.pop("report_path")
    outputs = [p for p in (csv_path, report_path) if p is not None]
    if len({Path(p).resolve() for p in outputs}) != len(outputs):  # type: ignore[arg-type]
        raise ConfigError("--csv and --report name the same file; give distinct paths")
    if report_path is not None:
        report_kind(report_path)  # type: ignore[arg-type]
    for p in outputs:  # refuse before the long passes
        check_destination(Path(p), force=force, protect=(model,))  # type: ignore[arg-type]

    from nbsmt_onnx.runtime.executor import create_executor

    with create_executor(
        str(kw.pop("executor")), int(kw.pop("workers")), kw.pop("ray_address")  # type: ignore[call-overload, arg-type]
    ) as executor:
        result = evaluate(
            model, kw.pop("data"), calib, config, labels=kw.pop("labels"), images=images,
            executor=executor,
        )  # fmt: skip
    if csv_path is not None:
        write_text(csv_path, result.to_csv(), force=force)  # type: ignore[arg-type]
    if report_path is not None:
        write_report(result.to_dict(), report_path, force=force)  # type: ignore[arg-type]
    if bool(kw.pop("as_json")):
        click.echo(result.to_json())
    else:
        click.echo(result.format_table())
        for p in outputs:
            click.echo(f"wrote {p}")
    sys.exit(result.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()


@main.command("run")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--data", "data", required=True, metavar="DATA",
    help="Inputs: .npz/.npy, a folder of arrays or images (as --calib takes them).",
)
@click.option(
    "--reference", type=click.Path(dir_okay=False, path_type=Path), metavar="MODEL",
    help="Compare every output with this model's (e.g. the float model MODEL was made from).",
)
@click.option(
    "--num-samples", type=click.IntRange(min=1), default=16, show_default=True,
    help="Samples drawn (seeded).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the draw.")
@click.option(
    "--save-outputs", "save_path", type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE.npz", help="Write MODEL's outputs here (keyed by output name).",
)
@_layout_options
@_image_options
@click.option("--force", is_flag=True, help="Overwrite an existing --save-outputs file.")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def run_command(model: Path, **kw: Any) -> None:
    """Run MODEL (simulation, QDQ or float) on a few samples; compare with --reference.

    The simulation models need the NB-SMT library, which generic runners do
    not load; this is the quick look before a full evaluate.

    \b
    Example:
      nbsmt-onnx run model.nbsmt.onnx --data calib.npz --reference model.onnx
    """
    import io as _stdio

    import numpy as np

    from nbsmt_onnx.api import run
    from nbsmt_onnx.io import check_destination, write_bytes

    _setup_logging(int(kw.pop("verbose")))
    save_path, force = kw.pop("save_path"), bool(kw.pop("force"))
    if save_path is not None:
        if save_path.suffix != ".npz":
            raise ConfigError(f"--save-outputs writes an .npz; got {str(save_path)!r}")
        check_destination(save_path, force=force, protect=(model,))
    result = run(
        model, kw.pop("data"), reference=kw.pop("reference"), num_samples=kw.pop("num_samples"),
        seed=kw.pop("seed"), images=_images(kw),
        layout=_data_layout(kw.pop("batch_axes"), kw.pop("constants")),
    )  # fmt: skip
    click.echo(f"{result.samples} sample(s)" + (f" vs {result.reference}" if result.reference else ""))
    click.echo(result.format_table())
    if save_path is not None:
        buffer = _stdio.BytesIO()
        np.savez(buffer, **result.outputs)  # type: ignore[arg-type]
        write_bytes(save_path, buffer.getvalue(), force=force)
        click.echo(f"wrote {save_path}")
