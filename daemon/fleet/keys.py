"""Keys created once (README "Keys created once"): the fleet database holds the desired keys;
each node writes its own key operations there in the same operation, and follows the rest.

Writing: the service calls `created`, `changed` and `deleted` as the last step of an
operation's all-or-nothing, once this node's side is saved: the other nodes hear of nothing that
is later taken back here, and a write that fails (a name the fleet has, a database that cannot be
used: 409 / 503) takes this node's side back. A change writes only the fields it changes, so two
nodes changing different fields at once both keep theirs. `local` operations (CLI `--local`, API
`?local=true`) leave the fleet out.

Following: a LISTEN connection of its own (outside the pool) wakes a sync of the keys the
notifications name; every poll interval a full comparison is the safety net; at start one full
comparison runs before the node says READY, after waiting for the database at most
FLEET_START_WAIT seconds. What a node applies goes through the service's `local` operations, so
nothing it follows is written back. Each node gives a key a port of its own range; id, uuid,
subscription token and short id are the fleet's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
import structlog
from psycopg import AsyncConnection, errors
from psycopg.rows import dict_row

from daemon import names
from daemon.bounds import (
    FLEET_CONVERGE_BUDGET,
    FLEET_START_WAIT,
    MAX_GROUPS,
    MAX_NAME_CHARS,
    MAX_NOTE_CHARS,
    MAX_USAGE_BYTES,
    SERVER_HEARTBEAT,
    SERVER_SILENT,
)
from daemon.errors import Conflict, Invalid, NotFound, OperationError, StoreUnavailable
from daemon.fleet.db import CONNECT_TIMEOUT, MAX_BACKOFF, FleetDB, FleetUnavailable
from daemon.fleet.db import describe_failure as _failure
from daemon.fleet.rows import (
    SHOWN,
    KeyRow,
    RowRefused,
    ServerRow,
    desired,
    key_row,
    server_row,
    shown,
)
from daemon.limits import Status
from daemon.logs.repeats import Once, RepeatedFailure
from daemon.store.state import KeyRecord
from daemon.xray.links import subscription as subscription_text
from daemon.xray.links import vless_link
from daemon.xray.model import Reality, XrayError, XrayKey

if TYPE_CHECKING:
    from daemon.service.front import Service

Log = structlog.typing.FilteringBoundLogger
CHANNEL = "portmeter_keys"
REFUSED_RETRY = 60.0  # seconds before a row this node refused (its name taken here) is tried again
# The fields a node follows (the rest of a key is its own: port, counters, status, resets).
DESIRED = (
    "data_limit_bytes",
    "expire_at",
    "enabled",
    "reset_strategy",
    "note",
    "groups",
    "speed_limit_bps",
    "max_connections",
    "max_ips",
)
IDENTITY = ("id", "uuid", "sub_token", "short_id", "created_at")
COLUMNS = ("name", "same_name", *IDENTITY, *DESIRED)
INSERT_KEY = (
    f"INSERT INTO portmeter.keys ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join(f'%({c})s' for c in COLUMNS)})"
)
# A new key's name starts its fleet usage afresh: what a deleted key of the name left in the
# ledger is no usage of this one (whole seconds, as the deltas' timestamps are).
FRESH_USER = """
INSERT INTO portmeter.users AS u (name, reset_at)
VALUES (%(name)s, date_trunc('second', least(%(at)s, now())))
ON CONFLICT (name) DO UPDATE SET reset_at = CASE
    WHEN u.reset_at > now() THEN excluded.reset_at ELSE greatest(u.reset_at, excluded.reset_at) END
"""
FRESH_TOTALS = "DELETE FROM portmeter.totals WHERE name = %(name)s"
DELETE_KEY = "DELETE FROM portmeter.keys WHERE id = %(id)s"
# What a node reads of a row: text cut a little past its bound, so a row holding a 1 MB note or a
# million groups costs a node no more than a row at the bounds, and is refused all the same.
READ_AS = {
    "id": "left(id, 64)",
    "name": f"left(name, {4 * MAX_NAME_CHARS + 1})",
    "sub_token": "left(sub_token, 129)",
    "short_id": "left(short_id, 33)",
    "note": f"left(note, {MAX_NOTE_CHARS + 1})",
    "reset_strategy": "left(reset_strategy, 33)",
    "groups": f"ARRAY(SELECT left(g, 65) FROM unnest(groups[1:{MAX_GROUPS + 1}]) AS g)",
}
READ = ", ".join(
    f"{READ_AS[c]} AS {c}" if c in READ_AS else c for c in (*IDENTITY, *DESIRED, "name")
)
SELECT_KEYS = f"SELECT {READ}, version FROM portmeter.keys"
# The rows this node serves (no groups, or one of its own) and the rows it cannot tell (a NULL
# group): their ids and versions, for the comparison to fetch only what changed. A held key's row
# missing here is read by its id (SELECT_BY_ID): deleted, moved to other groups, or damaged.
SERVED_WHERE = """
(cardinality(groups) = 0 OR groups && %(groups)s::text[]
 OR array_position(groups, NULL) IS NOT NULL)
