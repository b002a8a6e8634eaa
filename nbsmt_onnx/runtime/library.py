"""Locate the compiled NB-SMT custom-op library."""

from __future__ import annotations

import os
from pathlib import Path

from nbsmt_onnx.errors import LibraryNotFoundError

LIBRARY_ENV = "NBSMT_ONNX_LIBRARY"
_LIBRARY_NAME = "libnbsmt_ops.so"


def get_library_path() -> str:
    """Return the path of the custom-op library to pass to ``register_custom_ops_library``.

    ``$NBSMT_ONNX_LIBRARY`` overrides the copy built into the package.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        if not Path(override).is_file():
            raise LibraryNotFoundError(
                f"{LIBRARY_ENV}={override} does not exist; unset it or point it at {_LIBRARY_NAME}"
            )
        return str(Path(override).resolve())
    for candidate in _candidates():
        if candidate.is_file():
            return str(candidate)
    raise LibraryNotFoundError(
        f"NB-SMT op library {_LIBRARY_NAME} not found in the installed package; "
        f"reinstall with 'pip install .' (it builds custom_ops/) or set {LIBRARY_ENV}"
    )


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent.parent  # the nbsmt_onnx package
    found = [here / "_lib" / _LIBRARY_NAME]
    # Editable installs (scikit-build-core "redirect" mode) put the built library
    # into site-packages/nbsmt_onnx/_lib while Python code is read from the tree.
    import importlib.util

    spec = importlib.util.find_spec("nbsmt_onnx")
    if spec is not None:
        for location in spec.submodule_search_locations or []:
            found.append(Path(location) / "_lib" / _LIBRARY_NAME)
    return found
