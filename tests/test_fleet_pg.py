"""A fleet in PostgreSQL (README "A fleet in PostgreSQL"): the schema, the exactly-once delivery
from the outbox, and real daemons whose ledger must equal their kernel counts through node
crashes and database crashes.

Every test has its own database and role (fixture `fleet_db`) in the session's real
PostgreSQL 15 (tests/pgserver.py); daemons run in their own namespaces with their own tables.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
import structlog

from daemon.fleet.delivery import Delivery
from daemon.fleet.schema import LATEST, SchemaTooNew, migrate
from daemon.settings import Settings
from daemon.store.outbox import Outbox
from tests.conftest import Daemon, fresh_port_range
from tests.fleetrig import ready_fleet_db
from tests.netlab import SERVER_V4, Lab, lab, wait_for
from tests.pgserver import Cluster, Database

pytestmark = pytest.mark.root
LOG = structlog.get_logger()
HOUR = 1_780_000_000 - 1_780_000_000 % 3600  # 2026-05-28 20:00 UTC, an hour's start


def report(
    name: str, rx: int, tx: int, at: int, key_id: str = "k1", epoch: int = 0
) -> dict[str, Any]:
    """One delta as daemon/reports.py stages it (with the fields a DSN adds)."""
    return {
        "report_id": f"srv:inst:1:{key_id}:{epoch}",
        "user_token": name,
        "server": "srv",
        "port": 10001,
        "protocol": "vless",
        "bytes_uploaded": rx,
        "bytes_downloaded": tx,
        "timestamp": at,
        "key_id": key_id,
        "uuid": "00000000-0000-4000-8000-000000000001",
        "epoch": epoch,
        "rx_packets": 1,
        "tx_packets": 1,
    }


def put(outbox: Path, stem: str, message: dict[str, Any]) -> None:
    outbox.mkdir(parents=True, exist_ok=True)
    (outbox / f"{stem}.json").write_text(json.dumps(message), encoding="utf-8")


def rows(db: Database, query: str) -> list[str]:
    out = db.sql(query)
    return out.splitlines() if out else []


def run_delivery(
    db: Database, outbox: Path, server: str = "srv", then: Callable[[Delivery], Awaitable[None]]
    | None = None
) -> Delivery:
    """Connect, scan and drain `outbox` once, as a node's delivery loop does."""

    async def main() -> Delivery:
        async with ready_fleet_db(db.dsn) as fleet:
            delivery = Delivery(fleet, Outbox(outbox), server, "inst", 1.0, LOG)
            await delivery.scan()
            await delivery.drain()
            if then is not None:
                await then(delivery)
        return delivery

    return anyio.run(main)


# --- the delivery statement ----------------------------------------------------------------


def test_a_message_adds_once_even_when_sent_again(fleet_db: Database, tmp_path: Path) -> None:
    box = tmp_path / "reports"
    put(box, "000000000001", {"reports": [report("alice", 100, 7, HOUR + 5)]})
    put(box, "000000000002", {"reports": [report("alice", 50, 3, HOUR + 3605)]})
    first = run_delivery(fleet_db, box)
    assert first.backlog.answer() == {"messages": 0, "rows": 0, "bytes": 0, "oldest_at": None}
    assert list(box.iterdir()) == []
    # The crash between commit and unlink: the same files again add nothing.
    put(box, "000000000001", {"reports": [report("alice", 100, 7, HOUR + 5)]})
    put(box, "000000000002", {"reports": [report("alice", 50, 3, HOUR + 3605)]})
    run_delivery(fleet_db, box)
    assert rows(fleet_db, "SELECT extract(epoch FROM hour)::bigint, rx_bytes, tx_bytes, reports "
                          "FROM portmeter.usage_hourly ORDER BY hour") == [
        f"{HOUR}|100|7|1", f"{HOUR + 3600}|50|3|1"
    ]
    assert rows(fleet_db, "SELECT name, server, rx_bytes, tx_bytes, reports "
                          "FROM portmeter.totals") == ["alice|srv|150|10|2"]
    assert rows(fleet_db, "SELECT report_id, deltas FROM portmeter.reports ORDER BY 1") == [
        "srv:inst:000000000001|1", "srv:inst:000000000002|1"
    ]
    assert rows(fleet_db, "SELECT server, key_id, name, port, epoch FROM "
                          "portmeter.server_keys") == ["srv|k1|alice|10001|0"]
    assert rows(fleet_db, "SELECT name, last_delivery_at IS NOT NULL FROM "
                          "portmeter.servers") == ["srv|t"]


