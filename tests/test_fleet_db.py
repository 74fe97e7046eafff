"""The fleet database's owner (daemon/fleet/db.py) against a real PostgreSQL: a database that
stops answering never holds a caller past the deadline, a known-down database answers at once,
and a failed statement is not taken for a lost database."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import psycopg
import pytest
import structlog

from daemon.fleet.db import FleetDB, FleetUnavailable, connection_lost
from tests.fleetrig import ready_fleet_db
from tests.pgserver import PG_BIN, Database

LOG = structlog.get_logger()


def with_db(db: Database, deadline: int, body: Callable[[FleetDB], Awaitable[None]]) -> None:
    async def main() -> None:
        async with ready_fleet_db(db.dsn, deadline) as fleet:
            await body(fleet)

    anyio.run(main)


def test_a_lock_held_elsewhere_frees_the_caller_before_the_deadline(fleet_db: Database) -> None:
    """An operator's open transaction holding a lock would make a write wait for ever: the
    server ends the statement at 80 % of the deadline. The database answered, so it is still
    reachable; the caller gets FleetUnavailable with the reason."""
    holder = subprocess.Popen(
        [str(PG_BIN / "psql"), "-X", "-q", "-d", fleet_db.admin_dsn],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
    )

    async def body(fleet: FleetDB) -> None:
        assert holder.stdin is not None
        holder.stdin.write("BEGIN; LOCK TABLE portmeter.servers IN ACCESS EXCLUSIVE MODE;\n")
        holder.stdin.flush()
        await anyio.sleep(0.5)  # the lock is taken
        started = time.monotonic()
        with pytest.raises(FleetUnavailable, match="statement timeout"):
            async with fleet.connection() as conn:
                await conn.execute("INSERT INTO portmeter.servers (name) VALUES ('x')")
        assert 3.9 < time.monotonic() - started < 5  # 80 % of 5 s, before the deadline
        assert fleet.status.reachable is True

    try:
        with_db(fleet_db, 5, body)
    finally:
        holder.kill()
        holder.wait(10)


def test_a_server_that_stops_answering_frees_the_caller_at_the_deadline(
    fleet_db: Database,
) -> None:
    """The server process serving the connection stops (SIGSTOP: a hung host, a dead route): the
    caller gets FleetUnavailable at the deadline, the database counts as down, and the next
    caller is answered at once instead of waiting again."""
    stopped: list[int] = []

    async def body(fleet: FleetDB) -> None:
        started = time.monotonic()
        with pytest.raises(FleetUnavailable, match="no answer within 2 s"):
            async with fleet.connection() as conn:
                cursor = await conn.execute("SELECT pg_backend_pid()")
                row = await cursor.fetchone()
                assert row is not None
                stopped.append(int(row[0]))
                os.kill(stopped[0], signal.SIGSTOP)
                await conn.execute("SELECT 1")
        assert 1.9 < time.monotonic() - started < 4
        assert fleet.status.reachable is False
        started = time.monotonic()
        with pytest.raises(FleetUnavailable):
            async with fleet.connection():
                pass
        assert time.monotonic() - started < 0.1

    try:
        with_db(fleet_db, 2, body)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


def test_a_failed_statement_does_not_mark_the_database_unreachable(fleet_db: Database) -> None:
    async def body(fleet: FleetDB) -> None:
        with pytest.raises(FleetUnavailable, match="canceling statement"):
            async with fleet.connection() as conn:
                await conn.execute("SET statement_timeout = 50")
                await conn.execute("SELECT pg_sleep(1)")
        assert fleet.status.reachable is True
        async with fleet.connection() as conn:
            await conn.execute("RESET statement_timeout")

    with_db(fleet_db, 10, body)


@pytest.mark.parametrize(
    ("error", "lost"),
    [
        (psycopg.errors.ConnectionFailure("gone"), True),
        (psycopg.errors.AdminShutdown("shutting down"), True),
        (psycopg.OperationalError("server closed the connection unexpectedly"), True),
        (psycopg.errors.DeadlockDetected("deadlock"), False),
        (psycopg.errors.SerializationFailure("retry"), False),
        (psycopg.errors.QueryCanceled("statement timeout"), False),
    ],
)
def test_only_connection_failures_count_as_a_lost_database(error: Any, lost: bool) -> None:
    assert connection_lost(error) is lost
