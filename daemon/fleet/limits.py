"""Limits that count every server of a fleet, and resets that reach every server (README "A fleet
in PostgreSQL", "Fleet limits and reads").

`RemoteLimits` reads, for the names of this node's keys, what the other servers counted since
the name's last reset (`totals`) and that reset's moment (`users.reset_at`), after every delivery
and every poll interval, and hands both to the service: a key's kernel quota becomes its limit
minus the others' usage, and a key reset elsewhere after its own last reset is reset here. While
the database is unusable the last figures stay in force. `FleetResets` puts a reset made here
(API, CLI, page, periodic) into the fleet outbox, after the generation holding the usage before
it, so the ledger drops exactly what was counted before the reset.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime, timedelta
from typing import Any

import anyio
import psycopg
import structlog

from daemon.atomic import failure_reason
from daemon.bounds import FLEET_RESET_SLACK, MAX_USAGE_BYTES
from daemon.fleet.db import FleetDB, FleetUnavailable, describe_failure
from daemon.fleet.delivery import FleetNode, Retried
from daemon.fleet.reads import FleetReads
from daemon.fleet.retention import retention_loop
from daemon.fleet.rows import moment_or_none, shown
from daemon.fleet.schema import SCHEMA
from daemon.logs.repeats import Once
from daemon.reports import FleetReports
from daemon.service import Service
from daemon.store.state import KeyRecord, now

Log = structlog.typing.FilteringBoundLogger
IN_BOUNDS = (
    f"t.rx_bytes BETWEEN 0 AND {MAX_USAGE_BYTES} AND t.tx_bytes BETWEEN 0 AND {MAX_USAGE_BYTES}"
)

# Per name: the other servers' usage since its last reset, the rows left out of it (outside the
# bounds: damage, logged), and that reset's moment. Sums in numeric: no row can overflow them.
REMOTE = f"""
SELECT n.name,
       (SELECT coalesce(sum(t.rx_bytes::numeric + t.tx_bytes), 0) FROM {SCHEMA}.totals t
        WHERE t.name = n.name AND t.server <> %(me)s AND {IN_BOUNDS}),
       (SELECT count(*) FROM {SCHEMA}.totals t
        WHERE t.name = n.name AND t.server <> %(me)s AND NOT {IN_BOUNDS}),
       (SELECT u.reset_at FROM {SCHEMA}.users u WHERE u.name = n.name AND u.reset_at > '-infinity'),
       (SELECT u.reset_at > now() + make_interval(secs => {FLEET_RESET_SLACK})
        FROM {SCHEMA}.users u WHERE u.name = n.name)
FROM unnest(%(names)s::text[]) AS n(name)
"""


class FleetResets:
    """Resets made on this node, queued for the fleet as messages of their own."""

    def __init__(self, reports: FleetReports, log: Log) -> None:
        self.reports = reports
        self.log = log

    def put(self, resets: Sequence[tuple[str, datetime]], generation: int, staged: bool) -> None:
        """Queue these (name, moment) resets as one message, delivered after generation
        `generation`'s usage (`staged`: once that generation is saved). At whole seconds, as
        deltas carry them. Resets that cannot be queued stay this node's alone, and say so."""
        moments = [{"name": n, "at": at.replace(microsecond=0).isoformat()} for n, at in resets]
        try:
            self.reports.put_resets(moments, generation, staged)
        except OSError as exc:
            self.log.error(
                "fleet_reset_not_queued",
                names=[name for name, _ in resets][:10],
                count=len(resets),
                error=failure_reason(exc),
                remedy="reset the keys again once the disk has room",
            )

    async def reset(self, keys: Sequence[KeyRecord], names: Sequence[str], generation: int) -> None:
        """The service's hook: one operation reset these keys here, and the users `names` with
        them, after saved generation `generation`. One message, written in a worker thread: an
        operation over every user is one fsync, and the event loop goes on serving meanwhile."""
        moment = now()
        resets = [(key.name, key.last_reset_at or moment) for key in keys]
        resets += [(name, moment) for name in names]
        await anyio.to_thread.run_sync(self.put, resets, generation, False)

    def periodic(self, keys: Sequence[KeyRecord], generation: int) -> None:
        """The settler's hook: keys whose periodic reset came due in one settling pass, held
        until generation `generation` (the usage before them) is saved."""
        self.put([(key.name, key.last_reset_at or now()) for key in keys], generation, True)


