"""Command-line interface: a thin layer over the Python API.

User errors (``NbsmtError``) are printed as one line, without a traceback,
and turned into a non-zero exit code.
"""

from __future__ import annotations

import sys

import click

from nbsmt_onnx import __version__
from nbsmt_onnx.errors import NbsmtError


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except NbsmtError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="nbsmt-onnx")
def main() -> None:
    """Simulate NB-SMT accelerators on ONNX models and recalibrate BatchNorm."""


@main.command("library-path")
def library_path() -> None:
    """Print the path of the NB-SMT custom-op library (for other ONNX Runtime users)."""
    from nbsmt_onnx.runtime.library import get_library_path

    click.echo(get_library_path())


if __name__ == "__main__":  # pragma: no cover
    main()
