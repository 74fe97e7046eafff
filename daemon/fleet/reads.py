"""The usage answers' view of every other server, read from the fleet database (`Reported` of
daemon/store/reported.py, so the usage routes serve it like the SQLite history).

Totals since a user's last reset come from `totals`, series from `usage_hourly` and
`usage_daily`; this server's rows are left out (its entry is read live from the kernel). While
the database is unusable every read raises FleetUnavailable, which the routes answer with 503
(README "A fleet in PostgreSQL").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, time
from typing import Any

import psycopg

from daemon.errors import Invalid, StoreUnavailable
from daemon.fleet.db import FleetDB, FleetUnavailable, describe_failure
from daemon.fleet.ingest import ingest
from daemon.fleet.schema import SCHEMA, sane
from daemon.store.history import FleetReport, ReportBucket, ServerUsage
from daemon.store.reported import ReportedDetail, UserTotals
from daemon.store.state import now

PROTOCOL = "vless"  # what every portmeter node serves; `totals` does not keep it

TOTALS_SANE = sane("t", ("first_at", "last_at"), port=True)
USER = f"""
SELECT server, port, rx_bytes, tx_bytes, reports, first_at, last_at
FROM {SCHEMA}.totals t WHERE name = %s AND server <> %s AND {TOTALS_SANE} ORDER BY server
"""
USERS = f"""
SELECT name, sum(rx_bytes), sum(tx_bytes), array_agg(server ORDER BY server)
FROM {SCHEMA}.totals t WHERE server <> %s AND {TOTALS_SANE} GROUP BY name
"""
# A user's totals, series and reset in ONE statement (one round trip, one plan): rows of kind
# t (totals: first_at in `at`), h (hours), d (days: usage_daily and the hours not yet rolled up)
# and r (the reset). Every scan is a range of a name-first primary key.
DETAIL = f"""
SELECT 't' AS kind, server, first_at AS at, rx_bytes, tx_bytes, reports, port, last_at
FROM {SCHEMA}.totals t WHERE name = %(name)s AND server <> %(me)s AND {TOTALS_SANE}
UNION ALL
SELECT 'h', server, hour, rx_bytes, tx_bytes, reports, NULL, NULL FROM {SCHEMA}.usage_hourly h
WHERE name = %(name)s AND server <> %(me)s AND hour >= %(hours_since)s AND hour < %(until)s
  AND {sane("h", ("hour",))}
UNION ALL
SELECT 'd', server, day::timestamp AT TIME ZONE 'UTC', sum(rx)::bigint, sum(tx)::bigint,
       sum(n)::bigint, NULL, NULL
FROM (
    SELECT server, day, rx_bytes AS rx, tx_bytes AS tx, reports AS n FROM {SCHEMA}.usage_daily d
    WHERE name = %(name)s AND server <> %(me)s AND day >= %(days_since)s AND day < %(days_until)s
      AND {sane("d", ("day",))}
    UNION ALL
    SELECT server, (hour AT TIME ZONE 'UTC')::date, rx_bytes, tx_bytes, reports
    FROM {SCHEMA}.usage_hourly h
    WHERE name = %(name)s AND server <> %(me)s
      AND hour >= %(days_since)s::date AT TIME ZONE 'UTC' AND hour < %(until)s
      AND {sane("h", ("hour",))}
) AS days GROUP BY server, day
UNION ALL
SELECT 'r', NULL, reset_at, NULL, NULL, NULL, NULL, NULL FROM {SCHEMA}.users
WHERE name = %(name)s AND reset_at > '-infinity' AND reset_at <= now()
ORDER BY kind, server, at
"""
# The number of reports received is the planner's estimate: counting the dedupe table would read
# all of it on every overview.
STATS = f"""
SELECT (SELECT greatest(reltuples, 0)::bigint FROM pg_class
        WHERE oid = '{SCHEMA}.reports'::regclass), count(DISTINCT name),
       coalesce(array_agg(DISTINCT server), '{{}}'), coalesce(sum(rx_bytes), 0),
       coalesce(sum(tx_bytes), 0)
