"""Fleet-wide reads, the report intakes and retention in PostgreSQL (README "A fleet in
PostgreSQL", "Fleet limits and reads").

Real daemons (their own namespace, table and state dir) with PORTMETER_FLEET_DSN set to their own
database in the session's real PostgreSQL 15 (tests/pgserver.py); retention runs against it
in-process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import psycopg
import pytest

from daemon.errors import Invalid
from daemon.fleet.db import FleetDB
from daemon.fleet.reads import STATS, FleetReads
from daemon.fleet.retention import apply_retention
from daemon.fleet.schema import RETENTION_LOCK, migrate
from tests.conftest import Daemon
from tests.fleetrig import ready_fleet_db
from tests.pgserver import PASSWORD, Database

pytestmark = pytest.mark.root
NOW = int(time.time())


def report(rid: str, user: str, server: str, up: int, down: int, **extra: Any) -> dict[str, Any]:
    return {
        "report_id": rid,
        "user_token": user,
        "server": server,
        "port": 10001,
        "protocol": "vless",
        "bytes_uploaded": up,
        "bytes_downloaded": down,
        "timestamp": NOW,
        **extra,
    }


def wait_fleet_ready(daemon: Daemon, timeout: float = 30) -> None:
    """Until the usage answers read the fleet database (503 while it is not in use)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.http.request("GET", "/api/admin/usage").status_code == 200:
            return
        time.sleep(0.2)
    raise AssertionError(f"the fleet database was never in use:\n{daemon.log()}")


def scalar(db: Database, query: str) -> str:
    return db.sql(query).strip()


@pytest.fixture
def fleet_daemon(make_daemon: Any, fleet_db: Database) -> Daemon:
    daemon: Daemon = make_daemon(PORTMETER_FLEET_DSN=fleet_db.dsn, PORTMETER_SERVER_NAME="node-a")
    wait_fleet_ready(daemon)
    return daemon


def test_usage_answers_read_other_servers_from_the_database(
    fleet_daemon: Daemon, fleet_db: Database
) -> None:
    daemon = fleet_daemon
    # A key of this server alone: a new fleet key would start the name's fleet usage afresh,
    # and these reports are from before it (NOW).
    daemon.api("POST", "/api/keys?local=true", expect=201, json={"name": "alice"})
    sent = [
        report("b:1", "alice", "node-b", 1000, 20000),
        report("b:2", "alice", "node-b", 234, 5),
        report("c:1", "alice", "node-c", 7, 70_000),
        report("c:2", "bob", "node-c", 11, 22),
    ]
    answer = daemon.api("POST", "/api/traffic/webhook", json={"reports": sent})
    assert (answer["accepted"], answer["duplicates"]) == (4, 0)
    # A row of this server's own in the ledger is not a report: its entry is the kernel's.
    fleet_db.sql(
        "INSERT INTO portmeter.totals VALUES ('alice', 'node-a', 5, 5, 1, 1, now(), now())"
    )

    usage = daemon.api("GET", "/api/admin/usage/alice")
    reported = {r["server"]: r for r in usage["reported"]}
    assert sorted(reported) == ["node-b", "node-c"]
    assert (reported["node-b"]["bytes_uploaded"], reported["node-b"]["bytes_downloaded"]) == (
        1234,
        20005,
    )
    assert reported["node-b"]["reports"] == 2
    assert (reported["node-c"]["bytes_uploaded"], reported["node-c"]["bytes_downloaded"]) == (
        7,
        70_000,
    )
    assert usage["local"]["server"] == "node-a"
    assert usage["total_bytes"] == 1234 + 20005 + 7 + 70_000  # the new key has counted nothing
    assert usage["servers"] == 3

    detailed = daemon.api("GET", "/api/admin/usage/alice/detailed")
    hour = datetime.fromtimestamp(NOW - NOW % 3600, UTC).isoformat()
    point = next(p for p in detailed["hourly"] if p["start"] == hour)
    assert (point["bytes_uploaded"], point["bytes_downloaded"]) == (1241, 90_005)
    assert sum(p["total_bytes"] for p in detailed["daily"]) == 1241 + 90_005

    fleet_db.sql("ANALYZE portmeter.reports")  # the count of reports is the planner's estimate
    overview = daemon.api("GET", "/api/admin/usage")
    users = {u["username"]: u for u in overview["users"]}
    assert users["bob"]["total_bytes"] == 33 and users["bob"]["servers"] == 1
    assert users["alice"]["servers"] == 3
    assert overview["reported"]["servers"] == ["node-b", "node-c"]
    assert overview["reported"]["reports"] == 4


