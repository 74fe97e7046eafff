"""Usage per user (seed 004): exact numbers, history that agrees with the state file across
resets and kill -9, and fleet reports by webhook.

The in-process layer (tests/inprocess.py: the real service, history and app over the in-memory
kernel) checks the API's numbers, resets, retention and the reports' validation; the kernel layer
keeps what needs real datagrams and a real process: kill -9 and restart, and a node reporting to a
collector over TCP.
"""

from __future__ import annotations

import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from daemon.bounds import MAX_REPORT_BYTES, MAX_USAGE_BYTES
from daemon.store.history import History, Totals
from daemon.store.usage import UsageDelta
from tests.conftest import Daemon
from tests.inprocess import InProcessDaemon, inprocess_daemon
from tests.netlab import SERVER_V4, Lab
from tests.test_counting import udp_exchange
from tests.test_history import FULL, fill

V4 = 28  # IPv4 + UDP header bytes per datagram
AnyDaemon = Daemon | InProcessDaemon


@contextmanager
def history_of(daemon: AnyDaemon) -> Iterator[History]:
    """The daemon's history database, opened beside it (WAL: readers do not block it)."""
    history = History(daemon.state_dir / "history.sqlite3")
    try:
        yield history
    finally:
        history.close()


def saved_key(daemon: AnyDaemon, key_id: str) -> dict[str, Any]:
    return dict(daemon.saved_state()["keys"][key_id])


def usage(daemon: AnyDaemon, name: str) -> dict[str, Any]:
    return dict(daemon.api("GET", f"/api/admin/usage/{name}"))


def detailed(daemon: AnyDaemon, name: str) -> dict[str, Any]:
    """The detailed view; answering it also saves, so the history holds every counted byte."""
    return dict(daemon.api("GET", f"/api/admin/usage/{name}/detailed"))


def assert_history_matches_state(
    daemon: AnyDaemon, key_id: str, rx: int, tx: int, rxp: int, txp: int
) -> None:
    saved = saved_key(daemon, key_id)
    counted = (saved["rx"]["bytes"], saved["tx"]["bytes"])
    assert (*counted, saved["rx"]["packets"], saved["tx"]["packets"]) == (rx, tx, rxp, txp)
    with history_of(daemon) as history:
        assert history.total(key_id, saved["epoch"]) == Totals(rx, tx, rxp, txp)


def series_sum(points: list[dict[str, Any]], field: str) -> int:
    return sum(p[field] for p in points)


def test_usage_of_a_user_equals_the_kernel_counts_and_history_agrees(
    inproc: InProcessDaemon,
) -> None:
    alice = inproc.create("alice")
    bob = inproc.create("bob")
    inproc.datagrams(alice["port"], 20, 500 + V4, echo=True)
    inproc.datagrams(bob["port"], 7, 300 + V4)

    a = usage(inproc, "alice")
    assert (a["bytes_uploaded"], a["bytes_downloaded"]) == (20 * (500 + V4), 20 * (500 + V4))
    assert a["total_bytes"] == 40 * (500 + V4)
    assert a["username"] == "alice" and a["servers"] == 1 and a["reported"] == []
    assert a["local"]["keys"][0]["key_id"] == alice["id"]
    assert a["local"]["keys"][0]["bytes_uploaded"] == inproc.traffic(alice["id"])["rx_bytes"]
    b = usage(inproc, "bob")
    assert (b["bytes_uploaded"], b["bytes_downloaded"]) == (7 * (300 + V4), 0)

    d = detailed(inproc, "alice")
    assert d["total_bytes"] == a["total_bytes"]
    [local] = d["servers"]
    assert local["source"] == "local" and local["port"] == alice["port"]
    assert local["status"] == "active"
    assert local["connections"] == 0 and local["last_used"] is not None
    assert len(local["hourly"]) == 24 and len(local["daily"]) == 30
    for series in (local["hourly"], local["daily"], d["hourly"], d["daily"]):
        assert series_sum(series, "bytes_uploaded") == 20 * (500 + V4)
        assert series_sum(series, "bytes_downloaded") == 20 * (500 + V4)
    assert_history_matches_state(inproc, alice["id"], 20 * 528, 20 * 528, 20, 20)
    detailed(inproc, "bob")
    assert_history_matches_state(inproc, bob["id"], 7 * 328, 0, 7, 0)

    history_file = inproc.state_dir / "history.sqlite3"
    assert stat.S_IMODE(history_file.stat().st_mode) == 0o600
    missing = inproc.api("GET", "/api/admin/usage/nobody", expect=404)
    assert "nobody" in missing["detail"]
    inproc.api("GET", "/api/admin/usage/nobody/detailed", expect=404)
    inproc.api("GET", f"/api/admin/usage/{'x' * 129}", expect=422)


