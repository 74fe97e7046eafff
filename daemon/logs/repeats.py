"""A failure that repeats at every attempt while its cause lasts (a full disk at every save, a lost
database connection at every retry), logged once per interval with a count instead of once per
attempt, and its end logged once.

    writes = RepeatedFailure(log, "state_write_failed", "state_write_recovered")
    writes.failed(error="No space left on device")   # at once: event=state_write_failed
    writes.failed(error=...)                          # counted; a line with repeats=N at most
                                                      # once per `interval` (60 s)
    writes.succeeded()                                # event=state_write_recovered failures=N

No timer: a line is written by the attempt that finds the interval over, so what is counted
between attempts is never lost and nothing runs while nothing fails. Not thread-safe: one
owner calls it (the event loop).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import structlog

FAILURE_INTERVAL = 60.0  # seconds between two lines of one failure that goes on


class RepeatedFailure:
    """One kind of failure of one owner: `failed()` at each failed attempt, `succeeded()` at each
    good one. The first failure is logged at once with its fields; while it goes on, at most one
    line per `interval` carries `repeats` (the failures since the previous line, this one
    included) and the latest fields; the first success after a failure logs `recovered` with
    `failures` (all of them) and `seconds` (since the first)."""

    def __init__(
        self,
        log: structlog.typing.FilteringBoundLogger,
        event: str,
        recovered: str,
        *,
        level: int = logging.ERROR,
        interval: float = FAILURE_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.event = event
        self.recovered = recovered
        self.level = level
        self.interval = interval
        self.clock = clock
        self.failures = 0  # since the last success
        self._since: float | None = None  # the first failure's time, while failing
        self._logged_at = 0.0
        self._unlogged = 0  # failures since the last line

    @property
    def failing(self) -> bool:
        return self._since is not None

    def failed(self, **fields: object) -> None:
        now = self.clock()
        self.failures += 1
        if self._since is None:
            self._since = self._logged_at = now
            self.log.log(self.level, self.event, **fields)
            return
        self._unlogged += 1
        if now - self._logged_at >= self.interval:
            self.log.log(self.level, self.event, repeats=self._unlogged, **fields)
            self._logged_at, self._unlogged = now, 0

    def succeeded(self, **fields: object) -> None:
        if self._since is None:
            return
        seconds = round(self.clock() - self._since, 1)
        self.log.info(self.recovered, failures=self.failures, seconds=seconds, **fields)
        self.failures, self._since, self._unlogged = 0, None, 0