@pytest.mark.parametrize("path", ["/api/traffic/webhook", "/api/xpert/traffic-webhook"])
def test_intake_dedupes_and_refuses_bad_reports_in_the_database(
    fleet_daemon: Daemon, fleet_db: Database, path: str
) -> None:
    daemon = fleet_daemon
    body = {"reports": [report("x:1", "carol", "node-x", 100, 200)]}
    assert daemon.api("POST", path, json=body)["accepted"] == 1
    again = daemon.api("POST", path, json=body)
    assert (again["accepted"], again["duplicate_ids"]) == (0, ["x:1"])
    for bad in (
        report("x:2", "carol", "node-x", -1, 5),
        report("x:3", "carol", "node-x", 1, 5, colour="red"),
        report("x:4", "carol", "node-x", 10**15 + 1, 5),
    ):
        refused = daemon.api("POST", path, expect=422, json={"reports": [body["reports"][0], bad]})
        assert "detail" in refused
    assert scalar(fleet_db, "SELECT count(*) FROM portmeter.reports") == "1"
    assert scalar(fleet_db, "SELECT rx_bytes, tx_bytes FROM portmeter.totals") == "100|200"
    assert scalar(fleet_db, "SELECT sum(rx_bytes + tx_bytes) FROM portmeter.usage_hourly") == "300"


def test_xpert_path_stores_in_the_history_without_a_database(make_daemon: Any) -> None:
    daemon: Daemon = make_daemon()
    body = report("y:1", "dave", "node-y", 3, 4)
    assert daemon.api("POST", "/api/xpert/traffic-webhook", json=body)["accepted"] == 1
    assert daemon.api("POST", "/api/traffic/webhook", json=body)["duplicate_ids"] == ["y:1"]
    daemon.api(
        "POST",
        "/api/xpert/traffic-webhook",
        expect=422,
        json={**body, "report_id": "y:2", "bytes_uploaded": -3},
    )
    usage = daemon.api("GET", "/api/admin/usage/dave")
    assert [(r["server"], r["total_bytes"]) for r in usage["reported"]] == [("node-y", 7)]


def test_database_unusable_is_503_with_the_reason(make_daemon: Any, fleet_db: Database) -> None:
    wrong = fleet_db.dsn.replace(PASSWORD, "not-the-password")
    daemon: Daemon = make_daemon(PORTMETER_FLEET_DSN=wrong)
    daemon.api("POST", "/api/keys?local=true", expect=201, json={"name": "erin"})
    for method, path in (("GET", "/api/admin/usage/erin"), ("GET", "/api/admin/usage")):
        answer = daemon.api(method, path, expect=503)
        assert answer["detail"].startswith("fleet database: ")
        assert "not-the-password" not in answer["detail"]
    body = report("z:1", "erin", "node-z", 1, 1)
    assert daemon.api("POST", "/api/xpert/traffic-webhook", expect=503, json=body)["detail"]
    assert daemon.traffic("erin")["port"] > 0  # the key itself still answers from here


# --- retention ---------------------------------------------------------------------------

