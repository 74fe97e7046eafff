"""PORTMETER_HISTORY_RETENTION_DAYS in the fleet database, as in the SQLite history: hourly rows
older than 48 hours are rolled into daily rows (summed exactly, in the transaction that deletes
them), daily rows and report-id dedupe rows past the retention are deleted. One node at a time
does it: a node that does not get the retention lock leaves the round to the node holding it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import anyio
import psycopg
import structlog
from psycopg import AsyncConnection

from daemon.fleet.db import FleetDB, FleetUnavailable, describe_failure
from daemon.fleet.schema import RETENTION_LOCK, SCHEMA
from daemon.store.history import CLEANUP_INTERVAL, HOURLY_HOURS
from daemon.store.state import now

Log = structlog.typing.FilteringBoundLogger

ROLL_UP = f"""
WITH moved AS (
    DELETE FROM {SCHEMA}.usage_hourly WHERE hour < %(roll_before)s RETURNING *
), daily AS (
    INSERT INTO {SCHEMA}.usage_daily AS d
        (name, server, day, rx_bytes, tx_bytes, rx_packets, tx_packets, reports)
    SELECT name, server, (hour AT TIME ZONE 'UTC')::date, sum(rx_bytes), sum(tx_bytes),
           sum(rx_packets), sum(tx_packets), sum(reports)
    FROM moved GROUP BY 1, 2, 3
    ON CONFLICT (name, server, day) DO UPDATE SET
        rx_bytes = d.rx_bytes + excluded.rx_bytes, tx_bytes = d.tx_bytes + excluded.tx_bytes,
        rx_packets = d.rx_packets + excluded.rx_packets,
        tx_packets = d.tx_packets + excluded.tx_packets, reports = d.reports + excluded.reports
)
SELECT count(*) FROM moved
"""
EXPIRE_DAILY = f"DELETE FROM {SCHEMA}.usage_daily WHERE day < (%s AT TIME ZONE 'UTC')::date"
EXPIRE_REPORTS = f"DELETE FROM {SCHEMA}.reports WHERE received_at < %s"


async def _count(conn: AsyncConnection[Any], sql: str, params: Any) -> int:
    cursor = await conn.execute(sql, params)
    if cursor.description is None:
        return cursor.rowcount
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def apply_retention(
    conn: AsyncConnection[Any], retention_days: int, at: datetime | None = None
) -> dict[str, int] | None:
    """One round, in one transaction; what it did, or None when another node holds the lock."""
    moment = at or now()
    cutoff = moment - timedelta(days=retention_days)
    async with conn.transaction():
        cursor = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (RETENTION_LOCK,))
        row = await cursor.fetchone()
        if not row or not row[0]:
            return None
        roll_before = moment.replace(minute=0, second=0, microsecond=0) - timedelta(
            hours=HOURLY_HOURS
        )
        return {
            "hourly_rolled_up": await _count(conn, ROLL_UP, {"roll_before": roll_before}),
            "daily_deleted": await _count(conn, EXPIRE_DAILY, (cutoff,)),
            "reports_deleted": await _count(conn, EXPIRE_REPORTS, (cutoff,)),
        }


async def retention_loop(
    db: FleetDB, retention_days: int, log: Log, interval: float = CLEANUP_INTERVAL
) -> None:
    """A round once the database is ready, then every `interval` seconds."""
    await db.wait_ready()
    while True:
        try:
            async with db.connection() as conn:
                done = await apply_retention(conn, retention_days)
        except FleetUnavailable:
            done = None  # the database's state is logged by its owner; next round retries
        except psycopg.Error as exc:
            log.error("fleet_retention_failed", error=describe_failure(exc))
            done = None
        if done is not None:
            log.info("fleet_retention", retention_days=retention_days, **done)
        await anyio.sleep(interval)