"""
SERVED = f"SELECT left(id, 64), version FROM portmeter.keys WHERE {SERVED_WHERE}"
SELECT_SERVED = f"{SELECT_KEYS} WHERE id = ANY(%(ids)s) AND {SERVED_WHERE}"
SELECT_BY_ID = f"{SELECT_KEYS} WHERE id = ANY(%(ids)s)"
FETCH_CHUNK = 1000  # rows per read of whole rows
PUBLISH_SERVER = """
INSERT INTO portmeter.servers AS s (name, public_host, reality_public_key, last_seen)
VALUES (%(server)s, %(host)s, %(pbk)s, now())
ON CONFLICT (name) DO UPDATE SET
    public_host = excluded.public_host, reality_public_key = excluded.reality_public_key,
    last_seen = now()
"""
PUBLISH_STATUSES = """
INSERT INTO portmeter.server_keys AS k (server, key_id, name, uuid, port, epoch, status)
SELECT %(server)s, * FROM unnest(
    %(ids)s::text[], %(names)s::text[], %(uuids)s::text[], %(ports)s::int[], %(epochs)s::int[],
    %(statuses)s::text[])
ON CONFLICT (server, key_id) DO UPDATE SET
    name = excluded.name, uuid = excluded.uuid, port = excluded.port, epoch = excluded.epoch,
    status = excluded.status, last_seen = greatest(k.last_seen, now())
"""
DROP_STATUSES = """
UPDATE portmeter.server_keys SET status = 'deleted', last_seen = now()
WHERE server = %(server)s AND status <> 'deleted' AND NOT key_id = ANY(%(held)s::text[])
    AND (%(ids)s::text[] IS NULL OR key_id = ANY(%(ids)s::text[]))
"""
KEY_SERVERS = """
SELECT left(sk.server, 129) AS server, sk.port, left(sk.status, 33) AS status,
       left(s.public_host, 254) AS public_host,
       left(s.reality_public_key, 64) AS reality_public_key,
       coalesce(s.last_seen < now() - make_interval(secs => %(silent)s), false) AS silent
FROM portmeter.server_keys sk LEFT JOIN portmeter.servers s ON s.name = sk.server
WHERE sk.key_id = %(id)s AND sk.status IS DISTINCT FROM 'deleted'
ORDER BY sk.server
"""
FLEET_TOTALS = f"""
SELECT coalesce(sum(rx_bytes), 0) AS rx, coalesce(sum(tx_bytes), 0) AS tx
FROM portmeter.totals WHERE name = %(name)s
  AND rx_bytes BETWEEN 0 AND {MAX_USAGE_BYTES} AND tx_bytes BETWEEN 0 AND {MAX_USAGE_BYTES}
"""


@dataclass(frozen=True)
class Subscription:
    """One subscription for the whole fleet: a link per serving server, and usage fleet-wide."""

    body: str
    userinfo: str


def desired_of(key: KeyRecord) -> dict[str, Any]:
    """A key's followed fields."""
    return {name: getattr(key, name) for name in DESIRED}


def row_of(key: KeyRecord) -> dict[str, Any]:
    """The key as its row in portmeter.keys."""
    row = {name: getattr(key, name) for name in (*IDENTITY, *DESIRED)}
    row.update(name=key.name, same_name=names.fold(key.name))
    row["reset_strategy"] = key.reset_strategy.value
    return row


def differences(key: KeyRecord, wanted: dict[str, Any]) -> dict[str, Any]:
    """The followed fields where the key differs from what is wanted of it."""
    return {name: value for name, value in wanted.items() if getattr(key, name) != value}


