"""The kernel limits beyond the quota, settled per key (README "Speed, connection and device
limits"): the guard each key needs, given to the kernel when it holds another, and the events
for what the kernel refused.

`connection_refused` and `ip_limit_reached` are reported when a key's refused counters grew since
the last reading, at most once per key and event per address window, so a flood of refused
packets is one event, not thousands.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from daemon import limits
from daemon.kernel import Kernel
from daemon.limits import Guard
from daemon.service.ledger import StatusEvents
from daemon.store.state import KeyRecord

ALERTS = (("refused", "connection_refused"), ("ip_refused", "ip_limit_reached"))


class Guards:
    """Keeps every key's guard in the kernel and reports refusals."""

    def __init__(self, kernel: Kernel, events: StatusEvents, window: int) -> None:
        self.kernel = kernel
        self.events = events
        self.window = window
        self._seen: dict[tuple[str, str], int] = {}  # (key id, counter) -> packets last seen
        self._alerted: dict[tuple[str, str], float] = {}  # (key id, event) -> monotonic time

    def desired(self, key: KeyRecord) -> Guard | None:
        return limits.kernel_guard(
            key.speed_limit_bps, key.max_connections, key.max_ips, self.window
        )

    def all_desired(self, keys: Iterable[KeyRecord]) -> dict[int, Guard]:
        """The guards of every key that has one, by port: what a rebuilt table holds."""
        wanted = {key.port: self.desired(key) for key in keys}
        return {port: guard for port, guard in wanted.items() if guard is not None}

    async def settle(self, key: KeyRecord) -> bool:
        """Give the kernel the guard the key needs unless it holds that one; True if it changed.
        Also reports what the kernel refused since the last reading."""
        self.notice(key)
        wanted = self.desired(key)
        if self.kernel.guard_of(key.port) == wanted:
            return False
        await self.kernel.guard(key.port, wanted)
        return True

    def notice(self, key: KeyRecord) -> None:
        """Report a refusal burst: a refused counter grew since the key was last seen."""
        moment = time.monotonic()
        for field_name, event in ALERTS:
            count = getattr(key, field_name).packets
            before = self._seen.get((key.id, field_name))
            self._seen[key.id, field_name] = count
            if before is None or count <= before:
                continue
            last = self._alerted.get((key.id, event))
            if last is not None and moment - last < self.window:
                continue
            self._alerted[key.id, event] = moment
            self.events.report(event, key, refused=count - before, window_seconds=self.window)

    def forget(self, key_id: str) -> None:
        """A deleted key: its counters and alerts are no longer followed."""
        for field_name, event in ALERTS:
            self._seen.pop((key_id, field_name), None)
            self._alerted.pop((key_id, event), None)
