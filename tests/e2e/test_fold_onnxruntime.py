"""Folded vs unfolded BN in ONNX Runtime with the library (needs the library; FAILS without it).

Moved unchanged from tests/unit/test_fold.py (unit tests need no library);
the cases and the check (``_models_for_execution``, ``_check_equivalence``)
stay there and are shared with the reference-evaluator test.
"""

from __future__ import annotations

import onnx
import pytest

from nbsmt_onnx.runtime.session import create_session
from tests.unit.test_fold import _check_equivalence, _models_for_execution


def _ort_runner(model: onnx.ModelProto):  # type: ignore[no-untyped-def]
    session = create_session(model)  # graph optimisations disabled by default
    return lambda feed, names: session.run(names, feed)


@pytest.mark.parametrize("case", list(_models_for_execution()))
def test_folded_equals_unfolded_onnxruntime(case: str, nbsmt_library: str) -> None:
    _check_equivalence(case, _ort_runner)
