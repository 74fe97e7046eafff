"""Tests for daemon.store.history: buckets, the stage/commit/rollback/recover protocol, retention,
roll-ups, queries and fleet reports. Exact numbers throughout."""

from __future__ import annotations

import os
import sqlite3
import stat
import tempfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.bounds import MAX_REPORT_BYTES, MAX_USAGE_BYTES
from daemon.errors import StorageFull, StoreUnavailable
from daemon.http.routes.usage import storage
from daemon.store.history import (
    DAY,
    Bucket,
    FleetReport,
    History,
    HistoryError,
    ReportBucket,
    ReportRefused,
    Totals,
    days_back,
    hours_back,
)
from daemon.store.state import StateError
from daemon.store.usage import SinkError, UsageDelta

T0 = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)  # 12:30 UTC
H = timedelta(hours=1)
D = timedelta(days=1)


def delta(
    key: str = "k1", epoch: int = 0, rx: int = 0, tx: int = 0, rxp: int = 0, txp: int = 0
) -> UsageDelta:
    return UsageDelta(
        key, f"name-{key}", f"uuid-{key}", 10000 + int(key[1:] or 0), epoch, rx, tx, rxp, txp
    )


@pytest.fixture
def history(tmp_path: Path) -> History:
    made = History(tmp_path / "history.sqlite3", retention_days=90)
    yield made
    made.close()


def rows(h: History, table: str) -> list[tuple]:
    return sorted(h._read(f"SELECT * FROM {table}"))


# --- the file -------------------------------------------------------------------------------


