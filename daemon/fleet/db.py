"""The one owner of the fleet database connection (PostgreSQL, psycopg 3 and its async pool).

A node never waits for the database: start-up, counting, enforcing and key operations go on
without it. `FleetDB.run` opens the pool and migrates the schema in the background, retrying with
backoff, and keeps `status` current so `portmeter fleet status` can say why the database is not
in use. Users of the database take a connection with `connection()`, which fails at once with
FleetUnavailable (and the reason) while the database is unreachable, instead of blocking.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
import psycopg
import psycopg_pool
import structlog
from psycopg import AsyncConnection
from psycopg.abc import Buffer, Loader
from psycopg.conninfo import conninfo_to_dict
from psycopg.types import datetime as pgdt

from daemon.fleet.rows import Unreadable
from daemon.fleet.schema import SchemaTooNew, migrate
from daemon.store.state import now

Log = structlog.typing.FilteringBoundLogger
CONNECT_TIMEOUT = 5  # seconds for one connection attempt: a down database is noticed fast
MAX_BACKOFF = 30.0
POOL_SIZE = 4
QUERY_DEADLINE = 15  # seconds any use of a connection may take, statement timeout included
PROBE_INTERVAL = 1.0  # seconds between attempts to use a database known to be down
CLOCK_SKEW_WARN = 2.0  # seconds between this server's clock and the database's worth a warning
SKEW_SAMPLE_RTT = 0.25  # seconds: a clock sample that took longer says too little


class FleetUnavailable(Exception):
    """The fleet database cannot be used now; the message says why (for 503 answers)."""


@dataclass
class FleetStatus:
    """What the node knows of the database, for `portmeter fleet status` and the logs."""

    configured: bool
    reachable: bool = False
    schema_version: int | None = None
    error: str | None = None
    since: datetime | None = None  # when `reachable` last changed
    clock_skew: float | None = None  # seconds the database's clock is ahead of this server's


def _lenient(base: type[Loader]) -> type[Loader]:
    """`base`, except that a value Python cannot hold (`infinity`, a year past 9999) loads as
    rows.Unreadable instead of failing the whole query: one damaged row must not hide every
    other row from a node (README "The database is input too")."""

    class Lenient(base):  # type: ignore[valid-type,misc]
        def load(self, data: Buffer) -> Any:
            try:
                return super().load(data)
            except psycopg.DataError:
                return Unreadable(bytes(data).decode(errors="replace"))

    Lenient.__name__ = f"Lenient{base.__name__}"
    return Lenient


LENIENT_LOADERS = tuple(
    (type_name, _lenient(loader))
    for type_name, loaders in (
        ("timestamptz", (pgdt.TimestamptzLoader, pgdt.TimestamptzBinaryLoader)),
        ("timestamp", (pgdt.TimestampLoader, pgdt.TimestampBinaryLoader)),
        ("date", (pgdt.DateLoader, pgdt.DateBinaryLoader)),
    )
    for loader in loaders
)


async def lenient_loads(conn: AsyncConnection[Any]) -> None:
    """The pool's `configure`: dates and times load leniently on every fleet connection."""
    for type_name, loader in LENIENT_LOADERS:
        conn.adapters.register_loader(type_name, loader)


def dsn_problem(dsn: str) -> str | None:
    """Why a libpq connection string cannot be used, or None (checked without connecting)."""
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        return f"PORTMETER_FLEET_DSN is not a valid libpq connection string: {_first_line(exc)}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def connection_lost(exc: BaseException) -> bool:
    """The failure says the database is gone (no connection, shutting down, not accepting), not
    that one statement failed (a deadlock, a serialization failure, a cancelled statement)."""
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return True
    state = getattr(exc, "sqlstate", None)
    return state is None or state.startswith(("08", "57P"))


def describe_failure(exc: BaseException) -> str:
    """One readable line for a database failure (libpq's first line, never a password)."""
    if isinstance(exc, SchemaTooNew):
        return str(exc)
    return f"fleet database: {_first_line(exc)}"


