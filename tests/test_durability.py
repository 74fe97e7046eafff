"""No byte lost, none doubled: crashes, table loss, clean stops, damaged state, leftovers."""

from __future__ import annotations

import socket
import time

import pytest

from tests.conftest import Daemon
from tests.netlab import Lab, wait_for
from tests.test_counting import udp_exchange

pytestmark = pytest.mark.kernel
WIRE = 500 + 28  # one IPv4 datagram of 500 payload bytes


def send(net: Lab, port: int, count: int) -> None:
    udp_exchange(net, socket.AF_INET, port, count, 500, echo=True)


def test_kill9_loses_nothing_and_doubles_nothing(net: Lab, daemon: Daemon) -> None:
    key = daemon.create("crashy")
    send(net, key["port"], 10)
    assert daemon.traffic(key["id"])["rx_bytes"] == 10 * WIRE  # persisted by the next poll
    time.sleep(1.5)
    daemon.kill9()
    send(net, key["port"], 7)  # counted by the kernel while the daemon is down
    daemon.start()
    t = daemon.traffic(key["id"])
    assert (t["rx_bytes"], t["tx_bytes"]) == (17 * WIRE, 17 * WIRE)
    assert (t["rx_packets"], t["tx_packets"]) == (17, 17)
    daemon.kill9()  # again, right after a read, before any poll
    daemon.start()
    assert daemon.traffic(key["id"])["rx_bytes"] == 17 * WIRE


def test_clean_stop_exits_zero_and_writes_final_totals(net: Lab, daemon: Daemon) -> None:
    key = daemon.create("graceful")
    send(net, key["port"], 4)
    assert daemon.stop() == 0
    saved = daemon.saved_state()
    record = saved["keys"][key["id"]]
    assert (record["rx"]["bytes"], record["tx"]["bytes"]) == (4 * WIRE, 4 * WIRE)
    assert "daemon_stopped" in daemon.log()
    assert not daemon.socket.exists()


def test_deleted_table_is_rebuilt_within_a_poll_and_totals_never_drop(
    net: Lab, daemon: Daemon
) -> None:
    key = daemon.create("flushed")
    send(net, key["port"], 5)
    before = daemon.traffic(key["id"])["rx_bytes"]
    assert before == 5 * WIRE
    net.nft("delete", "table", "inet", daemon.table)
    wait_for(
        lambda: net.nft("list", "table", "inet", daemon.table, check=False).returncode == 0,
        timeout=3,
        what="table rebuilt",
    )
    assert "event=table_missing" in daemon.log()
    send(net, key["port"], 3)
    t = daemon.traffic(key["id"])
    assert (t["rx_bytes"], t["tx_bytes"]) == (8 * WIRE, 8 * WIRE)
    status = daemon.api("GET", "/api/system/ports/status")
    assert status["valid"], status


def test_flush_ruleset_while_daemon_is_down(net: Lab, daemon: Daemon) -> None:
    key = daemon.create("rebooted")
    send(net, key["port"], 6)
    time.sleep(1.5)  # one poll persists the reading
    daemon.kill9()
    net.nft("flush", "ruleset")  # what a reboot does to the table
    daemon.start()
    send(net, key["port"], 2)
    t = daemon.traffic(key["id"])
    assert (t["rx_bytes"], t["rx_packets"]) == (8 * WIRE, 8)


def test_reset_zeroes_exactly_and_counting_resumes(net: Lab, daemon: Daemon) -> None:
    key, other = daemon.create("reset-me"), daemon.create("keep-me")
    send(net, key["port"], 5)
    send(net, other["port"], 2)
    reset = daemon.api("POST", f"/api/keys/{key['id']}/traffic/port/reset")
    assert (reset["rx_bytes"], reset["tx_bytes"], reset["total_bytes"]) == (0, 0, 0)
    assert daemon.traffic(key["id"])["total_bytes"] == 0
    send(net, key["port"], 3)
    assert daemon.traffic(key["id"])["rx_bytes"] == 3 * WIRE
    assert daemon.traffic(other["id"])["rx_bytes"] == 2 * WIRE
    daemon.kill9()
    daemon.start()
    assert daemon.traffic(key["id"])["rx_bytes"] == 3 * WIRE


