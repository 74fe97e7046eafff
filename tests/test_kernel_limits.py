"""Speed, connection and device limits in the kernel, with real traffic (README "Speed, connection
and device limits"): iperf3 through a limited key in both directions, UDP offered above the limit,
concurrent TCP connections, client addresses within the window, and all of it after kill -9 and
`nft flush ruleset`. The API and bad input are tests/test_kernel_limits_api.py.

Throughput is the receiver's figure over 4 s after iperf3 omits the first second (`-O 1`): a
limit's bucket holds one second of its rate, which a fresh transfer may take at once (README).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.netlab import CLIENT_V4, SERVER_V4, Lab, iperf_client, make_socket, sh, wait_for

SECONDS = 4
WINDOW = 3
EXTRA_CLIENTS = ("198.18.0.3", "198.18.0.4")


@contextlib.contextmanager
def iperf_server(net: Lab, port: int) -> Iterator[None]:
    """iperf3 listening on `port` in the server namespace, stopped afterwards."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", net.server, "iperf3", "-s", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _listening(net, port), what=f"iperf3 on port {port}")
        yield
    finally:
        server.terminate()
        server.wait(10)


def _listening(net: Lab, port: int) -> bool:
    out = sh("ip", "netns", "exec", net.server, "ss", "-Htln", f"sport = :{port}").stdout
    return bool(out.strip())


