"""Fleet reads: `GET /api/admin/usage/{username}` answered from PostgreSQL with 90 days of history
(the last 48 hours hourly, the rest daily, as the retention keeps it) for 10,000 users on 3
servers, generated with generate_series; target p99 <= 10 ms. The daemon is one of the three
(node0) and holds the same 10,000 keys, so each answer reads its own kernel counters too; the
tables are vacuumed after the load, as 90 days of real history would be. Then the same
single-node workload (reports POSTed to the intake, then the same reads) on the SQLite default
and on PostgreSQL, side by side. A real daemon in its own namespace, a real PostgreSQL 15 in a
temp dir.
Usage: .venv/bin/python -m bench.fleet_reads [--quick]
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench.common import (
    append_results,
    interruptible,
    median,
    parse_quick,
    percentile,
    print_table,
    running,
)
from tests.conftest import Daemon
from tests.pgserver import Database, cluster

TARGET_P99_MS = 10.0
SERVERS = 3  # node0 is the daemon's own name; node1 and node2 are read from the database
BATCH = 200  # reports per POST: within the 64 KiB request body bound
SEED = (
    """INSERT INTO portmeter.usage_daily
    SELECT 'k' || n, 'node' || s, (now() AT TIME ZONE 'UTC')::date - d,
           n * 1000 + d, n * 3000 + d, n + d, n + d, 24
    FROM generate_series(0, {users} - 1) n, generate_series(0, 2) s, generate_series(2, 89) d""",
    """INSERT INTO portmeter.usage_hourly
    SELECT 'k' || n, 'node' || s, date_trunc('hour', now()) - h * interval '1 hour',
           n * 10 + h, n * 30 + h, n + h, n + h, 1
    FROM generate_series(0, {users} - 1) n, generate_series(0, 2) s, generate_series(0, 47) h""",
    """INSERT INTO portmeter.totals
    SELECT 'k' || n, 'node' || s, n::bigint * 100000, n::bigint * 300000, 90 * 24, 10001,
           now() - interval '90 days', now()
    FROM generate_series(0, {users} - 1) n, generate_series(0, 2) s""",
    "VACUUM ANALYZE",
)
WARM_UP = 200  # reads before the measured ones: every pooled connection has prepared its plans


def wait_usage(daemon: Daemon, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while daemon.http.request("GET", "/api/admin/usage/k0").status_code not in (200, 404):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the usage answers never came up:\n{daemon.log()}")
        time.sleep(0.2)


def reads(daemon: Daemon, prefix: str, users: int, count: int, path: str = "") -> list[float]:
    """Milliseconds of `count` reads of random users (`prefix` 0 .. users - 1), one at a time."""
    took = []
    for _ in range(count):
        name = f"{prefix}{random.randint(0, users - 1)}"
        started = time.perf_counter()
        response = daemon.http.request("GET", f"/api/admin/usage/{name}{path}")
        took.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200:
            raise RuntimeError(f"{name}: {response.status_code} {response.text}")
    return took


@contextmanager
def fleet_daemon(db: Database | None, keys: int) -> Iterator[Daemon]:
    # The default poll interval: a poll holds the service's lock while it reads every counter
    # (tens of ms at 10,000 keys), and a read that arrives then waits for it; at 1 s that is a
    # few percent of the reads, and the p99 would measure the poll, not the read.
    env = {"PORTMETER_SERVER_NAME": "node0", "PORTMETER_POLL_INTERVAL": "10"}
    if db is not None:
        env["PORTMETER_FLEET_DSN"] = db.dsn
    with running(keys, **env) as run:
        wait_usage(run.daemon)
        yield run.daemon


def history_read(db: Database, users: int, count: int) -> list[tuple[str, ...]]:
    """The 90-day read: rows generated in PostgreSQL, p50/p99 of the summary and detailed view
    (from the same run each), with the machine's load average over the last minute."""
    with fleet_daemon(db, users) as daemon:
        started = time.perf_counter()
        for statement in SEED:
            db.sql(statement.format(users=users))
        seeded = time.perf_counter() - started
        rows: list[tuple[str, ...]] = []
        for path in ("", "/detailed"):
            reads(daemon, "k", users, WARM_UP, path)
            took = reads(daemon, "k", users, count, path)
            rows.append(
                (
                    f"GET /api/admin/usage/{{username}}{path}",
                    f"{users:,} keys x {SERVERS} servers, 90 days",
                    f"{median(took):.2f}",
                    f"{percentile(took, 99):.2f}",
                    f"{count:,} reads, load {os.getloadavg()[0]:.1f}, seeded in {seeded:.0f} s",
                )
            )
    return rows


def reports(users: int, hours: int, batch: int) -> Iterator[list[dict[str, Any]]]:
    """`hours` reports per user and server, in batches as a node's intake receives them."""
    now = int(time.time())
    pending: list[dict[str, Any]] = []
    for hour in range(hours):
        for server in ("node1", "node2"):
            for n in range(1, users + 1):
                pending.append(
                    {
                        "report_id": f"{server}:{hour}:{n}",
                        "user_token": f"u{n - 1}",
                        "server": server,
                        "port": 10001,
                        "protocol": "vless",
                        "bytes_uploaded": n * 10 + hour,
                        "bytes_downloaded": n * 30 + hour,
                        "timestamp": now - (hours - hour) * 3600,
                    }
                )
                if len(pending) == batch:
                    yield pending
                    pending = []
    if pending:
        yield pending


def side_by_side(db: Database, users: int, hours: int, count: int) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for store, database in (("SQLite (default)", None), ("PostgreSQL", db)):
        with fleet_daemon(database, 100) as daemon:
            sent, started = 0, time.perf_counter()
            for batch in reports(users, hours, BATCH):
                daemon.api("POST", "/api/traffic/webhook", json={"reports": batch})
                sent += len(batch)
            ingest = sent / (time.perf_counter() - started)
            took = reads(daemon, "u", users, count)
            rows.append(
                (
                    store,
                    f"{users:,} users x 2 servers x {hours} h",
                    f"{ingest:,.0f}",
                    f"{median(took):.2f}",
                    f"{percentile(took, 99):.2f}",
                )
            )
    return rows


def main(quick: bool = False) -> None:
    users, count = (1000, 200) if quick else (10_000, 3000)
    with cluster() as pg:
        with pg.database() as db:
            long = history_read(db, users, count)
        with pg.database() as db:
            pair = side_by_side(db, users // 10, 24, count)
    print_table(
        f"Fleet reads from PostgreSQL (target p99 <= {TARGET_P99_MS:g} ms)",
        ("request", "history", "p50 ms", "p99 ms", "note"),
        long,
    )
    print_table(
        "The same single-node workload: SQLite default vs PostgreSQL",
        ("store", "reports", "intake reports/s", "read p50 ms", "read p99 ms"),
        pair,
    )
    append_results(
        "fleet reads",
        [(f"{r[0]} p99 ({r[1]})", f"{r[3]} ms") for r in long]
        + [(f"{r[0]}: intake, read p99", f"{r[2]}/s, {r[4]} ms") for r in pair],
        quick,
    )


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