def test_deleted_key_leaves_nothing_and_its_port_is_reused(net: Lab, daemon: Daemon) -> None:
    key = daemon.create("gone")
    send(net, key["port"], 2)
    deleted = daemon.api("DELETE", f"/api/keys/{key['id']}")
    assert deleted["rx_bytes"] == 2 * WIRE
    daemon.api("GET", f"/api/keys/{key['id']}", expect=404)
    ruleset = net.nft("list", "table", "inet", daemon.table).stdout
    assert f"rx_{key['port']}" not in ruleset and f"{key['port']} :" not in ruleset
    again = daemon.create("new")
    assert again["port"] == key["port"]
    assert daemon.traffic(again["id"])["total_bytes"] == 0


def test_damaged_state_file_refuses_start_and_is_left_untouched(net: Lab, daemon: Daemon) -> None:
    daemon.create("precious")
    assert daemon.stop() == 0
    damaged = daemon.state_file.read_bytes()[:-40]
    daemon.state_file.write_bytes(damaged)
    daemon.start(wait=False)
    assert daemon.process is not None
    assert daemon.process.wait(15) != 0
    lines = [line for line in daemon.log().splitlines() if line.startswith("portmeter:")]
    assert len(lines) == 1 and str(daemon.state_file) in lines[0] and "untouched" in lines[0]
    assert daemon.state_file.read_bytes() == damaged


def test_leftover_counters_from_a_crash_are_removed_at_start(net: Lab, daemon: Daemon) -> None:
    key = daemon.create("real")
    daemon.kill9()
    orphan = daemon.port_range[1]
    # What a crash between installing counters and saving the state leaves behind.
    for direction in ("rx", "tx"):
        net.nft("add", "counter", "inet", daemon.table, f"{direction}_{orphan}")
        net.nft(
            "add",
            "element",
            "inet",
            daemon.table,
            direction,
            f'{{ {orphan} : "{direction}_{orphan}" }}',
        )
    daemon.start()
    assert "event=orphan_counters_removed" in daemon.log()
    assert f"rx_{orphan}" not in net.nft("list", "table", "inet", daemon.table).stdout
    assert daemon.api("GET", "/api/system/ports/status")["valid"]
    assert daemon.traffic(key["id"])["total_bytes"] == 0


def test_port_held_by_another_process_is_skipped(net: Lab, daemon: Daemon) -> None:
    first = daemon.port_range[0]
    squatter = net.tcp(net.server)
    squatter.bind(("0.0.0.0", first))
    squatter.listen()
    try:
        assert daemon.create("polite")["port"] == first + 1
        taken = daemon.api("POST", "/api/keys", expect=409, json={"name": "pushy", "port": first})
        assert "in use by another process" in taken["detail"]
    finally:
        squatter.close()


def test_udp_and_ipv6_ports_held_by_others_are_skipped(net: Lab, daemon: Daemon) -> None:
    """The kernel-filtered look at bound ports sees UDP and IPv6 sockets, not only TCP v4."""
    first = daemon.port_range[0]
    tcp6 = net.tcp(net.server, family=socket.AF_INET6)
    udp4 = net.udp(net.server)
    udp6 = net.udp(net.server, family=socket.AF_INET6)
    try:
        tcp6.bind(("::", first))
        tcp6.listen()
        udp4.bind(("0.0.0.0", first + 1))
        udp6.bind(("::", first + 2))
        assert daemon.create("after-squatters")["port"] == first + 3
    finally:
        for held in (tcp6, udp4, udp6):
            held.close()


def test_capacity_is_the_range_size_then_409(make_daemon) -> None:  # type: ignore[no-untyped-def]
    daemon = make_daemon(size=5)
    ports = {daemon.create(f"k{i}")["port"] for i in range(5)}
    assert ports == set(range(daemon.port_range[0], daemon.port_range[1] + 1))
    full = daemon.api("POST", "/api/keys", expect=409, json={"name": "one-too-many"})
    assert "no free port" in full["detail"]
    assert daemon.api("GET", "/api/system/ports")["available_ports"] == 0


def test_systemd_notify_ready_watchdog_stopping(net: Lab, make_daemon, workdir) -> None:  # type: ignore[no-untyped-def]
    notify_path = workdir / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(10)
    try:
        daemon = make_daemon(start=False, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="400000")
        daemon.start()
        messages = [listener.recv(4096).decode() for _ in range(3)]
        assert any(m.startswith("READY=1") for m in messages), messages
        assert "WATCHDOG=1" in messages
        assert daemon.stop() == 0
        seen = []
        while not any("STOPPING=1" in m for m in seen):
            seen.append(listener.recv(4096).decode())
    finally:
        listener.close()
