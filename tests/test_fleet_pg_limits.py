"""Limits that count every server and resets that reach every server (README "Fleet limits and
reads"): three node daemons, each in its own namespaces, on one real PostgreSQL database.
"""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.netlab import SERVER_V4, wait_for
from tests.pgserver import Database
from tests.test_fleet_pg import WIRE, Node, fleet_nodes, kernel_totals, ledger, local_key, udp

pytestmark = pytest.mark.root
LIMIT = 10_000_000
RATE = 500_000  # bytes per second each node sends while measuring the overshoot
# README "Fleet limits and reads": the overshoot is at most what the other nodes count while
# one node's view of them lags: a poll interval, a delivery, the next refresh (1 s each here).
LAG = 3.0


def used(node: Node, key: str) -> int:
    rx, tx = kernel_totals(node, key)
    return rx + tx


def key_of(node: Node, key: str) -> dict[str, Any]:
    return dict(node.daemon.api("GET", f"/api/keys/{key}"))


def reset_since(node: Node, key: str, before: str | None) -> bool:
    """The key was reset since `before` (its last_reset_at then)."""
    return key_of(node, key)["last_reset_at"] not in (None, before)


def paced(node: Node, port: int, seconds: float, rate: int) -> None:
    """UDP datagrams to `port` at about `rate` bytes per second for `seconds`."""
    per_tick = max(1, rate // WIRE // 20)
    end = time.monotonic() + seconds
    sender = node.net.udp(node.net.client)
    try:
        while time.monotonic() < end:
            for _ in range(per_tick):
                sender.sendto(b"u" * (WIRE - 28), (SERVER_V4, port))
            time.sleep(0.05)
    finally:
        sender.close()


def delivered(db: Database, node: Node, key: str) -> None:
    """Until the ledger holds everything the node counted for `key`'s name."""
    name = key_of(node, key)["name"]
    wait_for(
        lambda: ledger(db, node.name, name) == kernel_totals(node, key),
        timeout=30,
        what=f"{node.name}'s usage in the ledger",
    )


def test_a_fleet_limit_stops_the_second_node_and_resets_reach_every_node(
    fleet_db: Database, tmp_path: Path
) -> None:
    with fleet_nodes(fleet_db, tmp_path, 3) as nodes:
        a, b, c = nodes
        keys = {n.name: local_key(n, "alice", data_limit_bytes=LIMIT) for n in nodes}
        ports = {name: key["port"] for name, key in keys.items()}
        ids = {name: key["id"] for name, key in keys.items()}

        # Node A first: 6 MB, delivered; then B may use only what is left.
        udp(a, ports[a.name], 6_000_000 // WIRE)
        delivered(fleet_db, a, ids[a.name])
        first = used(a, ids[a.name])
        wait_for(
            lambda: _quota_left(b, ids[b.name]) == LIMIT - first,
            timeout=15,
            what="B's quota to count A's usage",
        )
        udp(b, ports[b.name], 8_000_000 // WIRE)
        second = used(b, ids[b.name])
        assert first + second <= LIMIT  # A was quiet: B stopped at what A left, exactly
        assert first + second > LIMIT - WIRE
        delivered(fleet_db, b, ids[b.name])
        wait_for(
            lambda: key_of(b, ids[b.name])["status"] == "limited",
            timeout=15,
            what="B's key to be limited",
        )

        # A reset on A reaches B and C (their keys reset, quotas fresh) and the ledger.
        resets = {n.name: key_of(n, ids[n.name])["last_reset_at"] for n in nodes}
        a.daemon.api("POST", f"/api/keys/{ids[a.name]}/traffic/port/reset")
        for node in (b, c):
            wait_for(
                functools.partial(reset_since, node, ids[node.name], resets[node.name]),
                timeout=20,
                what=f"the reset to reach {node.name}",
            )
            assert used(node, ids[node.name]) == 0
            assert key_of(node, ids[node.name])["status"] == "active"
        assert fleet_db.sql("SELECT count(*) FROM portmeter.totals WHERE name = 'alice'") == "0"
        assert (
            fleet_db.sql(
                "SELECT resets >= 1 AND reset_at > '-infinity' FROM portmeter.users"
                " WHERE name = 'alice'"
            )
            == "t"
        )
        wait_for(
            lambda: all(_quota_left(n, ids[n.name]) == LIMIT for n in nodes),
            timeout=15,
            what="every node's quota to be the whole limit again",
        )

        # All three at once, as fast as RATE allows, until each is stopped: the sum passes the
        # limit by at most what the others count while a node's view of them lags.
        threads = [
            threading.Thread(target=paced, args=(n, ports[n.name], 12.0, RATE)) for n in nodes
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        total = sum(used(n, ids[n.name]) for n in nodes)
        bound = (len(nodes) - 1) * RATE * LAG
        print(f"fleet limit {LIMIT}: used {total}, overshoot {total - LIMIT}, bound {bound}")
        assert total <= LIMIT + bound


def _quota_left(node: Node, key_id: str) -> int:
    """The bytes the node's kernel quota still lets through for the key (from nft)."""
    port = key_of(node, key_id)["port"]
    listing = node.net.nft("list", "quota", "inet", node.daemon.table, f"q_{port}").stdout
    words = listing.split()
    over = int(words[words.index("over") + 1])
    return over - int(words[words.index("used") + 1]) if "used" in words else over