def test_a_reset_clears_every_servers_totals_and_counts_from_its_moment(
    fleet_db: Database, tmp_path: Path
) -> None:
    other, box = tmp_path / "other", tmp_path / "reports"
    put(other, "000000000001", {"reports": [report("alice", 1000, 1000, HOUR)]})
    run_delivery(fleet_db, other, server="other")
    put(box, "000000000001", {"reports": [report("alice", 10, 10, HOUR)]})
    reset_at = f"{HOUR + 60}"
    put(box, "000000000002", {
        "resets": [{"name": "alice", "at": "2026-05-28T20:01:00+00:00"}],
        "reports": [report("alice", 1, 1, HOUR + 30), report("alice", 5, 6, HOUR + 90)],
    })
    put(box, "000000000003", {"reports": [report("alice", 7, 8, HOUR + 120)]})
    run_delivery(fleet_db, box)
    assert rows(fleet_db, "SELECT name, resets, extract(epoch FROM reset_at)::bigint "
                          "FROM portmeter.users") == [f"alice|1|{reset_at}"]
    # Other servers' totals went with the reset; only deltas from its moment on count.
    assert rows(fleet_db, "SELECT server, rx_bytes, tx_bytes, reports FROM portmeter.totals") == [
        "srv|12|14|2"
    ]
    # The hourly ledger keeps everything.
    assert rows(fleet_db, "SELECT server, rx_bytes, tx_bytes FROM portmeter.usage_hourly "
                          "ORDER BY server") == ["other|1000|1000", "srv|23|25"]


def test_a_file_that_is_not_a_message_is_set_aside_and_the_rest_go(
    fleet_db: Database, tmp_path: Path
) -> None:
    box = tmp_path / "reports"
    put(box, "000000000001", {"reports": [report("alice", -5, 0, HOUR)]})
    (box / "000000000002.json").write_bytes(b"\xff not json")
    put(box, "000000000003", {"reports": [report("bob", 9, 9, HOUR)]})
    run_delivery(fleet_db, box)
    assert sorted(p.name for p in box.iterdir()) == ["000000000001.refused", "000000000002.refused"]
    assert rows(fleet_db, "SELECT name, rx_bytes FROM portmeter.totals") == ["bob|9"]


def test_several_files_go_in_one_statement(fleet_db: Database, tmp_path: Path) -> None:
    box = tmp_path / "reports"
    for generation in range(1, 41):
        put(box, f"{generation:012d}", {
            "reports": [report(f"u{i}", generation, 1, HOUR, key_id=f"k{i}") for i in range(50)]
        })

    async def batches_seen(delivery: Delivery) -> None:
        assert delivery.backlog.rows == 0

    run_delivery(fleet_db, box, then=batches_seen)
    assert rows(fleet_db, "SELECT count(*), sum(rx_bytes), sum(reports) "
                          "FROM portmeter.usage_hourly") == [f"50|{50 * sum(range(1, 41))}|2000"]
    assert rows(fleet_db, "SELECT count(*) FROM portmeter.reports") == ["40"]


# --- the schema ----------------------------------------------------------------------------


def schema_dump(db: Database) -> str:
    done = subprocess.run(
        ["/usr/lib/postgresql/15/bin/pg_dump", "--schema-only", "--no-owner", db.admin_dsn],
        check=True, capture_output=True, text=True, timeout=60,
    )
    # pg_dump's \restrict lines carry a random key per dump: not part of the schema.
    schema = [line for line in done.stdout.splitlines() if not line.startswith("\\")]
    return "\n".join(schema) + db.sql("SELECT version FROM portmeter.schema_version ORDER BY 1")


