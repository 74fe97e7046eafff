"""Usage reports POSTed by other servers (`/api/traffic/webhook`, `/api/xpert/traffic-webhook`)
into the fleet database: each report id counts once (the `reports` ledger), its bytes add to
`usage_hourly` and, when measured since the user's last reset, to `totals`, all in one
transaction (README "A fleet in PostgreSQL"). The ledger's one statement is the delivery's
(daemon/fleet/delivery.py `add_usage`): each report is a message of one delta, its report id
the dedupe id; one round trip per sending server in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from daemon import bounds
from daemon.fleet.delivery import Message, add_usage
from daemon.store.history import FleetReport, ReportRefused

NO_RESETS: tuple[list[Any], ...] = ([], [], [])


def _message(report: FleetReport, received: datetime) -> Message:
    """A report as a message of one delta: no key id (server_keys is left alone), no packets;
    its moment at whole seconds, as the deltas of an outbox carry it."""
    at = int((report.timestamp or received).timestamp())
    up, down = report.bytes_uploaded, report.bytes_downloaded
    delta = (report.user_token, None, None, report.port, 0, at, up, down, 0, 0)
    return Message(report.report_id, 0, None, tuple([v] for v in delta), NO_RESETS)


async def ingest(
    conn: AsyncConnection[Any], reports: Sequence[FleetReport], received: datetime
) -> list[bool]:
    """Store reports in one transaction, all or none; True for each report id not seen before
    (a repeated id within the batch counts once, at its first place). ReportRefused (nothing
    stored) when a user's total on a server would pass MAX_USAGE_BYTES."""
    first: dict[str, int] = {}
    for index, report in enumerate(reports):
        first.setdefault(report.report_id, index)
    by_server: dict[str, list[Message]] = {}
    for index in sorted(first.values()):
        report = reports[index]
        by_server.setdefault(report.server, []).append(_message(report, received))
    fresh: set[str] = set()
    async with conn.transaction():
        for server, batch in by_server.items():
            new, most = await add_usage(conn, server, [m.stem for m in batch], batch)
            if most > bounds.MAX_USAGE_BYTES:
                raise ReportRefused(
                    f"a user's total on a server would pass {bounds.MAX_USAGE_BYTES} bytes; "
                    "nothing was stored"
                )
            fresh |= new
    return [first[r.report_id] == i and r.report_id in fresh for i, r in enumerate(reports)]
