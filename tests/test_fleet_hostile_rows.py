"""The fleet database is input too (README "The database is input too"): random bad values in
every column of every table a node reads, put into a real PostgreSQL 15 (tests/pgserver.py),
never stop the node's comparison, its fleet limits, its usage reads or another key's
subscription. A bad row is refused alone, logged once per version with the field it names.

The node is the in-process service (tests/inprocess.py) with its real fleet side: `FleetKeys`,
`RemoteLimits` and `FleetReads` on the real database.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import structlog
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from psycopg import sql

from daemon.fleet.db import FleetDB
from daemon.fleet.keys import FleetKeys
from daemon.fleet.limits import RemoteLimits
from daemon.fleet.reads import FleetReads
from daemon.xray.reality import generate_reality
from tests.fleetrig import ready_fleet_db
from tests.inprocess import InProcess, started
from tests.pgserver import Database

ME = "node0"
NAMES = ("ann", "ben", "cat")  # ben's rows are the ones made bad
# node0 is the in-process node itself: it publishes its own host (tests/inprocess.py's).
HOSTS = {"node0": "vpn.example.net", "node1": "n1.example.net", "node2": "n2.example.net"}
BEN = "ben"


def key_id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:8]


def token(name: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(name.encode()).digest()).decode()[:32]


TEXT = [
    "",
    "x" * 10_000,
    "evil\x1b[2J\nname",
    "3014594c-1a4c-4472-87bc-0a5826be09d8",
    "0badcafe",
    "ann",
    "n1.example.net\nvless://evil@203.0.113.9:443?security=none#evil",
    "a b",
    "ZZZZZZZZ",
    "yearly",
    "Ann",
]
MOMENTS = ["infinity", "-infinity", "10000-01-01 00:00:00+00", "1900-01-01 00:00:00+00"]
NUMBERS = [-1, 0, 99_999, 2**31 - 1, 2**63 - 1, -(2**63)]
ARRAYS = [["EU"], [None], [f"g{n}" for n in range(17)], [""], ["x" * 1000], ["none", None]]
# Every column a node reads, by table, with the kind of bad value it can take.
COLUMNS: dict[str, dict[str, str]] = {
    "keys": {
        "id": "text", "name": "text", "sub_token": "text", "short_id": "text",
        "note": "text", "reset_strategy": "text", "data_limit_bytes": "number",
        "expire_at": "moment", "created_at": "moment", "groups": "array",
        "speed_limit_bps": "number", "max_connections": "number", "max_ips": "number",
        "version": "number",
    },
    "server_keys": {"port": "number", "status": "text", "server": "text"},
    "servers": {
        "public_host": "text", "reality_public_key": "text", "last_seen": "moment",
        "name": "text",
    },
    "totals": {
        "rx_bytes": "number", "tx_bytes": "number", "reports": "number", "port": "number",
        "first_at": "moment", "last_at": "moment", "server": "text",
    },
    "users": {"reset_at": "moment", "resets": "number"},
    "usage_hourly": {"rx_bytes": "number", "hour": "moment", "reports": "number"},
    "usage_daily": {"rx_bytes": "number", "day": "moment"},
}
# Which row each table's bad value goes into: ben's (on node1), or the server node1's.
WHERE: dict[str, dict[str, str]] = {
    "keys": {"id": key_id(BEN)},
    "server_keys": {"key_id": key_id(BEN), "server": "node1"},
    "servers": {"name": "node1"},
    "totals": {"name": BEN, "server": "node1"},
    "users": {"name": BEN},
    "usage_hourly": {"name": BEN},
    "usage_daily": {"name": BEN},
}
POOLS: dict[str, st.SearchStrategy[Any]] = {
    "text": st.sampled_from(TEXT) | st.text(max_size=300),
    "moment": st.sampled_from(MOMENTS),
    "number": st.sampled_from(NUMBERS) | st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "array": st.sampled_from(ARRAYS)
    | st.lists(st.none() | st.text(max_size=40), min_size=1, max_size=20),
}


@st.composite
def bad_values(draw: st.DrawFn) -> tuple[str, str, Any]:
    table = draw(st.sampled_from(sorted(COLUMNS)))
    column = draw(st.sampled_from(sorted(COLUMNS[table])))
    return table, column, draw(POOLS[COLUMNS[table][column]])


@dataclass
class Node:
    """The in-process node and its fleet side on one database."""

    rig: InProcess
    db: FleetDB
    admin: psycopg.AsyncConnection[Any]  # the database's owner, to write any row
    pbk: dict[str, str] = field(default_factory=dict)

    def follower(self) -> FleetKeys:
        fleet = FleetKeys(self.db, self.rig.service, structlog.get_logger())
        self.rig.service.fleet_keys = fleet
        return fleet

    async def execute(self, query: Any, params: Any = None) -> None:
        await self.admin.execute(query, params)

    async def seed(self) -> None:
        """Three fleet keys served everywhere, three servers, usage of each name elsewhere."""
        tables = ", ".join(f"portmeter.{t}" for t in COLUMNS)
        await self.execute(f"TRUNCATE {tables}")
        for server, host in HOSTS.items():
            await self.execute(
                "INSERT INTO portmeter.servers (name, public_host, reality_public_key, last_seen)"
                " VALUES (%s, %s, %s, now())",
                (server, host, self.pbk.setdefault(server, generate_reality().public_key)),
            )
        for number, name in enumerate(NAMES):
            await self.execute(
                "INSERT INTO portmeter.keys (id, name, same_name, uuid, sub_token, short_id,"
                " data_limit_bytes, enabled, reset_strategy, note, groups, created_at) VALUES"
                " (%s, %s, %s, %s, %s, 'ab12', %s, true, 'no_reset', '', '{}', now())",
                (key_id(name), name, name, uuid.uuid5(uuid.NAMESPACE_DNS, name), token(name),
                 10**9 + number),
            )
            for server in ("node1", "node2"):
                await self.execute(
                    "INSERT INTO portmeter.server_keys (server, key_id, name, uuid, port, epoch,"
                    " status) VALUES (%s, %s, %s, '-', %s, 0, 'active')",
                    (server, key_id(name), name, 30001 + number),
                )
                await self.execute(
                    "INSERT INTO portmeter.totals VALUES (%s, %s, 100, 200, 1, %s, now(), now())",
                    (name, server, 30001 + number),
                )
            hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
            await self.execute(
                "INSERT INTO portmeter.usage_hourly VALUES (%s, 'node1', %s, 100, 200, 1, 1, 1)",
                (name, hour),
            )
            await self.execute(
                "INSERT INTO portmeter.usage_daily VALUES (%s, 'node1', %s, 100, 200, 1, 1, 1)",
                (name, (hour - timedelta(days=2)).date()),
            )
            await self.execute(
                "INSERT INTO portmeter.users (name, reset_at) VALUES (%s, now() - interval '1h')",
                (name,),
            )

    async def corrupt(self, table: str, column: str, value: Any) -> bool:
        """Put `value` into ben's row of `table` (node1's in `servers`); False when PostgreSQL
        itself refuses it (a type, a constraint): such a value cannot be in a database."""
        where = WHERE[table]
        cast = "::text[]" if COLUMNS[table][column] == "array" else ""
        query = sql.SQL("UPDATE portmeter.{} SET {} = %s{} WHERE {}").format(
            sql.Identifier(table),
            sql.Identifier(column),
            sql.SQL(cast),
            sql.SQL(" AND ").join(
                sql.SQL("{} = {}").format(sql.Identifier(c), sql.Literal(v))
                for c, v in where.items()
            ),
        )
        try:
            await self.execute(query, (value,))
        except (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError):
            return False
        return True


@contextlib.contextmanager
def node_on(database: Database) -> Iterator[tuple[BlockingPortal, Node]]:
    @contextlib.asynccontextmanager
    async def running() -> AsyncIterator[Node]:
        async with (
            ready_fleet_db(database.dsn) as db,
            started(server_name=ME) as rig,
            await psycopg.AsyncConnection.connect(database.admin_dsn, autocommit=True) as admin,
        ):
            yield Node(rig, db, admin)

    with start_blocking_portal() as portal, portal.wrap_async_context_manager(running()) as node:
        yield portal, node


def links_in(body: str) -> list[str]:
    return base64.b64decode(body).decode().splitlines() if body else []


async def exercise(
    node: Node, held_before: bool, bad: tuple[str, str, Any]
) -> list[Any] | None:
    """Seed, follow (or not), corrupt, then everything a node reads; the events logged (None:
    PostgreSQL itself refused the value)."""
    await node.seed()
    # ann and cat stay as the rows hold them (the same every time); ben starts unknown here.
    if node.rig.service.index.find(key_id(BEN)) is not None:
        await node.rig.service.delete_key(key_id(BEN), local=True)
    follower = node.follower()
    if held_before:
        assert await follower.sync() is True
    if not await node.corrupt(*bad):
        return None
    limits = RemoteLimits(node.db, node.rig.service, ME, 1.0, structlog.get_logger())
    reads = FleetReads(node.db, ME)
    with structlog.testing.capture_logs() as events:
        for _ in range(2):
            assert await follower.sync() is True
            assert await follower.sync({key_id(n) for n in NAMES}) is True
        await limits.refresh()
        for name in NAMES:
            await follower.subscription(token(name))
            await reads.reported(name)
            now = datetime.now(UTC)
            await reads.reported_detail(name, now - timedelta(days=1), now - timedelta(days=7), now)
        await reads.reported_users()
        await reads.reported_stats()
        ann = node.rig.service.find("ann")
        assert await follower.servers_of(ann) is not None
        return events


def check_the_others(node: Node, portal: BlockingPortal, bad: tuple[str, str, Any]) -> None:
    """ann and cat are followed as the database holds them, and ann's subscription links every
    server whose row is good, to its own host."""
    service = node.rig.service
    for number, name in enumerate(NAMES):
        if name == BEN:
            continue
        key = service.find(name)
        assert key.fleet and key.data_limit_bytes == 10**9 + number
    follower = node.follower()
    answer = portal.call(follower.subscription, token("ann"))
    assert answer is not None
    hosts = sorted(urlsplit(link).hostname or "" for link in links_in(answer.body))
    others = sorted(host for server, host in HOSTS.items() if server != "node1")
    if bad[0] == "servers":  # node1's own link: gone, or to whatever host its row now names
        assert [h for h in hosts if h in others] == others and len(hosts) <= len(HOSTS)
    else:
        assert hosts == sorted(HOSTS.values())
    assert service.settler.remote.get("ann") == 600  # 300 bytes on each of two other servers


def test_bad_values_in_every_column_stop_nothing_but_their_own_row(fleet_db: Database) -> None:
    tried: set[tuple[str, str, str]] = set()
    with node_on(fleet_db) as (portal, node):

        @settings(
            max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        @given(bad=bad_values(), held_before=st.booleans())
        def case(bad: tuple[str, str, Any], held_before: bool) -> None:
            note(f"bad value: {bad[0]}.{bad[1]} = {bad[2]!r:.200}, held before: {held_before}")
            events = portal.call(exercise, node, held_before, bad)
            if events is None:
                return
            tried.add((bad[0], bad[1], repr(bad[2])))
            check_the_others(node, portal, bad)
            refusals = [e for e in events if e["event"] == "fleet_key_not_applied"]
            assert len(refusals) <= 1, refusals  # once per row version, not per comparison
            if bad[0] == "keys" and refusals and bad[1] != "id":
                assert refusals[0]["field"] == bad[1]
                kept = any(k.id == key_id(BEN) for k in node.rig.service.state.keys.values())
                assert kept == held_before  # kept as it was applied, never created from it

        case()
    print(f"distinct bad database values tried: {len(tried)}")
    assert len(tried) >= 150


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("reset_strategy", "yearly"),
        ("expire_at", "infinity"),
        ("created_at", "infinity"),
        ("name", "evil\x1b[2J\nname"),
        ("note", "n" * 1_000_000),
        ("groups", [None]),
        ("id", "race5"),
        ("id", "x" * 1000),
    ],
)
def test_a_bad_key_row_is_logged_once_naming_its_field(
    fleet_db: Database, column: str, value: Any
) -> None:
    with node_on(fleet_db) as (portal, node):
        events = portal.call(exercise, node, False, ("keys", column, value))
        assert events is not None
        refusals = [e for e in events if e["event"] == "fleet_key_not_applied"]
        assert [r["field"] for r in refusals] == [column]
        assert all(len(str(v)) < 400 for r in refusals for v in r.values())
        assert not any(k.id == key_id(BEN) for k in node.rig.service.state.keys.values())
        check_the_others(node, portal, ("keys", column, value))


def test_a_subscription_leaves_out_a_bad_server_row_and_keeps_the_others(
    fleet_db: Database,
) -> None:
    with node_on(fleet_db) as (portal, node):
        portal.call(exercise, node, True, ("server_keys", "port", 99999))
        answer = portal.call(node.follower().subscription, token(BEN))
        assert answer is not None
        hosts = sorted(urlsplit(link).hostname or "" for link in links_in(answer.body))
        assert hosts == ["n2.example.net", "vpn.example.net"]  # node1's row holds port 99999


def test_a_host_with_a_newline_and_a_link_gives_no_link(fleet_db: Database) -> None:
    evil = "n1.example.net\nvless://evil@203.0.113.9:443?security=none#evil"
    with node_on(fleet_db) as (portal, node):
        portal.call(exercise, node, True, ("servers", "public_host", evil))
        answer = portal.call(node.follower().subscription, token("ann"))
        assert answer is not None
        body = links_in(answer.body)
        assert len(body) == 2 and not any("evil" in link for link in body)


def test_a_server_silent_for_long_leaves_the_subscriptions(fleet_db: Database) -> None:
    with node_on(fleet_db) as (portal, node):
        portal.call(exercise, node, True, ("servers", "name", "node1"))
        stale = "UPDATE portmeter.servers SET last_seen = now() - interval '301 seconds'"
        portal.call(node.execute, stale + " WHERE name = 'node2'")
        follower = node.follower()
        answer = portal.call(follower.subscription, token("ann"))
        assert answer is not None
        hosts = sorted(urlsplit(link).hostname or "" for link in links_in(answer.body))
        assert hosts == ["n1.example.net", "vpn.example.net"]
        servers = portal.call(follower.servers_of, node.rig.service.find("ann"))
        assert servers is not None
        assert {s["server"]: s["status"] for s in servers}["node2"] == "silent"


def test_usage_past_the_bounds_moves_no_other_names_limit(fleet_db: Database) -> None:
    with node_on(fleet_db) as (portal, node):
        events = portal.call(exercise, node, True, ("totals", "rx_bytes", 2**63 - 1))
        assert events is not None
        assert node.rig.service.settler.remote["ben"] == 300  # node2's row alone counts
        assert node.rig.service.settler.remote["ann"] == 600
        assert [e["table"] for e in events if e["event"] == "fleet_row_not_used"] == ["totals"]


def test_a_reset_at_infinity_is_no_reset(fleet_db: Database) -> None:
    with node_on(fleet_db) as (portal, node):
        events = portal.call(exercise, node, True, ("users", "reset_at", "infinity"))
        assert events is not None
        assert [e.get("field") for e in events if e["event"] == "fleet_row_not_used"] == [
            "reset_at"
        ]
        assert node.rig.service.find(BEN).epoch == 0  # not reset by the damaged row
