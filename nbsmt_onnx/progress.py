"""Progress of long steps, wherever the output goes.

On a terminal each step is a bar with its total and an ETA, created before
the work starts. Anywhere else (a CI log, a pipe, a file) the same step
writes a log line through the ``nbsmt_onnx.progress`` logger when it starts,
every ``interval`` seconds while it runs, and when it ends: the stage, how
much is done of how much, the elapsed time and an estimate of the rest. The
CLI shows those lines unless ``-q``; library users get them by configuring
that logger like any other.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any

log = logging.getLogger("nbsmt_onnx.progress")

#: Seconds between two log lines of one step when the output is not a terminal.
LOG_INTERVAL_S = 10.0


def _fmt_s(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


class Progress:
    """One step's progress: ``update(done)`` as work completes; a context manager.

    ``unit`` is a plural noun ("batches", "samples", "passes").

    ``enabled=False`` makes every call a no-op. ``terminal=None`` asks whether
    stderr is a terminal (bar) or not (log lines).
    """

    def __init__(
        self,
        desc: str,
        total: int | None,
        unit: str = "batches",
        *,
        enabled: bool = True,
        terminal: bool | None = None,
        interval: float = LOG_INTERVAL_S,
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.enabled = enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.interval = interval
        self.done = 0
        self._start = time.monotonic()
        self._last_log = self._start
        self._bar: Any = None
        if not enabled:
            return
        if self.terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)
        else:
            log.info("%s: started (%s)", desc, self._of())

    def _of(self) -> str:
        total = "?" if self.total is None else str(self.total)
        return f"{self.done}/{total} {self.unit}"

    def _eta(self, elapsed: float) -> str:
        if not self.total or not self.done or self.done >= self.total:
            return ""
        return f", ~{_fmt_s(elapsed * (self.total - self.done) / self.done)} left"

    def update(self, done: int, total: int | None = None) -> None:
        """``done`` units finished so far (absolute, not an increment)."""
        if not self.enabled:
            return
        if total is not None and total != self.total:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
        if self._bar is not None:
            self._bar.update(done - self.done)
            self.done = done
            return
        self.done = done
        now = time.monotonic()
        if now - self._last_log >= self.interval:
            self._last_log = now
            elapsed = now - self._start
            log.info(
                "%s: %s, %s elapsed%s", self.desc, self._of(), _fmt_s(elapsed), self._eta(elapsed)
            )

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            return
        log.info(
            "%s: done (%s) in %s", self.desc, self._of(), _fmt_s(time.monotonic() - self._start)
        )
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._bar is not None:
            self._bar.close()