SEED = (
    """INSERT INTO portmeter.usage_hourly
    SELECT 'u' || mod(n, 3), 's' || mod(n, 2), %(start)s::timestamptz + n * interval '1 hour',
           n * 1000 + 1, n * 7 + 3, n, n + 1, 1
    FROM generate_series(0, 24 * 10 - 1) AS n""",
    """INSERT INTO portmeter.reports (report_id, server, received_at, deltas)
    SELECT 'r' || n, 's', %(start)s::timestamptz + n * interval '1 day', 1
    FROM generate_series(0, 9) AS n""",
)
DAILY_VIEW = """
SELECT name, server, day, sum(rx), sum(tx), sum(rp), sum(tp) FROM (
  SELECT name, server, day, rx_bytes rx, tx_bytes tx, rx_packets rp, tx_packets tp
  FROM portmeter.usage_daily
  UNION ALL SELECT name, server, (hour AT TIME ZONE 'UTC')::date, rx_bytes, tx_bytes,
  rx_packets, tx_packets FROM portmeter.usage_hourly) AS t
WHERE day >= %s GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""


async def _retention(dsn: str) -> None:
    at = datetime(2026, 3, 11, 12, 30, tzinfo=UTC)  # ten days of hours from 2026-03-01 00:00
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await migrate(conn)
        for seed in SEED:
            await conn.execute(seed, {"start": datetime(2026, 3, 1, tzinfo=UTC)})
        kept_from = (at - timedelta(days=7)).date()
        before = await (await conn.execute(DAILY_VIEW, (kept_from,))).fetchall()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as other:
            await other.execute("SELECT pg_advisory_lock(%s)", (RETENTION_LOCK,))
            assert await apply_retention(conn, 7, at) is None  # another node holds the round
            await other.execute("SELECT pg_advisory_unlock(%s)", (RETENTION_LOCK,))
        done = await apply_retention(conn, 7, at)
        after = await (await conn.execute(DAILY_VIEW, (kept_from,))).fetchall()
        hours = await (
            await conn.execute("SELECT min(hour) FROM portmeter.usage_hourly")
        ).fetchone()
        days = await (await conn.execute("SELECT min(day) FROM portmeter.usage_daily")).fetchone()
        reports = await (await conn.execute("SELECT count(*) FROM portmeter.reports")).fetchone()
    # Hours before 2026-03-09 12:00 (48 h before the current hour) were rolled into days; days
    # before 2026-03-04 (7 days before) deleted: 3 days x 6 (name, server) pairs.
    assert done == {"hourly_rolled_up": 24 * 8 + 12, "daily_deleted": 18, "reports_deleted": 4}
    assert after == before  # the days kept equal the hours they replace, byte for byte
    assert hours == (datetime(2026, 3, 9, 12, tzinfo=UTC),)
    assert days == (kept_from,)
    assert reports == (6,)


def test_retention_rolls_hours_into_equal_days_and_respects_the_lock(fleet_db: Database) -> None:
    anyio.run(_retention, fleet_db.dsn)


def test_a_control_character_in_a_name_is_422_never_500(
    fleet_daemon: Daemon, fleet_db: Database
) -> None:
    for path in ("/api/admin/usage/a%00b", "/api/admin/usage/a%1fb/detailed"):
        answer = fleet_daemon.http.request("GET", path)
        assert answer.status_code == 422, answer.text
        assert "detail" in answer.json()

    async def read(db: FleetDB) -> None:
        with pytest.raises(Invalid, match="fleet database: "):
            await FleetReads(db, "node-a").reported("a\x00b")

    with_fleet(fleet_db, read)


def with_fleet(db: Database, body: Callable[[FleetDB], Awaitable[None]]) -> None:
    """`body` with a FleetDB on `db`, ready, in-process."""

    async def main() -> None:
        async with ready_fleet_db(db.dsn) as fleet:
            await body(fleet)

    anyio.run(main)


def test_the_overview_reads_no_row_of_the_reports_table(fleet_db: Database) -> None:
    async def stats(db: FleetDB) -> None:
        async with db.connection() as conn:
            await conn.execute(
                "INSERT INTO portmeter.reports (report_id, server, deltas)"
                " SELECT 'r' || n, 'node-b', 1 FROM generate_series(1, 50) AS n"
            )
            await conn.execute("ANALYZE portmeter.reports")
            plan = await (await conn.execute("EXPLAIN (FORMAT JSON) " + STATS, ("me",))).fetchone()
        assert plan is not None and '"Relation Name": "reports"' not in json.dumps(plan[0])
        assert (await FleetReads(db, "me").reported_stats())["records"] == 50

    with_fleet(fleet_db, stats)
