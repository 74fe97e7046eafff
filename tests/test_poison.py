"""State poisoning, on the real daemon: a limit past what the kernel holds.

Before: `PATCH {"data_limit_bytes": "20000PB"}` answered 500 and left the key changed in memory;
the next save of any other key wrote it to the state journal; datagrams to the key's port ended
the poll loop; every restart failed (with a misleading "needs root or CAP_NET_ADMIN" for limits
between 2^63 and 2^64-1), each failed start wrote another backup of the poisoned state until the
good ones had rotated out, and `portmeter state check` called the file valid.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.bounds import MAX_KERNEL_QUOTA
from daemon.kernel import OutOfRange
from daemon.limits import Quota
from tests.conftest import REPO, Daemon
from tests.netlab import Lab, wait_for
from tests.test_counters_kernel import counters_in, run_in
from tests.test_counting import udp_exchange

pytestmark = pytest.mark.kernel
WIRE = 300 + 28
HUGE = {"20000PB": "20000PB", "2^64": 2**64, "2^63+5": 2**63 + 5}
GOOD_LIMIT = 10**9


def send(net: Lab, port: int, count: int) -> None:
    udp_exchange(net, socket.AF_INET, port, count, 300, echo=False)


def refusal_line(daemon: Daemon) -> str:
    lines = [line for line in daemon.log().splitlines() if line.startswith("portmeter:")]
    assert len(lines) == 1, daemon.log()
    return lines[0]


def failed_start(daemon: Daemon) -> None:
    daemon.start(wait=False)
    assert daemon.process is not None and daemon.process.wait(30) == 1, daemon.log()


@pytest.mark.parametrize("limit", list(HUGE.values()), ids=list(HUGE))
def test_a_huge_limit_is_refused_and_poisons_nothing(net: Lab, daemon: Daemon, limit: Any) -> None:
    alice = daemon.create("alice", data_limit_bytes=GOOD_LIMIT)
    bob = daemon.create("bob")
    shown = daemon.api("GET", f"/api/keys/{alice['id']}")
    saved = daemon.state_bytes()

    patched = daemon.http.patch(f"/api/keys/{alice['id']}", json={"data_limit_bytes": limit})
    assert patched.status_code == 422, patched.text
    assert patched.json()["detail"].startswith("data_limit_bytes")
    created = daemon.http.post("/api/keys", json={"name": "carol", "data_limit_bytes": limit})
    assert created.status_code == 422, created.text
    assert daemon.state_bytes() == saved
    assert daemon.api("GET", f"/api/keys/{alice['id']}") == shown

    # Another key's save must not carry a changed alice to disk.
    daemon.api("PATCH", f"/api/keys/{bob['id']}", json={"note": "saved after the attack"})
    on_disk = daemon.saved_state()["keys"]
    assert on_disk[alice["id"]]["data_limit_bytes"] == GOOD_LIMIT
    assert on_disk[bob["id"]]["note"] == "saved after the attack"

    # Datagrams to alice's port: the poll loop counts them and saves them by itself.
    send(net, alice["port"], 10)
    wait_for(lambda: daemon.saved_state()["keys"][alice["id"]]["rx"]["bytes"] == 10 * WIRE,
             what="the poll loop to save alice's traffic")
    assert daemon.process is not None and daemon.process.poll() is None
    every = daemon.api("GET", "/api/traffic/ports/exact")["ports_traffic"]["ports_traffic"]
    assert every[alice["uuid"]]["traffic"]["rx_bytes"] == 10 * WIRE
    assert every[alice["uuid"]]["error"] is None
    assert "Traceback" not in daemon.log() and "event=poll_failed" not in daemon.log()

    assert daemon.stop() == 0
    daemon.start()
    again = daemon.api("GET", f"/api/keys/{alice['id']}")
    assert (again["data_limit_bytes"], again["rx_bytes"]) == (GOOD_LIMIT, 10 * WIRE)
    assert again["error"] is None
    check = daemon.cli("state", "check", "--state-dir", str(daemon.state_dir))
    assert check.returncode == 0, check.stderr


def poison_snapshot(daemon: Daemon, key_id: str, limit: int) -> None:
    raw = json.loads(daemon.state_file.read_bytes())
    raw["keys"][key_id]["data_limit_bytes"] = limit
    daemon.state_file.write_text(json.dumps(raw, indent=1))


def poison_journal(daemon: Daemon, key_id: str, limit: int) -> None:
    """What the old daemon wrote: a journal record of another save, carrying the changed key."""
    raw = json.loads(daemon.state_file.read_bytes())
    key = {**raw["keys"][key_id], "data_limit_bytes": limit}
    record = {
        "generation": raw["generation"] + 1, "instance": raw["instance"],
        "table_handle": raw["table_handle"], "reality_private_key": raw["reality_private_key"],
        "keys": {key_id: key},
    }
    (daemon.state_dir / "state.journal").write_text(json.dumps(record) + "\n")


@pytest.mark.parametrize("where", ["snapshot", "journal"])
@pytest.mark.parametrize("limit", [2**64, 2**63 + 5], ids=["2^64", "2^63+5"])
def test_a_poisoned_state_is_refused_at_load_naming_file_key_and_field(
    daemon: Daemon, where: str, limit: int
) -> None:
    alice = daemon.create("alice", data_limit_bytes=GOOD_LIMIT)
    assert daemon.stop() == 0
    daemon.start()  # every start that succeeds leaves a backup
    assert daemon.stop() == 0
    (poison_snapshot if where == "snapshot" else poison_journal)(daemon, alice["id"], limit)
    poisoned = daemon.state_bytes()
    damaged = daemon.state_file if where == "snapshot" else daemon.state_dir / "state.journal"
    field = f"keys.{alice['id']}.data_limit_bytes: Input should be less than or equal to 10"

    check = daemon.cli("state", "check", "--state-dir", str(daemon.state_dir))
    assert check.returncode == 1 and check.stdout == ""
    assert len(check.stderr.splitlines()) == 1
    assert str(damaged) in check.stderr and field in check.stderr

    failed_start(daemon)
    line = refusal_line(daemon)
    assert str(damaged) in line and field in line
    assert "CAP_NET_ADMIN" not in line  # that remedy is only for EPERM / EACCES
    assert daemon.state_bytes() == poisoned  # a damaged file is never overwritten

    restore = daemon.cli("state", "restore", "--state-dir", str(daemon.state_dir))
    assert restore.returncode == 0, restore.stderr
    daemon.start()
    restored = daemon.api("GET", f"/api/keys/{alice['id']}")
    assert (restored["data_limit_bytes"], restored["error"]) == (GOOD_LIMIT, None)


def test_ten_failed_starts_do_not_rotate_the_good_backups_out(make_daemon: Any) -> None:
    daemon: Daemon = make_daemon(PORTMETER_STATE_BACKUPS="3")
    backups = daemon.state_dir / "backups"
    alice = daemon.create("alice", data_limit_bytes=GOOD_LIMIT)
    for name in ("bob", "carol"):
        assert daemon.stop() == 0
        daemon.start()  # a start that succeeded leaves a backup (none if nothing changed)
        daemon.create(name)
    assert daemon.stop() == 0
    daemon.start()
    assert daemon.stop() == 0
    daemon.start()  # the same state again: no new backup of it
    assert daemon.stop() == 0
    good = {path.name: path.read_bytes() for path in sorted(backups.iterdir())}
    assert len(good) == 3
    assert [len(json.loads(data)["keys"]) for data in good.values()] == [1, 2, 3]

    poison_snapshot(daemon, alice["id"], 2**63 + 5)
    for _ in range(10):  # what Restart=on-failure does
        failed_start(daemon)
        daemon.log_path.unlink()
    assert {path.name: path.read_bytes() for path in sorted(backups.iterdir())} == good

    restore = daemon.cli("state", "restore", "--state-dir", str(daemon.state_dir))
    assert restore.returncode == 0 and max(good) in restore.stdout, restore.stderr
    daemon.start()
    keys = daemon.api("GET", "/api/keys")["keys"]
    assert sorted(k["name"] for k in keys) == ["alice", "bob", "carol"]
    assert next(k for k in keys if k["name"] == "alice")["data_limit_bytes"] == GOOD_LIMIT


def test_the_kernel_layer_refuses_a_quota_it_cannot_hold_and_changes_nothing(net: Lab) -> None:
    counters = counters_in(net)
    port = 41400

    async def build() -> None:
        await counters.build({port: Quota(GOOD_LIMIT, 0)})

    async def refusals() -> list[str]:
        refused = []
        for limit in (MAX_KERNEL_QUOTA + 1, 2**64, 2**70):
            with pytest.raises(OutOfRange) as error:
                await counters.enforce(port, Quota(limit, 0))
            refused.append(str(error.value))
            with pytest.raises(OutOfRange):
                await counters.build({port: Quota(limit, 0)})
        view = await counters.read()
        assert view is not None
        quota = view.ports[port].quota
        assert quota is not None and quota.limit == GOOD_LIMIT
        return refused

    run_in(net.server, build)
    listed = net.nft("-a", "list", "table", "inet", counters.table).stdout
    refused = run_in(net.server, refusals)
    too_much = MAX_KERNEL_QUOTA + 1
    assert refused[0] == f"q_{port}: a limit of {too_much} bytes is outside 0..{MAX_KERNEL_QUOTA}"
    assert net.nft("-a", "list", "table", "inet", counters.table).stdout == listed


def test_missing_privileges_and_only_they_say_root_or_cap_net_admin(
    net: Lab, workdir: Path
) -> None:
    """EPERM from the kernel: the one case where the remedy is root or CAP_NET_ADMIN.

    The daemon runs as root with every capability dropped, not as another user: the checkout may
    sit in a directory only root can read (a clone under `mktemp -d`)."""
    state = workdir / "unprivileged"
    state.mkdir()
    env = {
        **os.environ, "PORTMETER_STATE_DIR": str(state / "state"),
        "PORTMETER_SOCKET": str(state / "pm.sock"), "PORTMETER_NFT_TABLE": "pmeperm",
        "PORTMETER_PORT_RANGE": "30001-30010", "PORTMETER_XRAY_CONFIG": "",
    }
    started = time.monotonic()
    result = subprocess.run(
        ["ip", "netns", "exec", net.server, "setpriv", "--inh-caps=-all", "--bounding-set=-all",
         sys.executable, "-m", "daemon", "run"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1 and time.monotonic() - started < 60
    line = result.stderr.splitlines()[-1]
    assert line.startswith("portmeter: nftables refused to read counters")
    assert "Operation not permitted" in line
    assert line.endswith("(portmeter needs root or CAP_NET_ADMIN)")