def test_nodes_migrating_at_once_make_one_schema(fleet_db: Database) -> None:
    async def one() -> int:
        async with await psycopg.AsyncConnection.connect(fleet_db.dsn, autocommit=True) as conn:
            return await migrate(conn)

    async def main() -> list[int]:
        done: list[int] = []

        async def run() -> None:
            done.append(await one())

        async with anyio.create_task_group() as tasks:
            for _ in range(8):
                tasks.start_soon(run)
        return done

    assert anyio.run(main) == [LATEST] * 8
    assert rows(fleet_db, "SELECT version FROM portmeter.schema_version ORDER BY 1") == [
        str(v) for v in range(1, LATEST + 1)
    ]


def test_a_newer_schema_is_refused_and_left_as_it_is(fleet_db: Database) -> None:
    async def migrate_once() -> int:
        async with await psycopg.AsyncConnection.connect(fleet_db.dsn, autocommit=True) as conn:
            return await migrate(conn)

    anyio.run(migrate_once)
    fleet_db.sql(f"INSERT INTO portmeter.schema_version (version) VALUES ({LATEST + 1})")
    before = schema_dump(fleet_db)
    with pytest.raises(SchemaTooNew, match=f"version {LATEST + 1}, newer than this portmeter"):
        anyio.run(migrate_once)
    assert schema_dump(fleet_db) == before


# --- real daemons --------------------------------------------------------------------------

PAYLOAD = 400
WIRE = PAYLOAD + 28  # a UDP datagram over IPv4, as the kernel counts it


@dataclass
class Node:
    """A daemon in its own server namespace, with its own client namespace."""

    net: Lab
    daemon: Daemon
    name: str


@contextlib.contextmanager
def fleet_nodes(
    db: Database,
    root: Path,
    count: int,
    per_node: Sequence[Mapping[str, str]] = (),
    **env: str,
) -> Iterator[list[Node]]:
    """`count` node daemons, each in its own pair of namespaces, all on database `db`; node i
    also gets the environment `per_node[i]`."""
    with contextlib.ExitStack() as stack:
        made = []
        for index in range(count):
            net = stack.enter_context(lab())
            name = f"node{index}"
            own = per_node[index] if index < len(per_node) else {}
            daemon = Daemon(
                net.server, root / name, fresh_port_range(),
                PORTMETER_FLEET_DSN=db.dsn, PORTMETER_SERVER_NAME=name, **env, **own,
            )
            stack.callback(daemon.close)
            daemon.start()
            made.append(Node(net, daemon, name))
        yield made


def udp(node: Node, port: int, count: int) -> None:
    """Datagrams from the node's client namespace to a key's port (rx of the key)."""
    sender = node.net.udp(node.net.client)
    try:
        for _ in range(count):
            sender.sendto(b"u" * PAYLOAD, (SERVER_V4, port))
    finally:
        sender.close()


def tcp(node: Node, port: int, size: int) -> None:
    """A TCP exchange on a key's port: `size` bytes up, the same echoed down, then closed."""
    listener = node.net.tcp(node.net.server)
    client = node.net.tcp(node.net.client)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((SERVER_V4, port))
        listener.listen(1)
        client.connect((SERVER_V4, port))
        peer, _ = listener.accept()
        with peer:
            client.sendall(b"t" * size)
            got = 0
            while got < size:
                chunk = peer.recv(65536)
                got += len(chunk)
                peer.sendall(chunk)
            echoed = 0
            while echoed < size:
                echoed += len(client.recv(65536))
            client.shutdown(socket.SHUT_WR)
            peer.recv(1)
    finally:
        client.close()
        listener.close()


def kernel_totals(node: Node, key: str) -> tuple[int, int]:
    traffic = node.daemon.traffic(key)
    return traffic["rx_bytes"], traffic["tx_bytes"]


def ledger(db: Database, server: str, name: str) -> tuple[int, int]:
    """What PostgreSQL holds of `name`'s usage on `server` (sum of the hourly rows)."""
    got = db.sql(
        "SELECT coalesce(sum(rx_bytes), 0), coalesce(sum(tx_bytes), 0) FROM "
        f"portmeter.usage_hourly WHERE server = '{server}' AND name = '{name}'"
    )
    rx, tx = got.split("|")
    return int(rx), int(tx)