def test_reset_zeroes_the_counters_and_keeps_history_under_the_old_epoch(
    inproc: InProcessDaemon,
) -> None:
    alice = inproc.create("alice")
    inproc.datagrams(alice["port"], 10, 400 + V4, echo=True)
    before = 10 * (400 + V4)

    done = inproc.api("POST", "/api/admin/usage/reset/alice")
    assert done["local"] == [
        {"key_id": alice["id"], "port": alice["port"], "used_before_reset": 2 * before, "epoch": 1}
    ]
    assert done["history_kept"] is True
    zero = usage(inproc, "alice")
    assert (zero["bytes_uploaded"], zero["bytes_downloaded"]) == (0, 0)
    assert inproc.traffic(alice["id"])["rx_bytes"] == 0

    inproc.datagrams(alice["port"], 3, 100 + V4)
    after = usage(inproc, "alice")
    assert (after["bytes_uploaded"], after["bytes_downloaded"]) == (3 * 128, 0)
    d = detailed(inproc, "alice")
    assert d["servers"][0]["epoch"] == 1
    # The chart shows all traffic over time: before and after the reset.
    assert series_sum(d["hourly"], "bytes_uploaded") == before + 3 * 128
    assert series_sum(d["hourly"], "bytes_downloaded") == before
    assert_history_matches_state(inproc, alice["id"], 3 * 128, 0, 3, 0)
    with history_of(inproc) as history:
        assert history.total(alice["id"], 0) == Totals(before, before, 10, 10)
    inproc.api("POST", "/api/admin/usage/reset/nobody", expect=404)


def test_kill9_and_restart_neither_lose_nor_double_count(net: Lab, daemon: Daemon) -> None:
    alice = daemon.create("alice")
    udp_exchange(net, socket.AF_INET, alice["port"], 5, 1000, echo=True)
    detailed(daemon, "alice")  # saved: generation g holds these bytes
    udp_exchange(net, socket.AF_INET, alice["port"], 4, 200, echo=True)
    daemon.kill9()  # this traffic may or may not have been saved
    udp_exchange(net, socket.AF_INET, alice["port"], 2, 50, echo=False)  # the kernel counts on

    # And as if the daemon had died between staging a save and writing the state file.
    saved = daemon.saved_state()
    key = saved["keys"][alice["id"]]
    staged = UsageDelta(
        alice["id"], "alice", key["uuid"], key["port"], key["epoch"], 999_999, 999_999, 9, 9
    )
    with history_of(daemon) as history:
        history.stage(saved["generation"] + 1, datetime.now(UTC), [staged])

    daemon.start()
    rx = 5 * 1028 + 4 * 228 + 2 * 78
    tx = 5 * 1028 + 4 * 228
    u = usage(daemon, "alice")
    assert (u["bytes_uploaded"], u["bytes_downloaded"]) == (rx, tx)
    d = detailed(daemon, "alice")
    assert series_sum(d["hourly"], "bytes_uploaded") == rx
    assert series_sum(d["hourly"], "bytes_downloaded") == tx
    assert_history_matches_state(daemon, alice["id"], rx, tx, 11, 9)

    assert daemon.stop() == 0  # a clean stop saves once more: still no double count
    daemon.start()
    detailed(daemon, "alice")
    assert_history_matches_state(daemon, alice["id"], rx, tx, 11, 9)


def report(rid: str, user: str, server: str, up: Any, down: Any, **extra: Any) -> dict[str, Any]:
    return {
        "report_id": rid, "user_token": user, "server": server, "port": 443, "protocol": "vless",
        "bytes_uploaded": up, "bytes_downloaded": down, "timestamp": int(time.time()), **extra,
    }


