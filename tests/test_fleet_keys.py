"""Keys created once (README "Keys created once"): three real daemons, each in its own
namespaces with its own table and port range, follow the keys one real PostgreSQL holds.

Every test has its own database and role (fixture `fleet_db`) in the session's PostgreSQL 15
(tests/pgserver.py); the nodes' names, hosts and port ranges are their own.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import urlsplit

import anyio
import pytest
import structlog

from daemon.errors import Conflict
from daemon.fleet.db import FleetDB
from daemon.fleet.keys import FleetKeys, desired_of, differences, row_of, serves, userinfo
from daemon.service import Service
from daemon.store.state import KeyRecord
from tests.conftest import Daemon, fresh_port_range
from tests.fleetrig import ready_fleet_db
from tests.inprocess import InProcessDaemon, started
from tests.netlab import SERVER_V4, Lab, lab, sh, wait_for
from tests.pgserver import Cluster, Database
from tests.test_limits import WIRE, Receiver

LOG = structlog.get_logger()
PROPAGATION = 1.0  # seconds: every other node applies a change within this (issue 13)


@dataclass
class Node:
    """A daemon in its own server namespace, with a client namespace to send from."""

    net: Lab
    daemon: Daemon
    name: str
    host: str

    def key(self, ref: str) -> dict[str, Any]:
        return dict(self.daemon.api("GET", f"/api/keys/{ref}"))

    def names(self) -> set[str]:
        return {k["name"] for k in self.daemon.api("GET", "/api/keys")["keys"]}

    def has(self, ref: str) -> bool:
        return bool(self.daemon.http.request("GET", f"/api/keys/{ref}").status_code == 200)

    def counters(self) -> str:
        listing = ("nft", "list", "table", "inet", self.daemon.table)
        return sh("ip", "netns", "exec", self.net.server, *listing).stdout


@contextlib.contextmanager
def fleet(db: Database, root: Path, count: int = 3, **env: str) -> Iterator[list[Node]]:
    """`count` nodes on database `db`, each with its own public host."""
    with contextlib.ExitStack() as stack:
        nodes = []
        for index in range(count):
            net = stack.enter_context(lab())
            name, host = f"node{index}", f"n{index}.example.net"
            daemon = Daemon(
                net.server, root / name, fresh_port_range(),
                PORTMETER_FLEET_DSN=db.dsn, PORTMETER_SERVER_NAME=name,
                PORTMETER_PUBLIC_HOST=host, **env,
            )
            stack.callback(daemon.close)
            daemon.start()
            nodes.append(Node(net, daemon, name, host))
        # Each has connected and published its server row.
        wait_for(lambda: all(fleet_row(db, n.name) for n in nodes), timeout=15, what="servers")
        yield nodes


def fleet_row(db: Database, server: str) -> str:
    return db.sql(f"SELECT public_host FROM portmeter.servers WHERE name = '{server}'")


def on_every(
    nodes: list[Node], check: Callable[[Node], bool], what: str, timeout: float = PROPAGATION
) -> None:
    """Wait until `check(node)` holds on every node."""
    wait_for(lambda: all(check(n) for n in nodes), timeout=timeout, what=what)


def udp_to(node: Node, port: int, count: int) -> None:
    sender = node.net.udp(node.net.client)
    try:
        for _ in range(count):
            sender.sendto(b"x" * (WIRE - 28), (SERVER_V4, port))
    finally:
        sender.close()


def test_created_on_one_node_is_counted_on_all_and_deleted_everywhere(
    fleet_db: Database, workdir: Path
) -> None:
    with fleet(fleet_db, workdir) as (a, b, c):
        made = a.daemon.create("alice")
        assert made["fleet"] is True
        on_every([b, c], lambda n: n.has("alice"), "alice on B and C")
        seen = {n.name: n.key("alice") for n in (a, b, c)}
        assert {(k["id"], k["uuid"]) for k in seen.values()} == {(made["id"], made["uuid"])}
        for node in (a, b, c):
            port = seen[node.name]["port"]
            assert node.daemon.port_range[0] <= port <= node.daemon.port_range[1]
            udp_to(node, port, 5)
            assert node.daemon.traffic("alice")["rx_bytes"] == 5 * WIRE
            assert f"rx_{port}" in node.counters()
        c.daemon.api("DELETE", "/api/keys/alice")
        on_every([a, b, c], lambda n: not n.has("alice"), "alice gone everywhere")
        for node in (a, b, c):
            assert f"rx_{seen[node.name]['port']}" not in node.counters()
        assert fleet_db.sql("SELECT count(*) FROM portmeter.keys") == "0"


def test_a_limit_changed_on_one_node_is_enforced_by_the_kernel_on_the_others(
    fleet_db: Database, workdir: Path
) -> None:
    with fleet(fleet_db, workdir) as (a, b, c):
        a.daemon.create("capped")
        on_every([b, c], lambda n: n.has("capped"), "capped everywhere")
        limit = 20 * WIRE
        b.daemon.api("PATCH", "/api/keys/capped", json={"data_limit_bytes": limit})
        on_every(
            [a, c], lambda n: n.key("capped")["data_limit_bytes"] == limit, "the limit on A, C"
        )
        version = fleet_db.sql("SELECT version FROM portmeter.keys")
        assert blast(a, 30) == 20  # A's kernel drops what passes the limit
        assert a.daemon.traffic("capped")["status"] == "limited"
        # The limit counts every server: once A's usage reached C, C's kernel lets nothing by.
        wait_for(lambda: c.daemon.traffic("capped")["status"] == "limited", what="C limited")
        assert blast(c, 5) == 0
        # Nodes that applied the change never wrote it back.
        assert fleet_db.sql("SELECT version FROM portmeter.keys") == version


def blast(node: Node, count: int) -> int:
    """Datagrams sent to the node's port of `capped`: how many arrived."""
    receiver = Receiver(node.net, node.key("capped")["port"])
    try:
        return receiver.blast(count)
    finally:
        receiver.close()


