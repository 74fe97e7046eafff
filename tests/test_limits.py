"""Limits: exact stop at the quota, expiry, disable, resets, webhooks.

The kernel layer proves the enforcement with real datagrams and TCP (the exact stop, a limited
key across kill -9 and a flushed table, disable's full stop, a reset boundary passed while the
daemon was down) and the CLI over the socket; the in-process layer (tests/inprocess.py, the
in-memory kernel drops as the kernel does) checks expiry, resets and refused limits through the
API.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.conftest import Daemon
from tests.inprocess import InProcessDaemon
from tests.netlab import SERVER_V4, Lab, make_socket, wait_for

DATAGRAM = 1000
WIRE = DATAGRAM + 28
SECRET = "test-webhook-secret"


class Receiver:
    """A UDP receiver on the key's port in the server namespace and a sender in the client's."""

    def __init__(self, net: Lab, port: int) -> None:
        self.port = port
        self.server = net.udp(net.server)
        self.server.bind((SERVER_V4, port))
        self.server.settimeout(0.05)
        self.client = net.udp(net.client)

    def blast(self, count: int) -> int:
        """Send `count` datagrams one by one; how many arrived."""
        arrived = 0
        for _ in range(count):
            self.client.sendto(b"x" * DATAGRAM, (SERVER_V4, self.port))
            with contextlib.suppress(TimeoutError):
                self.server.recv(65536)
                arrived += 1
        return arrived

    def close(self) -> None:
        self.server.close()
        self.client.close()


@pytest.fixture
def webhooks(net: Lab) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """An HTTP receiver inside the server namespace that checks each signature."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert self.headers["X-Portmeter-Signature"] == expected
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    sock = make_socket(net.server, socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = HTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook", received
    finally:
        server.shutdown()
        sock.close()


def test_udp_stops_exactly_at_the_limit_and_resumes_when_raised(
    net: Lab, make_daemon: Any, webhooks: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = webhooks
    daemon: Daemon = make_daemon(PORTMETER_WEBHOOK_URL=url, PORTMETER_WEBHOOK_SECRET=SECRET)
    limit = 1_000_000
    key = daemon.create("capped", data_limit_bytes="1MB")
    assert key["data_limit_bytes"] == limit and key["status"] == "active"
    rx = Receiver(net, key["port"])
    try:
        allowed = limit // WIRE
        assert rx.blast(allowed + 50) == allowed  # exactly: the kernel drops the rest
        t = daemon.traffic(key["id"])
        assert (t["rx_bytes"], t["rx_packets"]) == (allowed * WIRE, allowed)
        assert t["dropped_bytes"] == 50 * WIRE
        assert t["status"] == "limited"
        wait_for(lambda: [e["event"] for e in received] == ["key_limited"], what="webhook")
        event = received[0]
        assert event["key"]["uuid"] == key["uuid"] and event["used_bytes"] == allowed * WIRE
        assert event["data_limit_bytes"] == limit and event["status"] == "limited"

        raised = daemon.api("PATCH", f"/api/keys/{key['id']}", json={"data_limit_bytes": 2 * limit})
        assert raised["status"] == "active"
        assert rx.blast(1) == 1  # the next datagram arrives at once
        time.sleep(1.5)
        assert [e["event"] for e in received] == ["key_limited", "key_active"]
        assert daemon.traffic(key["id"])["rx_bytes"] == (allowed + 1) * WIRE
    finally:
        rx.close()


def test_tcp_stalls_at_the_limit_without_overshoot(net: Lab, daemon: Daemon) -> None:
    limit = 300_000
    key = daemon.create("tcp-capped", data_limit_bytes=limit)
    listener = net.tcp(net.server)
    listener.bind((SERVER_V4, key["port"]))
    listener.listen()
    client = net.tcp(net.client)
    client.settimeout(3)
    sink: list[socket.socket] = []
    accepting = threading.Thread(target=lambda: sink.append(listener.accept()[0]))
    accepting.start()
    try:
        client.connect((SERVER_V4, key["port"]))
        accepting.join(5)

        def drain() -> None:
            with contextlib.suppress(OSError):
                while sink[0].recv(65536):
                    pass

        threading.Thread(target=drain, daemon=True).start()
        with pytest.raises(OSError):  # stalls: the kernel stops the flow, the send times out
            client.sendall(b"z" * 5_000_000)
        t = daemon.traffic(key["id"])
        assert t["status"] == "limited"
        assert limit - 70_000 < t["used_bytes"] <= limit
        assert t["dropped_bytes"] > 0
    finally:
        client.close()
        for s in sink:
            s.close()
        listener.close()


def test_limited_key_stays_limited_after_kill9_and_table_flush(net: Lab, daemon: Daemon) -> None:
    key = daemon.create("stubborn", data_limit_bytes=10 * WIRE)
    rx = Receiver(net, key["port"])
    try:
        assert rx.blast(12) == 10
        assert daemon.traffic(key["id"])["status"] == "limited"
        time.sleep(1.5)
        daemon.kill9()
        net.nft("flush", "ruleset")
        daemon.start()
        assert rx.blast(3) == 0  # no fresh allowance after the table was rebuilt
        t = daemon.traffic(key["id"])
        assert (t["status"], t["used_bytes"]) == ("limited", 10 * WIRE)
    finally:
        rx.close()


def test_expiry_stops_traffic_within_a_poll_interval(inproc: InProcessDaemon) -> None:
    expire = datetime.now(UTC) + timedelta(seconds=1)
    key = inproc.create("ephemeral", expire_at=expire.isoformat())
    assert inproc.datagrams(key["port"], 2, WIRE) == 2
    while datetime.now(UTC) < expire:
        time.sleep(0.05)
    with capture_logs() as logged:
        inproc.poll()  # one poll interval
    assert inproc.datagrams(key["port"], 2, WIRE) == 0
    t = inproc.traffic(key["id"])
    assert t["status"] == "expired" and t["rx_bytes"] == 2 * WIRE
    assert t["dropped_bytes"] == 2 * WIRE
    assert "key_expired" in [event["event"] for event in logged]


def test_disable_drops_in_the_kernel_and_enable_restores_at_once(net: Lab, daemon: Daemon) -> None:
    key = daemon.create("switch")
    rx = Receiver(net, key["port"])
    try:
        assert daemon.api("POST", f"/api/keys/{key['id']}/disable")["status"] == "disabled"
        assert rx.blast(3) == 0
        assert daemon.api("POST", f"/api/keys/{key['id']}/enable")["status"] == "active"
        assert rx.blast(3) == 3
        t = daemon.traffic(key["id"])
        assert (t["rx_bytes"], t["dropped_bytes"]) == (3 * WIRE, 3 * WIRE)
    finally:
        rx.close()


def test_reset_gives_a_limited_key_its_allowance_back(inproc: InProcessDaemon) -> None:
    key = inproc.create("monthly", data_limit_bytes=5 * WIRE, reset_strategy="month")
    assert key["next_reset_at"] is not None
    assert inproc.datagrams(key["port"], 7, WIRE) == 5
    reset = inproc.api("POST", f"/api/keys/{key['id']}/traffic/port/reset")
    assert reset["status"] == "active"
    shown = inproc.api("GET", f"/api/keys/{key['id']}")
    assert shown["used_before_reset"] == 5 * WIRE and shown["last_reset_at"] is not None
    assert inproc.datagrams(key["port"], 7, WIRE) == 5


def test_reset_boundary_passed_while_down_is_applied_exactly_once(net: Lab, daemon: Daemon) -> None:
    key = daemon.create("daily", data_limit_bytes=3 * WIRE, reset_strategy="day")
    rx = Receiver(net, key["port"])
    try:
        assert rx.blast(4) == 3
        assert daemon.stop() == 0
        state = json.loads(daemon.state_file.read_text())
        passed = datetime.now(UTC) - timedelta(hours=30)
        state["keys"][key["id"]]["next_reset_at"] = passed.isoformat()
        daemon.state_file.write_text(json.dumps(state))
        daemon.start()
        shown = daemon.api("GET", f"/api/keys/{key['id']}")
        after = (shown["used_bytes"], shown["used_before_reset"], shown["status"])
        assert after == (0, 3 * WIRE, "active")
        assert datetime.fromisoformat(shown["next_reset_at"]) > datetime.now(UTC)
        assert daemon.log().count("event=key_reset") == 1
        assert rx.blast(1) == 1
        assert daemon.stop() == 0
        daemon.start()
        assert daemon.log().count("event=key_reset") == 1  # not again
        assert daemon.api("GET", f"/api/keys/{key['id']}")["used_bytes"] == WIRE
    finally:
        rx.close()


BAD_LIMITS: list[tuple[dict[str, Any], str]] = [
    ({"data_limit_bytes": -1}, "must not be negative"),
    ({"data_limit_bytes": "lots"}, "is not a size"),
    ({"expire_at": "2001-01-01"}, "in the past"),
    ({"expire_at": "someday"}, "is not a date"),
    ({"reset_strategy": "yearly"}, "reset_strategy"),
    ({"note": "n" * 300}, "note"),
]


def test_bad_limits_are_422_and_change_nothing(inproc: InProcessDaemon) -> None:
    key = inproc.create("steady")
    before = (inproc.api("GET", "/api/keys")["keys"], inproc.state_bytes())
    for extra, words in BAD_LIMITS:
        created = inproc.http.post("/api/keys", json={"name": "new", **extra})
        assert created.status_code == 422, (extra, created.text)
        assert words in created.json()["detail"], (extra, created.text)
        if "in the past" not in words:  # a past expiry is allowed when changing a key
            patched = inproc.http.patch(f"/api/keys/{key['id']}", json=extra)
            assert patched.status_code == 422, (extra, patched.text)
            assert words in patched.json()["detail"], (extra, patched.text)
    nothing = inproc.http.patch(f"/api/keys/{key['id']}", json={})
    assert nothing.status_code == 422 and "nothing to change" in nothing.json()["detail"]
    assert (inproc.api("GET", "/api/keys")["keys"], inproc.state_bytes()) == before


def test_cli_gives_50gb_for_30_days_with_a_monthly_reset(daemon: Daemon) -> None:
    added = daemon.cli(
        "--json", "keys", "add", "alice", "--limit", "50GB", "--expire", "+30d", "--reset", "month"
    )
    assert added.returncode == 0, added.stderr
    key = json.loads(added.stdout)
    assert key["data_limit_bytes"] == 50 * 10**9 and key["reset_strategy"] == "month"
    expires = datetime.fromisoformat(key["expire_at"])
    assert timedelta(days=29, hours=23) < expires - datetime.now(UTC) <= timedelta(days=30)
    shown = daemon.cli("keys", "show", "alice").stdout
    assert "0 B of 50 GB" in shown and "month, next" in shown  # as entered, not 46.6 GiB
    unlimited = daemon.cli("--json", "keys", "set", "alice", "--limit", "none", "--expire", "never")
    changed = json.loads(unlimited.stdout)
    assert changed["data_limit_bytes"] is None and changed["expire_at"] is None
    assert "is now disabled" in daemon.cli("keys", "disable", "alice").stdout
    assert "is now active" in daemon.cli("keys", "enable", "alice").stdout
    failed = daemon.cli("keys", "set", "alice", "--limit=-5GB")
    assert failed.returncode == 1 and failed.stderr.strip() == (
        "portmeter: --limit: '-5GB' is not a size: use e.g. 50GB, 512MiB or a number of bytes"
    )
    empty = daemon.cli("keys", "set", "alice")
    assert empty.returncode == 1 and "nothing to change" in empty.stderr