def fingerprint(key: KeyRecord) -> int:
    """The followed fields of a key, as one number: what a comparison checks for a change made
    here (a `local` operation) without reading the row again."""
    return hash(tuple(_hashable(getattr(key, name)) for name in DESIRED))


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True, slots=True)
class Followed:
    """What this node did with one version of a row: applied (the key's `fingerprint` after),
    or refused (tried again from `retry_at` on, anyio's clock: never for a row that fails the
    checks, after REFUSED_RETRY for a refusal of this node's, such as its name taken here)."""

    version: int
    fingerprint: int | None
    retry_at: float = math.inf


def _clash(keys: Sequence[KeyRecord], exc: errors.UniqueViolation) -> tuple[int, str, str]:
    """Which of `keys` the fleet has already, by what (a column) and the value held: PostgreSQL's
    detail names them (`Key (same_name)=(alice) already exists.`); the first key if it cannot be
    read."""
    detail = exc.diag.message_detail or ""
    column = detail.partition("(")[2].partition(")")[0] or "name"
    held = detail.partition("=(")[2].rpartition(")")[0]
    for at, key in enumerate(keys):
        if column == "same_name" and names.fold(key.name) == held:
            return at, column, held
        if column in ("uuid", "sub_token", "id") and str(getattr(key, column)) == held:
            return at, column, held
    return 0, column, held


def serves(own: Collection[str], groups: Iterable[str]) -> bool:
    """A server serves a key without groups, or one sharing a group with the server's."""
    wanted = set(groups)
    return not wanted or bool(wanted & set(own))


