"""A fleet: a node reports per-key usage to a collector over the network, exactly once in effect.

Two real daemons in two namespaces joined by veth: the node (client side) pushes the deltas of
every saved state generation to the collector's TCP listener; the collector's per-server totals
must equal the node's kernel counts exactly, also after the node is killed mid-batch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, fresh_port_range
from tests.netlab import CLIENT_V4, SERVER_V4, Lab, wait_for

pytestmark = pytest.mark.kernel
API_KEY = "fleet-key-0123456789"
PORT = 18090
PAYLOAD = 400
WIRE = PAYLOAD + 28


def blast(net: Lab, port: int, count: int) -> None:
    """Datagrams from the server namespace to the node's key port (rx at the node)."""
    sender = net.udp(net.server)
    try:
        for _ in range(count):
            sender.sendto(b"f" * PAYLOAD, (CLIENT_V4, port))
    finally:
        sender.close()


def reported(collector: Daemon, user: str) -> dict[str, Any]:
    """Per-server reports the collector holds for `user` (none yet: a 404)."""
    response = collector.http.get(f"/api/admin/usage/{user}")
    if response.status_code == 404:
        return {}
    assert response.status_code == 200, response.text
    return {r["server"]: r for r in response.json()["reported"]}


def test_collector_totals_equal_the_nodes_kernel_counts(
    net: Lab, make_daemon: Any, workdir: Path
) -> None:
    collector: Daemon = make_daemon(
        PORTMETER_HTTP_LISTEN=f"{SERVER_V4}:{PORT}", PORTMETER_API_KEY=API_KEY
    )
    node = Daemon(
        net.client,
        workdir / "node",
        fresh_port_range(),
        PORTMETER_REPORT_URL=f"http://{SERVER_V4}:{PORT}/api/traffic/webhook",
        PORTMETER_REPORT_API_KEY=API_KEY,
        PORTMETER_SERVER_NAME="node-1",
        PORTMETER_POLL_INTERVAL="0.3",
    )
    try:
        node.start()
        alice = node.create("alice")
        bob = node.create("bob")
        blast(net, alice["port"], 20)
        blast(net, bob["port"], 3)

        def caught_up(expected: dict[str, int]) -> bool:
            got = {
                user: reported(collector, user).get("node-1", {}).get("bytes_uploaded", 0)
                for user in expected
            }
            return got == expected

        wait_for(
            lambda: caught_up({"alice": 20 * WIRE, "bob": 3 * WIRE}),
            timeout=20,
            what="first reports",
        )

        for round_no in range(5):  # killed mid-batch: while generations are staged and in flight
            blast(net, alice["port"], 7)
            time.sleep(0.1 * round_no)
            node.kill9()
            blast(net, alice["port"], 2)  # counted by the node's kernel while it is down
            node.start()
        wait_for(
            lambda: caught_up({"alice": 65 * WIRE, "bob": 3 * WIRE}),
            timeout=20,
            what="reports after the kills",
        )
        assert node.traffic(alice["id"])["rx_bytes"] == 65 * WIRE
        time.sleep(1.5)  # nothing more arrives: no double count from retries
        assert caught_up({"alice": 65 * WIRE, "bob": 3 * WIRE})
        entry = reported(collector, "alice")["node-1"]
        assert entry["bytes_downloaded"] == 0 and entry["port"] == alice["port"]
    finally:
        node.close()


def test_webhook_without_the_api_key_is_refused(net: Lab, make_daemon: Any) -> None:
    collector: Daemon = make_daemon(
        PORTMETER_HTTP_LISTEN=f"{SERVER_V4}:{PORT}", PORTMETER_API_KEY=API_KEY
    )
    sock = net.tcp(net.client)
    try:
        sock.connect((SERVER_V4, PORT))
        body = (
            b'{"user_token": "x", "server": "s", "port": 1, "protocol": "vless", '
            b'"bytes_uploaded": 1, "bytes_downloaded": 1, "report_id": "r1"}'
        )
        sock.sendall(
            b"POST /api/traffic/webhook HTTP/1.1\r\nHost: c\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
        )
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 401")
    assert reported(collector, "x") == {}
