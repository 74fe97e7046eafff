"""Usage history in SQLite: per key per hour, rolled up per day, kept for a retention period.

The state file stays the source of truth for current totals; the history agrees with it exactly,
because it is written as a usage sink (daemon.store.usage) in the same step as each state save:
`stage(g)` adds the deltas to the buckets and remembers them under generation g, `commit(g)`
forgets that memory once state generation g is on disk, and `rollback`/`recover` subtract
whatever was staged for a generation the state file never reached. So for every key, the
buckets of one epoch (the usage since its last reset) sum to the key's totals in the state file.

Buckets are UTC: an hour [h, h+1h) per key and epoch, kept as hours for `HOURLY_HOURS` (48 h;
the page charts the last 24 h), then moved into days [d, d+1d). Moving is exact: the daily row
gains exactly what the hourly rows held. A bucket is deleted once its whole period ended at least
`retention_days` ago. Deleting or resetting a key keeps its history; only retention removes it.

Fleet reports (usage other servers push to the report intake, README "Usage history, the
Traffic Manager page, a fleet, Prometheus") are kept beside it: each report once (by report
id; a repeat is ignored), running totals per user and server (a reset zeroes them; the reports
and the series stay) and an hourly/daily series with the same retention.

No stored number can overflow SQLite's signed 64-bit integers: a report carries at most
MAX_REPORT_BYTES per direction (checked at the API), and a report is refused (ReportRefused,
nothing stored) that would bring a user's total from one server since its reset, or that
server's usage for the user in one UTC day, past MAX_USAGE_BYTES. Every bucket of a pair is part
of one day, so no row exceeds the bound and adding two rows stays below 2^63; sums over several
rows (users, servers, days) are taken in Python, whose integers do not overflow.

One connection, guarded by a lock, so the cleanup can run in a worker thread. Timestamps are
stored as Unix seconds.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import structlog

from daemon.atomic import disk_full, failure_reason, make_dirs
from daemon.bounds import MAX_USAGE_BYTES
from daemon.store.state import StateError, now
from daemon.store.usage import SinkError, UsageDelta

SCHEMA_VERSION = 1
HOUR = 3600
DAY = 86400
HOURLY_HOURS = 48  # hourly buckets older than this are moved into daily ones
DEFAULT_RETENTION_DAYS = 90
CLEANUP_INTERVAL = 3600.0
# Every table of buckets: its name, the column of a bucket's start, and a bucket's length.
BUCKET_TABLES = (
    ("hourly", "hour_start", HOUR),
    ("report_hourly", "hour_start", HOUR),
    ("daily", "day_start", DAY),
    ("report_daily", "day_start", DAY),
)
# The end of an INSERT into a bucket table: a bucket that is there already gets the counts added.
ADD_TRAFFIC = (
    "ON CONFLICT DO UPDATE SET rx_bytes = rx_bytes + excluded.rx_bytes, "
    "tx_bytes = tx_bytes + excluded.tx_bytes, rx_packets = rx_packets + excluded.rx_packets, "
    "tx_packets = tx_packets + excluded.tx_packets"
)
# Adding the hours that start before `?` into their days, for keys and for reports.
ROLL_UP_TRAFFIC = (
    "INSERT INTO daily SELECT key_id, epoch, hour_start - hour_start % 86400 AS day, "
    "sum(rx_bytes), sum(tx_bytes), sum(rx_packets), sum(tx_packets), max(last_at) "
    f"FROM hourly WHERE hour_start < ? GROUP BY key_id, epoch, day {ADD_TRAFFIC}, "
    "last_at = max(last_at, excluded.last_at)"
)
ROLL_UP_REPORTS = (
    "INSERT INTO report_daily SELECT user_token, server, "
    "hour_start - hour_start % 86400 AS day, sum(uploaded), sum(downloaded), sum(reports) "
    "FROM report_hourly WHERE hour_start < ? GROUP BY user_token, server, day "
    "ON CONFLICT DO UPDATE SET uploaded = uploaded + excluded.uploaded, "
    "downloaded = downloaded + excluded.downloaded, reports = reports + excluded.reports"
)
ROLL_UPS = (("hourly", ROLL_UP_TRAFFIC), ("report_hourly", ROLL_UP_REPORTS))

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY, name TEXT NOT NULL, uuid TEXT NOT NULL, port INTEGER NOT NULL,
    first_seen REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS keys_name ON keys (name);
CREATE TABLE IF NOT EXISTS hourly (
    key_id TEXT NOT NULL, epoch INTEGER NOT NULL, hour_start INTEGER NOT NULL,
    rx_bytes INTEGER NOT NULL, tx_bytes INTEGER NOT NULL,
    rx_packets INTEGER NOT NULL, tx_packets INTEGER NOT NULL,
    last_at REAL NOT NULL,
    PRIMARY KEY (key_id, epoch, hour_start)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS hourly_time ON hourly (hour_start);
CREATE TABLE IF NOT EXISTS daily (
    key_id TEXT NOT NULL, epoch INTEGER NOT NULL, day_start INTEGER NOT NULL,
    rx_bytes INTEGER NOT NULL, tx_bytes INTEGER NOT NULL,
    rx_packets INTEGER NOT NULL, tx_packets INTEGER NOT NULL,
    last_at REAL NOT NULL,
    PRIMARY KEY (key_id, epoch, day_start)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS daily_time ON daily (day_start);
CREATE TABLE IF NOT EXISTS staged (
    generation INTEGER NOT NULL, key_id TEXT NOT NULL, epoch INTEGER NOT NULL,
    hour_start INTEGER NOT NULL,
    rx_bytes INTEGER NOT NULL, tx_bytes INTEGER NOT NULL,
    rx_packets INTEGER NOT NULL, tx_packets INTEGER NOT NULL,
    prev_last_at REAL,
    PRIMARY KEY (generation, key_id, epoch, hour_start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reports (
    report_id TEXT PRIMARY KEY, user_token TEXT NOT NULL, server TEXT NOT NULL,
    port INTEGER, protocol TEXT NOT NULL,
    bytes_uploaded INTEGER NOT NULL, bytes_downloaded INTEGER NOT NULL,
    reported_at REAL NOT NULL, received_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reports_received ON reports (received_at);
CREATE TABLE IF NOT EXISTS report_totals (
    user_token TEXT NOT NULL, server TEXT NOT NULL, port INTEGER, protocol TEXT NOT NULL,
    uploaded INTEGER NOT NULL, downloaded INTEGER NOT NULL, reports INTEGER NOT NULL,
    offset_uploaded INTEGER NOT NULL DEFAULT 0, offset_downloaded INTEGER NOT NULL DEFAULT 0,
    offset_reports INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    PRIMARY KEY (user_token, server)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS report_users (
    user_token TEXT PRIMARY KEY, resets INTEGER NOT NULL, last_reset_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS report_hourly (
    user_token TEXT NOT NULL, server TEXT NOT NULL, hour_start INTEGER NOT NULL,
    uploaded INTEGER NOT NULL, downloaded INTEGER NOT NULL, reports INTEGER NOT NULL,
    PRIMARY KEY (user_token, server, hour_start)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS report_hourly_time ON report_hourly (hour_start);
CREATE TABLE IF NOT EXISTS report_daily (
    user_token TEXT NOT NULL, server TEXT NOT NULL, day_start INTEGER NOT NULL,
    uploaded INTEGER NOT NULL, downloaded INTEGER NOT NULL, reports INTEGER NOT NULL,
    PRIMARY KEY (user_token, server, day_start)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS report_daily_time ON report_daily (day_start);
"""