def test_a_node_that_was_down_converges_before_it_is_ready(
    fleet_db: Database, workdir: Path
) -> None:
    with fleet(fleet_db, workdir) as (a, b, c):
        for name in ("old1", "old2"):
            a.daemon.create(name)
        on_every([c], lambda n: n.names() == {"old1", "old2"}, "old keys on C")
        assert c.daemon.stop() == 0
        a.daemon.api("DELETE", "/api/keys/old1")
        for name in ("new1", "new2", "new3"):
            b.daemon.create(name)
        b.daemon.api("DELETE", "/api/keys/new2")
        a.daemon.api("PATCH", "/api/keys/old2", json={"note": "changed while C was down"})
        c.daemon.start()  # returns once the socket answers: after READY
        assert c.names() == {"old2", "new1", "new3"}
        assert c.key("old2")["note"] == "changed while C was down"
        assert "fleet_keys_converged" in c.daemon.log()


def test_one_subscription_lists_every_server_and_fleet_usage(
    fleet_db: Database, workdir: Path
) -> None:
    with fleet(fleet_db, workdir) as nodes:
        made = nodes[0].daemon.create("bob", data_limit_bytes=10**9)
        on_every(nodes, lambda n: n.has("bob"), "bob everywhere")
        ports = {n.host: n.key("bob")["port"] for n in nodes}
        for count, node in enumerate(nodes, start=1):
            udp_to(node, ports[node.host], count)
        wait_for(lambda: ledger(fleet_db, "bob") == (6 * WIRE, 0), timeout=20, what="the ledger")
        for node in nodes:
            answer = node.daemon.http.request("GET", made["subscription_url"])
            assert answer.status_code == 200
            links = base64.b64decode(answer.text).decode().splitlines()
            where = {(urlsplit(link).hostname, urlsplit(link).port) for link in links}
            assert where == set(ports.items())
            assert all(link.startswith(f"vless://{made['uuid']}@") for link in links)
            assert answer.headers["subscription-userinfo"] == (
                f"upload={6 * WIRE}; download=0; total={10**9}; expire=0"
            )


