"""`Once` (daemon/logs/repeats.py): a refused database row is one line however many comparisons
see it, and its memory stays bounded whatever the database holds."""

from __future__ import annotations

import structlog

from daemon.logs.repeats import Once


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