class HistoryError(StateError, SinkError):
    """The history database cannot be opened, is not ours, or refused a cleanup; the message
    says what to do. Also a SinkError, so either name catches it."""


class ReportRefused(ValueError):
    """A report would carry a total past MAX_USAGE_BYTES (module docstring); nothing was stored."""


@dataclass(frozen=True, slots=True)
class Totals:
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0


@dataclass(frozen=True, slots=True)
class Bucket:
    """Usage of one key in one hour or day, summed over its epochs."""

    start: datetime
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int


@dataclass(frozen=True, slots=True)
class ReportBucket:
    """Reported usage of one user in one hour or day (one server, or all)."""

    start: datetime
    bytes_uploaded: int
    bytes_downloaded: int
    reports: int


@dataclass(frozen=True, slots=True)
class FleetReport:
    """One usage report from a server: the report intake's fields plus an id and a time."""

    report_id: str
    user_token: str
    server: str
    port: int | None
    protocol: str
    bytes_uploaded: int  # client -> server (rx)
    bytes_downloaded: int  # server -> client (tx)
    timestamp: datetime | None = None  # when the usage was measured; defaults to receipt


@dataclass(frozen=True, slots=True)
class ServerUsage:
    """What one server reported for one user: totals since the user's last reset."""

    server: str
    port: int | None
    protocol: str
    bytes_uploaded: int
    bytes_downloaded: int
    reports: int
    first_seen: datetime
    last_seen: datetime


