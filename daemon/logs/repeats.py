"""Log lines for conditions that last. `Once`: one line per thing (a database row and its
version) however often it is seen. `RepeatedFailure`: a failure that repeats at every attempt
while its cause lasts (a full disk at every save, a lost
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
from collections import OrderedDict
from collections.abc import Callable, Hashable

import structlog

FAILURE_INTERVAL = 60.0  # seconds between two lines of one failure that goes on
REMEMBERED = 100_000  # things `Once` remembers; the oldest is forgotten (and may be logged again)


class Once:
    """Each (thing, event) logged once: a row refused at every comparison is one line, not one
    per poll. A thing is logged again only once it was forgotten (more than REMEMBERED newer
    things since)."""

    def __init__(
        self, log: structlog.typing.FilteringBoundLogger, remembered: int = REMEMBERED
    ) -> None:
        self.log = log
        self.remembered = remembered
        self._seen: OrderedDict[Hashable, None] = OrderedDict()

    def once(self, thing: Hashable, event: str, **fields: object) -> bool:
        """Log `event` as an error unless `thing` was logged already; whether it was logged."""
        if thing in self._seen:
            self._seen.move_to_end(thing)
            return False
        self._seen[thing] = None
        if len(self._seen) > self.remembered:
            self._seen.popitem(last=False)
        self.log.error(event, **fields)
        return True


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
