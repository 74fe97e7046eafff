"""A key that may no longer pass traffic has its live TCP connections closed at once (README
"Limits, expiry and resets"): panels' users kept browsing on a connection opened before their
limit, because a quota only stops new bytes and the proxy keeps the idle socket.

The in-process layer checks which status changes close a key's connections (MemoryHost records
every port it was asked to close) and that nothing else does. The kernel layer runs a long TCP
transfer through a key's port and checks that the server's socket is gone (`ss`) within one poll
interval, and that the client's connection ended, for disable, a data limit reached mid-transfer,
expiry and delete.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.conftest import Daemon
from tests.inprocess import InProcessDaemon
from tests.netlab import SERVER_V4, SERVER_V6, Lab, sh, wait_for

CONNECTIONS = 3  # live connections the in-process host shows on a key's port
CHUNK = b"s" * 65536


# --- in-process: which changes close connections ---------------------------------------------


def connected(inproc: InProcessDaemon, name: str, **fields: Any) -> dict[str, Any]:
    """A new key with CONNECTIONS live connections on its port."""
    key = inproc.create(name, **fields)
    inproc.rig.host.connections[key["port"]] = CONNECTIONS
    return key


def closings(logged: list[MutableMapping[str, Any]]) -> list[tuple[str, int, int, str]]:
    return [
        (event["key_id"], event["port"], event["count"], event["reason"])
        for event in logged
        if event["event"] == "connections_closed"
    ]


def disable(inproc: InProcessDaemon, key: dict[str, Any]) -> None:
    inproc.api("POST", f"/api/keys/{key['id']}/disable")


def delete(inproc: InProcessDaemon, key: dict[str, Any]) -> None:
    inproc.api("DELETE", f"/api/keys/{key['id']}")


def limit_below_usage(inproc: InProcessDaemon, key: dict[str, Any]) -> None:
    inproc.kernel.add_traffic(key["port"], rx=5000)
    inproc.api("PATCH", f"/api/keys/{key['id']}", json={"data_limit_bytes": 4000})


def expire_now(inproc: InProcessDaemon, key: dict[str, Any]) -> None:
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    inproc.api("PATCH", f"/api/keys/{key['id']}", json={"expire_at": past})


@pytest.mark.parametrize(
    ("operation", "reason"),
    [
        (disable, "disabled"),
        (delete, "deleted"),
        (limit_below_usage, "limited"),
        (expire_now, "expired"),
    ],
)
def test_an_operation_that_stops_a_key_closes_its_connections(
    inproc: InProcessDaemon,
    operation: Callable[[InProcessDaemon, dict[str, Any]], None],
    reason: str,
) -> None:
    key = connected(inproc, f"stopped-{reason}")
    with capture_logs() as logged:
        operation(inproc, key)
    assert inproc.rig.host.closed == [key["port"]]
    assert closings(logged) == [(key["id"], key["port"], CONNECTIONS, reason)]


def test_a_quota_that_ran_out_closes_connections_at_the_poll(inproc: InProcessDaemon) -> None:
    key = connected(inproc, "capped", data_limit_bytes=3000)
    inproc.kernel.add_traffic(key["port"], rx=2000)
    inproc.poll()
    assert inproc.rig.host.closed == []
    inproc.kernel.add_traffic(key["port"], rx=2000)  # the kernel drops what passes the limit
    with capture_logs() as logged:
        inproc.poll()
    assert inproc.traffic(key["id"])["status"] == "limited"
    assert closings(logged) == [(key["id"], key["port"], CONNECTIONS, "limited")]


def test_expiry_noticed_at_the_poll_closes_connections(inproc: InProcessDaemon) -> None:
    expire = datetime.now(UTC) + timedelta(seconds=1)
    key = connected(inproc, "ephemeral", expire_at=expire.isoformat())
    inproc.poll()
    assert inproc.rig.host.closed == []
    while datetime.now(UTC) < expire:
        time.sleep(0.05)
    with capture_logs() as logged:
        inproc.poll()
    assert closings(logged) == [(key["id"], key["port"], CONNECTIONS, "expired")]


def test_an_active_key_keeps_its_connections(inproc: InProcessDaemon) -> None:
    key = connected(inproc, "busy", data_limit_bytes=10**9)
    other = connected(inproc, "neighbour")
    at = f"/api/keys/{key['id']}"
    inproc.api("PATCH", at, json={"note": "a new note"})
    inproc.api("PATCH", at, json={"data_limit_bytes": 2 * 10**9})
    inproc.kernel.add_traffic(key["port"], rx=100_000, tx=100_000)
    inproc.poll()
    inproc.api("POST", f"{at}/traffic/port/reset")
    inproc.api("POST", f"{at}/enable")
    disable(inproc, other)
    inproc.poll()
    assert inproc.rig.host.closed == [other["port"]]
    assert inproc.rig.host.connections == {key["port"]: CONNECTIONS}


def test_a_change_of_a_stopped_key_does_not_close_again(inproc: InProcessDaemon) -> None:
    key = connected(inproc, "off", enabled=False)
    inproc.api("PATCH", f"/api/keys/{key['id']}", json={"note": "still off"})
    inproc.poll()
    assert inproc.rig.host.closed == []


def test_an_undone_disable_closes_nothing(inproc: InProcessDaemon) -> None:
    key = connected(inproc, "kept")
    inproc.kernel.refuse[("enforce", key["port"])] = OverflowError("refused for the test")
    inproc.api("POST", f"/api/keys/{key['id']}/disable", expect=503)
    inproc.kernel.refuse.clear()
    inproc.poll()
    inproc.api("PATCH", f"/api/keys/{key['id']}", json={"note": "touched"})
    inproc.poll()
    assert inproc.traffic(key["id"])["status"] == "active"
    assert inproc.rig.host.closed == []


def test_a_failure_to_close_is_logged_and_the_disable_stands(inproc: InProcessDaemon) -> None:
    key = connected(inproc, "stuck")
    inproc.rig.host.refuse_close = PermissionError(1, "Operation not permitted")
    with capture_logs() as logged:
        shown = inproc.api("POST", f"/api/keys/{key['id']}/disable")
    assert shown["status"] == "disabled"
    assert inproc.saved_state()["keys"][key["id"]]["status"] == "disabled"
    (failed,) = [event for event in logged if event["event"] == "connections_close_failed"]
    assert (failed["log_level"], failed["port"], failed["reason"]) == (
        "warning",
        key["port"],
        "disabled",
    )
    assert "Operation not permitted" in failed["error"]


# --- kernel: a long transfer through a key's port -------------------------------------------


class Download:
    """A long TCP download through a key's port: a server in the daemon's namespace (listening
    as the proxy does) sends without end to a client in the client namespace. `ended` is what
    ended the client's side: "reset", "eof" or "timeout"."""

    def __init__(self, net: Lab, port: int, family: int, address: str) -> None:
        self.listener = net.tcp(net.server, family)
        self.listener.bind((address, port))
        self.listener.listen()
        self.client = net.tcp(net.client, family)
        self.client.connect((address, port))
        self.server, _ = self.listener.accept()
        self.received = 0
        self.ended: str | None = None
        self._threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._receive, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _send(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.server.sendall(CHUNK)

    def _receive(self) -> None:
        try:
            while chunk := self.client.recv(65536):
                self.received += len(chunk)
            self.ended = "eof"
        except ConnectionResetError:
            self.ended = "reset"
        except TimeoutError:
            self.ended = "timeout"
        except OSError:  # closed by the test
            self.ended = "closed"

    def close(self) -> None:
        for sock in (self.client, self.server, self.listener):
            sock.close()
        for thread in self._threads:
            thread.join(15)


@contextlib.contextmanager
def downloads(net: Lab, port: int) -> Iterator[list[Download]]:
    """One download over IPv4 and one over IPv6, both flowing before the test goes on."""
    made: list[Download] = []
    try:
        for family, address in ((socket.AF_INET, SERVER_V4), (socket.AF_INET6, SERVER_V6)):
            made.append(Download(net, port, family, address))
        wait_for(lambda: all(d.received > 1_000_000 for d in made), 5, "both downloads flowing")
        yield made
    finally:
        for download in made:
            download.close()


def established(net: Lab, port: int) -> list[str]:
    """`ss`'s established TCP sockets on this local port in the server namespace."""
    shown = sh(
        "ip",
        "netns",
        "exec",
        net.server,
        "ss",
        "-tnH",
        "state",
        "established",
        f"( sport = :{port} )",
    )
    return shown.stdout.splitlines()


def listening(net: Lab, port: int) -> int:
    shown = sh("ip", "netns", "exec", net.server, "ss", "-tlnH", f"( sport = :{port} )")
    return len(shown.stdout.splitlines())


def assert_closed_both_ends(net: Lab, port: int, made: list[Download], within: float) -> None:
    """The server's sockets are gone within `within` seconds and each client saw its connection
    end (reset or EOF), not stall until a timeout; the proxy's listener stays."""
    wait_for(lambda: not established(net, port), within, f"no established socket on {port}")
    wait_for(lambda: all(d.ended is not None for d in made), 5, "the clients' side to end")
    assert [d.ended in ("reset", "eof") for d in made] == [True, True], [d.ended for d in made]
    assert listening(net, port) == 2


def test_disable_closes_a_running_download(net: Lab, daemon: Daemon) -> None:
    key = daemon.create("streamer")
    with downloads(net, key["port"]) as made:
        assert len(established(net, key["port"])) == 2
        daemon.api("POST", f"/api/keys/{key['id']}/disable")
        assert_closed_both_ends(net, key["port"], made, within=0.5)
    assert "event=connections_closed" in daemon.log() or "connections_closed" in daemon.log()


def test_a_limit_reached_mid_download_closes_it_at_the_poll(net: Lab, daemon: Daemon) -> None:
    key = daemon.create("capped-stream", data_limit_bytes=50_000_000)
    with downloads(net, key["port"]) as made:
        assert_closed_both_ends(net, key["port"], made, within=2.5)  # 1 s poll interval
    t = daemon.traffic(key["id"])
    assert t["status"] == "limited"
    assert all(d.received > 1_000_000 for d in made)


def test_expiry_closes_a_running_download(net: Lab, daemon: Daemon) -> None:
    expire = datetime.now(UTC) + timedelta(seconds=4)
    key = daemon.create("expiring-stream", expire_at=expire.isoformat())
    with downloads(net, key["port"]) as made:
        assert datetime.now(UTC) < expire
        assert len(established(net, key["port"])) == 2
        while datetime.now(UTC) < expire:
            time.sleep(0.05)
        assert_closed_both_ends(net, key["port"], made, within=2.5)
    assert daemon.traffic(key["id"])["status"] == "expired"


def test_delete_closes_a_running_download(net: Lab, daemon: Daemon) -> None:
    key = daemon.create("deleted-stream")
    with downloads(net, key["port"]) as made:
        daemon.api("DELETE", f"/api/keys/{key['id']}")
        assert_closed_both_ends(net, key["port"], made, within=0.5)