class FleetDB:
    """The pool, the schema check and the reachability the rest of the fleet side relies on."""

    def __init__(self, dsn: str, log: Log, deadline: int = QUERY_DEADLINE) -> None:
        self.dsn = dsn
        self.log = log
        self.deadline = deadline  # seconds any use of a connection may take
        self.status = FleetStatus(configured=True)
        self._pool: psycopg_pool.AsyncConnectionPool[AsyncConnection[Any]] | None = None
        self._ready = anyio.Event()
        self._probing = False  # a connection attempt is finding out whether the database is back
        self._probe_after = 0.0  # monotonic time before which a down database is not tried
        self._skew = 0.0  # whole seconds the database's clock is ahead of this server's

    async def run(self) -> None:
        """Connect and migrate in the background until it works; a bad DSN or a schema from a
        newer portmeter stops trying (retrying cannot help), anything else retries with backoff."""
        problem = dsn_problem(self.dsn)
        if problem:
            self._unreachable(problem, final=True)
            return
        backoff = 1.0
        while not self._ready.is_set():
            try:
                await self._open()
            except SchemaTooNew as exc:
                self._unreachable(str(exc), final=True)
                return
            except (psycopg.Error, OSError) as exc:
                self._unreachable(describe_failure(exc))
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _open(self) -> None:
        async with await AsyncConnection.connect(
            self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT
        ) as conn:
            version = await migrate(conn)
        self._pool = psycopg_pool.AsyncConnectionPool(
            self.dsn,
            min_size=1,
            max_size=POOL_SIZE,
            open=False,
            kwargs={
                "autocommit": True,
                "connect_timeout": CONNECT_TIMEOUT,
                # The server ends a statement before the deadline (a lock wait is then a failed
                # statement: the database answered); the deadline and TCP catch a silent one.
                "options": f"-c statement_timeout={self.deadline * 800}",
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
                "tcp_user_timeout": self.deadline * 1000,
            },
            check=psycopg_pool.AsyncConnectionPool.check_connection,
            configure=lenient_loads,
            # The pool's reconnection backs off exponentially until it gives up; given up, the
            # next request tries at once. Short, so a database that is back is used in seconds.
            reconnect_timeout=2 * CONNECT_TIMEOUT,
            name="portmeter-fleet",
        )
        await self._pool.open(wait=False)
        self.status.schema_version = version
        self._reachable()
        self._ready.set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A pooled connection (autocommit: use `conn.transaction()` for several statements).
        FleetUnavailable at once while the database is not in use; a connection failure marks
        it unreachable until a query succeeds again."""
        if self._pool is None:
            raise FleetUnavailable(self.status.error or "fleet database: not connected yet")
        if not self.status.reachable and (self._probing or time.monotonic() < self._probe_after):
            # Known down: answer at once; one caller at a time (and at most one a PROBE_INTERVAL)
            # pays the wait that finds out whether it is back.
            raise FleetUnavailable(self.status.error or "fleet database: unreachable")
        self._probing = not self.status.reachable
        try:
            # A database that stops answering (a dropped route, a lock held in psql) must never
            # hold the caller, and with it the service's lock, for long.
            with anyio.fail_after(self.deadline):
                async with self._pool.connection(timeout=CONNECT_TIMEOUT) as conn:
                    yield conn
        except TimeoutError:
            reason = f"fleet database: no answer within {self.deadline} s"
            self._unreachable(reason)
            raise FleetUnavailable(reason) from None
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            reason = describe_failure(exc)
            if connection_lost(exc):
                self._unreachable(reason)
            raise FleetUnavailable(reason) from None
        finally:
            self._probing = False
        self._reachable()

    @property
    def skew(self) -> float:
        """Whole seconds to add to this server's clock to get the database's (0 until measured,
        and while the clocks agree within CLOCK_SKEW_WARN: NTP keeps servers far closer)."""
        return self._skew

    async def measure_skew(self, conn: AsyncConnection[Any]) -> float:
        """The database's clock against this server's, from one round trip (within half of it):
        moments the fleet compares across servers (resets, the usage since them) are stamped in
        the database's clock, so a server whose clock runs ahead or behind neither hides the
        others' usage nor misses their resets. A sample whose round trip took longer than
        SKEW_SAMPLE_RTT is not used, and the skew in use moves only when a sample leaves it by
        more than CLOCK_SKEW_WARN: a measurement's jitter must never move a moment this server
        compares with its own (its own reset read back as a newer one)."""
        before = time.time()
        cursor = await conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
        row = await cursor.fetchone()
        after = time.time()
        if row is None or after - before > SKEW_SAMPLE_RTT:
            return self._skew
        measured = float(row[0]) - (before + after) / 2
        self.status.clock_skew = measured
        if abs(measured - self._skew) > CLOCK_SKEW_WARN:
            was, self._skew = self._skew, float(round(measured))
            if abs(self._skew) > CLOCK_SKEW_WARN:
                self.log.warning(
                    "fleet_clock_skew",
                    seconds=round(measured, 3),
                    remedy="fleet moments use the database's clock; run NTP (chrony) here",
                )
            elif was:
                self._skew = 0.0
                self.log.info("fleet_clock_skew_gone", seconds=round(measured, 3))
        return self._skew

    def _reachable(self) -> None:
        if not self.status.reachable:
            self.status.reachable, self.status.error, self.status.since = True, None, now()
            self.log.info("fleet_db_reachable", schema_version=self.status.schema_version)

    def _unreachable(self, reason: str, final: bool = False) -> None:
        if self.status.reachable or self.status.error != reason:
            self.log.error(
                "fleet_db_unreachable",
                error=reason,
                remedy="counting and enforcing go on locally; "
                + ("fix the setting and restart" if final else "retrying"),
            )
        self.status.reachable, self.status.error, self.status.since = False, reason, now()
        self._probe_after = time.monotonic() + PROBE_INTERVAL

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
