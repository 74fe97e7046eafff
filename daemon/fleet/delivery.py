"""Usage from the `reports` outbox into the fleet database, exactly once (README "A fleet in
PostgreSQL").

Each outbox file is one message: the deltas of one saved state generation (daemon/reports.py)
and, optionally, resets of users. Its dedupe id, the `message_id` it was staged with (files of
older versions lack it: then `server:instance:<file stem>`), goes into `portmeter.reports` in the
same transaction as its rows, so a message re-sent after a crash (between the commit and the
file's removal) adds nothing, and the files of a state line before `portmeter state restore`
keep their own ids. Messages go in file-name order, several
per transaction, in ONE statement per batch: data-modifying CTEs over `unnest` of arrays, joined
on the message ids the dedupe insert returned. A message carrying resets starts a batch of its
own, so its resets apply before its deltas and after every earlier message's.

While the database is down the files wait on disk and counting goes on; the backlog (messages,
rows, bytes, oldest) is kept in memory from each file read once, never re-read to be counted.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import psycopg
import structlog

from daemon import bounds
from daemon.errors import OperationError
from daemon.fleet.db import FleetDB, FleetUnavailable, describe_failure
from daemon.service.kernel_side import describe
from daemon.settings import Settings
from daemon.store.outbox import Outbox
from daemon.store.state import now

Log = structlog.typing.FilteringBoundLogger
Callback = Callable[[], Awaitable[None]]

# One batch: messages and deltas per transaction. 50,000 deltas are a few MB of arrays and a
# transaction of well under a second; a node of 10,000 keys sends five poll intervals at once.
BATCH_MESSAGES = 64
BATCH_DELTAS = 50_000
# Parsed messages kept between counting a file and delivering it, so a file is read once.
CACHE_DELTAS = 2 * BATCH_DELTAS


class Retried:
    """A background step that must never end the daemon's task group: any failure is logged
    once (again when it changes, and its recovery), and the step runs again next round, as the
    poll loop does (daemon/service/loops.py)."""

    def __init__(self, event: str, log: Log) -> None:
        self.event = event
        self.log = log
        self.failing: str | None = None

    async def attempt(self, step: Callback) -> None:
        try:
            await step()
        except Exception as exc:  # whatever fails, the next round tries again
            error = exc.detail if isinstance(exc, OperationError) else describe(exc)
            if error != self.failing:
                self.log.error(
                    self.event,
                    error=error,
                    remedy="tried again next round",
                    exc_info=None if isinstance(exc, OperationError) else exc,
                )
            self.failing = error
            return
        if self.failing is not None:
            self.log.info(f"{self.event.removesuffix('_failed')}_recovered")
            self.failing = None


class BadMessage(ValueError):
    """An outbox file that is not a message this node wrote: set aside, never sent."""


@dataclass(frozen=True, slots=True)
class Message:
    """One outbox file, parsed into the columns the delivery statement takes."""

    stem: str
    size: int
    oldest: datetime | None
    deltas: tuple[list[Any], ...]  # name, key_id, uuid, port, epoch, at, rx, tx, rx_p, tx_p
    resets: tuple[list[Any], ...]  # name, count, at (ISO 8601)
    message_id: str | None = None  # the dedupe id it was staged with, if any

    @property
    def rows(self) -> int:
        return len(self.deltas[0])


@dataclass
class Backlog:
    """What waits in the outbox: kept up to date as files come and go."""

    sizes: dict[str, tuple[int, int, datetime | None]] = field(default_factory=dict)
    rows: int = 0
    bytes: int = 0

    def add(self, message: Message) -> None:
        self.sizes[message.stem] = (message.rows, message.size, message.oldest)
        self.rows += message.rows
        self.bytes += message.size

    def drop(self, stem: str) -> None:
        rows, size, _ = self.sizes.pop(stem, (0, 0, None))
        self.rows -= rows
        self.bytes -= size

    def oldest_at(self) -> datetime | None:
        """The oldest delta waiting: files go in name order, so the first file holds it."""
        for _, _, oldest in self.sizes.values():
            if oldest is not None:
                return oldest
        return None

    def answer(self) -> dict[str, Any]:
        oldest = self.oldest_at()
        return {
            "messages": len(self.sizes),
            "rows": self.rows,
            "bytes": self.bytes,
            "oldest_at": oldest.isoformat() if oldest else None,
        }


def _int(value: object, low: int, high: int, what: str) -> int:
    if type(value) is not int or not low <= value <= high:
        raise BadMessage(f"{what} is not a whole number from {low} to {high}")
    return value


def _text(value: object, what: str, longest: int = 512) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= longest or "\x00" in value:
        raise BadMessage(f"{what} is not a text of 1 to {longest} characters")
    return value


def _delta_columns(reports: list[Any]) -> tuple[list[Any], ...]:
    """The columns of a message's deltas. Reports staged before the DSN was set lack key_id,
    uuid, epoch and packets: key_id and epoch are the report id's last two parts, the rest 0."""
    columns: tuple[list[Any], ...] = tuple([] for _ in range(10))
    most = bounds.MAX_REPORT_BYTES
    for report in reports:
        if not isinstance(report, dict):
            raise BadMessage("a report is not an object")
        _, key_id, epoch = _text(report.get("report_id"), "report_id").rsplit(":", 2)[-3:]
        values = (
            _text(report.get("user_token"), "user_token", bounds.MAX_REF_CHARS),
            str(report.get("key_id", key_id)),
            str(report.get("uuid", "")),
            _int(report.get("port"), bounds.MIN_PORT, bounds.MAX_PORT, "port"),
            _int(report.get("epoch", int(epoch)), 0, bounds.MAX_EPOCH, "epoch"),
            _int(report.get("timestamp"), 0, int(bounds.LATEST_MOMENT.timestamp()), "timestamp"),
            _int(report.get("bytes_uploaded"), 0, most, "bytes_uploaded"),
            _int(report.get("bytes_downloaded"), 0, most, "bytes_downloaded"),
            _int(report.get("rx_packets", 0), 0, most, "rx_packets"),
            _int(report.get("tx_packets", 0), 0, most, "tx_packets"),
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    return columns


def _reset_columns(resets: list[Any]) -> tuple[list[Any], ...]:
    """Resets of a message, one row per name (how many, the latest moment): a name twice in one
    statement's upsert would be an error."""
    merged: dict[str, tuple[int, datetime]] = {}
    for reset in resets:
        if not isinstance(reset, dict):
            raise BadMessage("a reset is not an object")
        name = _text(reset.get("name"), "reset name", bounds.MAX_REF_CHARS)
        try:
            at = datetime.fromisoformat(_text(reset.get("at"), "reset at", 64))
        except ValueError:
            raise BadMessage("reset at is not an ISO 8601 moment") from None
        at = at if at.tzinfo else at.replace(tzinfo=UTC)
        count, latest = merged.get(name, (0, at))
        merged[name] = (count + 1, max(latest, at))
    return (
        list(merged),
        [count for count, _ in merged.values()],
        [at.isoformat() for _, at in merged.values()],
    )


def parse(stem: str, body: bytes) -> Message:
    """An outbox file's message; BadMessage when it is not one this node could have written."""
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadMessage("not JSON") from None
    if not isinstance(message, dict):
        raise BadMessage("not a JSON object")
    reports, resets = message.get("reports", []), message.get("resets", [])
    if not isinstance(reports, list) or not isinstance(resets, list):
        raise BadMessage("reports and resets must be lists")
    message_id = message.get("message_id")
    if message_id is not None:
        message_id = _text(message_id, "message_id")
    try:
        deltas = _delta_columns(reports)
    except ValueError as exc:  # also a report id without key and epoch parts
        raise BadMessage(str(exc) if isinstance(exc, BadMessage) else "bad report_id") from None
    times = deltas[5]
    oldest = datetime.fromtimestamp(min(times), UTC) if times else None
    return Message(stem, len(body), oldest, deltas, _reset_columns(resets), message_id)


# The one statement that adds usage to the ledger (this node's outbox and the webhook intakes of
# daemon/fleet/ingest.py): the whole batch in one round trip. Parameters: the server, the message
# ids (a dedupe id covers a message's deltas: an outbox file, or one webhook report), each delta's
# and reset's message id, then their columns. `since` is each name's reset moment after this
# batch's resets: a delta counts towards the user's totals only from it on. A reset clears the
# name's totals (`clr`) only when it is newer than the stored reset: its moment won the upsert's
# `greatest` and is later than the reset read before it (`prior`), so a reset delivered late,
# after a newer one, only counts (`resets`) and clears nothing. A delta without a
# key_id (a webhook report) leaves server_keys alone. Answers the fresh message ids and the
# largest total it left. Arrays go in binary (`%b`): 20 nodes pushed 92,000 deltas/s so, 38,000
# as text (bench/fleet_ingest.py).
# A stored figure past its bound is damage (README "The database is input too"): adding to it
# could overflow and fail every delivery after, so the delivery's own figure replaces it.
MAX_COUNT = 10**9  # reports and resets counted in one row


def _future(moment: str) -> str:
    """SQL: `moment` (a stored reset) is later than the database's clock allows: damage, read as
    no reset at all (every reset is stamped by that clock, at most `now()`)."""
    return f"{moment} > now() + make_interval(secs => {bounds.FLEET_RESET_SLACK})"


def _added(table: str, column: str, bound: int = bounds.MAX_USAGE_BYTES) -> str:
    """SQL: the stored `column` plus the new figure, or the new figure alone where the stored
    one is outside 0..bound."""
    stored = f"{table}.{column}"
    return (
        f"CASE WHEN {stored} BETWEEN 0 AND {bound} THEN {stored} + excluded.{column} "
        f"ELSE excluded.{column} END"
    )


DELIVER = f"""
WITH msg AS (
    INSERT INTO portmeter.reports (report_id, server, deltas)
    SELECT id, %(server)s, n FROM unnest(%(ids)b::text[], %(counts)b::int[]) AS m(id, n)
    ON CONFLICT DO NOTHING
    RETURNING report_id
), srv AS (
    INSERT INTO portmeter.servers (name, last_delivery_at) VALUES (%(server)s, now())
    ON CONFLICT (name) DO UPDATE SET last_delivery_at = now()
), prior AS (
    SELECT name, reset_at FROM portmeter.users WHERE name = ANY(%(r_name)b::text[])
), rst AS (
    INSERT INTO portmeter.users AS u (name, resets, reset_at)
    SELECT r.name, r.n, least(r.at + make_interval(secs => %(skew)s), now())
    FROM unnest(%(r_msg)b::text[], %(r_name)b::text[], %(r_n)b::int[], %(r_at)b::timestamptz[])
        AS r(msg, name, n, at)
    WHERE r.msg IN (SELECT report_id FROM msg)
    ORDER BY r.name
    ON CONFLICT (name) DO UPDATE
        SET resets = {_added("u", "resets", MAX_COUNT)},
            reset_at = CASE WHEN {_future("u.reset_at")} THEN excluded.reset_at
                            ELSE greatest(u.reset_at, excluded.reset_at) END
    RETURNING name, reset_at
), clr AS (
    SELECT r.name FROM rst AS r LEFT JOIN prior AS p USING (name)
    WHERE (p.reset_at IS NULL OR {_future("p.reset_at")} OR p.reset_at < r.reset_at)
      AND r.reset_at = (
        SELECT max(least(x.at + make_interval(secs => %(skew)s), now()))
        FROM unnest(%(r_name)b::text[], %(r_at)b::timestamptz[]) AS x(name, at)
        WHERE x.name = r.name)
), d AS (
    SELECT d.name, d.key_id, d.uuid, d.port, d.epoch, to_timestamp(d.at + %(skew)s) AS at,
           d.rx, d.tx, d.rxp, d.txp
    FROM unnest(%(d_msg)b::text[], %(d_name)b::text[], %(d_key)b::text[], %(d_uuid)b::text[],
                %(d_port)b::int[], %(d_epoch)b::int[], %(d_at)b::bigint[], %(d_rx)b::bigint[],
                %(d_tx)b::bigint[], %(d_rxp)b::bigint[], %(d_txp)b::bigint[])
        AS d(msg, name, key_id, uuid, port, epoch, at, rx, tx, rxp, txp)
    WHERE d.msg IN (SELECT report_id FROM msg)
), hourly AS (
    INSERT INTO portmeter.usage_hourly AS h
        (name, server, hour, rx_bytes, tx_bytes, rx_packets, tx_packets, reports)
    SELECT name, %(server)s, date_trunc('hour', at, 'UTC') AS hour,
           sum(rx), sum(tx), sum(rxp), sum(txp), count(*)
    FROM d GROUP BY name, hour ORDER BY name, hour
    ON CONFLICT (name, server, hour) DO UPDATE SET
        rx_bytes = {_added("h", "rx_bytes")}, tx_bytes = {_added("h", "tx_bytes")},
        rx_packets = {_added("h", "rx_packets")}, tx_packets = {_added("h", "tx_packets")},
        reports = {_added("h", "reports", MAX_COUNT)}
), keys AS (
    INSERT INTO portmeter.server_keys AS k (server, key_id, name, uuid, port, epoch, last_seen)
    SELECT DISTINCT ON (key_id) %(server)s, key_id, name, uuid, port, epoch, at
    FROM d WHERE key_id IS NOT NULL ORDER BY key_id, at DESC, epoch DESC
    ON CONFLICT (server, key_id) DO UPDATE SET
        name = excluded.name, uuid = excluded.uuid, port = excluded.port,
        epoch = excluded.epoch, last_seen = greatest(k.last_seen, excluded.last_seen)
), since AS (
    SELECT n.name, coalesce(
        r.reset_at, CASE WHEN {_future("u.reset_at")} THEN NULL ELSE u.reset_at END, '-infinity'
    ) AS reset_at
    FROM (SELECT DISTINCT name FROM d) AS n
    LEFT JOIN rst AS r USING (name) LEFT JOIN portmeter.users AS u USING (name)
), counted AS (
    SELECT d.name, sum(d.rx) AS rx, sum(d.tx) AS tx, count(*) AS n,
           (array_agg(d.port ORDER BY d.at DESC))[1] AS port, min(d.at) AS first_at,
           max(d.at) AS last_at
    FROM d JOIN since AS s USING (name) WHERE d.at >= s.reset_at GROUP BY d.name
), cleared AS (
    DELETE FROM portmeter.totals AS t
    WHERE t.name IN (SELECT name FROM clr)
      AND NOT (t.server = %(server)s AND t.name IN (SELECT name FROM counted))
), tot AS (
    INSERT INTO portmeter.totals AS t
        (name, server, rx_bytes, tx_bytes, reports, port, first_at, last_at)
    SELECT name, %(server)s, rx, tx, n, port, first_at, last_at FROM counted ORDER BY name
    ON CONFLICT (name, server) DO UPDATE SET
        rx_bytes = CASE WHEN t.name IN (SELECT name FROM clr) THEN excluded.rx_bytes
                        ELSE {_added("t", "rx_bytes")} END,
        tx_bytes = CASE WHEN t.name IN (SELECT name FROM clr) THEN excluded.tx_bytes
                        ELSE {_added("t", "tx_bytes")} END,
        reports = CASE WHEN t.name IN (SELECT name FROM clr) THEN excluded.reports
                       ELSE {_added("t", "reports", MAX_COUNT)} END,
        first_at = CASE WHEN t.name IN (SELECT name FROM clr) THEN excluded.first_at
                        ELSE least(t.first_at, excluded.first_at) END,
        port = CASE WHEN excluded.last_at >= t.last_at THEN excluded.port ELSE t.port END,
        last_at = greatest(t.last_at, excluded.last_at)
    RETURNING greatest(t.rx_bytes, t.tx_bytes) AS most
)
SELECT (SELECT coalesce(array_agg(report_id), '{{}}') FROM msg),
       (SELECT coalesce(max(most), 0) FROM tot)
"""


def statement_parameters(
    server: str, ids: list[str], batch: list[Message], skew: float = 0.0
) -> dict[str, Any]:
    """The DELIVER statement's parameters for a batch of one server's messages (`ids`: their
    dedupe ids, in order; `skew`: seconds the database's clock is ahead of the server's)."""
    names = ("name", "key", "uuid", "port", "epoch", "at", "rx", "tx", "rxp", "txp")
    params: dict[str, Any] = {
        "server": server,
        "skew": skew,
        "ids": ids,
        "counts": [m.rows for m in batch],
        "d_msg": [i for i, m in zip(ids, batch, strict=True) for _ in range(m.rows)],
        "r_msg": [i for i, m in zip(ids, batch, strict=True) for _ in m.resets[0]],
    }
    for index, name in enumerate(names):
        params[f"d_{name}"] = [v for m in batch for v in m.deltas[index]]
    for index, name in enumerate(("name", "n", "at")):
        params[f"r_{name}"] = [v for m in batch for v in m.resets[index]]
    return params


async def add_usage(
    conn: psycopg.AsyncConnection[Any],
    server: str,
    ids: list[str],
    batch: list[Message],
    skew: float = 0.0,
) -> tuple[set[str], int]:
    """Add one server's messages to the ledger, each dedupe id once (the caller holds the
    transaction): the ids that were new, and the largest total (rx or tx) a user now has.
    Moments are moved by `skew` into the database's clock, and no reset is later than it."""
    cursor = await conn.execute(DELIVER, statement_parameters(server, ids, batch, skew))
    row = await cursor.fetchone()
    assert row is not None
    return set(row[0]), int(row[1])


async def deliver_batch(
    conn: psycopg.AsyncConnection[Any],
    server: str,
    instance: str,
    batch: list[Message],
    skew: float = 0.0,
) -> int:
    """Deliver `batch` in one transaction; how many of its messages were new (not duplicates)."""
    ids = [m.message_id or f"{server}:{instance}:{m.stem}" for m in batch]
    async with conn.transaction():
        fresh, _ = await add_usage(conn, server, ids, batch, skew)
    return len(fresh)


def batches(messages: list[Message]) -> Iterator[list[Message]]:
    """Consecutive messages in batches within the bounds; a message with resets opens one."""
    batch: list[Message] = []
    rows = 0
    for message in messages:
        full = len(batch) >= BATCH_MESSAGES or rows + message.rows > BATCH_DELTAS
        if batch and (full or message.resets[0]):
            yield batch
            batch, rows = [], 0
        batch.append(message)
        rows += message.rows
    if batch:
        yield batch


class Delivery:
    """Drains one node's `reports` outbox into the fleet database, in order, exactly once."""

    def __init__(
        self, db: FleetDB, outbox: Outbox, server: str, instance: str, interval: float, log: Log
    ) -> None:
        self.db = db
        self.outbox = outbox
        self.server = server
        self.instance = instance
        self.interval = interval
        self.log = log
        self.backlog = Backlog()
        self.last_delivered_at: datetime | None = None
        self.on_delivered: list[Callback] = []  # after each batch that committed
        self._hooks: dict[int, Retried] = {}  # each hook's failure, by its place in the list
        self._cache: dict[str, Message] = {}  # parsed when counted, until delivered
        self._cached_rows = 0

    async def run(self) -> None:
        """Count what waits, then deliver whenever the database is ready, forever."""
        while True:
            await self.scan()
            if self.db.ready and self.backlog.sizes:
                await self.drain()
            await self.outbox.wait(self.interval)

    async def scan(self) -> None:
        """Learn of new files (each read once, in a thread) and forget files that went. The
        backlog itself changes only here on the event loop, so a status read never races it."""
        known = set(self.backlog.sizes)
        gone, learned = await anyio.to_thread.run_sync(self._read_new, known)
        for stem in gone:
            self._forget(stem)
        for message in learned:
            self.backlog.add(message)
            if self._cached_rows + message.rows <= CACHE_DELTAS:
                self._cache[message.stem] = message
                self._cached_rows += message.rows

    def _read_new(self, known: set[str]) -> tuple[list[str], list[Message]]:
        """Stems no longer pending, and the new files parsed (blocking: file I/O); a file that
        is not a message is set aside with one log line."""
        paths = self.outbox.pending()
        stems = {path.stem for path in paths}
        learned = []
        for path in paths:
            if path.stem in known:
                continue
            try:
                learned.append(parse(path.stem, self.outbox.read(path)))
            except (OSError, BadMessage) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                self.log.error("fleet_message_refused", message=path.name, error=reason)
                self.outbox.set_aside(path)
        return sorted(known - stems), learned

    def _forget(self, stem: str) -> None:
        self.backlog.drop(stem)
        cached = self._cache.pop(stem, None)
        if cached is not None:
            self._cached_rows -= cached.rows

    def _chunks(self) -> Iterator[list[str]]:
        """The waiting stems in order, in runs of at most one batch's bounds."""
        chunk: list[str] = []
        rows = 0
        for stem in sorted(self.backlog.sizes):
            size = self.backlog.sizes[stem][0]
            if chunk and (len(chunk) >= BATCH_MESSAGES or rows + size > BATCH_DELTAS):
                yield chunk
                chunk, rows = [], 0
            chunk.append(stem)
            rows += size
        if chunk:
            yield chunk

    def _load(self, stems: list[str]) -> list[Message]:
        """The messages of `stems`, from the cache or read again (blocking: file I/O)."""
        return [
            self._cache.get(stem)
            or parse(stem, self.outbox.read(self.outbox.directory / f"{stem}.json"))
            for stem in stems
        ]

    async def drain(self) -> None:
        """Deliver everything counted, in order, until done or the database fails."""
        for stems in list(self._chunks()):
            try:
                messages = await anyio.to_thread.run_sync(self._load, stems)
            except (OSError, BadMessage):
                return  # changed under us: the next scan sets it aside
            for batch in batches(messages):
                if not await self._deliver(batch):
                    return

    async def _deliver(self, batch: list[Message]) -> bool:
        try:
            async with self.db.connection() as conn:
                skew = await self.db.measure_skew(conn)
                new = await deliver_batch(conn, self.server, self.instance, batch, skew)
        except FleetUnavailable:
            return False
        except psycopg.Error as exc:
            self.log.error("fleet_delivery_failed", error=describe_failure(exc))
            return False
        await anyio.to_thread.run_sync(self._remove, batch)
        for message in batch:
            self._forget(message.stem)
        self.last_delivered_at = now()
        self.log.info(
            "fleet_delivered",
            messages=len(batch),
            duplicates=len(batch) - new,
            rows=sum(m.rows for m in batch),
        )
        await self._tell_delivered()
        return True

    async def _tell_delivered(self) -> None:
        """Run each hook; a hook's failure is logged and never ends the delivery (which runs in
        the daemon's task group): the hook runs again after the next batch."""
        for index, callback in enumerate(self.on_delivered):
            guard = self._hooks.setdefault(index, Retried("fleet_delivery_hook_failed", self.log))
            await guard.attempt(callback)

    def _remove(self, batch: list[Message]) -> None:
        for message in batch:
            self.outbox.remove(self.outbox.directory / f"{message.stem}.json")

    def status(self) -> dict[str, Any]:
        """The delivery's part of `GET /api/fleet/status`."""
        last = self.last_delivered_at
        return {
            "last_delivered_at": last.isoformat() if last else None,
            "backlog": self.backlog.answer(),
        }


@dataclass
class FleetNode:
    """This node's side of the fleet database: the connection and the delivery."""

    db: FleetDB
    delivery: Delivery
    server: str

    def status(self) -> dict[str, Any]:
        """`GET /api/fleet/status`: is the database in use (and why not), what waits."""
        db = self.db.status
        return {
            "configured": True,
            "reachable": db.reachable,
            "error": db.error,
            "schema_version": db.schema_version,
            "clock_skew_seconds": None if db.clock_skew is None else round(db.clock_skew, 3),
            "server": self.server,
            **self.delivery.status(),
        }


def fleet_node(settings: Settings, instance: str, log: Log) -> FleetNode:
    """The fleet side for a node with PORTMETER_FLEET_DSN set (nothing connects yet)."""
    assert settings.fleet_dsn is not None
    db = FleetDB(settings.fleet_dsn, log)
    outbox = Outbox(settings.state_dir / "reports")
    delivery = Delivery(db, outbox, settings.server_name, instance, settings.poll_interval, log)
    return FleetNode(db, delivery, settings.server_name)
