"""What a database written by anyone does to real nodes (README "The database is input too"):
a bad row never stops a node, its start or its comparison, a node whose clock is a day off
neither hides nor loses fleet usage, and rows of groups no node serves cost the nodes nothing.

Real daemons in their own namespaces on a real PostgreSQL 15 (tests/pgserver.py).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import pytest

from tests.netlab import wait_for
from tests.pgserver import Database
from tests.test_fleet_keys import PROPAGATION, fleet, on_every
from tests.test_fleet_pg import WIRE, Node, fleet_nodes, local_key, udp
from tests.test_fleet_pg_limits import _quota_left, delivered, key_of, reset_since, used

pytestmark = pytest.mark.root
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
LIMIT = 10_000_000


def bad_row(db: Database, key_id: str, name: str, **columns: str) -> None:
    """A keys row as a buggy panel might write it (values as SQL literals)."""
    values = {
        "id": f"'{key_id}'", "name": f"'{name}'", "same_name": f"'{name}'",
        "uuid": "gen_random_uuid()", "sub_token": f"'{key_id}{key_id}{key_id}'",
        "short_id": "'ab'", "enabled": "true", "reset_strategy": "'no_reset'", "note": "''",
        "groups": "'{}'", "created_at": "now()", **columns,
    }
    db.sql(
        f"INSERT INTO portmeter.keys ({', '.join(values)}) VALUES ({', '.join(values.values())})"
    )


def lines(log: str, event: str) -> list[str]:
    return [line for line in log.splitlines() if f"event={event}" in line or f" {event} " in line]


def test_a_bad_row_stops_no_node_and_no_start(fleet_db: Database, workdir: Path) -> None:
    with fleet(fleet_db, workdir, count=2) as (a, b):
        a.daemon.create("before")
        on_every([b], lambda n: n.has("before"), "before on B")
        bad_row(fleet_db, "0badbad0", "yearly", reset_strategy="'yearly'")
        bad_row(fleet_db, "0badbad1", "forever", expire_at="'infinity'")
        time.sleep(3)  # three comparisons (poll interval 1 s)
        a.daemon.create("after")
        on_every([a, b], lambda n: n.has("after"), "a key made after the bad rows, everywhere")
        for node in (a, b):
            assert node.daemon.process is not None and node.daemon.process.poll() is None
            refused = lines(node.daemon.log(), "fleet_key_not_applied")
            assert len(refused) == 2, refused  # once per row, not once per comparison
            assert any("reset_strategy" in line for line in refused)
            assert any("expire_at" in line for line in refused)
            assert not node.has("yearly") and not node.has("forever")
        b.daemon.stop()
        b.daemon.start()  # READY again, with the rows still there
        assert b.has("before") and b.has("after")
        assert "Traceback" not in b.daemon.log()


@pytest.mark.parametrize("offset", ["+1d", "-1d"], ids=["a day ahead", "a day behind"])
def test_a_node_whose_clock_is_a_day_off_neither_hides_nor_loses_fleet_usage(
    fleet_db: Database, tmp_path: Path, offset: str
) -> None:
    """Resets and the usage since them are ordered by the database's clock: B's reset stamped a
    day ahead would otherwise hide A's usage from every limit, and B's usage stamped a day
    behind would never count after A's reset."""
    faketime = {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": offset, "DONT_FAKE_MONOTONIC": "1"}
    with fleet_nodes(fleet_db, tmp_path, 2, per_node=[{}, faketime]) as (a, b):
        keys = {n.name: local_key(n, "kim", data_limit_bytes=LIMIT) for n in (a, b)}
        ports = {name: key["port"] for name, key in keys.items()}
        ids = {name: key["id"] for name, key in keys.items()}
        time.sleep(1.1)  # resets travel in whole seconds: one in the second a key was made is
        # no reset of it (nothing was counted before it)

        def after_reset_on(resetting: Node, sending: Node, amount: int) -> int:
            resets = {n.name: key_of(n, ids[n.name])["last_reset_at"] for n in (a, b)}
            resetting.daemon.api("POST", f"/api/keys/{ids[resetting.name]}/traffic/port/reset")
            for node in (a, b):  # the reset reached both nodes
                wait_for(
                    functools.partial(reset_since, node, ids[node.name], resets[node.name]),
                    timeout=15, what=f"the reset on {node.name}",
                )
            udp(sending, ports[sending.name], amount // WIRE)
            delivered(fleet_db, sending, ids[sending.name])
            sent = used(sending, ids[sending.name])
            other = a if sending is b else b
            wait_for(
                lambda: _quota_left(other, ids[other.name]) == LIMIT - sent,
                timeout=15, what=f"{other.name}'s quota to count {sending.name}'s usage",
            )
            return sent

        after_reset_on(b, a, 6_000_000)  # B's reset must not hide A's usage
        after_reset_on(a, b, 6_000_000)  # B's usage must count after A's reset
        skew = b.daemon.api("GET", "/api/fleet/status")["clock_skew_seconds"]
        assert abs(abs(skew) - 86_400) < 5
        assert lines(b.daemon.log(), "fleet_clock_skew")


def test_rows_of_groups_no_node_serves_cost_the_nodes_nothing(
    fleet_db: Database, workdir: Path
) -> None:
    """100,000 rows for servers elsewhere, and 2,000 served rows each refused: a new key still
    reaches the other node at once, the refusals are logged once, and an idle node stays idle."""
    with fleet(fleet_db, workdir, count=2) as (a, b):
        fleet_db.sql(
            "INSERT INTO portmeter.keys (id, name, same_name, uuid, sub_token, short_id, enabled,"
            " reset_strategy, note, groups, created_at) SELECT lpad(to_hex(n), 8, '0'),"
            " 'far' || n, 'far' || n, gen_random_uuid(), md5('far' || n), 'ab', true,"
            " 'no_reset', '', '{elsewhere}', now() FROM generate_series(1, 100000) AS n"
        )
        fleet_db.sql(
            "INSERT INTO portmeter.keys (id, name, same_name, uuid, sub_token, short_id, enabled,"
            " reset_strategy, note, groups, created_at) SELECT 'b' || lpad(to_hex(n), 7, '0'),"
            " 'bad' || n, 'bad' || n, gen_random_uuid(), md5('bad' || n), 'ab', true,"
            " 'yearly', '', '{}', now() FROM generate_series(1, 2000) AS n"
        )
        time.sleep(3)  # the refusals are logged by the first comparisons
        started = time.monotonic()
        a.daemon.create("newcomer")
        on_every([b], lambda n: n.has("newcomer"), "the new key on B", timeout=3 * PROPAGATION)
        print(f"a new key reached B in {time.monotonic() - started:.3f} s")
        for node in (a, b):
            assert len(lines(node.daemon.log(), "fleet_key_not_applied")) == 2000
        pid = b.daemon.process.pid if b.daemon.process else 0
        cpu_before, rss_before = cpu_seconds(pid), rss_kib(pid)
        time.sleep(10)
        cpu = (cpu_seconds(pid) - cpu_before) / 10
        print(f"idle node with 102,000 rows: CPU {cpu:.1%}, RSS {rss_before} -> {rss_kib(pid)} KiB")
        assert cpu < 0.05
        assert rss_kib(pid) - rss_before < 20 * 1024
        assert len(lines(b.daemon.log(), "fleet_key_not_applied")) == 2000


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process and its threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
