"""Faults real servers meet: a full disk, damaged state files, oversized requests, and secrets."""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.netlab import Lab
from tests.test_counting import udp_exchange

pytestmark = pytest.mark.kernel
WIRE = 300 + 28


def send(net: Lab, port: int, count: int) -> None:
    udp_exchange(net, socket.AF_INET, port, count, 300, echo=False)


def test_disk_full_is_507_keeps_state_valid_and_catches_up(net: Lab, make_daemon: Any) -> None:
    daemon: Daemon = make_daemon(start=False)
    daemon.state_dir.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(daemon.state_dir)], check=True
    )
    try:
        daemon.start()
        key = daemon.create("before-full")
        send(net, key["port"], 5)
        assert daemon.traffic(key["id"])["rx_bytes"] == 5 * WIRE
        filler = daemon.state_dir / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # fill the file system to the last block
        try:
            while True:
                os.write(fd, b"\0" * 512)
        except OSError:
            pass
        finally:
            os.close(fd)
        saved = daemon.state_bytes()
        refused = daemon.http.post("/api/keys", json={"name": "no-room"})
        assert refused.status_code == 507, refused.text
        assert "No space left on device" in refused.json()["detail"]
        assert daemon.state_bytes() == saved
        daemon.saved_state()  # and what is there still loads
        assert not list(daemon.state_dir.glob(".*.tmp"))
        send(net, key["port"], 4)  # the kernel keeps counting meanwhile
        assert daemon.traffic(key["id"])["rx_bytes"] == 9 * WIRE
        assert daemon.api("GET", "/api/keys")["total"] == 1
        filler.unlink()
        assert daemon.create("after-room")["name"] == "after-room"
        daemon.kill9()
        daemon.start()
        assert daemon.traffic(key["id"])["rx_bytes"] == 9 * WIRE
    finally:
        daemon.close()
        subprocess.run(["umount", "-l", str(daemon.state_dir)], check=False)


DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "garbage": lambda data: b"\x00\xff garbage \x13" * 10,
    "wrong schema": lambda data: data.replace(b'"schema_version": 1', b'"schema_version": 9'),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_state_refuses_start_then_check_and_restore(daemon: Daemon, kind: str) -> None:
    key = daemon.create("survivor")
    assert daemon.stop() == 0
    daemon.start()  # every start leaves a valid backup
    assert daemon.stop() == 0
    damaged = DAMAGE[kind](daemon.state_file.read_bytes())
    daemon.state_file.write_bytes(damaged)

    daemon.start(wait=False)
    assert daemon.process is not None and daemon.process.wait(15) != 0
    refusal = [line for line in daemon.log().splitlines() if line.startswith("portmeter:")]
    assert (
        len(refusal) == 1
        and str(daemon.state_file) in refusal[-1]
        and "state restore" in refusal[-1]
    )
    assert daemon.state_file.read_bytes() == damaged

    check = daemon.cli("state", "check", "--state-dir", str(daemon.state_dir))
    assert (
        check.returncode == 1
        and str(daemon.state_file) in check.stderr
        and "newest valid backup" in check.stderr
    )
    restore = daemon.cli("state", "restore", "--state-dir", str(daemon.state_dir))
    assert restore.returncode == 0, restore.stderr
    assert "restored" in restore.stdout and "previous file is kept" in restore.stdout
    assert daemon.cli("state", "check", "--state-dir", str(daemon.state_dir)).returncode == 0
    daemon.start()
    assert daemon.api("GET", f"/api/keys/{key['id']}")["name"] == "survivor"


def test_restore_refuses_while_the_daemon_runs(daemon: Daemon) -> None:
    result = daemon.cli("state", "restore", "--state-dir", str(daemon.state_dir))
    assert result.returncode == 1 and "stop it first" in result.stderr


def test_oversized_and_deep_bodies_are_refused(daemon: Daemon) -> None:
    big = daemon.http.post("/api/keys", content=b'{"name": "' + b"x" * 70_000 + b'"}')
    assert big.status_code == 413 and "larger than" in big.json()["detail"]
    deep = daemon.http.post("/api/keys", content=b"[" * 20 + b"]" * 20)
    assert deep.status_code == 400 and "deeper than" in deep.json()["detail"]
    assert daemon.api("GET", "/api/keys")["total"] == 0


def test_secrets_never_leave_the_state_file(daemon: Daemon) -> None:
    key = daemon.create("secretive")
    state = daemon.saved_state()
    private = state["reality_private_key"]
    assert private and oct(daemon.state_file.stat().st_mode & 0o777) == "0o600"
    answers = [
        daemon.http.get(path).text
        for path in (
            "/api/keys",
            f"/api/keys/{key['id']}",
            "/api/system/xray/config-status",
            "/api/traffic/ports/exact",
            "/api/system/xray/validate-sync",
            f"/api/keys/{key['id']}/link",
        )
    ]
    for text in [*answers, daemon.log()]:
        assert private not in text


def test_other_tables_are_never_touched(net: Lab, daemon: Daemon) -> None:
    net.nft("add", "table", "ip", "neighbour")
    net.nft("add", "counter", "ip", "neighbour", f"rx_{daemon.port_range[0]}")
    net.nft("add", "table", "inet", "alsomine")
    net.nft("add", "chain", "inet", "alsomine", "c", "{ type filter hook input priority 0; }")
    before = [
        net.nft("list", "table", f, t).stdout
        for f, t in (("ip", "neighbour"), ("inet", "alsomine"))
    ]
    key = daemon.create("k")
    daemon.api("POST", "/api/system/ports/reset")
    net.nft("delete", "table", "inet", daemon.table)
    daemon.api("GET", "/api/traffic/ports/exact")  # rebuilds our table
    daemon.api("DELETE", f"/api/keys/{key['id']}")
    after = [
        net.nft("list", "table", f, t).stdout
        for f, t in (("ip", "neighbour"), ("inet", "alsomine"))
    ]
    assert after == before


def test_mutating_calls_are_logged_with_the_callers_pid_and_uid(daemon: Daemon) -> None:
    daemon.create("audited")
    daemon.api("GET", "/api/keys")
    calls = [line for line in daemon.log().splitlines() if "event=api_call" in line]
    assert len(calls) == 1
    assert "method=POST path=/api/keys status=201" in calls[0]
    assert f'peer="pid={os.getpid()} uid=0"' in calls[0]
