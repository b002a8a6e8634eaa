"""Command-line interface: a thin layer over the Python API.

User errors (``NbsmtError``) are printed as one line, without a traceback,
and turned into a non-zero exit code.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from nbsmt_onnx import __version__
from nbsmt_onnx.config import Selection
from nbsmt_onnx.errors import ConfigError, NbsmtError

NO_CALIB_MESSAGE = (
    "calibration data is needed: NB-SMT quantizes every activation with a scale measured on real "
    "inputs, and the report's statistics come from running them. Pass --calib DATA (an .npz/.npy "
    "keyed by input name, a folder of .npy/.npz files or a folder of images), or --calib random "
    "for a smoke test only"
)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except NbsmtError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)


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
@click.option(
    "--num-samples",
    type=int,
    default=512,
    show_default=True,
    help="Calibration samples drawn (seeded).",
)
@click.option(
    "--batch-size",
    type=int,
    default=16,
    show_default=True,
    help="Calibration batch size (a fixed model batch wins).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample draw.")
@click.option(
    "--range-estimator",
    type=click.Choice(["max", "percentile"]),
    default="max",
    show_default=True,
    help="Activation range estimator.",
)
@click.option(
    "--percentile",
    type=float,
    default=99.99,
    show_default=True,
    help="Percentile for --range-estimator percentile.",
)
@_selection_options
@click.option(
    "--export",
    type=click.Choice(["sim", "qdq", "both"]),
    default="sim",
    show_default=True,
    help="Models to write: NB-SMT simulation, standard QDQ, or both.",
)
@click.option(
    "--recalibrate/--no-recalibrate",
    default=False,
    show_default=True,
    help="Recalibrate BatchNorm statistics under NB-SMT (issue 3).",
)
@click.option(
    "--strategy",
    type=click.Choice(["train-mode", "sequential", "relative"]),
    default="relative",
    show_default=True,
    help="Recalibration strategy.",
)
@click.option(
    "--fold/--no-fold",
    default=True,
    show_default=True,
    help="Fold recalibrated BN into the NB-SMT op's scale and bias.",
)
@click.option(
    "--correction",
    type=click.Choice(["none", "mean", "mean+var"]),
    default="mean+var",
    show_default=True,
    help="Correction for models whose BN is already fused.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the JSON report here.",
)
@click.option(
    "--resize", metavar="N|HxW", help="Images: resize the shorter side to N, or to HxW exactly."
)
@click.option("--center-crop", metavar="N|HxW", help="Images: center crop to N x N or HxW.")
@click.option(
    "--mean",
    default="0",
    show_default=True,
    help="Images: per-channel mean (RGB order) after dividing by --pixel-scale.",
)
@click.option("--std", default="1", show_default=True, help="Images: per-channel std (RGB order).")
@click.option(
    "--pixel-scale",
    type=float,
    default=255.0,
    show_default=True,
    help="Images: divide pixel values by this first.",
)
@click.option(
    "--layout",
    type=click.Choice(["NCHW", "NHWC"]),
    default="NCHW",
    show_default=True,
    help="Images: model input layout.",
)
@click.option(
    "--channel-order",
    type=click.Choice(["RGB", "BGR"]),
    default="RGB",
    show_default=True,
    help="Images: channel order the model expects.",
)
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bars on stderr [default: when stderr is a terminal].",
)
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def transform_command(model: Path, **kw: Any) -> None:
    """Rewrite MODEL into an NB-SMT simulation model (and/or a QDQ model) with a report."""
    from nbsmt_onnx.api import output_paths, transform
    from nbsmt_onnx.config import (
        ImagePreprocessing,
        RangeConfig,
        RecalibrationConfig,
        TransformConfig,
    )
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
        recalibration=RecalibrationConfig(
            enabled=bool(kw.pop("recalibrate")),
            strategy=str(kw.pop("strategy")),
            fold=bool(kw.pop("fold")),
            correction=str(kw.pop("correction")),
        ),
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

    result = transform(model, calib, config, images=images)
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
    for path in written:
        click.echo(f"wrote {path}")


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@_selection_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("-v", "--verbose", count=True, help="More log output.")
def inspect_command(model: Path, **kw: Any) -> None:
    """List what transform would rewrite in MODEL, what not and why, and its BatchNorm layers."""
    from nbsmt_onnx.api import inspect
    from nbsmt_onnx.config import TransformConfig

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


if __name__ == "__main__":  # pragma: no cover
    main()