class History:
    """The usage store of one state directory; a UsageSink."""

    def __init__(
        self,
        path: Path,
        retention_days: int = DEFAULT_RETENTION_DAYS,
        hourly_hours: int = HOURLY_HOURS,
    ) -> None:
        if retention_days < 1:
            raise ValueError("retention_days must be at least 1")
        self.path = path
        self.retention_days = retention_days
        self.hourly_hours = hourly_hours
        self._lock = threading.RLock()
        self._db = self._open(path)

    # --- opening -------------------------------------------------------------------------

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        remedy = f"move {path} away to start a new history (the state file is not affected)"
        try:
            make_dirs(path.parent)
            # Create the file ourselves so it is 0600 from the first byte, never through a
            # link; SQLite gives the -wal and -shm files the mode of the database file.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
        except OSError as exc:
            raise HistoryError(
                f"history database {path} cannot be created: {failure_reason(exc)}",
                disk_full=disk_full(exc),
            ) from None
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a staged generation is on disk before the state file that counts on it.
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=OFF")
            db.executescript(f"BEGIN IMMEDIATE;{SCHEMA}COMMIT;")
            db.execute(
                "CREATE TEMP TABLE IF NOT EXISTS incoming "
                "(key_id TEXT, epoch INTEGER, rx INTEGER, tx INTEGER, rxp INTEGER, txp INTEGER)"
            )
            row = db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise HistoryError(
                    f"history database {path} has schema version {row[0]}, this portmeter "
                    f"reads {SCHEMA_VERSION}; {remedy}"
                )
        except sqlite3.Error as exc:
            db.close()
            raise HistoryError(f"history database {path} is unusable ({exc}); {remedy}") from None
        except HistoryError:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; any SQLite failure rolls it back and raises SinkError."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._failure(exc) from None
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._failure(exc) from None
                raise

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self._failure(exc) from None

    def _failure(self, exc: sqlite3.Error) -> SinkError:
        """SQLite's error as a SinkError; only SQLITE_FULL (no space) counts as a full disk."""
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        return SinkError(
            f"history database {self.path}: {exc}", disk_full=code == sqlite3.SQLITE_FULL
        )

    # --- the UsageSink protocol ----------------------------------------------------------

    def stage(self, generation: int, at: datetime, deltas: Sequence[UsageDelta]) -> None:
        """Add `deltas` to the hour of `at`, remembered under `generation` until commit."""
        moment = _seconds(at)
        hour = _floor(moment, HOUR)
        moved = [d for d in deltas if d.rx_bytes or d.tx_bytes or d.rx_packets or d.tx_packets]
        with self._write() as db:
            # Leftovers of a generation that was refused and could not be rolled back then.
            self._undo(db, above=generation - 1)
            if not moved:
                return
            # Set-based: 10,000 keys stage in tens of milliseconds, not one statement per key.
            db.execute("DELETE FROM temp.incoming")
            db.executemany(
                "INSERT INTO temp.incoming VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (d.key_id, d.epoch, d.rx_bytes, d.tx_bytes, d.rx_packets, d.tx_packets)
                    for d in moved
                ],
            )
            db.executemany(
                "INSERT INTO keys VALUES (?, ?, ?, ?, ?) ON CONFLICT (key_id) DO UPDATE SET "
                "name = excluded.name, uuid = excluded.uuid, port = excluded.port",
                [(d.key_id, d.name, d.uuid, d.port, moment) for d in moved],
            )
            # What undoing needs: the deltas, and each bucket's last_at before this generation.
            db.execute(
                "INSERT INTO staged SELECT ?, i.key_id, i.epoch, ?, sum(i.rx), sum(i.tx),"
                " sum(i.rxp), sum(i.txp), h.last_at FROM temp.incoming AS i LEFT JOIN hourly AS h"
                " ON h.key_id = i.key_id AND h.epoch = i.epoch AND h.hour_start = ?"
                f" WHERE true GROUP BY i.key_id, i.epoch {ADD_TRAFFIC}",
                (generation, hour, hour),
            )
            db.execute(
                "INSERT INTO hourly SELECT key_id, epoch, ?, sum(rx), sum(tx), sum(rxp), sum(txp),"
                f" ? FROM temp.incoming WHERE true GROUP BY key_id, epoch {ADD_TRAFFIC},"
                " last_at = max(last_at, excluded.last_at)",
                (hour, moment),
            )
            db.execute("DELETE FROM temp.incoming")

    def commit(self, generation: int) -> None:
        """State generation `generation` is on disk: forget how to undo it and older ones.

        Never raises: the state is already saved, and rows left behind are removed by the next
        commit or at start (`recover`), without touching the buckets.
        """
        with contextlib.suppress(SinkError), self._write() as db:
            db.execute("DELETE FROM staged WHERE generation <= ?", (generation,))

    def rollback(self, generation: int) -> None:
        """State generation `generation` was not saved: take its usage out again.

        Never raises: if the database refuses now, the rows stay staged and the next `stage`
        of the same generation (or `recover` at start) undoes them first.
        """
        with contextlib.suppress(SinkError), self._write() as db:
            self._undo(db, above=generation - 1)

    def recover(self, committed: int) -> None:
        """At start: undo what was staged for generations the state file (at `committed`) lacks."""
        try:
            with self._write() as db:
                self._undo(db, above=committed)
                db.execute("DELETE FROM staged")
        except SinkError as exc:
            raise HistoryError(
                f"{exc}; cannot recover the history at start", disk_full=exc.disk_full
            ) from None

    def _undo(self, db: sqlite3.Connection, above: int) -> None:
        rows = db.execute(
            "SELECT generation, key_id, epoch, hour_start, rx_bytes, tx_bytes, rx_packets, "
            "tx_packets, prev_last_at FROM staged WHERE generation > ? ORDER BY generation DESC",
            (above,),
        ).fetchall()
        for _, key_id, epoch, hour, rx, tx, rxp, txp, prev_last_at in rows:
            bucket = (key_id, epoch, hour)
            if db.execute(
                "SELECT 1 FROM hourly WHERE key_id = ? AND epoch = ? AND hour_start = ?", bucket
            ).fetchone():
                db.execute(
                    "UPDATE hourly SET rx_bytes = rx_bytes - ?, tx_bytes = tx_bytes - ?, "
                    "rx_packets = rx_packets - ?, tx_packets = tx_packets - ?, "
                    "last_at = coalesce(?, last_at) "
                    "WHERE key_id = ? AND epoch = ? AND hour_start = ?",
                    (rx, tx, rxp, txp, prev_last_at, *bucket),
                )
            else:  # already moved into its day by a cleanup (only after a clock jump)
                db.execute(
                    "UPDATE daily SET rx_bytes = rx_bytes - ?, tx_bytes = tx_bytes - ?, "
                    "rx_packets = rx_packets - ?, tx_packets = tx_packets - ? "
                    "WHERE key_id = ? AND epoch = ? AND day_start = ?",
                    (rx, tx, rxp, txp, key_id, epoch, _floor(hour, DAY)),
                )
        if rows:
            for table in ("hourly", "daily"):
                db.execute(
                    f"DELETE FROM {table} WHERE rx_bytes = 0 AND tx_bytes = 0 "
                    "AND rx_packets = 0 AND tx_packets = 0"
                )
        db.execute("DELETE FROM staged WHERE generation > ?", (above,))

    # --- retention -----------------------------------------------------------------------

    def cleanup(self, at: datetime | None = None) -> dict[str, int]:
        """Move hourly buckets older than `hourly_hours` into days, then delete every bucket
        whose whole period ended `retention_days` or more before `at`. Returns the counts."""
        moment = _seconds(at or now())
        roll_before = _floor(moment, HOUR) - self.hourly_hours * HOUR  # hour_start < this: roll
        cutoff = moment - self.retention_days * DAY  # a period ending at or before this expires
        try:
            counts = self._cleanup(roll_before, cutoff)
        except SinkError as exc:
            raise HistoryError(
                f"{exc}; retention not applied, retried later", disk_full=exc.disk_full
            ) from None
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return counts

    def _cleanup(self, roll_before: int, cutoff: float) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._write() as db:
            for hours, into_days in ROLL_UPS:
                counts[f"{hours}_rolled_up"] = db.execute(
                    f"SELECT count(*) FROM {hours} WHERE hour_start < ?", (roll_before,)
                ).fetchone()[0]
                db.execute(into_days, (roll_before,))
                db.execute(f"DELETE FROM {hours} WHERE hour_start < ?", (roll_before,))
            for table, start, length in BUCKET_TABLES:
                counts[f"{table}_deleted"] = db.execute(
                    f"DELETE FROM {table} WHERE {start} + ? <= ?", (length, cutoff)
                ).rowcount
            # A report id is remembered (repeats ignored) for the retention period.
            counts["reports_deleted"] = db.execute(
                "DELETE FROM reports WHERE received_at <= ?", (cutoff,)
            ).rowcount
            # Names of keys that have no history left.
            db.execute(
                "DELETE FROM keys WHERE key_id NOT IN (SELECT key_id FROM hourly) "
                "AND key_id NOT IN (SELECT key_id FROM daily) "
                "AND key_id NOT IN (SELECT key_id FROM staged)"
            )
        return counts

    # --- queries: keys -------------------------------------------------------------------

    def hourly(self, key_id: str, since: datetime, until: datetime) -> list[Bucket]:
        """Hours starting in [since, until) (`since` rounded down to its hour), oldest first.
        Only the last `hourly_hours` are kept as hours; older usage is in `daily`."""
        rows = self._read(
            "SELECT hour_start, sum(rx_bytes), sum(tx_bytes), sum(rx_packets), sum(tx_packets) "
            "FROM hourly WHERE key_id = ? AND hour_start >= ? AND hour_start < ? "
            "GROUP BY hour_start ORDER BY hour_start",
            (key_id, _floor(_seconds(since), HOUR), _seconds(until)),
        )
        return [Bucket(_moment(r[0]), *r[1:]) for r in rows]

    def daily(self, key_id: str, since: datetime, until: datetime) -> list[Bucket]:
        """UTC days starting in [since, until) (`since` rounded down to its day), oldest first;
        recent days are summed from their hourly buckets."""
        start, end = _floor(_seconds(since), DAY), _seconds(until)
        rows = self._read(
            "SELECT day, sum(rx), sum(tx), sum(rxp), sum(txp) FROM ("
            " SELECT day_start AS day, rx_bytes AS rx, tx_bytes AS tx, rx_packets AS rxp,"
            "  tx_packets AS txp FROM daily WHERE key_id = ?"
            " UNION ALL SELECT hour_start - hour_start % 86400, rx_bytes, tx_bytes, rx_packets,"
            "  tx_packets FROM hourly WHERE key_id = ?"
            ") WHERE day >= ? AND day < ? GROUP BY day ORDER BY day",
            (key_id, key_id, start, end),
        )
        return [Bucket(_moment(r[0]), *r[1:]) for r in rows]

    def total(self, key_id: str, epoch: int) -> Totals:
        """Everything kept for one epoch of a key: its totals since that reset, within retention."""
        row = self._read(
            "SELECT coalesce(sum(rx), 0), coalesce(sum(tx), 0), coalesce(sum(rxp), 0), "
            "coalesce(sum(txp), 0) FROM ("
            " SELECT rx_bytes AS rx, tx_bytes AS tx, rx_packets AS rxp, tx_packets AS txp"
            "  FROM hourly WHERE key_id = ? AND epoch = ?"
            " UNION ALL SELECT rx_bytes, tx_bytes, rx_packets, tx_packets"
            "  FROM daily WHERE key_id = ? AND epoch = ?)",
            (key_id, epoch, key_id, epoch),
        )[0]
        return Totals(*row)

    def last_used(self, key_id: str) -> datetime | None:
        """When traffic of the key was last saved (to the poll interval), or None."""
        row = self._read(
            "SELECT max(m) FROM (SELECT max(last_at) AS m FROM hourly WHERE key_id = ? "
            "UNION ALL SELECT max(last_at) FROM daily WHERE key_id = ?)",
            (key_id, key_id),
        )[0]
        return None if row[0] is None else _moment(row[0])

    def known_keys(self) -> dict[str, dict[str, Any]]:
        """Every key with history, deleted ones included: id -> name, uuid, port, first_seen."""
        rows = self._read("SELECT key_id, name, uuid, port, first_seen FROM keys")
        return {
            r[0]: {"name": r[1], "uuid": r[2], "port": r[3], "first_seen": _moment(r[4])}
            for r in rows
        }

    def stats(self) -> dict[str, Any]:
        """Database information: rows, users, servers, size, retention, oldest/newest bucket."""
        hourly, daily, keys, oldest, newest = self._read(
            "SELECT (SELECT count(*) FROM hourly), (SELECT count(*) FROM daily),"
            " (SELECT count(DISTINCT key_id) FROM"
            "   (SELECT key_id FROM hourly UNION SELECT key_id FROM daily)),"
            " min(s), max(s) FROM (SELECT min(hour_start) AS s FROM hourly"
            " UNION ALL SELECT max(hour_start) FROM hourly"
            " UNION ALL SELECT min(day_start) FROM daily"
            " UNION ALL SELECT max(day_start) FROM daily)"
        )[0]
        reports, report_series, servers, users = self._read(
            "SELECT (SELECT count(*) FROM reports),"
            " (SELECT count(*) FROM report_hourly) + (SELECT count(*) FROM report_daily),"
            " (SELECT count(DISTINCT server) FROM report_totals),"
            " (SELECT count(*) FROM (SELECT name FROM keys WHERE key_id IN"
            "   (SELECT key_id FROM hourly UNION SELECT key_id FROM daily)"
            "  UNION SELECT user_token FROM report_totals))"
        )[0]
        return {
            "records": hourly + daily + reports + report_series,
            "hourly_records": hourly,
            "daily_records": daily,
            "report_records": reports,
            "report_series_records": report_series,
            "unique_keys": keys,
            "unique_users": users,
            "unique_servers": servers,
            "size_bytes": self.size_bytes(),
            "retention_days": self.retention_days,
            "hourly_hours": self.hourly_hours,
            "oldest": None if oldest is None else _moment(oldest),
            "newest": None if newest is None else _moment(newest),
        }

    def size_bytes(self) -> int:
        size = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                size += os.path.getsize(f"{self.path}{suffix}")
        return size

    # --- fleet reports -------------------------------------------------------------------

    def record_report(self, report: FleetReport, received_at: datetime | None = None) -> bool:
        """Store one report; False if its report id was seen already (nothing changes)."""
        return self.record_reports([report], received_at)[0]

    def record_reports(
        self, reports: Iterable[FleetReport], received_at: datetime | None = None
    ) -> list[bool]:
        """Store reports in one transaction: all or none. True for each new one.

        Raises ReportRefused (nothing stored) when one would pass a bound of the module docstring.
        """
        received = _seconds(received_at or now())
        fresh: list[bool] = []
        with self._write() as db:
            for r in reports:
                at = received if r.timestamp is None else _seconds(r.timestamp)
                fields = (r.user_token, r.server, r.port, r.protocol)
                sent = (r.bytes_uploaded, r.bytes_downloaded)
                inserted = db.execute(
                    "INSERT INTO reports VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (r.report_id, *fields, *sent, at, received),
                ).rowcount
                fresh.append(bool(inserted))
                if not inserted:
                    continue
                _check_room(db, r, at)
                db.execute(
                    "INSERT INTO report_totals (user_token, server, port, protocol, uploaded, "
                    "downloaded, reports, first_seen, last_seen) "
                    "VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?) "
                    "ON CONFLICT DO UPDATE SET uploaded = uploaded + excluded.uploaded, "
                    "downloaded = downloaded + excluded.downloaded, reports = reports + 1, "
                    "port = CASE WHEN excluded.last_seen >= last_seen "
                    "THEN excluded.port ELSE port END, "
                    "protocol = CASE WHEN excluded.last_seen >= last_seen "
                    "THEN excluded.protocol ELSE protocol END, "
                    "first_seen = min(first_seen, excluded.first_seen), "
                    "last_seen = max(last_seen, excluded.last_seen)",
                    (*fields, *sent, at, at),
                )
                db.execute(
                    "INSERT INTO report_hourly VALUES (?, ?, ?, ?, ?, 1) "
                    "ON CONFLICT DO UPDATE SET uploaded = uploaded + excluded.uploaded, "
                    "downloaded = downloaded + excluded.downloaded, reports = reports + 1",
                    (r.user_token, r.server, _floor(at, HOUR), *sent),
                )
        return fresh

    def reported(self, user_token: str) -> list[ServerUsage]:
        """Per server, what was reported for `user_token` since its last reset (by server name)."""
        rows = self._read(
            "SELECT server, port, protocol, uploaded - offset_uploaded,"
            " downloaded - offset_downloaded, reports - offset_reports, first_seen, last_seen"
            " FROM report_totals WHERE user_token = ? ORDER BY server",
            (user_token,),
        )
        return [
            ServerUsage(r[0], r[1], r[2], r[3], r[4], r[5], _moment(r[6]), _moment(r[7]))
            for r in rows
        ]

    def reported_users(self) -> dict[str, tuple[int, int, list[str]]]:
        """Every user that was reported: (uploaded, downloaded since reset, servers)."""
        users: dict[str, tuple[int, int, list[str]]] = {}
        for user, server, up, down in self._read(
            "SELECT user_token, server, uploaded - offset_uploaded, downloaded - offset_downloaded"
            " FROM report_totals ORDER BY user_token, server"
        ):
            total_up, total_down, servers = users.get(user, (0, 0, []))
            users[user] = (total_up + up, total_down + down, [*servers, server])
        return users

    def reported_hourly(
        self, user_token: str, since: datetime, until: datetime, server: str | None = None
    ) -> list[ReportBucket]:
        rows = self._read(
            "SELECT hour_start, uploaded, downloaded, reports FROM report_hourly"
            " WHERE user_token = ? AND (? IS NULL OR server = ?)"
            " AND hour_start >= ? AND hour_start < ?",
            (user_token, server, server, _floor(_seconds(since), HOUR), _seconds(until)),
        )
        return _report_buckets(rows)

    def reported_daily(
        self, user_token: str, since: datetime, until: datetime, server: str | None = None
    ) -> list[ReportBucket]:
        rows = self._read(
            "SELECT day, up, down, n FROM ("
            " SELECT day_start AS day, uploaded AS up, downloaded AS down, reports AS n, server"
            "  FROM report_daily WHERE user_token = ?"
            " UNION ALL SELECT hour_start - hour_start % 86400, uploaded, downloaded, reports,"
            "  server FROM report_hourly WHERE user_token = ?"
            ") WHERE (? IS NULL OR server = ?) AND day >= ? AND day < ?",
            (user_token, user_token, server, server, _floor(_seconds(since), DAY), _seconds(until)),
        )
        return _report_buckets(rows)

    def reported_stats(self) -> dict[str, Any]:
        """Reports kept, users and servers that reported, and the totals since each reset."""
        reports, users, servers = self._read(
            "SELECT (SELECT count(*) FROM reports), count(DISTINCT user_token),"
            " count(DISTINCT server) FROM report_totals"
        )[0]
        names = [r[0] for r in self._read("SELECT DISTINCT server FROM report_totals ORDER BY 1")]
        totals = self._read(
            "SELECT uploaded - offset_uploaded, downloaded - offset_downloaded FROM report_totals"
        )
        return {
            "records": reports,
            "unique_users": users,
            "unique_servers": servers,
            "servers": names,
            "bytes_uploaded": sum(row[0] for row in totals),
            "bytes_downloaded": sum(row[1] for row in totals),
        }

    def reset_reports(self, user_token: str, at: datetime | None = None) -> dict[str, Any]:
        """Zero the reported totals of `user_token`; the reports and the series stay."""
        moment = _seconds(at or now())
        with self._write() as db:
            totals = db.execute(
                "SELECT uploaded - offset_uploaded, downloaded - offset_downloaded"
                " FROM report_totals WHERE user_token = ?",
                (user_token,),
            ).fetchall()
            up, down, servers = sum(t[0] for t in totals), sum(t[1] for t in totals), len(totals)
            # Zeroed, not offset: what is stored since the reset stays within its bound.
            db.execute(
                "UPDATE report_totals SET uploaded = 0, downloaded = 0, reports = 0,"
                " offset_uploaded = 0, offset_downloaded = 0, offset_reports = 0"
                " WHERE user_token = ?",
                (user_token,),
            )
            if servers:
                db.execute(
                    "INSERT INTO report_users VALUES (?, 1, ?) ON CONFLICT DO UPDATE SET"
                    " resets = resets + 1, last_reset_at = excluded.last_reset_at",
                    (user_token, moment),
                )
        return {"servers": servers, "bytes_uploaded": up, "bytes_downloaded": down}

    def reports_reset_at(self, user_token: str) -> datetime | None:
        rows = self._read(
            "SELECT last_reset_at FROM report_users WHERE user_token = ?", (user_token,)
        )
        return _moment(rows[0][0]) if rows else None


