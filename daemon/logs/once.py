"""Log lines for conditions that hold for a while: `Once` logs an event once per thing it is
about (a database row and its version), `Throttled` logs a failure that repeats at most once per
interval, with how many times it happened, and says when it stopped.

Neither needs a timer: a condition that keeps failing calls again, and its next call after the
interval carries the count. Memory is bounded whatever the input: a database can hold any number
of bad rows.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

import structlog

Log = structlog.typing.FilteringBoundLogger
REMEMBERED = 100_000  # things `Once` remembers; the oldest is forgotten (and may be logged again)


class Once:
    """Each (thing, event) logged once: a row refused at every comparison is one line, not one
    per poll. A thing is logged again only once it was forgotten (more than REMEMBERED newer
    things since)."""

    def __init__(self, log: Log, remembered: int = REMEMBERED) -> None:
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


class Throttled:
    """A failure that may repeat every second (a lost connection retried): its first occurrence
    logged at once, then at most one line per `interval` with `repeats` (how many since the last
    line), and `<event>_recovered` with the count when it stops."""

    def __init__(
        self,
        log: Log,
        event: str,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.event = event
        self.interval = interval
        self.clock = clock
        self._logged_at: float | None = None
        self._unlogged = 0
        self._total = 0

    def happened(self, **fields: object) -> None:
        self._total += 1
        moment = self.clock()
        if self._logged_at is not None and moment - self._logged_at < self.interval:
            self._unlogged += 1
            return
        self.log.warning(self.event, repeats=self._unlogged + 1, **fields)
        self._logged_at, self._unlogged = moment, 0

    def recovered(self) -> None:
        if self._total:
            recovery = self.event.removesuffix("_failed").removesuffix("_lost")
            self.log.info(f"{recovery}_recovered", failures=self._total)
        self._logged_at, self._unlogged, self._total = None, 0, 0