def post_reports(daemon: AnyDaemon, *reports: dict[str, Any], expect: int = 200) -> Any:
    """POST /api/traffic/webhook with these reports as one batch."""
    return daemon.api("POST", "/api/traffic/webhook", expect=expect, json={"reports": [*reports]})


def test_fleet_reports_count_once_and_add_up_across_servers(inproc: InProcessDaemon) -> None:
    webhook = "/api/traffic/webhook"
    first = inproc.api("POST", webhook, json=report("r1", "anna", "s1", 1000, 5000))
    assert (first["received"], first["accepted"], first["duplicates"]) == (1, 1, 0)
    batch = post_reports(
        inproc, report("r2", "anna", "s2", 300, 700), report("r1", "anna", "s1", 1000, 5000)
    )
    assert (batch["accepted"], batch["duplicates"], batch["duplicate_ids"]) == (1, 1, ["r1"])
    again = inproc.api("POST", webhook, json=report("r1", "anna", "s1", 1000, 5000))
    assert again["accepted"] == 0
    inproc.api("POST", webhook, json=report("r3", "anna", "s1", 10, 20))

    u = usage(inproc, "anna")
    assert (u["bytes_uploaded"], u["bytes_downloaded"], u["servers"]) == (1310, 5720, 2)
    assert u["local"] is None
    assert {
        r["server"]: (r["bytes_uploaded"], r["bytes_downloaded"], r["reports"])
        for r in u["reported"]
    } == {"s1": (1010, 5020, 2), "s2": (300, 700, 1)}

    # The same user with a key on this server: local and reported add up.
    anna = inproc.create("anna")
    inproc.datagrams(anna["port"], 6, 100 + V4, echo=True)
    local = 6 * 128
    u = usage(inproc, "anna")
    assert (u["bytes_uploaded"], u["bytes_downloaded"]) == (1310 + local, 5720 + local)
    assert u["servers"] == 3 and u["local"]["bytes_uploaded"] == local
    d = detailed(inproc, "anna")
    assert [s["source"] for s in d["servers"]] == ["local", "report", "report"]
    assert series_sum(d["hourly"], "bytes_uploaded") == 1310 + local
    assert series_sum(d["daily"], "bytes_downloaded") == 5720 + local
    s2 = d["servers"][2]
    s2_uploaded = series_sum(s2["hourly"], "bytes_uploaded")
    assert (s2["server"], s2_uploaded, s2["connections"]) == ("s2", 300, None)

    overview = inproc.api("GET", "/api/admin/usage")
    assert overview["total_users"] == 1 and overview["total_servers"] == 3
    assert overview["traffic_used"] == 1310 + 5720 + 2 * local
    assert overview["reported"]["servers"] == ["s1", "s2"]
    assert overview["reported"]["reports"] == 3
    assert overview["database"]["report_records"] == 3
    assert overview["database"]["unique_users"] == 1
    assert overview["database"]["unique_servers"] == 3
    assert overview["database"]["retention_days"] == 90
    assert overview["database"]["size_bytes"] > 0
    assert overview["users"] == [{
        "username": "anna", "bytes_uploaded": 1310 + local, "bytes_downloaded": 5720 + local,
        "total_bytes": 1310 + 5720 + 2 * local,
        "total_formatted": overview["users"][0]["total_formatted"], "servers": 3,
    }]

    reset = inproc.api("POST", "/api/admin/usage/reset/anna")
    assert reset["reported"] == {"servers": 2, "bytes_uploaded": 1310, "bytes_downloaded": 5720}
    assert reset["local"][0]["used_before_reset"] == 2 * local
    u = usage(inproc, "anna")
    assert (u["bytes_uploaded"], u["bytes_downloaded"], u["servers"]) == (0, 0, 3)
    d = detailed(inproc, "anna")
    assert series_sum(d["hourly"], "bytes_uploaded") == 1310 + local  # history kept
    assert d["reports_reset_at"] is not None
    inproc.api("POST", webhook, json=report("r1", "anna", "s1", 1000, 5000))
    assert usage(inproc, "anna")["bytes_uploaded"] == 0  # a repeat after the reset: still once