def test_database_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "state" / "history.sqlite3"
    h = History(path)
    h.stage(1, T0, [delta(rx=1)])
    h.commit(1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for side in path.parent.glob("history.sqlite3-*"):
        assert stat.S_IMODE(side.stat().st_mode) == 0o600, side
    assert h._read("PRAGMA journal_mode")[0][0] == "wal"
    h.close()


def test_existing_file_with_loose_mode_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    History(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_garbage_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(HistoryError, match="move .* away") as caught:
        History(path)
    assert isinstance(caught.value, StateError)  # the CLI reports it like a damaged state file
    assert path.read_bytes() == b"this is not a database" * 100


def test_other_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    History(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'")
    with pytest.raises(HistoryError, match="schema version 99"):
        History(path)


def test_data_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    h = History(path)
    h.stage(1, T0, [delta(rx=10, tx=20, rxp=1, txp=2)])
    h.commit(1)
    h.close()
    again = History(path)
    assert again.total("k1", 0) == Totals(10, 20, 1, 2)
    again.close()


# --- staging, committing, undoing ----------------------------------------------------------


def test_deltas_go_into_hourly_buckets_per_key_and_epoch(history: History) -> None:
    history.stage(1, T0, [delta("k1", rx=100, tx=200, rxp=1, txp=2), delta("k2", rx=5, rxp=1)])
    history.commit(1)
    history.stage(2, T0 + timedelta(minutes=29), [delta("k1", rx=1, tx=2, rxp=1, txp=1)])  # 12:59
    history.commit(2)
    history.stage(3, T0 + timedelta(minutes=30), [delta("k1", rx=7, rxp=1)])  # 13:00: next hour
    history.commit(3)
    noon = datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert history.hourly("k1", noon, noon + 2 * H) == [
        Bucket(noon, 101, 202, 2, 3),
        Bucket(noon + H, 7, 0, 1, 0),
    ]
    assert history.hourly("k2", noon, noon + 2 * H) == [Bucket(noon, 5, 0, 1, 0)]
    assert history.total("k1", 0) == Totals(108, 202, 3, 3)
    assert rows(history, "staged") == []


def test_epochs_are_kept_apart_and_series_sum_them(history: History) -> None:
    history.stage(1, T0, [delta(epoch=0, rx=100, tx=10)])
    history.commit(1)
    history.stage(2, T0 + timedelta(minutes=1), [delta(epoch=1, rx=3, tx=4)])  # after a reset
    history.commit(2)
    assert history.total("k1", 0) == Totals(100, 10)
    assert history.total("k1", 1) == Totals(3, 4)
    assert history.total("k1", 2) == Totals()
    noon = datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert history.hourly("k1", noon, noon + H) == [Bucket(noon, 103, 14, 0, 0)]


def test_all_zero_deltas_leave_no_bucket(history: History) -> None:
    history.stage(1, T0, [delta(rx=0, tx=0)])
    history.commit(1)
    assert rows(history, "hourly") == []


def test_rollback_takes_out_exactly_the_refused_generation(history: History) -> None:
    history.stage(1, T0, [delta(rx=100, tx=50, rxp=2, txp=1)])
    history.commit(1)
    history.stage(
        2, T0 + timedelta(minutes=5), [delta(rx=7, tx=3, rxp=1, txp=1), delta("k2", rx=9, rxp=1)]
    )
    history.rollback(2)
    assert history.total("k1", 0) == Totals(100, 50, 2, 1)
    assert history.total("k2", 0) == Totals()
    assert [r[0] for r in rows(history, "hourly")] == ["k1"]  # k2's bucket became zero: deleted
    assert history.last_used("k1") == T0  # the refused save's time is gone too
    assert history.last_used("k2") is None
    assert rows(history, "staged") == []


def test_recover_after_crash_between_stage_and_state_save(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    h = History(path)
    h.stage(1, T0, [delta(rx=100, tx=50)])
    h.commit(1)
    h.stage(2, T0 + H, [delta(rx=7, tx=3)])  # the state file never reached generation 2
    h._db.close()
    after = History(path)
    after.recover(1)
    assert after.total("k1", 0) == Totals(100, 50)
    assert len(rows(after, "hourly")) == 1
    assert rows(after, "staged") == []
    after.close()


def test_recover_after_crash_between_state_save_and_commit(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    h = History(path)
    h.stage(1, T0, [delta(rx=100, tx=50)])
    h._db.close()
    after = History(path)
    after.recover(1)
    assert after.total("k1", 0) == Totals(100, 50)
    assert rows(after, "staged") == []
    after.close()


def test_stage_again_after_a_failed_rollback_counts_once(history: History) -> None:
    history.stage(1, T0, [delta(rx=10)])
    history.commit(1)
    history.stage(2, T0, [delta(rx=5)])
    # The state save failed and the rollback could not run; the service stages generation 2
    # again with the usage it still holds plus what came since.
    history.stage(2, T0, [delta(rx=5 + 6)])
    history.commit(2)
    assert history.total("k1", 0) == Totals(21)


def test_commit_of_a_later_generation_clears_older_leftovers(history: History) -> None:
    history.stage(1, T0, [delta(rx=10)])
    # commit(1) failed to run (database busy): the state has generation 1 anyway.
    history.stage(2, T0, [delta(rx=1)])
    history.commit(2)
    assert rows(history, "staged") == []
    assert history.total("k1", 0) == Totals(11)


def test_stage_on_a_full_disk_raises_sink_error_and_changes_nothing(history: History) -> None:
    history.stage(1, T0, [delta(rx=10)])
    history.commit(1)
    before = (rows(history, "hourly"), rows(history, "keys"), rows(history, "staged"))
    pages = history._read("PRAGMA page_count")[0][0]
    history._read(f"PRAGMA max_page_count = {pages}")
    many = [delta(f"k{i}", rx=i + 1) for i in range(2000)]
    with pytest.raises(SinkError, match="full"):
        history.stage(2, T0, many)
    history.rollback(2)  # what the service does next; must not raise
    assert (rows(history, "hourly"), rows(history, "keys"), rows(history, "staged")) == before
    assert history.total("k1", 0) == Totals(10)


def test_a_refused_cleanup_raises_history_error_and_changes_nothing(history: History) -> None:
    history.stage(1, T0, [delta(rx=10)])
    history.commit(1)
    before = rows(history, "hourly")
    history._read("PRAGMA query_only = 1")
    with pytest.raises(HistoryError, match="retention not applied") as caught:
        history.cleanup(T0 + 5 * D)
    assert isinstance(caught.value, SinkError)  # caught by either name
    history._read("PRAGMA query_only = 0")
    assert rows(history, "hourly") == before and rows(history, "daily") == []


def test_commit_and_rollback_never_raise(tmp_path: Path) -> None:
    h = History(tmp_path / "history.sqlite3")
    h.stage(1, T0, [delta(rx=1)])
    h._db.close()
    h.commit(1)
    h.rollback(2)
    with pytest.raises(SinkError):
        h.stage(2, T0, [delta(rx=1)])


# --- the protocol as a property ------------------------------------------------------------

KEYS = ("k1", "k2", "k3")
deltas_strategy = st.lists(
    st.builds(
        delta,
        key=st.sampled_from(KEYS),
        epoch=st.integers(0, 2),
        rx=st.integers(0, 10**12),
        tx=st.integers(0, 10**12),
        rxp=st.integers(0, 10**6),
        txp=st.integers(0, 10**6),
    ),
    max_size=4,
    unique_by=lambda d: (d.key_id, d.epoch),  # one delta per key and epoch, as the service sends
)
steps = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "commit",
                "rollback",
                "rollback_fails",
                "crash_before_save",
                "crash_after_save",
                "commit_fails",
                "cleanup",
            ]
        ),
        deltas_strategy,
        st.integers(0, 6 * DAY),  # seconds after T0: hours and days apart, sometimes backwards
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_buckets_equal_the_sum_of_committed_deltas(
    script: list[tuple[str, list[UsageDelta], int]],
) -> None:
    """Whatever the order of saves, refusals and crashes, the history holds exactly the usage of
    the generations the state file reached: per key and epoch, and per UTC day."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "history.sqlite3"
        h = History(path, retention_days=3650)
        generation = 0  # what the state file says
        totals: Counter[tuple[str, int, str]] = Counter()
        per_day: Counter[tuple[str, datetime, str]] = Counter()

        def count(deltas: list[UsageDelta], at: datetime) -> None:
            day = days_back(at, 1)[0]
            for d in deltas:
                for field in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets"):
                    totals[(d.key_id, d.epoch, field)] += getattr(d, field)
                for field in ("rx_bytes", "tx_bytes"):
                    per_day[(d.key_id, day, field)] += getattr(d, field)

        def crash() -> History:
            h._db.close()
            again = History(path, retention_days=3650)
            again.recover(generation)
            return again

        for action, deltas, offset in script:
            at = T0 + timedelta(seconds=offset)
            if action == "cleanup":
                h.cleanup(at)
                continue
            h.stage(generation + 1, at, deltas)
            if action == "commit":
                generation += 1
                h.commit(generation)
                count(deltas, at)
            elif action == "commit_fails":  # state saved, commit did not get through
                generation += 1
                count(deltas, at)
            elif action == "rollback":
                h.rollback(generation + 1)
            elif action == "rollback_fails":  # refused save, and the rollback failed too
                pass
            elif action == "crash_before_save":
                h = crash()
            elif action == "crash_after_save":
                generation += 1
                count(deltas, at)
                h = crash()

        h.recover(generation)  # what the next start does
        for key in KEYS:
            for epoch in range(3):
                expected = Totals(
                    *(
                        totals[(key, epoch, f)]
                        for f in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")
                    )
                )
                assert h.total(key, epoch) == expected, (key, epoch)
            days = {b.start: (b.rx_bytes, b.tx_bytes) for b in h.daily(key, T0 - D, T0 + 8 * D)}
            wanted = {
                day: (per_day[(key, day, "rx_bytes")], per_day[(key, day, "tx_bytes")])
                for (k, day, _) in per_day
                if k == key and (per_day[(key, day, "rx_bytes")] or per_day[(key, day, "tx_bytes")])
            }
            assert {day: v for day, v in days.items() if v != (0, 0)} == wanted, key
        assert h._read("SELECT count(*) FROM hourly WHERE rx_bytes < 0 OR tx_bytes < 0")[0][0] == 0
        h.close()


# --- roll-ups and retention ----------------------------------------------------------------


def test_cleanup_moves_hours_older_than_48h_into_days_exactly(history: History) -> None:
    now = datetime(2024, 5, 10, 12, 20, tzinfo=UTC)
    this_hour = datetime(2024, 5, 10, 12, tzinfo=UTC)
    for g, (hours_ago, rx) in enumerate(
        ((0, 1), (47, 2), (48, 4), (49, 8), (60, 16), (72, 32)), start=1
    ):
        history.stage(g, this_hour - hours_ago * H + timedelta(minutes=5), [delta(rx=rx, rxp=1)])
        history.commit(g)
    counts = history.cleanup(now)
    assert counts["hourly_rolled_up"] == 3  # the hours that started before 12:00 two days ago
    kept = [b.start for b in history.hourly("k1", now - 100 * H, now + H)]
    assert kept == [this_hour - 48 * H, this_hour - 47 * H, this_hour]
    # 48 h before 12:00 on May 10 is 12:00 on May 8: that hour stays hourly; older ones move.
    assert rows(history, "daily") == [
        (
            "k1",
            0,
            int(datetime(2024, 5, 7, tzinfo=UTC).timestamp()),
            32,
            0,
            1,
            0,
            (this_hour - 72 * H + timedelta(minutes=5)).timestamp(),
        ),
        (
            "k1",
            0,
            int(datetime(2024, 5, 8, tzinfo=UTC).timestamp()),
            8 + 16,
            0,
            2,
            0,
            (this_hour - 49 * H + timedelta(minutes=5)).timestamp(),
        ),
    ]
    assert history.total("k1", 0) == Totals(63, 0, 6, 0)
    assert [(b.start.day, b.rx_bytes) for b in history.daily("k1", now - 5 * D, now)] == [
        (7, 32),
        (8, 16 + 8 + 4 + 2),  # May 8 holds rolled and hourly buckets
        (10, 1),
    ]
    assert history.cleanup(now)["hourly_rolled_up"] == 0  # idempotent
    assert history.total("k1", 0) == Totals(63, 0, 6, 0)


def test_retention_cleanup_removes_exactly_the_expired_buckets(tmp_path: Path) -> None:
    """A bucket goes once its whole period ended retention_days or more ago: no sooner, no later."""
    h = History(tmp_path / "history.sqlite3", retention_days=10)
    now = datetime(2024, 6, 30, 15, 0, 0, tzinfo=UTC)
    # The cutoff is now - 10 days: 2024-06-20 15:00.
    day = lambda y, m, d: int(datetime(y, m, d, tzinfo=UTC).timestamp())
    # Daily buckets (as if rolled up long ago), key k1; k9 is a deleted key.
    daily = {
        ("k1", day(2024, 6, 18)): True,  # ended 06-19 00:00 < cutoff: expired
        ("k1", day(2024, 6, 19)): True,  # ended 06-20 00:00 < cutoff: expired
        ("k1", day(2024, 6, 20)): False,  # ends 06-21 00:00 > cutoff: kept (partly in retention)
        ("k1", day(2024, 6, 25)): False,
        ("k9", day(2024, 5, 1)): True,
        ("k9", day(2024, 6, 26)): False,  # a deleted key's history stays until retention
    }
    with h._write() as db:
        for key, start in daily:
            db.execute(
                "INSERT INTO daily VALUES (?, 0, ?, 100, 1, 1, 1, ?)", (key, start, start + 60)
            )
        for hours_ago in (0, 1, 47):  # recent hours: never expired
            start = int((now - hours_ago * H).timestamp())
            db.execute("INSERT INTO hourly VALUES ('k1', 1, ?, 5, 5, 1, 1, ?)", (start, start + 1))
        db.execute("INSERT INTO keys VALUES ('k9', 'gone', 'u', 1, 0)")
    counts = h.cleanup(now)
    assert counts["daily_deleted"] == 3
    assert counts["hourly_deleted"] == 0
    left = {(r[0], r[2]) for r in rows(h, "daily")}
    assert left == {bucket for bucket, expired in daily.items() if not expired}
    assert len(rows(h, "hourly")) == 3
    assert h.total("k1", 0) == Totals(200, 2, 2, 2)
    assert h.total("k9", 0) == Totals(100, 1, 1, 1)
    assert "k9" in h.known_keys()
    # One second before the 06-20 bucket ends at the cutoff: kept; at the cutoff: gone.
    almost = datetime(2024, 6, 30, 23, 59, 59, tzinfo=UTC)
    assert h.cleanup(almost)["daily_deleted"] == 0
    assert h.cleanup(almost + timedelta(seconds=1))["daily_deleted"] == 1
    # Meanwhile the hour that started 06-28 16:00 became older than 48 h: moved into its day.
    assert {(r[0], r[2]) for r in rows(h, "daily")} == {
        ("k1", day(2024, 6, 25)),
        ("k9", day(2024, 6, 26)),
        ("k1", day(2024, 6, 28)),
    }
    assert h.total("k1", 1) == Totals(15, 15, 3, 3)
    h.close()


def test_retention_shorter_than_the_hourly_window_deletes_hours(tmp_path: Path) -> None:
    h = History(tmp_path / "history.sqlite3", retention_days=1)
    now = datetime(2024, 6, 30, 15, 30, tzinfo=UTC)
    this_hour = datetime(2024, 6, 30, 15, tzinfo=UTC)
    for g, hours_ago in enumerate((0, 23, 24, 25, 30), start=1):
        h.stage(g, this_hour - hours_ago * H, [delta(rx=hours_ago + 1)])
        h.commit(g)
    counts = h.cleanup(now)
    # The hour that started 25 h ago ended 24 h ago, before the cutoff (now - 24 h = 15:30).
    # The one that started 24 h ago ends at 16:00 the day before: 23.5 h ago, kept.
    assert counts["hourly_deleted"] == 2
    assert [b.start for b in h.hourly("k1", now - 3 * D, now + H)] == [
        this_hour - 24 * H,
        this_hour - 23 * H,
        this_hour,
    ]
    h.close()


def test_cleanup_keeps_whats_within_retention_untouched(history: History) -> None:
    at = datetime(2024, 5, 1, 12, tzinfo=UTC)
    for g in range(1, 4):
        history.stage(g, at + g * D, [delta(rx=g)])
        history.commit(g)
    counts = history.cleanup(at + 10 * D)
    assert counts["daily_deleted"] == counts["hourly_deleted"] == 0
    assert history.total("k1", 0) == Totals(6)
    assert [b.rx_bytes for b in history.daily("k1", at, at + 10 * D)] == [1, 2, 3]
    counts = history.cleanup(at + 92 * D)  # day 1 ended at May 3 00:00, 91.5 days before
    assert counts["daily_deleted"] == 1
    assert history.total("k1", 0) == Totals(5)


def test_undo_of_a_bucket_already_rolled_into_its_day(history: History) -> None:
    history.stage(1, T0, [delta(rx=10)])
    history.commit(1)
    history.stage(2, T0, [delta(rx=5)])  # refused, and the rollback could not run
    history.cleanup(T0 + 3 * D)  # the clock jumped: the hour moved into its day
    history.recover(1)
    assert history.total("k1", 0) == Totals(10)
    assert rows(history, "hourly") == []


# --- queries -------------------------------------------------------------------------------


def test_hourly_and_daily_ranges(history: History) -> None:
    base = datetime(2024, 5, 1, tzinfo=UTC)
    for g, hours in enumerate((0, 5, 23, 24, 49), start=1):
        history.stage(g, base + hours * H, [delta(rx=hours + 1)])
        history.commit(g)
    assert [b.rx_bytes for b in history.hourly("k1", base + 5 * H, base + 24 * H)] == [6, 24]
    # `since` inside an hour includes that hour; `until` is exclusive.
    assert [
        b.rx_bytes
        for b in history.hourly("k1", base + 5.5 * H, base + 24 * H + timedelta(seconds=1))
    ] == [6, 24, 25]
    assert [(b.start, b.rx_bytes) for b in history.daily("k1", base, base + 3 * D)] == [
        (base, 1 + 6 + 24),
        (base + D, 25),
        (base + 2 * D, 50),
    ]
    assert history.daily("k1", base + D + H, base + 2 * D) == [Bucket(base + D, 25, 0, 0, 0)]
    assert history.hourly("nobody", base, base + 3 * D) == []


def test_last_used_and_known_keys(history: History) -> None:
    assert history.last_used("k1") is None
    history.stage(1, T0, [delta(rx=1)])
    history.commit(1)
    history.stage(2, T0 + timedelta(minutes=7, seconds=3), [delta(tx=1)])
    history.commit(2)
    assert history.last_used("k1") == T0 + timedelta(minutes=7, seconds=3)
    history.cleanup(T0 + 5 * D)  # moved into a day: still known
    assert history.last_used("k1") == T0 + timedelta(minutes=7, seconds=3)
    assert history.known_keys()["k1"]["name"] == "name-k1"


def test_stats_count_exactly(history: History) -> None:
    assert history.stats()["records"] == 0
    history.stage(1, T0, [delta("k1", rx=1), delta("k2", rx=1)])
    history.commit(1)
    history.stage(2, T0 + 3 * D, [delta("k1", rx=1)])
    history.commit(2)
    history.cleanup(T0 + 3 * D)  # the first hour of each key moves into its day
    history.record_reports(
        [
            FleetReport("r1", "anna", "s1", 443, "vless", 1, 2),
            FleetReport("r2", "name-k1", "s2", 443, "vless", 1, 2),
        ],
        received_at=T0,
    )
    stats = history.stats()
    assert stats["hourly_records"] == 1 and stats["daily_records"] == 2
    assert stats["report_records"] == 2 and stats["report_series_records"] == 2
    assert stats["records"] == 1 + 2 + 2 + 2
    assert stats["unique_keys"] == 2
    assert stats["unique_users"] == 3  # name-k1, name-k2, anna (name-k1 reported too: once)
    assert stats["unique_servers"] == 2
    assert stats["retention_days"] == 90 and stats["hourly_hours"] == 48
    assert stats["oldest"] == datetime(2024, 5, 1, tzinfo=UTC)
    assert stats["newest"] == datetime(2024, 5, 4, 12, tzinfo=UTC)
    assert stats["size_bytes"] >= history.path.stat().st_size > 0


def test_series_helpers() -> None:
    at = datetime(2024, 5, 1, 0, 10, tzinfo=UTC)
    hours = hours_back(at, 24)
    assert len(hours) == 24 and hours[-1] == datetime(2024, 5, 1, tzinfo=UTC)
    assert hours[0] == datetime(2024, 4, 30, 1, tzinfo=UTC)
    days = days_back(at, 30)
    assert days[-1] == datetime(2024, 5, 1, tzinfo=UTC) and days[0] == datetime(
        2024, 4, 2, tzinfo=UTC
    )


# --- fleet reports -------------------------------------------------------------------------


def report(
    rid: str,
    user: str = "anna",
    server: str = "s1",
    up: int = 0,
    down: int = 0,
    at: datetime | None = None,
) -> FleetReport:
    return FleetReport(rid, user, server, 443, "vless", up, down, at)


def test_reports_are_counted_once_per_report_id(history: History) -> None:
    assert history.record_report(report("a", up=100, down=1000, at=T0)) is True
    assert history.record_report(report("a", up=100, down=1000, at=T0)) is False
    assert history.record_report(report("b", server="s2", up=5, down=7, at=T0 + H)) is True
    assert history.record_reports(
        [report("c", up=1, down=2, at=T0), report("a", up=9, down=9)]
    ) == [True, False]
    by_server = {u.server: u for u in history.reported("anna")}
    assert (
        by_server["s1"].bytes_uploaded,
        by_server["s1"].bytes_downloaded,
        by_server["s1"].reports,
    ) == (101, 1002, 2)
    assert (
        by_server["s2"].bytes_uploaded,
        by_server["s2"].bytes_downloaded,
        by_server["s2"].reports,
    ) == (5, 7, 1)
    assert by_server["s2"].last_seen == T0 + H
    assert history.reported("nobody") == []
    stats = history.reported_stats()
    assert stats == {
        "records": 3,
        "unique_users": 1,
        "unique_servers": 2,
        "servers": ["s1", "s2"],
        "bytes_uploaded": 106,
        "bytes_downloaded": 1009,
    }
    assert history.reported_users() == {"anna": (106, 1009, ["s1", "s2"])}


def test_a_batch_is_stored_all_or_nothing(history: History) -> None:
    broken = FleetReport("y", "anna", "s1", 443, None, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(SinkError):
        history.record_reports([report("x", up=5), broken])
    assert history.reported("anna") == []
    assert history.record_report(report("x", up=5)) is True  # "x" was not remembered either


def test_reported_series_hourly_and_daily(history: History) -> None:
    noon = datetime(2024, 5, 1, 12, tzinfo=UTC)
    history.record_reports(
        [
            report("1", up=1, down=10, at=noon + timedelta(minutes=1)),
            report("2", up=2, down=20, at=noon + timedelta(minutes=59)),
            report("3", server="s2", up=4, down=40, at=noon + H),
            report("4", up=8, down=80, at=noon + D),
        ]
    )
    assert history.reported_hourly("anna", noon, noon + 2 * H) == [
        ReportBucket(noon, 3, 30, 2),
        ReportBucket(noon + H, 4, 40, 1),
    ]
    assert history.reported_hourly("anna", noon, noon + 2 * H, server="s2") == [
        ReportBucket(noon + H, 4, 40, 1)
    ]
    day = datetime(2024, 5, 1, tzinfo=UTC)
    history.cleanup(noon + 4 * D)  # moves all into days
    assert history.reported_daily("anna", day, day + 3 * D) == [
        ReportBucket(day, 7, 70, 3),
        ReportBucket(day + D, 8, 80, 1),
    ]
    assert history.reported_daily("anna", day, day + 3 * D, server="s1") == [
        ReportBucket(day, 3, 30, 2),
        ReportBucket(day + D, 8, 80, 1),
    ]


def test_reset_reports_zeroes_totals_and_keeps_history(history: History) -> None:
    history.record_reports(
        [report("1", up=10, down=100, at=T0), report("2", server="s2", up=1, down=2, at=T0)]
    )
    assert history.reset_reports("anna", at=T0 + H) == {
        "servers": 2,
        "bytes_uploaded": 11,
        "bytes_downloaded": 102,
    }
    assert [
        (u.server, u.bytes_uploaded, u.bytes_downloaded, u.reports)
        for u in history.reported("anna")
    ] == [
        ("s1", 0, 0, 0),
        ("s2", 0, 0, 0),
    ]
    assert history.reports_reset_at("anna") == T0 + H
    assert len(rows(history, "reports")) == 2  # nothing deleted
    assert sum(b.bytes_uploaded for b in history.reported_hourly("anna", T0 - D, T0 + D)) == 11
    history.record_report(report("3", up=5, down=6, at=T0 + 2 * H))
    assert [
        (u.server, u.bytes_uploaded, u.bytes_downloaded, u.reports)
        for u in history.reported("anna")
    ] == [
        ("s1", 5, 6, 1),
        ("s2", 0, 0, 0),
    ]
    assert history.record_report(report("1", up=10, down=100, at=T0)) is False  # still a repeat
    assert history.reset_reports("nobody") == {
        "servers": 0,
        "bytes_uploaded": 0,
        "bytes_downloaded": 0,
    }
    assert history.reports_reset_at("nobody") is None


def test_report_retention_forgets_old_reports_but_not_totals(history: History) -> None:
    history.record_report(report("old", up=1, down=1, at=T0), received_at=T0)
    history.record_report(report("new", up=2, down=2, at=T0 + 80 * D), received_at=T0 + 80 * D)
    counts = history.cleanup(T0 + 91 * D)
    assert counts["reports_deleted"] == 1
    assert counts["report_daily_deleted"] == 1
    assert [u.bytes_uploaded for u in history.reported("anna")] == [3]  # totals are not history
    assert sum(b.bytes_uploaded for b in history.reported_daily("anna", T0 - D, T0 + 100 * D)) == 2


# --- bounds: no stored number overflows, every sum is exact ----------------------------------

FULL = MAX_USAGE_BYTES // MAX_REPORT_BYTES  # reports at the report bound that fill a pair's day


def fill(
    history: History, server: str, at: datetime, count: int = FULL, user: str = "anna"
) -> None:
    """`count` reports of MAX_REPORT_BYTES each way for (user, server), all at `at`."""
    history.record_reports(
        report(
            f"{server}-{at.isoformat()}-{n}", user, server, MAX_REPORT_BYTES, MAX_REPORT_BYTES, at
        )
        for n in range(count)
    )


def assert_refused(history: History, r: FleetReport, because: str) -> None:
    before = (
        rows(history, "reports"),
        rows(history, "report_totals"),
        rows(history, "report_hourly"),
    )
    with pytest.raises(ReportRefused, match=because):
        history.record_reports([report("fine", "bob", "s1", 1, 1, r.timestamp), r])
    assert (
        rows(history, "reports"),
        rows(history, "report_totals"),
        rows(history, "report_hourly"),
    ) == before


def test_totals_past_2_to_the_63_are_exact_integers(history: History) -> None:
    # Ten servers, each at the bound for anna: 10^19 bytes each way, more than SQLite's
    # integers hold (2^63 - 1 = 9.2 * 10^18). Old code: "integer overflow" (507), or floats.
    servers = [f"s{n}" for n in range(10)]
    for server in servers:
        fill(history, server, T0)
    total = 10 * MAX_USAGE_BYTES
    assert total > 2**63
    stats = history.reported_stats()
    assert (stats["bytes_uploaded"], stats["bytes_downloaded"], stats["records"]) == (
        total,
        total,
        10 * FULL,
    )
    assert type(stats["bytes_uploaded"]) is int
    assert history.reported_users() == {"anna": (total, total, servers)}
    assert [(u.bytes_uploaded, u.reports) for u in history.reported("anna")] == [
        (MAX_USAGE_BYTES, FULL)
    ] * 10
    hour = T0.replace(minute=0)
    assert history.reported_hourly("anna", T0 - D, T0 + D) == [
        ReportBucket(hour, total, total, 10 * FULL)
    ]
    history.cleanup(T0 + 3 * D)  # into days: the roll-up stays within the bound as well
    day = T0.replace(hour=0, minute=0)
    assert history.reported_daily("anna", T0 - D, T0 + D) == [
        ReportBucket(day, total, total, 10 * FULL)
    ]
    assert history.reset_reports("anna") == {
        "servers": 10,
        "bytes_uploaded": total,
        "bytes_downloaded": total,
    }


def test_a_report_past_a_pairs_bound_is_refused_and_nothing_is_stored(history: History) -> None:
    fill(history, "s1", T0, FULL // 2)
    fill(history, "s1", T0 + D, FULL // 2)  # two days, so the total is what is full
    late = report("late", "anna", "s1", 1, 0, T0 + 2 * D)
    assert_refused(
        history, late, r"bytes_uploaded of user 'anna' from server 's1' since its last reset past"
    )
    assert history.record_report(report("other", "anna", "s2", 1, 0, T0 + 2 * D)) is True
    history.reset_reports("anna")
    assert history.record_report(late) is True
    assert [(u.server, u.bytes_uploaded) for u in history.reported("anna")] == [
        ("s1", 1),
        ("s2", 0),
    ]


def test_a_servers_day_is_bounded_too_across_resets(history: History) -> None:
    fill(history, "s1", T0)
    history.reset_reports("anna")  # the total is free again, the day is not
    same_day = report("again", "anna", "s1", 0, 1, T0 + H)
    assert_refused(
        history, same_day, r"bytes_downloaded of user 'anna' from server 's1' on 2024-05-01"
    )
    assert history.record_report(report("next", "anna", "s1", 0, 1, T0 + D)) is True


def test_only_a_full_disk_is_507(history: History, tmp_path: Path) -> None:
    history.record_report(report("a", up=1, down=1, at=T0))
    history._db.execute("PRAGMA max_page_count = 1")  # SQLite's own "database or disk is full"
    with pytest.raises(StorageFull, match="full"), storage():
        history.record_reports(report(f"x{n}", up=1, at=T0 + n * D) for n in range(200))
    read_only = History(history.path)
    read_only._db.execute("PRAGMA query_only = 1")  # any other failure: 503
    try:
        with pytest.raises(StoreUnavailable, match="readonly"), storage():
            read_only.record_report(report("b", up=1, at=T0))
    finally:
        read_only.close()
    assert [u.bytes_uploaded for u in history.reported("anna")] == [1]
