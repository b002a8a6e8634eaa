"""tests/ops needs the compiled library: every test here fails (not skips) without it."""

from __future__ import annotations

import numpy as np
import pytest
from ops_cases import Case, build_model, run_model

from nbsmt_onnx.ops import schema


@pytest.fixture(scope="session", autouse=True)
def nbsmt_ops_registered(nbsmt_library: str) -> str:
    """The library loads and registers both ops (a placeholder build does not)."""
    probe = Case(
        op=schema.MATMUL,
        seed=-1,
        inputs=[
            np.ones((1, 2), np.float32),
            np.ones((2, 1), np.int8),
            np.array(1.0, np.float32),
            np.ones(1, np.float32),
            None,
        ],
        attributes={},
        with_stats=False,
        kind="probe",
    )
    try:
        model, feeds = build_model([probe])
        run_model(model, feeds)
    except Exception as err:
        pytest.fail(
            f"NB-SMT op library {nbsmt_library} cannot run {schema.DOMAIN}::{schema.MATMUL}: {err}",
            pytrace=False,
        )
    return nbsmt_library
