"""Fixtures shared by every test directory. Keep this small."""

from __future__ import annotations

import pytest

from nbsmt_onnx.errors import LibraryNotFoundError
from nbsmt_onnx.runtime.library import LIBRARY_ENV, get_library_path


@pytest.fixture(scope="session")
def nbsmt_library() -> str:
    """Path of the compiled NB-SMT op library.

    Tests that need the library FAIL (not skip) when it is missing: CI builds it,
    so a missing library is a broken build, not an optional feature.
    """
    try:
        return get_library_path()
    except LibraryNotFoundError as err:
        pytest.fail(
            f"NB-SMT op library not available ({err}). Build it with 'pip install .' "
            f"or point {LIBRARY_ENV} at a built libnbsmt_ops.so",
            pytrace=False,
        )
