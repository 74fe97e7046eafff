"""Speed, connection and device limits through the API and the CLI, in process (README "Speed,
connection and device limits"): rates as typed, bad input refused with a clear 422 (CLI: one line,
exit 1) and nothing changed, the guard the in-memory kernel is given, and the refusal events.
The kernel's enforcement is tests/test_kernel_limits.py."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon import cli, limits
from daemon.accounting import Reading
from daemon.limits import Guard
from daemon.store.state import DirectionModel
from tests.inprocess import InProcessDaemon
from tests.test_api_input import memory_snapshot


@pytest.mark.parametrize(
    ("typed", "bps"),
    [
        ("20Mbit", 20_000_000),
        ("1Gbit", 10**9),
        ("500kbit", 500_000),
        ("8000", 8000),
        ("1.5 Mbit", 1_500_000),
        ("100Gbit", 100 * 10**9),
        ("20mbps", 20_000_000),
    ],
)
def test_rates_as_typed(typed: str, bps: int) -> None:
    assert limits.parse_rate(typed) == bps


@pytest.mark.parametrize(
    ("typed", "reason"),
    [
        ("20MB", "is not a speed"),
        ("20Mbyte", "is not a speed"),
        ("-5Mbit", "is not a speed"),
        ("101Gbit", "outside 8000..100000000000"),
        ("7999", "outside 8000"),
        ("", "is not a speed"),
        ("5Tbit", "is not a speed"),
        ("1" * 40, "is not a speed"),
    ],
)
def test_bad_rates_say_why(typed: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        limits.parse_rate(typed)


BAD = [
    ({"speed_limit_bps": "20 parsecs"}, "speed_limit_bps: '20 parsecs' is not a speed"),
    ({"speed_limit_bps": -1}, "speed_limit_bps: a speed of -1 bit/s is outside"),
    ({"speed_limit_bps": 200 * 10**9}, "outside 8000..100000000000 (100 Gbit)"),
    ({"speed_limit_bps": True}, "speed_limit_bps: must be a whole number of bits/s"),
    ({"max_ips": 0}, "max_ips"),
    ({"max_ips": 1001}, "max_ips"),
    ({"max_connections": 0}, "max_connections"),
    ({"max_connections": 100_001}, "max_connections"),
    ({"max_connections": "4"}, "max_connections"),
]


@pytest.mark.parametrize(("body", "reason"), BAD)
def test_bad_limits_are_422_and_change_nothing(
    inproc: InProcessDaemon, body: dict[str, Any], reason: str
) -> None:
    key = inproc.create("alice", speed_limit_bps="10Mbit")
    before = memory_snapshot(inproc), inproc.kernel.guard_of(key["port"])
    for method, path, extra in (
        ("POST", "/api/keys", {"name": "bob"}),
        ("PATCH", f"/api/keys/{key['id']}", {}),
    ):
        response = inproc.http.request(method, path, json={**extra, **body})
        assert response.status_code == 422, response.text
        assert reason in response.json()["detail"]
    assert (memory_snapshot(inproc), inproc.kernel.guard_of(key["port"])) == before


def test_limits_are_set_shown_changed_and_cleared(inproc: InProcessDaemon) -> None:
    key = inproc.create("alice", speed_limit_bps="20Mbit", max_connections=4, max_ips=2)
    assert (key["speed_limit_bps"], key["max_connections"], key["max_ips"]) == (20_000_000, 4, 2)
    assert key["refused_connections"] == 0
    window = inproc.service.settler.guards.window  # type: ignore[union-attr]
    assert inproc.kernel.guard_of(key["port"]) == Guard(2_500_000, 4, 2, window)
    shown = inproc.api("GET", f"/api/keys/{key['id']}")
    assert shown["client_ips"] == [] and shown["speed_limit_bps"] == 20_000_000
    changed = inproc.api("PATCH", f"/api/keys/{key['id']}", json={"speed_limit_bps": 8000})
    assert changed["speed_limit_bps"] == 8000
    assert inproc.kernel.guard_of(key["port"]) == Guard(1000, 4, 2, window)
    inproc.api(
        "PATCH",
        f"/api/keys/{key['id']}",
        json={"speed_limit_bps": None, "max_connections": None, "max_ips": None},
    )
    assert inproc.kernel.guard_of(key["port"]) is None
    assert inproc.saved_state()["keys"][key["id"]]["speed_limit_bps"] is None


def test_a_key_without_limits_gets_no_guard(inproc: InProcessDaemon) -> None:
    key = inproc.create("plain")
    assert inproc.kernel.guard_of(key["port"]) is None


def test_a_rebuilt_table_gets_the_guards_back(inproc: InProcessDaemon) -> None:
    key = inproc.create("alice", max_connections=3)
    inproc.kernel.drop_table()
    inproc.poll()
    assert inproc.kernel.guard_of(key["port"]) == Guard(None, 3, None, 0)


def test_refusal_bursts_are_one_event_per_window(inproc: InProcessDaemon) -> None:
    key = inproc.create("alice", max_connections=1, max_ips=1)
    guards = inproc.service.settler.guards
    assert guards is not None
    record = inproc.service.state.keys[key["id"]]

    def refused(connections: int, packets: int) -> None:
        record.refused = DirectionModel.of(
            record.refused.account().advance(Reading(1, 99, connections, 0))
        )
        record.ip_refused = DirectionModel.of(
            record.ip_refused.account().advance(Reading(1, 98, packets, 0))
        )

    with capture_logs() as logs:
        guards.notice(record)  # first sight: the baseline, no event
        refused(3, 0)
        guards.notice(record)
        refused(5, 7)
        guards.notice(record)
    events = [(e["event"], e.get("refused")) for e in logs if "refused" in e]
    assert events == [("connection_refused", 3), ("ip_limit_reached", 7)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--speed", "20parsecs"], "--speed: '20parsecs' is not a speed"),
        (["--speed", "200Gbit"], "--speed: a speed of 200000000000 bit/s is outside"),
        (["--max-conns", "0"], "--max-conns: '0' is not a whole number from 1 to 100000"),
        (["--max-ips", "1001"], "--max-ips: '1001' is not a whole number from 1 to 1000"),
        (["--max-ips", "-1"], "--max-ips: '-1' is not a whole number"),
        (["--max-ips", "\u0665"], "--max-ips: '\u0665' is not a whole number from 1 to 1000"),
        (["--max-conns", "1" * 5000], "--max-conns: 5000 characters is not a whole number"),
    ],
)
def test_cli_refuses_bad_limits_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["--socket", "/nonexistent/pm.sock", "keys", "set", "alice", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.count("\n") == 0 and message in err


def test_cli_sends_limits_and_clears_with_none() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(
        ["keys", "set", "a", "--speed", "20Mbit", "--max-conns", "4", "--max-ips", "none"]
    )
    assert cli.key_settings(args) == {
        "speed_limit_bps": 20_000_000,
        "max_connections": 4,
        "max_ips": None,
    }