async def cleanup_loop(
    history: History, log: structlog.typing.FilteringBoundLogger, interval: float = CLEANUP_INTERVAL
) -> None:
    """Apply retention at start and then every `interval` seconds, in a worker thread."""
    while True:
        try:
            counts = await anyio.to_thread.run_sync(history.cleanup)
            if any(counts.values()):
                log.info("history_cleanup", retention_days=history.retention_days, **counts)
        except SinkError as exc:
            log.error("history_cleanup_failed", error=str(exc))
        await anyio.sleep(interval)


def _check_room(db: sqlite3.Connection, report: FleetReport, at: float) -> None:
    """Raise ReportRefused unless the report's pair total and day stay within MAX_USAGE_BYTES."""
    pair = (report.user_token, report.server)
    day = _floor(at, DAY)
    totals = db.execute(
        "SELECT uploaded, downloaded FROM report_totals WHERE user_token = ? AND server = ?", pair
    ).fetchall()
    days = db.execute(
        "SELECT uploaded, downloaded FROM report_daily WHERE user_token = ? AND server = ?"
        " AND day_start = ? UNION ALL SELECT uploaded, downloaded FROM report_hourly"
        " WHERE user_token = ? AND server = ? AND hour_start >= ? AND hour_start < ?",
        (*pair, day, *pair, day, day + DAY),
    ).fetchall()
    adding = (report.bytes_uploaded, report.bytes_downloaded)
    for rows, what in ((totals, "since its last reset"), (days, f"on {_moment(day).date()} (UTC)")):
        for column, field in enumerate(("bytes_uploaded", "bytes_downloaded")):
            if sum(row[column] for row in rows) + adding[column] > MAX_USAGE_BYTES:
                raise ReportRefused(
                    f"report {report.report_id!r} would bring the {field} of user "
                    f"{report.user_token!r} from server {report.server!r} {what} past "
                    f"{MAX_USAGE_BYTES} bytes; nothing was stored"
                )