class FleetKeys:
    """This node's side of the fleet's keys: writes its operations, follows the others'."""

    def __init__(self, db: FleetDB, service: Service, log: Log) -> None:
        self.db = db
        self.service = service
        self.log = log
        settings = service.settings
        self.server = settings.server_name
        self.groups = settings.server_groups
        self.interval = settings.poll_interval
        self._syncing = anyio.Lock()
        self._woken = anyio.Event()
        self._pending: set[str] = set()
        self._full = False
        self._published: dict[str, tuple[int, int, str]] = {}  # key id -> port, epoch, status
        self._failing: str | None = None
        self._memo: dict[str, Followed] = {}  # key id -> what this node did with its row
        self._refusals = Once(log)
        self._listen_lost = RepeatedFailure(
            log, "fleet_keys_listen_lost", "fleet_keys_listen_recovered", level=logging.WARNING
        )

    # --- what the service calls inside its operations -------------------------------------------

    def check_serves(self, groups: Sequence[str]) -> None:
        """A fleet key is created on a server that serves it (Invalid otherwise)."""
        if not serves(self.groups, groups):
            mine = ", ".join(self.groups) or "none"
            raise Invalid(
                f"this server serves the groups {mine}, not {', '.join(groups)}: create the key "
                "on a server of one of its groups"
            )

    async def created(self, key: KeyRecord) -> None:
        """Insert the key and start its name's fleet usage afresh, in one transaction (409
        naming the fleet's key when the fleet has the name)."""
        await self._insert([key], batch=False)

    async def created_many(self, keys: Sequence[KeyRecord]) -> None:
        """`created` for a batch (README "Batch create"): every key in ONE transaction, all or
        nothing; 409 naming the item (`keys[i]`) when the fleet has one of the names."""
        await self._insert(keys, batch=True)

    async def _insert(self, keys: Sequence[KeyRecord], *, batch: bool) -> None:
        fresh = [{"name": key.name, "at": key.created_at} for key in keys]
        try:
            await self._write_many(
                (INSERT_KEY, [row_of(key) for key in keys]),
                (FRESH_USER, fresh),
                (FRESH_TOTALS, [{"name": row["name"]} for row in fresh]),
            )
        except errors.UniqueViolation as exc:
            at, column, held = _clash(keys, exc)
            where, tail = (f"keys[{at}]: ", "; nothing was created") if batch else ("", "")
            if column != "same_name":
                detail = f"a key with this {column} already exists in the fleet"
            else:
                name = await self._name_held(held) or keys[at].name
                detail = (
                    f"a key named {name!r} already exists in the fleet "
                    f"(the same name: {names.SAME})"
                )
            raise Conflict(f"{where}{detail}{tail or '; nothing was changed'}") from None

    async def _name_held(self, folded: str) -> str | None:
        """The fleet key's own spelling of a name (the requester's may differ in case)."""
        with contextlib.suppress(FleetUnavailable, psycopg.Error):
            rows = await self._query(
                "SELECT left(name, 65) AS name FROM portmeter.keys WHERE same_name = %(n)s",
                {"n": folded},
            )
            return str(rows[0]["name"]) if rows else None
        return None

    async def changed(self, before: KeyRecord, after: KeyRecord) -> None:
        """Write the followed fields the change changes, and only those: a field another node
        changed meanwhile keeps its change."""
        fields = differences(after, desired_of(before))
        if not before.fleet or not fields:
            return
        assignments = ", ".join(f"{name} = %({name})s" for name in fields)
        update = f"UPDATE portmeter.keys SET {assignments} WHERE id = %(id)s"
        if await self._write((update, row_of(after))) == 0:
            raise NotFound(
                f"the key {before.name!r} was deleted from the fleet; nothing was changed"
            )

    async def deleted(self, key: KeyRecord) -> None:
        """Delete a fleet key's row."""
        if key.fleet:
            await self._write((DELETE_KEY, {"id": key.id}))

    async def _write(self, *statements: tuple[str, dict[str, Any]]) -> int:
        """The statements in one transaction: the first one's row count."""
        async with self._transaction() as conn:
            counts = [(await conn.execute(sql, params)).rowcount for sql, params in statements]
            return counts[0]

    async def _write_many(self, *statements: tuple[str, list[dict[str, Any]]]) -> None:
        """Each statement once per row of parameters (executemany), all in one transaction."""
        async with self._transaction() as conn, conn.cursor() as cursor:
            for sql, rows in statements:
                await cursor.executemany(sql, rows)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A connection inside one transaction. StoreUnavailable (503, with the reason) when the
        database cannot take it; UniqueViolation passes through (the callers name the clash)."""
        try:
            async with self.db.connection() as conn, conn.transaction():
                yield conn
        except FleetUnavailable as exc:
            raise StoreUnavailable(f"{exc}; nothing was changed ({LOCAL_HINT})") from None
        except errors.UniqueViolation:
            raise
        except psycopg.Error as exc:
            raise StoreUnavailable(f"{_failure(exc)}; nothing was changed ({LOCAL_HINT})") from None

    # --- reads for the HTTP layer ---------------------------------------------------------------

    async def servers_of(self, key: KeyRecord) -> list[dict[str, Any]] | None:
        """The servers that serve the key, with its port and status there (None: the database
        cannot answer now; local reads go on without it). A server silent for longer than
        SERVER_SILENT shows as `silent`."""
        try:
            servers = await self._servers(key.id)
        except (FleetUnavailable, psycopg.Error):
            return None
        return [
            {"server": s.server, "port": s.port, "status": "silent" if s.silent else s.status}
            for s in servers
        ]

    async def subscription(self, token: str) -> Subscription | None:
        """The fleet subscription of a token; None when the fleet has no key with it, its row
        fails the checks or the database cannot answer, so the caller answers from this server
        alone. A server's row that fails them gives no link; the others do."""
        try:
            found = await self._query(f"{SELECT_KEYS} WHERE sub_token = %(t)s", {"t": token})
            if not found:
                return None
            row = self._checked(found[0])
            servers = await self._servers(row.id)
            (totals,) = await self._query(FLEET_TOTALS, {"name": row.name})
        except (FleetUnavailable, psycopg.Error):
            return None
        except RowRefused as exc:
            self._refuse(found[0], exc)
            return None
        serving = [s for s in servers if s.status == Status.ACTIVE.value and not s.silent]
        links = [self._link(row, s) for s in serving]
        return Subscription(
            subscription_text(link for link in links if link is not None),
            userinfo(int(totals["rx"]), int(totals["tx"]), row.data_limit_bytes, row.expire_at),
        )

    async def _servers(self, key_id: str) -> list[ServerRow]:
        """The key's servers whose rows pass the checks (the others logged once each)."""
        servers = []
        params = {"id": key_id, "silent": SERVER_SILENT}
        for found in await self._query(KEY_SERVERS, params):
            try:
                servers.append(server_row(found))
            except RowRefused as exc:
                self._refusals.once(
                    ("server_keys", key_id, str(found.get("server")), exc.field),
                    "fleet_server_row_not_used",
                    key_id=key_id,
                    server=shown(found.get("server")),
                    field=exc.field,
                    error=exc.reason,
                )
        return servers

    def _link(self, row: KeyRow, server: ServerRow) -> str | None:
        """The key's link on one server: its host, its port there, its REALITY public key."""
        xray = self.service.xray
        if xray is None or not server.public_host:
            return None
        key = XrayKey(row.id, row.name, str(row.uuid), server.port, row.short_id)
        options = dataclasses.replace(xray.options, public_host=server.public_host)
        pbk = server.reality_public_key
        try:
            return vless_link(key, options, None if pbk is None else Reality("", pbk))
        except XrayError:
            return None

    async def _query(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        async with self.db.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(sql, params)
            return await cursor.fetchall()

    # --- following ------------------------------------------------------------------------------

    async def converge_at_start(self, budget: float = FLEET_CONVERGE_BUDGET) -> None:
        """One full comparison before READY, if the database answers within FLEET_START_WAIT;
        what is not applied within `budget` seconds (a new node joining thousands of keys)
        follows after READY, so a start never outlasts systemd's start timeout."""
        with anyio.move_on_after(FLEET_START_WAIT):
            await self.db.wait_ready()
        if not self.db.ready:
            self.log.warning(
                "fleet_keys_not_converged",
                reason=self.db.status.error or "the fleet database did not answer in time",
                remedy=f"followed once it answers (within {self.interval}s of it)",
            )
            return
        started = anyio.current_time()
        if not await self.sync_quietly(deadline=started + budget):
            self.log.warning(
                "fleet_keys_not_converged",
                reason=self._failing or f"not every key applied within {budget:g}s",
                keys=sum(1 for key in self.service.state.keys.values() if key.fleet),
                remedy="the rest is applied after READY",
            )
            self.wake(None)
            return
        self.log.info(
            "fleet_keys_converged",
            keys=sum(1 for key in self.service.state.keys.values() if key.fleet),
            seconds=round(anyio.current_time() - started, 3),
        )

    async def run(self) -> None:
        """Follow the fleet's keys forever: notifications, and a full comparison per interval."""
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._listen)
            tasks.start_soon(self._compare_periodically)
            tasks.start_soon(self._heartbeat)
            while True:
                await self._woken.wait()
                self._woken = anyio.Event()
                ids, full = self._pending, self._full
                self._pending, self._full = set(), False
                # Thousands of notifications at once (a panel's bulk insert): one comparison
                # reads only what changed, cheaper than reading each named row.
                await self.sync_quietly(None if full or len(ids) > FETCH_CHUNK else ids)

    def wake(self, key_id: str | None) -> None:
        """Sync this key soon (None: every key)."""
        if key_id is None:
            self._full = True
        else:
            self._pending.add(key_id[:SHOWN])
        self._woken.set()

    async def _compare_periodically(self) -> None:
        while True:
            await anyio.sleep(self.interval)
            self.wake(None)

    async def _heartbeat(self) -> None:
        """This server's row, with `last_seen`, at least every SERVER_HEARTBEAT seconds whatever
        the poll interval: subscriptions leave out a server silent for SERVER_SILENT."""
        while True:
            await anyio.sleep(SERVER_HEARTBEAT)
            with contextlib.suppress(FleetUnavailable, psycopg.Error):
                await self._publish_server()

    async def _listen(self) -> None:
        """A connection of its own that LISTENs; lost, it comes back with backoff (at most a poll
        interval), and a full comparison covers what was notified meanwhile."""
        backoff = 1.0
        while True:
            await self.db.wait_ready()
            try:
                async with await AsyncConnection.connect(
                    self.db.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._listen_lost.succeeded()
                    self.wake(None)
                    backoff = 1.0
                    async for note in conn.notifies():
                        self.wake(note.payload)
            except (psycopg.Error, OSError) as exc:
                self._listen_lost.failed(error=_failure(exc), retry_in=backoff)
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF, max(1.0, self.interval))

    async def sync_quietly(
        self, ids: set[str] | None = None, deadline: float | None = None
    ) -> bool:
        """`sync`, whatever fails logged once (the next wake or comparison tries again): no
        database content and no failure ends the node; True if it completed."""
        try:
            complete = await self.sync(ids, deadline)
        except Exception as exc:  # the database is input: nothing in it may end the daemon
            expected = isinstance(exc, FleetUnavailable | psycopg.Error)
            error = str(exc) if isinstance(exc, FleetUnavailable) else _failure(exc)
            if error != self._failing:
                self.log.warning(
                    "fleet_keys_sync_failed",
                    error=error,
                    remedy="retried",
                    exc_info=None if expected else exc,
                )
            self._failing = error
            return False
        if self._failing is not None:
            self.log.info("fleet_keys_sync_recovered")
        self._failing = None
        return complete

    async def sync(self, ids: set[str] | None = None, deadline: float | None = None) -> bool:
        """Make this node's fleet keys what the database holds: all of them (`ids` None), or
        those named. Keys created here with `local` are never touched. A row that fails the
        checks (rows.py) is refused alone, logged once per version, and the key it names is kept
        as this node last applied it. With a `deadline` (anyio's clock), no operation starts
        after it: False if some were left for later."""
        async with self._syncing:
            held = self._held()
            if ids is None:
                await self._publish_server()
                versions = await self._served_versions()
                due = [i for i, version in versions.items() if self._due(i, version, held)]
                due = [i for i in due if self._readable(i, versions[i])]
                due += [i for i in held if i not in versions]  # gone, moved or damaged
            else:
                due, versions = sorted(ids), {}
            wanted, kept, served = await self._checked_rows(due, held)
            present = (set(versions) if ids is None else served) | kept
            scope = set(held) if ids is None else ids & set(held)
            steps = [(key_id, None) for key_id in sorted(scope - present)]
            for key_id, row in steps + [(row.id, row) for row in wanted.values()]:
                if deadline is not None and anyio.current_time() >= deadline:
                    return False
                if row is None:
                    await self._apply(self.service.delete_key(key_id, local=True), key_id, None)
                else:
                    await self._follow(row, held.get(row.id))
            self._memo = {i: m for i, m in self._memo.items() if i in present or i in held}
            await self._publish_statuses(None if ids is None else ids)
            return True

    async def _served_versions(self) -> dict[str, int]:
        async with self.db.connection() as conn:
            cursor = await conn.execute(SERVED, {"groups": list(self.groups)})
            return {key_id: int(version) for key_id, version in await cursor.fetchall()}

    def _due(self, key_id: str, version: int, held: dict[str, KeyRecord]) -> bool:
        """Whether a comparison must read this row whole: a version it has not handled, a
        refusal due for another try, or a key changed or deleted here since (the database's
        version wins)."""
        memo = self._memo.get(key_id)
        if memo is None or memo.version != version:
            return True
        if memo.fingerprint is None:
            return anyio.current_time() >= memo.retry_at
        key = held.get(key_id)
        return key is None or fingerprint(key) != memo.fingerprint

    async def _checked_rows(
        self, ids: Sequence[str], held: Mapping[str, KeyRecord]
    ) -> tuple[dict[str, KeyRow], set[str], set[str]]:
        """The rows of `ids` that pass the checks and that this server serves, the ids of rows
        refused (whose keys this node keeps as they are), and the ids of rows served. Rows of
        other groups are never read whole, except a held key's (to tell a move from damage)."""
        wanted: dict[str, KeyRow] = {}
        kept: set[str] = set()
        for at in range(0, len(ids), FETCH_CHUNK):
            chunk = list(ids[at : at + FETCH_CHUNK])
            found = await self._query(SELECT_SERVED, {"ids": chunk, "groups": list(self.groups)})
            seen = {row["id"] for row in found}
            elsewhere = [i for i in chunk if i in held and i not in seen]
            if elsewhere:
                found += await self._query(SELECT_BY_ID, {"ids": elsewhere})
            for raw in found:
                try:
                    row = self._checked(raw)
                except RowRefused as exc:
                    self._refuse(raw, exc)
                    kept.add(str(raw.get("id")))
                    continue
                if serves(self.groups, row.groups or ()):
                    wanted[row.id] = row
        return wanted, kept, set(wanted)

    def _readable(self, key_id: str, version: int) -> bool:
        """An id a row can be read back by: SERVED cuts ids past SHOWN characters, so a longer
        one (no key id is) is refused from its version alone."""
        if len(key_id) < SHOWN:
            return True
        self._refuse({"id": key_id, "version": version}, RowRefused("id", "is no key id"))
        return False

    def _checked(self, found: dict[str, Any]) -> KeyRow:
        """A row as rows.py checks it, and never the id of another key's name (a lookup by that
        name would find the fleet key instead)."""
        row = key_row(found)
        if any(key.id != row.id for key in self.service.keys_named(row.id)):
            raise RowRefused("id", f"{row.id!r} is the name of another key on this server")
        return row

    def _refuse(self, found: dict[str, Any], exc: RowRefused) -> None:
        """Log a refused row once per version, and remember not to read it again until it
        changes."""
        key_id, version = str(found.get("id")), found.get("version")
        if isinstance(version, int):
            self._memo[key_id] = Followed(version, None)
        self._refusals.once(
            ("keys", key_id, version, exc.field),
            "fleet_key_not_applied",
            key_id=shown(found.get("id")),
            version=version,
            field=exc.field,
            error=exc.reason,
            remedy="fix the row in portmeter.keys; the other keys are not affected",
        )

    def _held(self) -> dict[str, KeyRecord]:
        return {key.id: key for key in self.service.state.keys.values() if key.fleet}

    async def _follow(self, row: KeyRow, key: KeyRecord | None) -> None:
        wanted = desired(row, DESIRED)
        if key is None:
            identity = {name: getattr(row, name) for name in IDENTITY}
            create = self.service.create_key(
                row.name, None, wanted, local=True, identity={**identity, "fleet": True}
            )
            await self._apply(create, row.id, row.version)
        elif changes := differences(key, wanted):
            await self._apply(
                self.service.update_key(key.id, changes, local=True), key.id, row.version
            )
        else:
            self._memo[row.id] = Followed(row.version, fingerprint(key))

    async def _apply(
        self, operation: Awaitable[KeyRecord], key_id: str, version: int | None
    ) -> None:
        """Run one local operation; a refusal (a name or no port free here) is logged once and
        tried again after REFUSED_RETRY, and the key's servers list shows this server without
        it."""
        try:
            done = await operation
        except NotFound:
            return
        except OperationError as exc:
            if version is not None:
                retry = anyio.current_time() + REFUSED_RETRY
                self._memo[key_id] = Followed(version, None, retry)
            self._refusals.once(
                ("apply", key_id, exc.detail),
                "fleet_key_not_applied",
                key_id=key_id,
                error=exc.detail,
                remedy=f"tried again every {REFUSED_RETRY:g}s and when the row changes",
            )
            return
        if version is not None:
            self._memo[key_id] = Followed(version, fingerprint(done))

    async def _publish_server(self) -> None:
        """This server's public host and REALITY public key, for the fleet's subscriptions."""
        xray, state = self.service.xray, self.service.state
        pbk = None if xray is None else xray.server_reality(state).public_key
        host = None if xray is None else xray.options.public_host
        async with self.db.connection() as conn:
            await conn.execute(PUBLISH_SERVER, {"server": self.server, "host": host, "pbk": pbk})

    async def _publish_statuses(self, ids: set[str] | None) -> None:
        """Port, epoch and status of this node's fleet keys where they changed; the keys it no
        longer holds (of `ids`, or of all when None) marked deleted."""
        held = self._held()
        scope = held.keys() if ids is None else ids & held.keys()
        moved = [held[i] for i in scope if self._published.get(i) != _seen(held[i])]
        gone = None if ids is None else sorted(ids - held.keys())
        if not moved and gone == []:
            return
        async with self.db.connection() as conn, conn.transaction():
            if moved:
                await conn.execute(PUBLISH_STATUSES, _status_rows(self.server, moved))
            await conn.execute(
                DROP_STATUSES, {"server": self.server, "held": list(held), "ids": gone}
            )
        self._published = {i: seen for i, seen in self._published.items() if i in held}
        self._published.update((key.id, _seen(key)) for key in moved)


LOCAL_HINT = "--local / ?local=true changes this server alone"


def _seen(key: KeyRecord) -> tuple[int, int, str]:
    return key.port, key.epoch, key.status.value


def _status_rows(server: str, keys: Sequence[KeyRecord]) -> dict[str, Any]:
    return {
        "server": server,
        "ids": [k.id for k in keys],
        "names": [k.name for k in keys],
        "uuids": [str(k.uuid) for k in keys],
        "ports": [k.port for k in keys],
        "epochs": [k.epoch for k in keys],
        "statuses": [k.status.value for k in keys],
    }


def userinfo(rx: int, tx: int, limit: int | None, expire_at: datetime | None) -> str:
    """The `subscription-userinfo` header: upload is what clients sent (rx), download what they
    received (tx), total the limit (0: none), expire a Unix time (0: never)."""
    expire = 0 if expire_at is None else int(expire_at.timestamp())
    return f"upload={rx}; download={tx}; total={limit or 0}; expire={expire}"