FROM {SCHEMA}.totals t WHERE server <> %s AND {TOTALS_SANE}
"""


def _usage(row: Sequence[Any]) -> ServerUsage:
    """A `totals` row: server, port, rx, tx, reports, first_at, last_at."""
    return ServerUsage(
        row[0], row[1], PROTOCOL, int(row[2]), int(row[3]), int(row[4]), row[5], row[6]
    )


def _bucket(row: Sequence[Any]) -> ReportBucket:
    start = row[0] if isinstance(row[0], datetime) else datetime.combine(row[0], time(), UTC)
    return ReportBucket(start.astimezone(UTC), int(row[1]), int(row[2]), int(row[3]))


class FleetReads:
    """`Reported` from PostgreSQL for the server named `server`. A user's reset reaches every
    server as the service's message (`Service.reset_many`, daemon/fleet/limits.py
    `FleetResets.reset`), not from here."""

    def __init__(self, db: FleetDB, server: str) -> None:
        self.db = db
        self.server = server

    async def _rows(self, sql: str, params: Sequence[Any] | dict[str, Any]) -> list[Any]:
        with unavailable():
            async with self.db.connection() as conn:
                cursor = await conn.execute(sql, params)
                return await cursor.fetchall()

    async def reported(self, user: str) -> list[ServerUsage]:
        return [_usage(r) for r in await self._rows(USER, (user, self.server))]

    async def reported_users(self) -> UserTotals:
        rows = await self._rows(USERS, (self.server,))
        return {r[0]: (int(r[1]), int(r[2]), list(r[3])) for r in rows}

    async def reported_detail(
        self, user: str, hours_since: datetime, days_since: datetime, until: datetime
    ) -> ReportedDetail:
        params = {
            "name": user,
            "me": self.server,
            "hours_since": hours_since,
            "days_since": days_since.astimezone(UTC).date(),
            "days_until": _day_after(until),
            "until": until,
        }
        usage: list[ServerUsage] = []
        series: dict[str, dict[str, list[ReportBucket]]] = {"h": {}, "d": {}}
        reset_at = None
        for kind, server, at, up, down, reports, port, last_at in await self._rows(DETAIL, params):
            if kind == "t":
                usage.append(_usage((server, port, up, down, reports, at, last_at)))
            elif kind == "r":
                reset_at = at
            else:
                series[kind].setdefault(server, []).append(_bucket((at, up, down, reports)))
        return ReportedDetail(usage, series["h"], series["d"], reset_at)

    async def reported_stats(self) -> dict[str, Any]:
        records, users, servers, up, down = (await self._rows(STATS, (self.server,)))[0]
        return {
            "records": int(records),
            "unique_users": int(users),
            "unique_servers": len(servers),
            "servers": sorted(servers),
            "bytes_uploaded": int(up),
            "bytes_downloaded": int(down),
        }

    async def reset_reports(self, user: str) -> dict[str, Any]:
        """What the others had until the user's reset (queued by the service, delivered in order
        with the usage, so nothing counted before it survives it)."""
        reported = await self.reported(user)
        return {
            "servers": len(reported),
            "bytes_uploaded": sum(r.bytes_uploaded for r in reported),
            "bytes_downloaded": sum(r.bytes_downloaded for r in reported),
        }

    async def reset_many(self, users: Sequence[str]) -> None:
        """Nothing to do here: the service's one message resets them (`reset_reports`)."""

    async def record_reports(self, reports: Sequence[FleetReport]) -> list[bool]:
        with unavailable():
            async with self.db.connection() as conn:
                return await ingest(conn, reports, now())


@contextlib.contextmanager
def unavailable() -> Iterator[None]:
    """The database unusable (down, refusing, not migrated): 503 with the reason; a value it
    cannot take: 422. Never 500."""
    try:
        yield
    except FleetUnavailable as exc:
        reason = str(exc)
        prefix = "" if reason.startswith("fleet database:") else "fleet database: "
        raise StoreUnavailable(prefix + reason) from None
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(describe_failure(exc)) from None
    except psycopg.DataError as exc:  # a value PostgreSQL cannot take, such as a NUL in a name
        raise Invalid(f"{describe_failure(exc)} (a value it cannot take)") from None


def _day_after(moment: datetime) -> date:
    """The first UTC day that starts at or after `moment` (the exclusive end of a day range)."""
    day = moment.astimezone(UTC).date()
    return (
        day
        if datetime.combine(day, time(), UTC) >= moment
        else date.fromordinal(day.toordinal() + 1)
    )