class RemoteLimits:
    """Keeps the service's view of the other servers' usage and resets current."""

    def __init__(
        self, db: FleetDB, service: Service, server: str, interval: float, log: Log
    ) -> None:
        self.db = db
        self.service = service
        self.server = server
        self.interval = interval
        self.log = log
        self._lock = anyio.Lock()
        # Settling runs in the daemon's task group: a failure there (disk full, the kernel or
        # Xray refusing a reset) is logged and tried again next round, never ends the daemon.
        self._settling = Retried("fleet_settle_failed", log)
        self._refusals = Once(log)

    async def refresh(self) -> None:
        """Read the figures for every local key's name and settle the keys they moved."""
        names = sorted({key.name for key in self.service.keys_by_port()})
        if not names:
            return
        async with self._lock:
            try:
                async with self.db.connection() as conn:
                    params = {"me": self.server, "names": names}
                    await self.db.measure_skew(conn)
                    cursor = await conn.execute(REMOTE, params)
                    rows = await cursor.fetchall()
            except FleetUnavailable:
                return  # the last figures stay in force; the database's state is logged there
            except psycopg.Error as exc:
                self.log.error("fleet_limits_failed", error=describe_failure(exc))
                return
            remote, resets = self._figures(rows)
            await self._settling.attempt(lambda: self.service.settle_remote(remote, resets))

    def _figures(self, rows: Sequence[Sequence[Any]]) -> tuple[dict[str, int], dict[str, datetime]]:
        """Each name's usage elsewhere and its last reset, from rows that passed the bounds: a
        damaged row (usage past the bounds, a reset at `infinity` or later than the database's
        own clock allows) is left out and logged once, and moves no other name's figures."""
        remote: dict[str, int] = {}
        resets: dict[str, datetime] = {}
        to_local = timedelta(seconds=self.db.skew)  # stored moments are the database's clock
        for name, used, damaged, at, future in rows:
            if damaged:
                self._refusals.once(
                    ("totals", name, int(damaged)),
                    "fleet_row_not_used",
                    table="totals",
                    name=name,
                    rows=int(damaged),
                    error=f"usage outside 0..{MAX_USAGE_BYTES} bytes",
                )
            if used:
                remote[name] = int(used)
            if at is None:
                continue
            moment = moment_or_none(at)
            if moment is None or future:
                self._refusals.once(
                    ("users", name, str(at)),
                    "fleet_row_not_used",
                    table="users",
                    name=name,
                    field="reset_at",
                    error=f"{shown(at)} is no moment a reset can have",
                )
                continue
            resets[name] = moment - to_local
        return remote, resets

    async def run(self) -> None:
        """At least every interval (and after every delivery, by the delivery's hook)."""
        await self.db.wait_ready()
        while True:
            await self.refresh()
            await anyio.sleep(self.interval)


def attach(service: Service, node: FleetNode, log: Log) -> Callable[[], Coroutine[Any, Any, None]]:
    """Give the service the fleet's reads, limits and resets; what to run in the daemon's task
    group (the limits at every poll interval and after each delivery, the retention hourly)."""
    server, settings = service.settings.server_name, service.settings
    resets = FleetResets(reports_of(service, node), log)
    service.settler.on_reset = resets.reset
    service.settler.on_resets = resets.periodic
    service.fleet_reads = FleetReads(node.db, server)
    remote = RemoteLimits(node.db, service, server, settings.poll_interval, log)
    node.delivery.on_delivered.append(remote.refresh)

    async def run() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(remote.run)
            group.start_soon(retention_loop, node.db, settings.history_retention_days, log)

    return run


def reports_of(service: Service, node: FleetNode) -> FleetReports:
    """The usage sink that stages into the node's delivery outbox (daemon/main.py gives it to
    the service): resets are named and released in the same line of generations."""
    for sink in service.ledger.sinks:
        if isinstance(sink, FleetReports) and sink.outbox is node.delivery.outbox:
            return sink
    raise LookupError("no fleet reports sink stages into the delivery's outbox")