def without(body: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != field}


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (report("b1", "anna", "s1", -1, 5), "bytes_uploaded"),
        (without(report("b2", "anna", "s1", 1, 5), "bytes_downloaded"), "bytes_downloaded"),
        (without(report("b3", "anna", "s1", 1, 5), "report_id"), "report_id"),
        (report("b4", "anna", "s1", "100", 5), "bytes_uploaded"),
        (report("b5", "anna", "s1", True, 5), "bytes_uploaded"),
        (report("b6", "anna", "s1", 1.5, 5), "bytes_uploaded"),
        (report("b7", "a" * 129, "s1", 1, 5), "user_token"),
        (report("b8", "an\nna", "s1", 1, 5), "user_token"),
        (report("b9", "anna", "", 1, 5), "server"),
        (report("b10", "anna", "s1", 1, 5, port=70000), "port"),
        (report("b11", "anna", "s1", 1, 5, timestamp=int(time.time()) + 3 * 86400), "timestamp"),
        (report("b12\x00", "anna", "s1", 1, 5), "report_id"),
        ({"reports": []}, "reports"),
        (
            {"reports": [report("b13", "anna", "s1", 1, 5), report("b14", "anna", "s1", -5, 5)]},
            "reports.1.bytes_uploaded",
        ),
        ([report("b15", "anna", "s1", 1, 5)], "report object"),
        (
            report("b16", "anna", "s1", 2**62, 5),
            "bytes_uploaded: Input should be less than or equal to 1000000000000000",
        ),
        (report("b17", "anna", "s1", 1, MAX_REPORT_BYTES + 1), "bytes_downloaded"),
        (
            report("b18", "anna", "s1", 1, 5, bytes_total=6),
            "bytes_total: Extra inputs are not permitted",
        ),
        ("hello", "report object"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_reports_are_refused_and_nothing_is_stored(
    inproc: InProcessDaemon, body: Any, complaint: str
) -> None:
    answer = inproc.api("POST", "/api/traffic/webhook", expect=422, json=body)
    assert complaint in answer["detail"]
    inproc.api("GET", "/api/admin/usage/anna", expect=404)
    overview = inproc.api("GET", "/api/admin/usage")
    assert overview["database"]["report_records"] == 0 and overview["reported"]["reports"] == 0


def test_webhook_rejects_bodies_that_are_not_json(inproc: InProcessDaemon) -> None:
    assert inproc.api("POST", "/api/traffic/webhook", expect=400, content=b"{nope")["detail"]
    assert inproc.api("POST", "/api/traffic/webhook", expect=422)["detail"]


def test_cleanup_applies_the_configured_retention_exactly() -> None:
    with inprocess_daemon(history_retention_days=30) as inproc:
        now = int(time.time())
        old = report("old", "anna", "s1", 7, 7, timestamp=now - 40 * 86400)
        kept = report("kept", "anna", "s1", 5, 5, timestamp=now - 20 * 86400)
        fresh = report("fresh", "anna", "s1", 3, 3)
        post_reports(inproc, old, kept, fresh)

        counts = inproc.api("POST", "/api/admin/usage/cleanup")
        assert counts["retention_days"] == 30
        assert counts["report_hourly_rolled_up"] == 2  # the two old hours became days
        assert counts["report_daily_deleted"] == 1  # only the 40-day-old one expired
        assert counts["removed"] == 1
        assert inproc.api("POST", "/api/admin/usage/cleanup")["removed"] == 0
        d = detailed(inproc, "anna")
        assert series_sum(d["daily"], "bytes_uploaded") == 5 + 3
        assert series_sum(d["hourly"], "bytes_uploaded") == 3
        # Totals are not history: what was reported since the last reset still counts.
        assert usage(inproc, "anna")["bytes_uploaded"] == 7 + 5 + 3
        assert inproc.api("GET", "/api/admin/usage")["database"]["retention_days"] == 30


def test_deleted_keys_keep_their_history(inproc: InProcessDaemon) -> None:
    gone = inproc.create("gone")
    inproc.datagrams(gone["port"], 4, 60 + V4)
    inproc.api("DELETE", f"/api/keys/{gone['id']}")
    inproc.api("GET", "/api/admin/usage/gone", expect=404)  # no key and no reports any more
    with history_of(inproc) as history:
        assert history.total(gone["id"], 0) == Totals(4 * 88, 0, 4, 0)
        assert history.known_keys()[gone["id"]]["name"] == "gone"
    overview = inproc.api("GET", "/api/admin/usage")
    database = overview["database"]
    assert database["hourly_records"] == 1 and database["unique_users"] == 1
    assert overview["total_users"] == 0
    newest = datetime.fromisoformat(database["newest"])
    assert timedelta(0) <= datetime.now(UTC) - newest < timedelta(hours=1)


def test_reset_all_users(inproc: InProcessDaemon) -> None:
    alice, bob = inproc.create("alice"), inproc.create("bob")
    inproc.datagrams(alice["port"], 2, 100 + V4)
    inproc.datagrams(bob["port"], 3, 100 + V4)
    inproc.api("POST", "/api/traffic/webhook", json=report("r1", "carol", "s1", 10, 20))
    done = inproc.api("POST", "/api/admin/usage/reset")
    assert done["users_reset"] == ["alice", "bob", "carol"] and done["keys_reset"] == 2
    overview = inproc.api("GET", "/api/admin/usage")
    assert overview["traffic_used"] == 0 and overview["total_users"] == 3
    detailed(inproc, "bob")
    with history_of(inproc) as history:
        assert history.total(alice["id"], 0) == Totals(2 * 128, 0, 2, 0)  # history kept
        assert history.total(bob["id"], 0) == Totals(3 * 128, 0, 3, 0)


FLEET_KEY = "fleet-key-" + "f" * 16
FLEET_PORT = 18081


def wait_for_reported(
    collector: Daemon, user: str, server: str, up: int, down: int
) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    seen: Any = None
    while time.monotonic() < deadline:
        answer = collector.http.get(f"/api/admin/usage/{user}")
        if answer.status_code == 200:
            reported = answer.json()["reported"]
            seen = {r["server"]: (r["bytes_uploaded"], r["bytes_downloaded"]) for r in reported}
            if seen == {server: (up, down)}:
                return dict(answer.json())
        time.sleep(0.2)
    raise AssertionError(f"collector has {seen}, wanted {server}: {(up, down)}")


def test_a_node_reports_its_exact_counts_to_a_collector_across_kill9(
    net: Lab, make_daemon: Any
) -> None:
    collector = make_daemon(
        PORTMETER_HTTP_LISTEN=f"{SERVER_V4}:{FLEET_PORT}", PORTMETER_API_KEY=FLEET_KEY,
        PORTMETER_SERVER_NAME="collector",
    )
    node = make_daemon(
        PORTMETER_REPORT_URL=f"http://{SERVER_V4}:{FLEET_PORT}/api/traffic/webhook",
        PORTMETER_REPORT_API_KEY=FLEET_KEY, PORTMETER_SERVER_NAME="node1",
    )
    anna = node.create("anna")
    udp_exchange(net, socket.AF_INET, anna["port"], 10, 500, echo=True)
    exact = node.traffic(anna["id"])
    assert (exact["rx_bytes"], exact["tx_bytes"]) == (10 * 528, 10 * 528)
    wait_for_reported(collector, "anna", "node1", 10 * 528, 10 * 528)

    udp_exchange(net, socket.AF_INET, anna["port"], 4, 200, echo=True)
    node.kill9()  # perhaps between staging a batch and sending it
    udp_exchange(net, socket.AF_INET, anna["port"], 3, 100, echo=False)  # counted while it is down
    node.start()
    up, down = 10 * 528 + 4 * 228 + 3 * 128, 10 * 528 + 4 * 228
    exact = node.traffic(anna["id"])
    assert (exact["rx_bytes"], exact["tx_bytes"]) == (up, down)
    answer = wait_for_reported(collector, "anna", "node1", up, down)
    assert answer["servers"] == 1 and answer["local"] is None
    time.sleep(3)  # retries and repeats have settled: still exactly once
    wait_for_reported(collector, "anna", "node1", up, down)
    overview = collector.api("GET", "/api/admin/usage")
    assert overview["total_servers"] == 2 and overview["reported"]["servers"] == ["node1"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=15,
)
near_reports = st.dictionaries(
    st.sampled_from(["report_id", "user_token", "server", "port", "protocol", "bytes_uploaded",
                     "bytes_downloaded", "timestamp", "reports", "extra"]),
    json_values,
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.one_of(json_values, near_reports, st.builds(lambda r: {"reports": [r]}, near_reports)),
    name=st.text(min_size=1, max_size=140).filter(lambda s: "/" not in s and s not in (".", "..")),
)
def test_odd_input_never_gets_a_500(inproc: InProcessDaemon, body: Any, name: str) -> None:
    with capture_logs() as logged:
        answer = inproc.http.post("/api/traffic/webhook", json=body)
        assert answer.status_code in (200, 400, 422), (body, answer.status_code, answer.text)
        assert "detail" in answer.json() or answer.status_code == 200
        for path in (f"/api/admin/usage/{quote(name)}", f"/api/admin/usage/{quote(name)}/detailed"):
            got = inproc.http.get(path)
            assert got.status_code in (200, 404, 422), (path, got.status_code, got.text)
    assert "request_failed" not in [event["event"] for event in logged]


def test_reported_sums_past_2_to_the_63_are_exact_and_a_full_pair_refuses_more(
    inproc: InProcessDaemon,
) -> None:
    # Ten servers at the bound for anna: 10^19 bytes each way. Old code answered 507
    # "integer overflow" here (and accepted 2^62 per report, so two reports got there).
    with history_of(inproc) as history:
        for n in range(10):
            fill(history, f"s{n}", datetime.now(UTC))
    total = 10 * MAX_USAGE_BYTES
    overview = inproc.api("GET", "/api/admin/usage")
    reported = overview["reported"]
    assert (overview["bytes_uploaded"], overview["traffic_used"]) == (total, 2 * total)
    assert (reported["bytes_downloaded"], reported["reports"]) == (total, 10 * FULL)
    users = [(u["username"], u["total_bytes"], u["servers"]) for u in overview["users"]]
    assert users == [("anna", 2 * total, 10)]
    assert usage(inproc, "anna")["bytes_downloaded"] == total
    d = detailed(inproc, "anna")
    assert series_sum(d["hourly"], "bytes_uploaded") == total
    assert series_sum(d["daily"], "bytes_downloaded") == total

    full = post_reports(
        inproc,
        report("new-1", "anna", "s10", 1, 1),
        report("more", "anna", "s3", MAX_REPORT_BYTES, 0),
        expect=422,
    )
    assert "'anna' from server 's3'" in full["detail"]
    assert f"past {MAX_USAGE_BYTES} bytes" in full["detail"]
    # Nothing stored.
    assert inproc.api("GET", "/api/admin/usage")["reported"]["reports"] == 10 * FULL
    fits = report("new-2", "anna", "s10", MAX_REPORT_BYTES, 0)
    inproc.api("POST", "/api/traffic/webhook", json=fits)
    assert inproc.api("GET", "/api/admin/usage")["bytes_uploaded"] == total + MAX_REPORT_BYTES


def test_a_report_may_not_claim_to_come_from_this_server() -> None:
    # The unnamed one's label is its public host, its reports' name the host name.
    with (
        inprocess_daemon(server_name="collector") as named,
        inprocess_daemon() as unnamed,
    ):
        named.create("anna")
        own_names = ((named, ["collector", "Collector"]),
                     (unnamed, ["vpn.example.net", socket.gethostname()]))
        for daemon, names in own_names:
            for name in names:
                single = daemon.api(
                    "POST", "/api/traffic/webhook", expect=422,
                    json=report("f1", "anna", name, 10, 20),
                )
                assert single["detail"].startswith("server: ")
                assert "is this server's own name" in single["detail"]
                batch = post_reports(
                    daemon,
                    report("f2", "anna", "elsewhere", 1, 2),
                    report("f3", "anna", name, 10, 20),
                    expect=422,
                )
                assert batch["detail"].startswith("reports.1.server: ")
            overview = daemon.api("GET", "/api/admin/usage")
            assert overview["reported"]["reports"] == 0 and overview["traffic_used"] == 0
        anna = usage(named, "anna")
        assert (anna["bytes_uploaded"], anna["servers"], anna["reported"]) == (0, 1, [])