def _report_buckets(rows: Iterable[tuple[Any, ...]]) -> list[ReportBucket]:
    """Rows (start, uploaded, downloaded, reports) summed per start in Python, oldest first."""
    sums: dict[int, tuple[int, int, int]] = {}
    for start, up, down, count in rows:
        have = sums.get(start, (0, 0, 0))
        sums[start] = (have[0] + up, have[1] + down, have[2] + count)
    return [ReportBucket(_moment(start), *sums[start]) for start in sorted(sums)]


def _seconds(at: datetime) -> float:
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.timestamp()


def _floor(seconds: float, unit: int) -> int:
    return math.floor(seconds / unit) * unit


def _moment(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def hours_back(at: datetime, hours: int) -> list[datetime]:
    """The starts of the `hours` UTC hours ending with the one holding `at`, oldest first."""
    last = _floor(_seconds(at), HOUR)
    return [_moment(last - i * HOUR) for i in range(hours - 1, -1, -1)]


def days_back(at: datetime, days: int) -> list[datetime]:
    """The starts of the `days` UTC days ending with the one holding `at`, oldest first."""
    last = _floor(_seconds(at), DAY)
    return [_moment(last - i * DAY) for i in range(days - 1, -1, -1)]


__all__ = [
    "Bucket",
    "FleetReport",
    "History",
    "HistoryError",
    "ReportBucket",
    "ReportRefused",
    "ServerUsage",
    "Totals",
    "cleanup_loop",
    "days_back",
    "hours_back",
]