def settled(db: Database, nodes: list[Node], keys: dict[str, str], name: str) -> None:
    """Wait until every node's ledger equals its kernel count; then it must stay so."""

    def equal() -> bool:
        return all(
            ledger(db, n.name, name) == kernel_totals(n, keys[n.name]) for n in nodes
        )

    wait_for(equal, timeout=30, what="the ledger to equal the kernel counts")
    time.sleep(1.5)  # retries and re-sent messages must add nothing
    assert equal()


def local_key(node: Node, name: str, **extra: Any) -> dict[str, Any]:
    """A key created on this node alone (`?local=true`): the same name on several nodes is one
    user of the fleet."""
    return dict(node.daemon.api(
        "POST", "/api/keys", expect=201, params={"local": "true"}, json={"name": name, **extra}
    ))


def status(node: Node) -> dict[str, Any]:
    return dict(node.daemon.api("GET", "/api/fleet/status"))


def test_three_nodes_ledger_equals_their_kernel_counts(
    fleet_db: Database, workdir: Path
) -> None:
    with fleet_nodes(fleet_db, workdir, 3) as nodes:
        made = {n.name: local_key(n, "alice") for n in nodes}
        keys = {name: key["id"] for name, key in made.items()}
        for index, node in enumerate(nodes):
            port = made[node.name]["port"]
            udp(node, port, 10 + index)
            tcp(node, port, 100_000 * (index + 1))
        settled(fleet_db, nodes, keys, "alice")
        per_node = [kernel_totals(n, keys[n.name]) for n in nodes]
        assert all(rx > 100_000 for rx, _ in per_node)  # the TCP bytes are in
        total = fleet_db.sql(
            "SELECT sum(rx_bytes), sum(tx_bytes) FROM portmeter.usage_hourly WHERE name = 'alice'"
        )
        assert total == f"{sum(rx for rx, _ in per_node)}|{sum(tx for _, tx in per_node)}"
        totals = fleet_db.sql("SELECT sum(rx_bytes) FROM portmeter.totals WHERE name = 'alice'")
        assert totals == str(sum(rx for rx, _ in per_node))
        assert rows(fleet_db, "SELECT name FROM portmeter.servers ORDER BY 1") == [
            "node0", "node1", "node2"
        ]
        answer = status(nodes[0])
        assert answer["configured"] and answer["reachable"] and answer["error"] is None
        assert answer["schema_version"] == LATEST and answer["server"] == "node0"
        assert answer["backlog"]["messages"] == 0 and answer["last_delivered_at"]


def test_killed_mid_delivery_twenty_times_no_loss_no_double_count(
    fleet_db: Database, workdir: Path
) -> None:
    chance = random.Random(12)
    with fleet_nodes(fleet_db, workdir, 1, PORTMETER_POLL_INTERVAL="0.3") as nodes:
        node = nodes[0]
        ports = [local_key(node, f"user{i}")["port"] for i in range(5)]
        key = node.daemon.api("GET", "/api/keys/user0")["id"]
        for _ in range(20):
            for port in ports:
                udp(node, port, chance.randint(1, 5))
            time.sleep(chance.uniform(0, 0.8))
            node.daemon.kill9()
            udp(node, ports[0], 3)  # counted by the kernel while the node is down
            node.daemon.start()
        settled(fleet_db, nodes, {"node0": key}, "user0")
        for index in range(5):
            kernel = kernel_totals(node, f"user{index}")
            assert ledger(fleet_db, "node0", f"user{index}") == kernel


def goes_on_without_database(node: Node, port: int, backlog_rows: int) -> None:
    """With the database down: a key is created, its local limit enforced, the backlog grows."""
    limited = local_key(node, "bob", data_limit_bytes=4 * WIRE)
    udp(node, limited["port"], 10)
    wait_for(
        lambda: node.daemon.api("GET", "/api/keys/bob")["status"] == "limited",
        what="a local limit while the database is down",
    )
    udp(node, port, 5)
    wait_for(
        lambda: status(node)["backlog"]["rows"] > backlog_rows,
        what="the backlog to grow while the database is down",
    )


