"""Log lines for conditions that last (daemon/logs/once.py): a refused row is one line however
many comparisons see it, and a failure retried every second is one line a minute with a count."""

from __future__ import annotations

import structlog

from daemon.logs.once import Once, Throttled


def test_a_thing_is_logged_once_and_memory_stays_bounded() -> None:
    with structlog.testing.capture_logs() as events:
        once = Once(structlog.get_logger(), remembered=3)
        assert once.once(("keys", "a", 1), "fleet_key_not_applied", key_id="a")
        assert not once.once(("keys", "a", 1), "fleet_key_not_applied", key_id="a")
        assert once.once(("keys", "a", 2), "fleet_key_not_applied", key_id="a")  # a new version
        for thing in "bcd":
            once.once(thing, "x")
        assert len(once._seen) == 3
    assert [e.get("key_id") for e in events if e["event"] == "fleet_key_not_applied"] == ["a", "a"]


def test_a_repeated_failure_is_one_line_per_interval_with_its_count() -> None:
    moment = [0.0]
    with structlog.testing.capture_logs() as events:
        lost = Throttled(structlog.get_logger(), "fleet_keys_listen_lost", 60, lambda: moment[0])
        for second in range(130):  # retried every second for over two minutes
            moment[0] = float(second)
            lost.happened(error="connection refused")
        lost.recovered()
        lost.recovered()  # nothing failed since: nothing to say
    assert [(e["event"], e.get("repeats"), e.get("failures")) for e in events] == [
        ("fleet_keys_listen_lost", 1, None),
        ("fleet_keys_listen_lost", 60, None),
        ("fleet_keys_listen_lost", 60, None),
        ("fleet_keys_listen_recovered", None, 130),
    ]
