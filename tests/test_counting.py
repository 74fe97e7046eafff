"""Exact counting of real traffic by the real daemon, in its own network namespaces.

Counting contract (README, "What is counted"): layer-3 bytes at the hook. A UDP datagram with
payload P is P+28 bytes over IPv4 and P+48 over IPv6, one packet each.
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import Daemon
from tests.netlab import CLIENT_V4, SERVER_V4, SERVER_V6, Lab, wait_for

pytestmark = pytest.mark.kernel

UDP_OVERHEAD = {socket.AF_INET: 28, socket.AF_INET6: 48}
SERVER_ADDR = {socket.AF_INET: SERVER_V4, socket.AF_INET6: SERVER_V6}


def udp_exchange(net: Lab, family: int, port: int, count: int, payload: int, echo: bool) -> None:
    """`count` datagrams client -> server:port, each answered by one of the same size if `echo`."""
    server = net.udp(net.server, family)
    server.bind((SERVER_ADDR[family], port))
    client = net.udp(net.client, family)
    try:
        for i in range(count):
            client.sendto(bytes([i % 256]) * payload, (SERVER_ADDR[family], port))
            data, peer = server.recvfrom(65536)
            assert len(data) == payload
            if echo:
                server.sendto(data, peer)
                assert len(client.recv(65536)) == payload
    finally:
        server.close()
        client.close()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_udp_counts_exact_bytes_and_packets_per_key(net: Lab, daemon: Daemon, family: int) -> None:
    alice = daemon.create("alice")
    bob = daemon.create("bob")
    count, payload = 37, 700
    udp_exchange(net, family, alice["port"], count, payload, echo=True)
    # Traffic to a port outside the range must not be counted for anyone.
    udp_exchange(net, family, daemon.port_range[1] + 7, 5, payload, echo=True)

    wire = payload + UDP_OVERHEAD[family]
    a = daemon.traffic(alice["id"])
    assert (a["rx_bytes"], a["rx_packets"]) == (count * wire, count)
    assert (a["tx_bytes"], a["tx_packets"]) == (count * wire, count)
    assert a["total_bytes"] == 2 * count * wire
    b = daemon.traffic(bob["uuid"])
    assert (b["rx_bytes"], b["tx_bytes"], b["rx_packets"], b["tx_packets"]) == (0, 0, 0, 0)


def test_rx_and_tx_are_separate_directions(net: Lab, daemon: Daemon) -> None:
    key = daemon.create("oneway")
    udp_exchange(net, socket.AF_INET, key["port"], 10, 1000, echo=False)
    t = daemon.traffic(key["name"])
    assert (t["rx_bytes"], t["rx_packets"], t["tx_bytes"], t["tx_packets"]) == (10 * 1028, 10, 0, 0)


def tcp_transfer(net: Lab, port: int, upload: int, download: int) -> None:
    """Client uploads `upload` bytes to server:port, then downloads `download` bytes."""
    listener = net.tcp(net.server)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((SERVER_V4, port))
    listener.listen()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                received = 0
                while received < upload:
                    chunk = conn.recv(65536)
                    assert chunk
                    received += len(chunk)
                conn.sendall(b"d" * download)
                conn.shutdown(socket.SHUT_WR)
                conn.recv(1)
        except BaseException as exc:  # noqa: BLE001 - any failure is surfaced in the test thread
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    client = net.tcp(net.client)
    try:
        client.connect((SERVER_V4, port))
        client.sendall(b"u" * upload)
        got = 0
        while chunk := client.recv(65536):
            got += len(chunk)
        assert got == download
    finally:
        client.close()
        thread.join(10)
        listener.close()
    assert not errors, errors


def test_tcp_transfer_counted_in_the_right_direction(net: Lab, daemon: Daemon) -> None:
    key = daemon.create("tcp")
    upload, download = 3_000_000, 1_500_000
    tcp_transfer(net, key["port"], upload, download)
    t = daemon.traffic(key["id"])
    # Every IPv4 TCP packet carries 20 bytes of IP header and 20-60 bytes of TCP header.
    for direction, payload in (("rx", upload), ("tx", download)):
        packets = t[f"{direction}_packets"]
        headers = t[f"{direction}_bytes"] - payload
        assert 40 * packets <= headers <= 80 * packets, (direction, t)
    assert t["connections"] == 0


def test_established_connections_are_reported(net: Lab, daemon: Daemon) -> None:
    key = daemon.create("conns")
    listener = net.tcp(net.server)
    listener.bind((SERVER_V4, key["port"]))
    listener.listen()
    clients = [net.tcp(net.client) for _ in range(3)]
    try:
        for c in clients:
            c.connect((SERVER_V4, key["port"]))
        accepted = [listener.accept()[0] for _ in clients]
        # Counted at each poll (README "API"): within one poll interval.
        wait_for(lambda: daemon.traffic(key["id"])["connections"] == 3, 5, "a poll's count")
        everything = daemon.api("GET", "/api/traffic/ports/exact")
        assert everything["ports_traffic"]["total_connections"] == 3
        for conn in accepted:
            conn.close()
    finally:
        for c in clients:
            c.close()
        listener.close()
    assert CLIENT_V4 != SERVER_V4


def test_all_ports_endpoint_matches_per_key_numbers(net: Lab, daemon: Daemon) -> None:
    keys = [daemon.create(f"k{i}") for i in range(3)]
    for i, key in enumerate(keys):
        udp_exchange(net, socket.AF_INET, key["port"], i + 1, 100 * (i + 1), echo=False)
    everything = daemon.api("GET", "/api/traffic/ports/exact")
    table = everything["ports_traffic"]
    assert table["total_ports"] == 3
    expected_total = 0
    for i, key in enumerate(keys):
        entry = table["ports_traffic"][key["uuid"]]
        assert entry["port"] == key["port"] and entry["key_name"] == key["name"]
        expected = (i + 1) * (100 * (i + 1) + 28)
        assert entry["traffic"]["rx_bytes"] == expected
        expected_total += expected
    assert table["total_traffic"] == expected_total
    assert everything["source"] == "nftables"
    summary = daemon.api("GET", "/api/system/traffic/summary")
    assert summary["rx_bytes"] == expected_total and summary["tx_bytes"] == 0
    assert summary["total_interface_traffic"] > 0


def test_traffic_pages_are_exact_ordered_by_port_and_refuse_bad_bounds(
    net: Lab, daemon: Daemon
) -> None:
    keys = sorted((daemon.create(f"page{i}") for i in range(5)), key=lambda k: k["port"])
    for i, key in enumerate(keys):
        udp_exchange(net, socket.AF_INET, key["port"], i + 1, 60, echo=False)
    page = daemon.api("GET", "/api/traffic/ports/exact?limit=2&offset=1")["ports_traffic"]
    assert (page["total_ports"], page["total_keys"], page["offset"], page["limit"]) == (2, 5, 1, 2)
    listed = list(page["ports_traffic"].values())
    assert [entry["port"] for entry in listed] == [keys[1]["port"], keys[2]["port"]]
    rx = [entry["traffic"]["rx_bytes"] for entry in listed]
    assert rx == [2 * 88, 3 * 88]  # read at request time
    assert page["total_traffic"] == 5 * 88
    beyond = daemon.api("GET", "/api/traffic/ports/exact?offset=5")["ports_traffic"]
    assert beyond["total_ports"] == 0 and beyond["total_keys"] == 5
    for query in ("limit=0", "offset=-1", "limit=abc", "limit=10001"):
        refused = daemon.http.get(f"/api/traffic/ports/exact?{query}")
        assert refused.status_code == 422 and refused.json()["detail"], query


def test_concurrent_answers_for_every_key_are_shared_yet_exact(net: Lab, daemon: Daemon) -> None:
    """Requests that wait for one reading share its answer (daemon/http/shared.py); one that
    arrives after bytes were sent never gets an answer read before them."""
    key = daemon.create("shared")
    path = "/api/traffic/ports/exact"
    for round_ in range(1, 4):
        udp_exchange(net, socket.AF_INET, key["port"], 5, 100, echo=False)
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: daemon.api("GET", path), range(8)))
        for answer in answers:
            traffic = answer["ports_traffic"]["ports_traffic"][key["uuid"]]["traffic"]
            assert traffic["rx_bytes"] == round_ * 5 * 128  # 100 B payload + 28 B headers
