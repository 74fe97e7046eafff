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
from collections.abc import AsyncIterator, Awaitable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
import structlog
from psycopg import AsyncConnection, errors
from psycopg.rows import dict_row

from daemon import names
from daemon.bounds import FLEET_CONVERGE_BUDGET, FLEET_START_WAIT
from daemon.errors import Conflict, Invalid, NotFound, OperationError, StoreUnavailable
from daemon.fleet.db import CONNECT_TIMEOUT, MAX_BACKOFF, FleetDB, FleetUnavailable
from daemon.fleet.db import describe_failure as _failure
from daemon.limits import ResetStrategy, Status
from daemon.store.state import KeyRecord
from daemon.xray.links import subscription as subscription_text
from daemon.xray.links import vless_link
from daemon.xray.model import Reality, XrayError, XrayKey

if TYPE_CHECKING:
    from daemon.service.front import Service

Log = structlog.typing.FilteringBoundLogger
CHANNEL = "portmeter_keys"
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
INSERT INTO portmeter.users AS u (name, reset_at) VALUES (%(name)s, date_trunc('second', %(at)s))
ON CONFLICT (name) DO UPDATE SET reset_at = greatest(u.reset_at, excluded.reset_at)
"""
FRESH_TOTALS = "DELETE FROM portmeter.totals WHERE name = %(name)s"
DELETE_KEY = "DELETE FROM portmeter.keys WHERE id = %(id)s"
SELECT_KEYS = f"SELECT {', '.join(COLUMNS)} FROM portmeter.keys"
PUBLISH_SERVER = """
INSERT INTO portmeter.servers AS s (name, public_host, reality_public_key)
VALUES (%(server)s, %(host)s, %(pbk)s)
ON CONFLICT (name) DO UPDATE SET
    public_host = excluded.public_host, reality_public_key = excluded.reality_public_key
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
SELECT sk.server, sk.port, sk.status, s.public_host, s.reality_public_key
FROM portmeter.server_keys sk LEFT JOIN portmeter.servers s ON s.name = sk.server
WHERE sk.key_id = %(id)s AND sk.status IS DISTINCT FROM 'deleted'
ORDER BY sk.server
"""
FLEET_TOTALS = """
SELECT coalesce(sum(rx_bytes), 0) AS rx, coalesce(sum(tx_bytes), 0) AS tx
FROM portmeter.totals WHERE name = %(name)s
"""


@dataclass(frozen=True)
class Subscription:
    """One subscription for the whole fleet: a link per serving server, and usage fleet-wide."""

    body: str
    userinfo: str


def row_of(key: KeyRecord) -> dict[str, Any]:
    """The key as its row in portmeter.keys."""
    row = {name: getattr(key, name) for name in (*IDENTITY, *DESIRED)}
    row.update(name=key.name, same_name=names.fold(key.name))
    row["reset_strategy"] = key.reset_strategy.value
    return row


def desired(row: dict[str, Any]) -> dict[str, Any]:
    """What a node applies of a row, in the types of a KeyRecord."""
    found = {name: row[name] for name in DESIRED}
    found["reset_strategy"] = ResetStrategy(row["reset_strategy"])
    found["groups"] = list(row["groups"])
    return found


def differences(key: KeyRecord, row: dict[str, Any]) -> dict[str, Any]:
    """The followed fields where the key differs from its row."""
    return {name: value for name, value in desired(row).items() if getattr(key, name) != value}


def _clash(keys: Sequence[KeyRecord], exc: errors.UniqueViolation) -> str:
    """The name of `keys` the fleet has already: PostgreSQL's detail names the `same_name`
    (`Key (same_name)=(alice) already exists.`); the first key's name if it cannot be read."""
    detail = exc.diag.message_detail or ""
    folded = detail.partition("=(")[2].rpartition(")")[0]
    return next((key.name for key in keys if names.fold(key.name) == folded), keys[0].name)


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
        self._refused: dict[str, str] = {}  # key id -> why this node cannot apply it (logged once)

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
        """Insert the key and start its name's fleet usage afresh, in one transaction (409 when
        the fleet has the name)."""
        await self.created_many([key])

    async def created_many(self, keys: Sequence[KeyRecord]) -> None:
        """`created` for a batch (README "Batch create"): every key in ONE transaction, all or
        nothing; 409 naming the key when the fleet has one of the names."""
        fresh = [{"name": key.name, "at": key.created_at} for key in keys]
        try:
            await self._write_many(
                (INSERT_KEY, [row_of(key) for key in keys]),
                (FRESH_USER, fresh),
                (FRESH_TOTALS, [{"name": row["name"]} for row in fresh]),
            )
        except errors.UniqueViolation as exc:
            raise Conflict(
                f"a key named {_clash(keys, exc)!r} already exists in the fleet "
                f"(the same name: {names.SAME}); nothing was changed"
            ) from None

    async def changed(self, before: KeyRecord, after: KeyRecord) -> None:
        """Write the followed fields the change changes, and only those: a field another node
        changed meanwhile keeps its change."""
        fields = differences(after, row_of(before))
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
        cannot answer now; local reads go on without it)."""
        try:
            rows = await self._query(KEY_SERVERS, {"id": key.id})
        except (FleetUnavailable, psycopg.Error):
            return None
        return [{"server": r["server"], "port": r["port"], "status": r["status"]} for r in rows]

    async def subscription(self, token: str) -> Subscription | None:
        """The fleet subscription of a token; None when the fleet has no key with it or the
        database cannot answer, so the caller answers from this server alone."""
        try:
            found = await self._query(f"{SELECT_KEYS} WHERE sub_token = %(t)s", {"t": token})
            if not found:
                return None
            row = found[0]
            servers = await self._query(KEY_SERVERS, {"id": row["id"]})
            (totals,) = await self._query(FLEET_TOTALS, {"name": row["name"]})
        except (FleetUnavailable, psycopg.Error):
            return None
        links = [self._link(row, s) for s in servers if s["status"] == Status.ACTIVE.value]
        return Subscription(
            subscription_text(link for link in links if link is not None),
            userinfo(totals["rx"], totals["tx"], row["data_limit_bytes"], row["expire_at"]),
        )

    def _link(self, row: dict[str, Any], server: dict[str, Any]) -> str | None:
        """The key's link on one server: its host, its port there, its REALITY public key."""
        xray = self.service.xray
        if xray is None or not server["public_host"]:
            return None
        key = XrayKey(row["id"], row["name"], str(row["uuid"]), server["port"], row["short_id"])
        options = dataclasses.replace(xray.options, public_host=server["public_host"])
        pbk = server["reality_public_key"]
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
                reason=f"not every key applied within {budget:g}s",
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
            while True:
                await self._woken.wait()
                self._woken = anyio.Event()
                ids, full = self._pending, self._full
                self._pending, self._full = set(), False
                await self.sync_quietly(None if full else ids)

    def wake(self, key_id: str | None) -> None:
        """Sync this key soon (None: every key)."""
        if key_id is None:
            self._full = True
        else:
            self._pending.add(key_id)
        self._woken.set()

    async def _compare_periodically(self) -> None:
        while True:
            await anyio.sleep(self.interval)
            self.wake(None)

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
                    self.wake(None)
                    backoff = 1.0
                    async for note in conn.notifies():
                        self.wake(note.payload)
            except (psycopg.Error, OSError) as exc:
                self.log.warning("fleet_keys_listen_lost", error=_failure(exc), retry_in=backoff)
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF, max(1.0, self.interval))

    async def sync_quietly(
        self, ids: set[str] | None = None, deadline: float | None = None
    ) -> bool:
        """`sync`, a database failure logged once (the next wake or comparison tries again);
        True if it completed."""
        try:
            complete = await self.sync(ids, deadline)
        except (FleetUnavailable, psycopg.Error) as exc:
            error = str(exc) if isinstance(exc, FleetUnavailable) else _failure(exc)
            if error != self._failing:
                self.log.warning("fleet_keys_sync_failed", error=error, remedy="retried")
            self._failing = error
            return False
        self._failing = None
        return complete

    async def sync(self, ids: set[str] | None = None, deadline: float | None = None) -> bool:
        """Make this node's fleet keys what the database holds: all of them (`ids` None), or
        those named. Keys created here with `local` are never touched. With a `deadline`
        (anyio's clock), no operation starts after it: False if some were left for later."""
        async with self._syncing:
            if ids is None:
                await self._publish_server()
            rows = {r["id"]: r for r in await self._rows(ids)}
            if ids is None:  # refusals of keys the fleet no longer has are forgotten
                self._refused = {i: why for i, why in self._refused.items() if i in rows}
            wanted = {i: r for i, r in rows.items() if serves(self.groups, r["groups"])}
            held = self._held()
            scope = set(held) if ids is None else ids & set(held)
            due = [(key_id, None) for key_id in sorted(scope - set(wanted))]
            for key_id, row in due + [(row["id"], row) for row in wanted.values()]:
                if deadline is not None and anyio.current_time() >= deadline:
                    return False
                if row is None:
                    await self._apply(self.service.delete_key(key_id, local=True), key_id)
                else:
                    await self._follow(row, held.get(key_id))
            await self._publish_statuses(None if ids is None else ids)
            return True

    async def _rows(self, ids: set[str] | None) -> list[dict[str, Any]]:
        if ids is None:
            return await self._query(SELECT_KEYS, {})
        return await self._query(f"{SELECT_KEYS} WHERE id = ANY(%(ids)s)", {"ids": list(ids)})

    def _held(self) -> dict[str, KeyRecord]:
        return {key.id: key for key in self.service.state.keys.values() if key.fleet}

    async def _follow(self, row: dict[str, Any], key: KeyRecord | None) -> None:
        if key is None:
            identity = {name: row[name] for name in IDENTITY}
            create = self.service.create_key(
                row["name"], None, desired(row), local=True, identity={**identity, "fleet": True}
            )
            await self._apply(create, row["id"])
        elif changes := differences(key, row):
            await self._apply(self.service.update_key(key.id, changes, local=True), key.id)

    async def _apply(self, operation: Awaitable[KeyRecord], key_id: str) -> None:
        """Run one local operation; a refusal (a name or no port free here) is logged, and the
        key's servers list shows this server without it."""
        try:
            await operation
        except NotFound:
            pass
        except OperationError as exc:
            if self._refused.get(key_id) != exc.detail:
                self.log.error("fleet_key_not_applied", key_id=key_id, error=exc.detail)
            self._refused[key_id] = exc.detail
            return
        self._refused.pop(key_id, None)

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