def iperf_start(net: Lab, port: int, seconds: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        iperf_client(net, port, seconds, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def iperf_result(run: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, f"iperf3 failed: {out[-500:]} {err[-500:]}"
    return dict(json.loads(out))


def mbit(result: dict[str, Any]) -> float:
    """The receiver's throughput, Mbit/s."""
    return float(result["end"]["sum_received"]["bits_per_second"]) / 1e6


@pytest.fixture
def daemon(make_daemon: Any) -> Daemon:
    made: Daemon = make_daemon(PORTMETER_IP_WINDOW=str(WINDOW))
    return made


@pytest.mark.parametrize("direction", [(), ("-R",)], ids=["rx", "tx"])
def test_tcp_holds_the_speed_and_leaves_other_keys_alone(
    net: Lab, daemon: Daemon, direction: tuple[str, ...]
) -> None:
    limited = daemon.create("slow", speed_limit_bps="20Mbit")
    free = daemon.create("fast")
    with iperf_server(net, limited["port"]), iperf_server(net, free["port"]):
        slow = iperf_start(net, limited["port"], SECONDS, "-O", "1", *direction)
        fast = iperf_start(net, free["port"], SECONDS, "-O", "1", *direction)
        slow_mbit, fast_mbit = mbit(iperf_result(slow)), mbit(iperf_result(fast))
    assert 16.0 <= slow_mbit <= 21.0, slow_mbit  # 80-105 % of 20 Mbit/s
    assert fast_mbit > 25 * 20, fast_mbit  # the unlimited key is not held anywhere near it


def test_a_changed_speed_applies_to_the_running_transfer(net: Lab, daemon: Daemon) -> None:
    key = daemon.create("changing", speed_limit_bps="20Mbit")
    with iperf_server(net, key["port"]):
        run = iperf_start(net, key["port"], 11, "-R", "-i", "1")
        time.sleep(4)
        daemon.api("PATCH", f"/api/keys/{key['id']}", json={"speed_limit_bps": "10Mbit"})
        intervals = [i["sum"]["bits_per_second"] / 1e6 for i in iperf_result(run)["intervals"]]
    before = sum(intervals[1:4]) / 3  # seconds 1-4, at 20 Mbit/s
    after = sum(intervals[7:11]) / 4  # seconds 7-11: the new limit, its first bucket long spent
    assert 16.0 <= before <= 21.0, intervals
    assert 8.0 <= after <= 10.5, intervals


def test_udp_above_the_limit_arrives_at_the_limit(net: Lab, daemon: Daemon) -> None:
    key = daemon.create("udp", speed_limit_bps="10Mbit")
    with iperf_server(net, key["port"]):
        result = iperf_result(iperf_start(net, key["port"], SECONDS, "-O", "1", "-u", "-b", "50M"))
    assert 9.0 <= mbit(result) <= 11.0, mbit(result)


class Pair:
    """Both ends of one TCP connection: closing it closes both, as a finished session does."""

    def __init__(self, client: socket.socket, served: socket.socket) -> None:
        self.ends = (client, served)

    def close(self) -> None:
        for end in self.ends:
            end.close()


class Server:
    """A TCP listener on a key's port in the server namespace."""

    def __init__(self, net: Lab, port: int) -> None:
        self.net = net
        self.port = port
        self.listener = net.tcp(net.server)
        self.listener.bind((SERVER_V4, port))
        self.listener.listen(64)

    def connect(self, source: str = CLIENT_V4) -> Pair:
        """A connection from `source`, accepted; ConnectionRefusedError when the kernel resets
        it."""
        client = make_socket(self.net.client, socket.AF_INET, socket.SOCK_STREAM)
        client.settimeout(5)
        client.bind((source, 0))
        try:
            client.connect((SERVER_V4, self.port))
        except OSError:
            client.close()
            raise
        served, _ = self.listener.accept()
        return Pair(client, served)

    def close(self) -> None:
        self.listener.close()


def established(net: Lab, port: int) -> int:
    out = sh(
        "ip", "netns", "exec", net.server, "ss", "-Htn", "state", "established", f"sport = :{port}"
    ).stdout
    return len(out.splitlines())


def test_max_connections_resets_the_one_too_many(net: Lab, daemon: Daemon) -> None:
    key = daemon.create("three", max_connections=3)
    server = Server(net, key["port"])
    clients: list[Pair] = []
    try:
        clients = [server.connect() for _ in range(3)]
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            server.connect()
        assert time.monotonic() - started < 1  # a reset at once, not a timeout
        assert established(net, key["port"]) == 3
        clients.pop().close()
        time.sleep(0.3)
        clients.append(server.connect())
        assert established(net, key["port"]) == 3
        wait_for(
            lambda: daemon.api("GET", f"/api/keys/{key['id']}")["refused_connections"] == 1,
            what="refused_connections 1",
        )
    finally:
        for client in clients:
            client.close()
        server.close()
    assert "connection_refused" in daemon.log()


@pytest.fixture
def more_clients(net: Lab) -> Lab:
    client_dev = sh("ip", "-n", net.client, "-o", "link", "show", "type", "veth").stdout
    device = client_dev.split(":")[1].strip().split("@")[0]
    for address in EXTRA_CLIENTS:
        sh("ip", "-n", net.client, "addr", "add", f"{address}/24", "dev", device)
    return net


def test_max_ips_refuses_a_third_address_until_the_window_frees_a_place(
    more_clients: Lab, daemon: Daemon
) -> None:
    net = more_clients
    key = daemon.create("two-devices", max_ips=2)
    server = Server(net, key["port"])
    first, second, third = CLIENT_V4, *EXTRA_CLIENTS
    udp = net.udp(net.server)
    udp.bind((SERVER_V4, key["port"]))
    udp.settimeout(0.5)
    try:
        server.connect(first).close()
        server.connect(second).close()
        with pytest.raises(ConnectionRefusedError):
            server.connect(third)
        server.connect(first).close()  # the known ones keep working
        assert _datagram(net, udp, second) and not _datagram(net, udp, third)
        shown = daemon.api("GET", f"/api/keys/{key['id']}")
        assert sorted(seen["address"] for seen in shown["client_ips"]) == [first, second]
        quiet_since = time.monotonic()
        wait_for(lambda: _gets_in(server, third), timeout=WINDOW + 4, what="a freed place")
        assert time.monotonic() - quiet_since >= WINDOW - 1
    finally:
        udp.close()
        server.close()
    assert "ip_limit_reached" in daemon.log()


def _datagram(net: Lab, receiver: socket.socket, source: str) -> bool:
    """Whether a datagram from `source` arrives at the key's port."""
    sender = net.udp(net.client)
    try:
        sender.bind((source, 0))
        sender.sendto(b"x", receiver.getsockname())
        receiver.recv(16)
        return True
    except TimeoutError:
        return False
    finally:
        sender.close()


def _gets_in(server: Server, source: str) -> bool:
    try:
        server.connect(source).close()
    except ConnectionRefusedError:
        return False
    return True


def test_limits_survive_kill9_and_a_flushed_ruleset(net: Lab, daemon: Daemon) -> None:
    key = daemon.create("stubborn", speed_limit_bps="20Mbit", max_connections=1, max_ips=2)
    port = key["port"]
    expected = {f"chain g_{port}_1_2_{WINDOW}", f"limit sr_{port}", f"limit st_{port}"}
    for flush in (False, True):
        daemon.kill9()
        if flush:
            net.nft("flush", "ruleset")
        daemon.start()
        wait_for(lambda: expected <= _listed(net, daemon), what="guards rebuilt")
        assert (
            "rate over 2500000 bytes/second"
            in net.nft("list", "limit", "inet", daemon.table, f"sr_{port}").stdout
        )
        server = Server(net, port)
        try:
            held = server.connect()
            with pytest.raises(ConnectionRefusedError):
                server.connect()
            held.close()
        finally:
            server.close()


def _listed(net: Lab, daemon: Daemon) -> set[str]:
    out = net.nft("list", "table", "inet", daemon.table, check=False).stdout
    return {line.strip().rstrip("{").strip() for line in out.splitlines()}