def test_database_crash_and_downtime_lose_nothing(
    fleet_db: Database, pg_cluster: Cluster, workdir: Path
) -> None:
    with fleet_nodes(fleet_db, workdir, 1, PORTMETER_POLL_INTERVAL="0.5") as nodes:
        node = nodes[0]
        alice = local_key(node, "alice")
        port, key = alice["port"], alice["id"]
        try:
            for round_no in range(3):
                udp(node, port, 20)
                time.sleep(0.2 * round_no)
                pg_cluster.stop("immediate")
                udp(node, port, 5)
                # Noticed at the next delivery, within a connection timeout (db.CONNECT_TIMEOUT).
                wait_for(lambda: status(node)["reachable"] is False, timeout=20, what="noticed")
                down = status(node)
                assert down["error"]
                assert down["backlog"]["rows"] >= 1 and down["backlog"]["oldest_at"]
                if round_no == 0:
                    goes_on_without_database(node, port, down["backlog"]["rows"])
                pg_cluster.start()
        finally:
            if not pg_cluster.running():
                pg_cluster.start()
        settled(fleet_db, nodes, {"node0": key}, "alice")
        wait_for(lambda: status(node)["backlog"]["messages"] == 0, what="the backlog to drain")
        assert status(node)["reachable"] is True
        assert ledger(fleet_db, "node0", "bob") == kernel_totals(node, "bob")


def counts_and_says_why(node: Node, why: str) -> None:
    """The node counts without its database; its status, CLI and log say `why`."""
    daemon = node.daemon
    key = local_key(node, "alice")
    udp(node, key["port"], 4)
    wait_for(lambda: daemon.traffic(key["id"])["rx_bytes"] == 4 * WIRE, what="counting")
    wait_for(lambda: status(node)["error"] is not None, what="the reason")
    answer = status(node)
    assert answer["configured"] is True and answer["reachable"] is False
    assert why in answer["error"] and "not-" not in answer["error"]  # never the password
    assert "fleet_db_unreachable" in daemon.log() and why in daemon.log()
    shown = daemon.cli("fleet", "status")
    assert shown.returncode == 0 and "NOT reachable" in shown.stdout and why in shown.stdout


def test_a_database_it_cannot_use_leaves_the_node_counting(
    fleet_db: Database, pg_cluster: Cluster, make_daemon: Any, net: Lab
) -> None:
    async def newer() -> None:
        async with await psycopg.AsyncConnection.connect(fleet_db.dsn, autocommit=True) as conn:
            await migrate(conn)
            await conn.execute(
                "INSERT INTO portmeter.schema_version (version) VALUES (%s)", (LATEST + 1,)
            )

    anyio.run(newer)
    before = schema_dump(fleet_db)
    wrong = fleet_db.dsn.replace("password=", "password=not-")
    cases = {
        "host=/nonexistent port=notaport =": "not a valid libpq connection string",
        wrong: "password authentication failed",
        fleet_db.dsn: f"schema is version {LATEST + 1}, newer than this portmeter",
    }
    for dsn, why in cases.items():
        counts_and_says_why(Node(net, make_daemon(PORTMETER_FLEET_DSN=dsn), "local"), why)
    assert schema_dump(fleet_db) == before
    assert rows(fleet_db, "SELECT count(*) FROM portmeter.reports") == ["0"]


def test_without_a_dsn_the_fleet_is_not_configured(make_daemon: Any) -> None:
    daemon = make_daemon()
    assert daemon.api("GET", "/api/fleet/status") == {
        "configured": False, "reachable": False, "error": None, "schema_version": None,
        "server": daemon.api("GET", "/api/fleet/status")["server"], "last_delivered_at": None,
        "backlog": None,
    }
    shown = daemon.cli("fleet", "status")
    assert (shown.returncode, shown.stdout) == (
        0, "fleet database: not configured (PORTMETER_FLEET_DSN is unset)\n"
    )


def test_a_dsn_and_a_report_url_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PORTMETER_FLEET_DSN and PORTMETER_REPORT_URL"):
        Settings(
            state_dir=tmp_path, fleet_dsn="host=/tmp dbname=x", report_url="http://c/api",
            xray_config="",
        )