def ledger(db: Database, name: str) -> tuple[int, int]:
    rx, tx = db.sql(
        "SELECT coalesce(sum(rx_bytes), 0), coalesce(sum(tx_bytes), 0) "
        f"FROM portmeter.totals WHERE name = '{name}'"
    ).split("|")
    return int(rx), int(tx)


def test_concurrent_creates_of_one_name_make_one_key_and_one_409(
    fleet_db: Database, workdir: Path
) -> None:
    with fleet(fleet_db, workdir, count=2) as nodes:
        statuses: list[int] = []
        start = threading.Barrier(2)

        def create(node: Node) -> None:
            start.wait()
            answer = node.daemon.http.request("POST", "/api/keys", json={"name": "carol"})
            statuses.append(answer.status_code)

        threads = [threading.Thread(target=create, args=(n,)) for n in nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(statuses) == [201, 409]
        on_every(nodes, lambda n: n.has("carol"), "carol on both")
        ids = {n.key("carol")["id"] for n in nodes}
        assert len(ids) == 1
        assert fleet_db.sql("SELECT count(*) FROM portmeter.keys") == "1"
        assert all(n.names() == {"carol"} for n in nodes)


def test_database_down_local_reads_work_fleet_operations_503_local_works(
    fleet_db: Database, pg_cluster: Cluster, workdir: Path
) -> None:
    with fleet(fleet_db, workdir, count=2) as (a, b):
        a.daemon.create("dave")
        on_every([b], lambda n: n.has("dave"), "dave on B")
        before = settings_of(a)
        table_before = a.counters()
        pg_cluster.stop("fast")
        try:
            shown = a.key("dave")
            assert shown["servers"] is None and shown["name"] == "dave"
            refused = [
                a.daemon.http.request("POST", "/api/keys", json={"name": "erin"}),
                a.daemon.http.request("PATCH", "/api/keys/dave", json={"note": "x"}),
                a.daemon.http.request("POST", "/api/keys/dave/disable"),
                a.daemon.http.request("DELETE", "/api/keys/dave"),
            ]
            for answer in refused:
                assert answer.status_code == 503, answer.text
                assert "fleet database" in answer.json()["detail"]
            assert settings_of(a) == before
            assert a.counters() == table_before
            added = a.daemon.cli("keys", "add", "frank", "--local")
            assert added.returncode == 0, added.stderr
            changed = a.daemon.cli("keys", "disable", "dave", "--local")
            assert changed.returncode == 0, changed.stderr
            assert a.key("frank")["fleet"] is False and a.key("dave")["status"] == "disabled"
            refused_cli = a.daemon.cli("keys", "add", "gina")
            assert refused_cli.returncode == 1 and "fleet database" in refused_cli.stderr
        finally:
            pg_cluster.start()
        # Back: the local key stays this node's own, the fleet's version of dave wins again.
        on_every([a], lambda n: n.key("dave")["status"] == "active", "dave followed", timeout=15)
        assert a.has("frank") and not b.has("frank")
        assert fleet_db.sql("SELECT name FROM portmeter.keys") == "dave"


def test_a_create_that_fails_here_never_reaches_the_database(
    fleet_db: Database, workdir: Path
) -> None:
    with fleet(fleet_db, workdir, count=2) as (a, b):
        before = settings_of(a)
        break_xray(a)
        answer = a.daemon.http.request("POST", "/api/keys", json={"name": "nora"})
        assert answer.status_code == 503, answer.text
        # The database is written last: no row was ever written (no version drawn), so no node
        # was notified of a key that was then taken back.
        assert fleet_db.sql("SELECT is_called FROM portmeter.key_versions") == "f"
        assert fleet_db.sql("SELECT count(*) FROM portmeter.keys") == "0"
        assert not a.has("nora") and "rx_" not in a.counters()
        assert settings_of(a) == before
        time.sleep(1.5)  # a poll interval: B follows the database, which never had it
        assert not b.has("nora")


def break_xray(node: Node) -> None:
    """Xray's config cannot be written: an operation fails after its kernel steps."""
    config = node.daemon.xray_config
    config.unlink(missing_ok=True)
    config.mkdir(parents=True)


def test_a_delete_that_fails_here_never_takes_the_key_from_the_others(
    fleet_db: Database, workdir: Path
) -> None:
    with fleet(fleet_db, workdir, count=2) as (a, b):
        a.daemon.create("otto")
        on_every([b], lambda n: n.has("otto"), "otto on B")
        held = b.key("otto")
        udp_to(b, held["port"], 3)
        version = fleet_db.sql("SELECT version FROM portmeter.keys")
        break_xray(a)
        answer = a.daemon.http.request("DELETE", "/api/keys/otto")
        assert answer.status_code == 503, answer.text
        assert a.has("otto") and "otto" in {k["name"] for k in settings_of(a).values()}
        # The row was never deleted and put back (a new version): B never lost the key.
        assert fleet_db.sql("SELECT version FROM portmeter.keys") == version
        time.sleep(1.5)  # a poll interval
        after = b.key("otto")
        assert (after["id"], after["port"]) == (held["id"], held["port"])
        assert b.daemon.traffic("otto")["rx_bytes"] == 3 * WIRE


def test_a_fleet_write_refused_after_the_local_save_takes_the_local_side_back(
    fleet_db: Database, workdir: Path
) -> None:
    with fleet(fleet_db, workdir, count=1) as (a,):
        a.daemon.create("keep")
        # The fleet has "olga" for servers of a group A does not serve: A holds no such key, so
        # its own create gets as far as the database, which refuses the name.
        fleet_db.sql(
            "INSERT INTO portmeter.keys (id, name, same_name, uuid, sub_token, short_id, enabled,"
            " reset_strategy, note, groups, created_at) VALUES ('other', 'olga', 'olga',"
            " gen_random_uuid(), 'tok', 'ab', true, 'no_reset', '', '{us}', now())"
        )
        before, counters = settings_of(a), a.counters()
        answer = a.daemon.http.request("POST", "/api/keys", json={"name": "olga"})
        assert answer.status_code == 409, answer.text
        assert not a.has("olga") and a.names() == {"keep"}
        assert settings_of(a) == before  # the state saved with olga was saved again without it
        assert a.counters() == counters
        assert fleet_db.sql("SELECT id FROM portmeter.keys WHERE name = 'olga'") == "other"


def settings_of(node: Node) -> dict[str, dict[str, Any]]:
    """Each saved key's settings: what a refused operation must leave as it was."""
    kept = ("name", "port", "note", "enabled", "status", "data_limit_bytes", "groups", "fleet")
    saved = node.daemon.saved_state()["keys"]
    return {key_id: {f: key.get(f) for f in kept} for key_id, key in saved.items()}


def test_a_key_of_a_group_is_served_only_by_that_groups_servers(
    fleet_db: Database, workdir: Path
) -> None:
    with fleet(fleet_db, workdir, count=2, PORTMETER_SERVER_GROUPS="eu") as (a, b):
        a.daemon.create("helen", groups=["eu"])
        a.daemon.api("POST", "/api/keys", expect=422, json={"name": "ivan", "groups": ["us"]})
        on_every([b], lambda n: n.has("helen"), "helen on B")
        a.daemon.api("PATCH", "/api/keys/helen", json={"groups": ["us"]})
        on_every([a, b], lambda n: not n.has("helen"), "helen served by no eu server")
        assert fleet_db.sql("SELECT groups FROM portmeter.keys") == "{us}"


def test_keys_show_lists_the_servers_with_their_ports(
    fleet_db: Database, workdir: Path
) -> None:
    with fleet(fleet_db, workdir, count=2) as (a, b):
        a.daemon.create("jack")
        on_every([b], lambda n: n.has("jack"), "jack on B")
        expected = [
            {"server": n.name, "port": n.key("jack")["port"], "status": "active"} for n in (a, b)
        ]
        wait_for(lambda: a.key("jack")["servers"] == expected, what="both servers listed")
        shown = b.daemon.cli("keys", "show", "jack")
        assert shown.returncode == 0, shown.stderr
        for row in expected:
            assert f"{row['server']} port {row['port']} active" in shown.stdout


def test_without_a_database_keys_have_no_servers(make_daemon: Any) -> None:
    daemon: Daemon = make_daemon()
    daemon.create("kate")
    shown = daemon.api("GET", "/api/keys/kate")
    assert shown["servers"] is None and shown["fleet"] is False


# --- pure parts and bad input, in process ---------------------------------------------------


def with_writers(db: Database, body: Callable[[FleetKeys, FleetKeys], Awaitable[None]]) -> None:
    """Two nodes' writing sides (FleetKeys) on the real database `db`, in-process."""

    def writer(fleet_db: FleetDB, server: str) -> FleetKeys:
        settings = SimpleNamespace(server_name=server, server_groups=(), poll_interval=1.0)
        return FleetKeys(fleet_db, cast(Service, SimpleNamespace(settings=settings)), LOG)

    async def main() -> None:
        async with ready_fleet_db(db.dsn) as fleet_db:
            await body(writer(fleet_db, "node0"), writer(fleet_db, "node1"))

    anyio.run(main)


def fleet_key(name: str) -> KeyRecord:
    return KeyRecord(
        id=hashlib.sha256(name.encode()).hexdigest()[:8], name=name,
        uuid=uuid.uuid5(uuid.NAMESPACE_DNS, name), port=20001, sub_token=f"token-of-{name}-0123456",
        created_at=datetime(2026, 5, 1, 12, 0, 0, 700_000, tzinfo=UTC), fleet=True,
    )


def test_two_nodes_changing_different_fields_at_once_both_keep_theirs(
    fleet_db: Database,
) -> None:
    key = fleet_key("pat")

    async def body(a: FleetKeys, b: FleetKeys) -> None:
        await a.created(key)
        # Both nodes change the key from the same copy: B disables it, A (not yet following
        # B's change) sets a limit.
        await b.changed(key, key.model_copy(update={"enabled": False}))
        await a.changed(key, key.model_copy(update={"data_limit_bytes": 5000, "note": "x"}))

    with_writers(fleet_db, body)
    row = fleet_db.sql("SELECT enabled, data_limit_bytes, note FROM portmeter.keys")
    assert row == "f|5000|x"


def test_a_new_key_starts_its_names_fleet_usage_afresh(fleet_db: Database) -> None:
    key = fleet_key("rita")

    async def body(a: FleetKeys, b: FleetKeys) -> None:
        await a.created(key)
        await a.deleted(key)
        # What the deleted rita used on another server, still in the ledger.
        fleet_db.sql(
            "INSERT INTO portmeter.totals VALUES ('rita', 'node1', 700, 800, 3, 1, now(), now()),"
            " ('ritb', 'node1', 1, 2, 1, 1, now(), now())"
        )
        fleet_db.sql(
            "UPDATE portmeter.users SET resets = 2, reset_at = '2026-04-01T00:00:00Z'"
            " WHERE name = 'rita'"
        )
        await b.created(key.model_copy(update={"id": "0a0a0a0a"}))

    with_writers(fleet_db, body)
    assert fleet_db.sql("SELECT name FROM portmeter.totals") == "ritb"
    # From the new key's creation on (whole seconds, as the deltas' timestamps), resets kept.
    users = "SELECT resets, reset_at AT TIME ZONE 'UTC' FROM portmeter.users WHERE name = 'rita'"
    assert fleet_db.sql(users) == "2|2026-05-01 12:00:00"


def test_a_start_applies_keys_within_its_budget_and_the_rest_after_ready(
    fleet_db: Database,
) -> None:
    """A node joining a fleet of many keys must not outlast systemd's start timeout: what its
    budget did not cover before READY is applied by the next comparison."""
    names = [f"joiner{n}" for n in range(5)]

    async def main() -> None:
        async with ready_fleet_db(fleet_db.dsn) as db:
            settings = SimpleNamespace(server_name="node1", server_groups=(), poll_interval=1.0)
            writer = FleetKeys(db, cast(Service, SimpleNamespace(settings=settings)), LOG)
            for name in names:
                fresh = {"uuid": uuid.uuid4(), "sub_token": uuid.uuid4().hex}
                await writer.created(fleet_key(name).model_copy(update=fresh))
            async with started(xray=False) as rig:
                node = FleetKeys(db, rig.service, LOG)
                await node.converge_at_start(budget=0)
                assert [k for k in rig.service.state.keys.values() if k.fleet] == []
                assert await node.sync() is True
                held = sorted(k.name for k in rig.service.state.keys.values() if k.fleet)
                assert held == names

    anyio.run(main)


def test_a_server_serves_keys_without_groups_or_sharing_one() -> None:
    assert serves((), []) and serves(("eu",), [])
    assert serves(("eu", "premium"), ["premium", "us"])
    assert not serves(("eu",), ["us"]) and not serves((), ["eu"])


def test_a_node_applies_only_the_followed_fields_that_differ() -> None:
    moment = datetime(2026, 5, 1, tzinfo=UTC)
    key = KeyRecord(
        id="k1", name="Alice", uuid="3014594c-1a4c-4472-87bc-0a5826be09d8", port=20001,
        created_at=moment, note="old", groups=["eu"], fleet=True,
    )
    row = row_of(key)
    assert row["same_name"] == "alice" and row["reset_strategy"] == "no_reset"
    assert differences(key, desired_of(key)) == {}
    changed = key.model_copy(update={"note": "new", "data_limit_bytes": 5, "port": 20002})
    assert differences(key, desired_of(changed)) == {"note": "new", "data_limit_bytes": 5}


def test_userinfo_carries_fleet_usage_limit_and_expiry() -> None:
    assert userinfo(1, 2, None, None) == "upload=1; download=2; total=0; expire=0"
    expiry = datetime(2030, 1, 1, tzinfo=UTC)
    assert userinfo(10, 20, 300, expiry) == "upload=10; download=20; total=300; expire=1893456000"


def test_bad_groups_are_422_and_change_nothing(inproc: InProcessDaemon) -> None:
    made = inproc.create("liam", groups=["eu", "eu", "asia"])
    assert made["groups"] == ["asia", "eu"] and made["fleet"] is False
    for body in ({"groups": ["EU"]}, {"groups": [f"g{n}" for n in range(17)]}, {"groups": None}):
        inproc.api("PATCH", "/api/keys/liam", expect=422, json=body)
        inproc.api("POST", "/api/keys", expect=422, json={"name": "mia", **body})
    assert inproc.api("GET", "/api/keys/liam")["groups"] == ["asia", "eu"]
    assert [k["name"] for k in inproc.api("GET", "/api/keys")["keys"]] == ["liam"]


def test_a_409_for_a_name_the_fleet_has_names_its_spelling_and_the_batch_item(
    fleet_db: Database,
) -> None:
    alice = fleet_key("Alice")
    refusals: list[str] = []

    async def body(a: FleetKeys, b: FleetKeys) -> None:
        await a.created(alice)
        for attempt in (
            b.created(fleet_key("alice")),
            b.created_many([fleet_key("zed"), fleet_key("ALICE")]),
        ):
            with pytest.raises(Conflict) as refused:
                await attempt
            refusals.append(refused.value.detail)

    with_writers(fleet_db, body)
    single, batch = refusals
    assert single.startswith("a key named 'Alice' already exists in the fleet")
    assert single.endswith("nothing was changed")
    assert batch.startswith("keys[1]: a key named 'Alice' already exists in the fleet")
    assert batch.endswith("nothing was created")
    assert fleet_db.sql("SELECT name FROM portmeter.keys") == "Alice"


def test_a_server_without_xray_creates_many_fleet_keys(fleet_db: Database) -> None:
    """Every key has its own subscription token, with Xray or without: the fleet holds tokens
    unique, and a counting-only server must not make every key after the first a 409."""

    async def main() -> None:
        async with ready_fleet_db(fleet_db.dsn) as db, started(xray=False) as rig:
            rig.service.fleet_keys = FleetKeys(db, rig.service, LOG)
            for name in ("ada", "bo", "cy"):
                assert (await rig.service.create_key(name)).fleet

    anyio.run(main)
    assert fleet_db.sql("SELECT count(DISTINCT sub_token) FROM portmeter.keys") == "3"
