"""Progress: log lines with counts, elapsed time and ETA when the output is not a terminal."""

from __future__ import annotations

import logging

import pytest

from nbsmt_onnx.progress import Progress


def test_log_lines_when_not_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nbsmt_onnx.progress")
    with Progress("activation ranges", 4, terminal=False, interval=0.0) as bar:
        for done in range(1, 5):
            bar.update(done)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "activation ranges: started (0/4 batches)"
    assert lines[1].startswith("activation ranges: 1/4 batches, ") and "left" in lines[1]
    assert lines[-1].startswith("activation ranges: done (4/4 batches) in ")
    assert len(lines) == 6  # start, 4 updates (interval 0), done


def test_disabled_progress_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nbsmt_onnx.progress")
    with Progress("x", 3, enabled=False, terminal=False, interval=0.0) as bar:
        bar.update(3)
    assert caplog.records == []


def test_a_failed_step_does_not_claim_it_finished(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nbsmt_onnx.progress")
    with pytest.raises(RuntimeError), Progress("x", 3, terminal=False, interval=60.0) as bar:
        bar.update(1)
        raise RuntimeError("boom")
    assert [r.getMessage() for r in caplog.records] == ["x: started (0/3 batches)"]
