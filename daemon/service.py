"""The daemon: key operations under one lock, the poll loop, reconciliation, signals, sd_notify.

Every operation that changes the kernel and the state file does the kernel part first and saves
the state before it answers; if saving fails the kernel part is undone, so an acknowledged
operation is on disk and a refused one left nothing behind. A crash between the two leaves at
most objects that no key owns, which the start-up reconciliation removes.

Each reading of the kernel also settles every key: its status (active, limited, expired,
disabled), the quota the kernel must enforce for it, and a periodic reset that came due.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import secrets
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import structlog

from daemon import allocator, limits, metrics, netinfo, xray_sync
from daemon.counters import Counters, NftError, PortReading, TableView, port_gaps
from daemon.errors import Conflict, Invalid, KernelRefused, NotFound, OperationError, StorageFull
from daemon.history import History, cleanup_loop
from daemon.limits import Quota, ResetStrategy, Status
from daemon.reports import FleetReports, Outbox, fleet_outbox, webhook_outbox
from daemon.sdnotify import Notifier
from daemon.settings import Settings
from daemon.state import DirectionModel, KeyRecord, State, StateStore, StorageError, now
from daemon.usage import SinkError, UsageDelta, UsageSink
from daemon.xray_bridge import Pushed, XrayBridge
from daemon.xray_sync import XrayError

Log = structlog.typing.FilteringBoundLogger
DIRECTIONS = ("rx", "tx", "dropped")
DRIFT_LINES = 20  # drift problems logged one by one at start; the rest as a count
SETTABLE = frozenset({"note", "enabled", "data_limit_bytes", "expire_at", "reset_strategy"})


@dataclass(slots=True)
class Refresh:
    """What one reading of the kernel found and did."""

    changed: bool = False
    table_rebuilt: bool = False
    installed: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)  # keys whose kernel reading changed


class Service:
    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        state: State,
        counters: Counters,
        outbox: Outbox,
        log: Log,
        xray: XrayBridge | None = None,
        sinks: Sequence[UsageSink] = (),
        history: History | None = None,
    ) -> None:
        self.settings = settings
        self.history = history
        self.xray = xray
        self.sinks = list(sinks)
        self._pending: dict[tuple[str, int], UsageDelta] = {}  # traffic since the last save
        self.store = store
        self.state = state
        self.counters = counters
        self.outbox = outbox
        self.log = log
        self.zone = ZoneInfo(settings.timezone)
        self.lock = anyio.Lock()
        self.last_poll_at: float | None = None
        self.last_poll_seconds: float | None = None
        self._unsaved = False  # in-memory totals or statuses newer than the state file
        # Ids of keys changed (or deleted) since the last save: a save writes only these.
        self._dirty: set[str] = set()
        # Ids of keys changed since the last Xray push (None: not known, look at every key).
        self._xray_stale: set[str] | None = None
        self._read_started = 0.0  # monotonic time the last kernel reading began
        self._connections_lock = anyio.Lock()
        self._connections: dict[int, int] = {}
        self._connections_counted = 0.0  # monotonic time the last connection count began
        self._statuses_moved = False  # a key's status changed since the last Xray push
        self._kernel_limits: dict[int, int | None] = {}  # quota limit installed per port
        self._applied: TableView | None = None  # the last full reading taken into the totals
        # A poll settles only the keys whose reading changed, unless a key's expiry or reset
        # time has come (the earliest is kept here) or something asks for all of them.
        self._next_deadline: datetime | None = None
        self._settle_everything = True

    # --- lookups -------------------------------------------------------------------------

    def find(self, ref: str) -> KeyRecord:
        """A key by id, uuid or name (in that order)."""
        keys = self.state.keys
        if ref in keys:
            return keys[ref]
        lowered = ref.lower()
        for key in keys.values():
            if str(key.uuid) == lowered:
                return key
        for key in keys.values():
            if key.name == ref:
                return key
        raise NotFound(f"no key with id, uuid or name {ref!r}")

    def assigned_ports(self) -> dict[str, int]:
        return {key.id: key.port for key in self.state.keys.values()}

    # --- operations ----------------------------------------------------------------------

    async def create_key(
        self, name: str, port: int | None = None, settings: dict[str, Any] | None = None
    ) -> KeyRecord:
        async with self.lock:
            keys = self.state.keys.values()
            if name in {key.name for key in keys}:
                raise Conflict(f"a key named {name!r} already exists")
            assigned = {key.port for key in keys}
            busy = await anyio.to_thread.run_sync(netinfo.bound_ports, self.settings.port_range)
            try:
                chosen = allocator.allocate(self.settings.port_range, assigned, busy, port)
            except allocator.PortUnavailable as exc:
                raise Conflict(str(exc)) from None
            moment = now()
            key = KeyRecord(
                id=self._new_id(), name=name, uuid=uuid.uuid4(), port=chosen, created_at=moment,
                **(settings or {}),
            )
            key.next_reset_at = limits.next_boundary(moment, key.reset_strategy, self.zone)
            key.status = self._status(key, moment, kernel_over=False)
            self._watch_deadlines(key, moment)
            if self.xray is not None:
                self.xray.prepare(self.state, key)
            await self._install_fresh(chosen, self._desired_quota(key))
            self.state.keys[key.id] = key
            self._mark(key.id)
            await self._commit(
                undo_memory=lambda: self.state.keys.pop(key.id, None),
                undo_kernel=lambda: self._uninstall(chosen),
            )
            self.log.info(
                "key_created", key_id=key.id, name=key.name, port=key.port,
                limit=key.data_limit_bytes, expire_at=_iso(key.expire_at), status=key.status.value,
            )
            return key

    async def delete_key(self, ref: str) -> KeyRecord:
        async with self.lock:
            key = self.find(ref)
            await self._refresh_keys([key])  # the final totals, reported and logged, are exact
            del self.state.keys[key.id]
            self._mark(key.id)
            await self._commit(undo_memory=lambda: self.state.keys.__setitem__(key.id, key))
            await self._uninstall(key.port)
            self.log.info(
                "key_deleted", key_id=key.id, name=key.name, port=key.port,
                rx_bytes=key.rx.bytes, tx_bytes=key.tx.bytes,
            )
            return key

    async def reset_traffic(self, ref: str) -> KeyRecord:
        """Zero a key's totals; what the kernel counts from now on is its new usage."""
        async with self.lock:
            key = self.find(ref)
            await self._refresh_keys([key])
            before = key.model_copy(deep=True)
            self._zero(key, now())
            await self._transact(key, before, force_quota=True)
            self.log.info(
                "traffic_reset", key_id=key.id, port=key.port,
                used_before_reset=key.used_before_reset, status=key.status.value,
            )
            return key

    async def update_key(self, ref: str, changes: dict[str, Any]) -> KeyRecord:
        """Change a key's limit, expiry, reset strategy, note or enabled flag; applied at once."""
        unknown = set(changes) - SETTABLE
        if unknown:
            raise ValueError(f"not settable: {sorted(unknown)}")
        async with self.lock:
            key = self.find(ref)
            await self._refresh_keys([key])
            before = key.model_copy(deep=True)
            for name, value in changes.items():
                setattr(key, name, value)
            if "reset_strategy" in changes and changes["reset_strategy"] != before.reset_strategy:
                key.next_reset_at = limits.next_boundary(now(), key.reset_strategy, self.zone)
            await self._transact(key, before)
            self.log.info(
                "key_updated", key_id=key.id, port=key.port, status=key.status.value,
                **{name: _loggable(value) for name, value in changes.items()},
            )
            return key

    async def refresh(self) -> Refresh:
        """Read the kernel now, so answers are exact to this moment.

        Requests that queue up behind one reading share the next: a reading that started after a
        request arrived is as exact for it as one of its own."""
        arrived = time.monotonic()
        async with self.lock:
            if self._read_started > arrived:
                return Refresh()
            return await self._refresh_locked()

    async def refresh_keys(self, refs: Sequence[str], *, skip_missing: bool = False) -> list[KeyRecord]:
        """Read just these keys' counters now: the cost does not grow with the number of keys.
        With `skip_missing`, keys deleted meanwhile are left out instead of refused."""
        async with self.lock:
            keys = [self.state.keys[r] for r in refs if r in self.state.keys] if skip_missing else [
                self.find(ref) for ref in refs
            ]
            if keys:
                await self._refresh_keys(keys)
            return keys

    async def poll_once(self, *, final: bool = False) -> Refresh:
        """Read the kernel, settle every key and persist the totals if anything moved.

        `final`: the last save before exit, always written as a full snapshot, so the next
        start reads one file and no journal."""
        async with self.lock:
            result = await self._refresh_locked()
            await self._follow_statuses()
            if self._unsaved or final:
                self._save_quietly(compact=final)
            return result

    async def reconcile(self) -> Refresh:
        """Make the kernel table match the state: rebuild a damaged table, fix missing entries."""
        async with self.lock:
            result = await self._refresh_locked(check_elements=True)
            self._save_quietly()
            return result

    async def start_xray(self) -> None:
        """At start: give older keys their Xray fields, report drift, repair it if configured."""
        if self.xray is None:
            return
        async with self.lock:
            for key in self.state.keys.values():
                self.xray.prepare(self.state, key)
                self._mark(key.id)
            # Once per start, any key may have changed: a snapshot, which also folds in the
            # journal of the previous run.
            self._save_quietly(compact=True)
        if not self.settings.public_host:
            self.log.warning("public_host_unset", using=self.xray.options.public_host,
                             hint="set PORTMETER_PUBLIC_HOST for share links")
        try:
            problems = await self.xray.drift(self.state)
        except XrayError as exc:
            self.log.error("xray_config_unreadable", error=str(exc))
            return
        for problem in problems[:DRIFT_LINES]:
            self.log.warning("xray_drift", kind=problem.kind, problem=problem.message, port=problem.port)
        if len(problems) > DRIFT_LINES:
            self.log.warning("xray_drift_more", more=len(problems) - DRIFT_LINES, hint="portmeter xray status")
        if not self.settings.xray_autosync or not (problems or self.state.keys):
            return
        try:
            # Without drift this writes nothing, but leaves the rendered config in memory, so
            # the first key operation does not pay for rendering every key.
            await self.sync_xray()
            if problems:
                self.log.info("xray_drift_repaired", problems=len(problems))
        except OperationError as exc:
            self.log.error("xray_sync_failed", error=exc.detail)

    async def connections(self) -> dict[int, int]:
        """Established connections per port, counted now.

        Counting walks the kernel's whole TCP table (6-8 ms here, however few sockets exist), so
        requests that queue up behind one count share the next, as `refresh` does: a count that
        started after a request arrived is as fresh for it as one of its own."""
        arrived = time.monotonic()
        async with self._connections_lock:
            if self._connections_counted > arrived:
                return self._connections
            started = time.monotonic()
            self._connections = await anyio.to_thread.run_sync(netinfo.established_by_port, self.settings.port_range)
            self._connections_counted = started
            return self._connections

    async def check(self) -> list[str]:
        """Every disagreement between state, kernel table and allocator, as readable lines."""
        async with self.lock:
            found = allocator.problems(self.settings.port_range, self.assigned_ports())
            view = await self.counters.read()
            if view is None:
                return [*found, f"nftables table inet {self.counters.table} is missing"]
            found += view.problems
            found += [f"port {port} has an incomplete set of counters" for port in sorted(view.stray)]
            wanted = {key.port for key in self.state.keys.values()}
            gaps = port_gaps(wanted, view, await self.counters.map_elements())
            missing, orphaned = gaps.pop("counters")
            found += [f"port {port} has a key but no counters in the kernel" for port in sorted(missing)]
            found += [f"port {port} has counters in the kernel but no key" for port in sorted(orphaned)]
            for where, (missing, orphaned) in gaps.items():
                found += [f"port {port} is missing from {where}" for port in sorted(missing)]
                found += [f"{where} holds port {port} that no key owns" for port in sorted(orphaned)]
            for key in self.state.keys.values():
                desired = self._desired_quota(key)
                installed = view.ports.get(key.port)
                have = None if installed is None or installed.quota is None else installed.quota.limit
                if (None if desired is None else desired.limit) != have:
                    found.append(f"port {key.port} should have quota {desired} but has limit {have}")
            return found

    # --- keys: status, quota, reset ------------------------------------------------------

    def _status(self, key: KeyRecord, moment: datetime, kernel_over: bool) -> Status:
        return limits.status(
            enabled=key.enabled, expire_at=key.expire_at, limit=key.data_limit_bytes,
            used=key.used_bytes, kernel_over=kernel_over, now=moment,
        )

    def _desired_quota(self, key: KeyRecord) -> Quota | None:
        return limits.kernel_quota(key.status, key.data_limit_bytes, key.used_bytes)

    def _zero(self, key: KeyRecord, moment: datetime) -> None:
        key.used_before_reset = key.used_bytes
        key.last_reset_at = moment
        key.epoch += 1
        for direction in DIRECTIONS:
            model: DirectionModel = getattr(key, direction)
            setattr(key, direction, DirectionModel.of(model.account().reset()))

    async def _transact(self, key: KeyRecord, before: KeyRecord, force_quota: bool = False) -> None:
        """Settle `key` after a change and commit; on failure, put everything back."""
        self._mark(key.id)
        await self._settle(key, now(), kernel_over=False, force_quota=force_quota)

        async def restore_kernel() -> None:
            await self._settle(before, now(), kernel_over=False, force_quota=True, quiet=True)

        await self._commit(
            undo_memory=lambda: self.state.keys.__setitem__(key.id, before), undo_kernel=restore_kernel
        )

    async def _commit(
        self,
        undo_memory: Callable[[], object],
        undo_kernel: Callable[[], Awaitable[None]] | None = None,
        base: dict[str, Any] | None = None,
    ) -> None:
        """Push the keys to Xray, then save the state; if either fails, undo all, newest first."""
        pushed = None
        try:
            if self.xray is not None:
                pushed = await self._push_xray(self.xray, base=base)
            self._save()
        except OperationError:
            if pushed is not None:
                await pushed.undo()
                self._xray_stale = None  # what Xray has now is the file before: look at every key
            undo_memory()
            if undo_kernel is not None:
                await undo_kernel()
            raise

    def _mark(self, key_id: str) -> None:
        """The key changed (or went): the next save writes it, the next Xray push looks at it."""
        self._dirty.add(key_id)
        if self._xray_stale is not None:
            self._xray_stale.add(key_id)

    async def _push_xray(self, xray: XrayBridge, **options: Any) -> Pushed:
        pushed = await xray.push(self.state, changed=self._xray_stale, **options)
        self._xray_stale = set()
        self._statuses_moved = False
        return pushed

    async def sync_xray(self, force_restart: bool = False) -> Pushed:
        """Re-render Xray's config from the state and apply it (repairs drift)."""
        xray = self._require_xray()
        async with self.lock:
            self._xray_stale = None  # a repair looks at every key
            pushed = await self._push_xray(xray, force_restart=force_restart)
            self._save_quietly()
            return pushed

    async def migrate(self, source_path: Path, dry_run: bool) -> tuple[list[str], list[KeyRecord]]:
        """Give every client of a shared VLESS inbound its own key, port and inbound.

        uuid and name (email) are kept, so clients only change port. Idempotent: a second run
        finds nothing to move. The live config is kept as a pre-migration copy first.
        """
        xray = self._require_xray()
        async with self.lock:
            source = await xray.read_source(source_path)
            busy = await anyio.to_thread.run_sync(netinfo.bound_ports, self.settings.port_range)
            plan = xray.plan(source, self.state, busy)
            if dry_run or plan.is_empty:
                return plan.lines(), []
            copy = await xray.keep_original()
            created = [self._migrated_key(move) for move in plan.moves]
            for key in created:
                await self._install_fresh(key.port, self._desired_quota(key))
                self.state.keys[key.id] = key
                self._mark(key.id)
            base = xray_sync.apply_migration(source, plan)

            def forget() -> None:
                for key in created:
                    self.state.keys.pop(key.id, None)

            async def uninstall() -> None:
                for key in created:
                    await self._uninstall(key.port)

            await self._commit(undo_memory=forget, undo_kernel=uninstall, base=base)
            self._settle_everything = True
            self.log.info("xray_migrated", source=str(source_path), keys=len(created), original_copy=copy)
            return plan.lines(), created

    def _migrated_key(self, move: xray_sync.MigrationMove) -> KeyRecord:
        wanted = move.key(self._new_id())
        key = KeyRecord(
            id=wanted.id, name=wanted.name, uuid=uuid.UUID(wanted.uuid), port=wanted.port,
            created_at=now(), flow=wanted.flow or None, migrated=True, short_id=wanted.short_id,
            extra_short_ids=list(wanted.extra_short_ids),
            reality_private_key=None if wanted.reality is None else wanted.reality.private_key,
        )
        assert self.xray is not None
        self.xray.prepare(self.state, key)
        return key

    async def rollback_migration(self) -> tuple[str, list[KeyRecord]]:
        """Restore the pre-migration config byte for byte and delete the keys migration made."""
        xray = self._require_xray()
        async with self.lock:
            await self._refresh_locked()
            migrated = [key for key in self.state.keys.values() if key.migrated]
            for key in migrated:
                del self.state.keys[key.id]
                self._mark(key.id)
            try:
                copy = await xray.restore_original()
                self._save()
            except OperationError:
                for key in migrated:
                    self.state.keys[key.id] = key
                raise
            for key in migrated:
                await self._uninstall(key.port)
            self.log.info("xray_migration_rolled_back", restored=str(copy), keys_removed=len(migrated))
            return str(copy), migrated

    def _require_xray(self) -> XrayBridge:
        if self.xray is None:
            raise Invalid("the Xray integration is off (PORTMETER_XRAY_CONFIG is empty)")
        return self.xray

    async def _follow_statuses(self) -> None:
        """With PORTMETER_XRAY_REMOVE_INACTIVE, keep Xray's inbounds in step with statuses."""
        if self.xray is None or not self.settings.xray_remove_inactive:
            return
        if not self._statuses_moved:
            return
        try:
            await self._push_xray(self.xray)
        except OperationError as exc:
            self.log.error("xray_sync_failed", error=exc.detail)

    async def _settle(
        self,
        key: KeyRecord,
        moment: datetime,
        kernel_over: bool,
        force_quota: bool = False,
        quiet: bool = False,
    ) -> bool:
        """Bring status and kernel quota in line with the key; True if anything changed."""
        changed = False
        if key.next_reset_at is not None and moment >= key.next_reset_at:
            self._zero(key, moment)
            key.next_reset_at = limits.next_boundary(moment, key.reset_strategy, self.zone)
            self._event("key_reset", key, used_before_reset=key.used_before_reset)
            kernel_over, force_quota, changed = False, True, True
        new_status = self._status(key, moment, kernel_over)
        if new_status != key.status:
            previous, key.status = key.status, new_status
            self._statuses_moved = True
            if not quiet:
                self._event(f"key_{new_status.value}", key, previous_status=previous.value)
            changed = True
        if changed:
            self._mark(key.id)
        desired = self._desired_quota(key)
        wanted_limit = None if desired is None else desired.limit
        if force_quota or self._kernel_limits.get(key.port) != wanted_limit:
            await self._kernel("set quota", self.counters.enforce(key.port, desired))
            self._kernel_limits[key.port] = wanted_limit
        self._watch_deadlines(key, moment)
        return changed

    def _watch_deadlines(self, key: KeyRecord, moment: datetime) -> None:
        """Remember the key's expiry and reset time, so the poll settles every key once due."""
        for deadline in (key.expire_at, key.next_reset_at):
            if deadline is not None and deadline > moment and (
                self._next_deadline is None or deadline < self._next_deadline
            ):
                self._next_deadline = deadline

    def _event(self, name: str, key: KeyRecord, **fields: Any) -> None:
        """A status change or reset: a log event, and a webhook message when configured."""
        self.log.info(
            name, key_id=key.id, name=key.name, port=key.port, status=key.status.value,
            used_bytes=key.used_bytes, limit=key.data_limit_bytes, **fields,
        )
        self.outbox.put({
            "event_id": secrets.token_hex(8),
            "event": name,
            "key": {"id": key.id, "name": key.name, "uuid": str(key.uuid), "port": key.port},
            "status": key.status.value,
            "used_bytes": key.used_bytes,
            "data_limit_bytes": key.data_limit_bytes,
            "at": now().isoformat(),
            **fields,
        })

    # --- reading the kernel --------------------------------------------------------------

    async def _refresh_locked(self, check_elements: bool = False) -> Refresh:
        self._read_started = time.monotonic()
        result = Refresh()
        view = await self._kernel("read counters", self.counters.read())
        if view is None and self.state.table_handle is None:
            view = await self._rebuild("table_created", result, level="info")
        elif view is None:
            view = await self._rebuild("table_missing", result)
        else:
            self._apply(view, result)
            if view.problems:
                view = await self._rebuild("table_damaged", result, problems=view.problems)
            else:
                await self._repair(view, result, check_elements)
        await self._settle_all(view, result)
        self.last_poll_at = time.time()
        self.last_poll_seconds = time.monotonic() - self._read_started
        self._unsaved = self._unsaved or result.changed
        return result

    def _apply(self, view: TableView, result: Refresh) -> None:
        if view is self._applied:
            return  # the kernel showed exactly the last reading again: nothing moved
        if self.state.table_handle != view.handle:
            self.state.table_handle = view.handle
            result.changed = True
        before = {} if self._applied is None else self._applied.ports
        for key in self.state.keys.values():
            reading = view.ports.get(key.port)
            if reading is not None and reading is not before.get(key.port):
                self._apply_reading(key, reading, result)
        self._kernel_limits = {
            port: None if reading.quota is None else reading.quota.limit
            for port, reading in view.ports.items()
        }
        self._applied = view

    def _apply_reading(self, key: KeyRecord, reading: PortReading, result: Refresh) -> None:
        result.touched.add(key.id)
        before = (key.rx.bytes, key.tx.bytes, key.rx.packets, key.tx.packets)
        if self._advance(key, reading):
            result.changed = True
            self._mark(key.id)
            self._note_usage(key, before)

    async def _refresh_keys(self, keys: Sequence[KeyRecord]) -> None:
        """Take these keys' readings into their totals and settle them; falls back to a full
        reading when the table is missing, was replaced, or lacks one of them."""
        view = await self._kernel("read counters", self.counters.read_ports([k.port for k in keys]))
        if view is None or view.handle != self.state.table_handle or any(k.port not in view.ports for k in keys):
            await self._refresh_locked()
            return
        result = Refresh()
        moment = now()
        for key in keys:
            reading = view.ports[key.port]
            self._apply_reading(key, reading, result)
            if await self._settle(key, moment, kernel_over=reading.over):
                result.changed = True
        self._unsaved = self._unsaved or result.changed

    def _note_usage(self, key: KeyRecord, before: tuple[int, int, int, int]) -> None:
        """Remember what moved since the last save, for history and fleet reports."""
        if not self.sinks:
            return
        slot = (key.id, key.epoch)
        pending = self._pending.get(slot) or UsageDelta(key.id, key.name, str(key.uuid), key.port, key.epoch)
        self._pending[slot] = pending.plus(
            key.rx.bytes - before[0], key.tx.bytes - before[1],
            key.rx.packets - before[2], key.tx.packets - before[3],
        )

    @staticmethod
    def _advance(key: KeyRecord, reading: PortReading) -> bool:
        moved = False
        for direction in DIRECTIONS:
            current = getattr(reading, direction)
            if current is None:
                continue
            model: DirectionModel = getattr(key, direction)
            account = model.account()
            if account.reading == current:
                continue
            setattr(key, direction, DirectionModel.of(account.advance(current)))
            moved = True
        return moved

    async def _settle_all(self, view: TableView | None, result: Refresh) -> None:
        moment = now()
        due = self._next_deadline is not None and moment >= self._next_deadline
        if self._settle_everything or due or view is None:
            keys = list(self.state.keys.values())
            self._settle_everything, self._next_deadline = False, None
        else:
            keys = [self.state.keys[i] for i in result.touched if i in self.state.keys]
        try:
            for key in keys:
                reading = None if view is None else view.ports.get(key.port)
                over = reading is not None and reading.over
                if await self._settle(key, moment, kernel_over=over):
                    result.changed = True
        except KernelRefused:
            self._settle_everything = True  # retried at the next poll, for every key
            raise

    async def _rebuild(self, event: str, result: Refresh, level: str = "error", **fields: Any) -> TableView | None:
        """Recreate the table from the state; bytes since the last reading are lost and logged."""
        ports = {key.port: self._desired_quota(key) for key in self.state.keys.values()}
        await self._kernel("rebuild table", self.counters.build(ports))
        if level == "info":
            self.log.info(event, table=self.counters.table, keys=len(ports))
        else:
            since = None if self.last_poll_at is None else round(time.time() - self.last_poll_at, 1)
            self.log.error(
                event, table=self.counters.table, keys=len(ports), action="table rebuilt from state",
                lost="traffic since the last reading", seconds_since_last_reading=since, **fields,
            )
        result.table_rebuilt = result.changed = True
        self._settle_everything = True
        view = await self._kernel("read counters", self.counters.read())
        if view is not None:
            self._apply(view, result)
        return view

    async def _repair(self, view: TableView, result: Refresh, check_elements: bool) -> None:
        keys_by_port = {key.port: key for key in self.state.keys.values()}
        elements = await self._kernel("read maps", self.counters.map_elements()) if check_elements else None
        missing: set[int] = set()
        orphans = view.stray - set(keys_by_port)  # half-made leftovers of ports no key owns
        for absent, unowned in port_gaps(set(keys_by_port), view, elements).values():
            missing |= absent
            orphans |= unowned
        if orphans:
            await self._kernel("remove orphans", self.counters.remove_present(orphans))
            self.log.warning("orphan_counters_removed", ports=sorted(orphans))
            result.removed = sorted(orphans)
        for port in sorted(missing):
            key = keys_by_port[port]
            await self._install_fresh(port, self._desired_quota(key))
        if missing:
            self.log.warning("missing_counters_installed", ports=sorted(missing))
            result.installed = sorted(missing)
            self._settle_everything = True
            result.changed = True
            fresh = await self._kernel("read counters", self.counters.read())
            if fresh is not None:
                self._apply(fresh, result)

    async def _install_fresh(self, port: int, quota: Quota | None) -> None:
        """Install a port's objects; a leftover set (crash, tampering) is removed first."""
        try:
            await self.counters.install(port, quota)
        except NftError:
            await self._kernel("remove leftover counters", self.counters.remove_present([port]))
            await self._kernel("install counters", self.counters.install(port, quota))
            self.log.warning("leftover_counters_replaced", port=port)
        self._kernel_limits[port] = None if quota is None else quota.limit

    async def _uninstall(self, port: int) -> None:
        try:
            await self.counters.remove(port)
        except NftError as exc:
            self.log.warning("counter_removal_retried", port=port, error=str(exc))
            await self._kernel("remove counters", self.counters.remove_present([port]))
        self._kernel_limits.pop(port, None)

    async def _kernel(self, what: str, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except NftError as exc:
            self.log.error("nftables_refused", what=what, error=str(exc))
            raise KernelRefused(f"nftables refused to {what}: {exc}") from None

    def _new_id(self) -> str:
        while True:
            candidate = secrets.token_hex(4)
            if candidate not in self.state.keys:
                return candidate

    def _save(self, compact: bool = False) -> None:
        """Save the state; the usage since the last save goes to the sinks in the same step.

        Only the keys marked dirty are written (the store may still choose a full snapshot);
        `compact` asks for a full snapshot. The marks are dropped only once the save succeeded."""
        generation = self.state.generation + 1
        deltas = [d for d in self._pending.values() if d.rx_bytes or d.tx_bytes]
        staged: list[UsageSink] = []
        try:
            if deltas:
                for sink in self.sinks:
                    sink.stage(generation, now(), deltas)
                    staged.append(sink)
            self.state.generation = generation
            self.store.save(self.state, None if compact else self._dirty)
        except (StorageError, SinkError) as exc:
            self.state.generation = generation - 1
            for sink in staged:
                sink.rollback(generation)
            self.log.error("state_write_failed", error=str(exc))
            raise StorageFull(f"{exc}; nothing was changed") from None
        for sink in staged:
            sink.commit(generation)
        self._pending.clear()
        self._dirty.clear()
        self._unsaved = False

    def _save_quietly(self, compact: bool = False) -> None:
        """Persist from a background loop: a failure is logged and retried at the next poll."""
        try:
            self._save(compact)
        except StorageFull:
            pass

    # --- loops ---------------------------------------------------------------------------

    async def poll_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.poll_interval)
            try:
                result = await self.poll_once()
                self.log.debug("poll", seconds=round(self.last_poll_seconds or 0, 4), changed=result.changed)
            except KernelRefused:
                continue  # already logged; the next poll tries again
            if self.settings.metrics_textfile is not None:
                try:
                    await metrics.write_textfile(self, self.settings.metrics_textfile)
                except OSError as exc:
                    self.log.error("metrics_textfile_failed", error=exc.strerror or str(exc))

    async def backup_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.snapshot_interval)
            try:
                async with self.lock:
                    target = self.store.backup(self.state)
                if target is not None:
                    self.log.info("state_backup_written", path=str(target))
            except StorageError as exc:
                self.log.error("state_backup_failed", error=str(exc))


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _loggable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, ResetStrategy):
        return value.value
    return value


async def run_daemon(
    settings: Settings,
    serve: Callable[..., Awaitable[None]],
    notifier: Notifier,
    log: Log,
) -> None:
    """Start, reconcile, serve until SIGTERM/SIGINT, then write a final snapshot."""
    store = StateStore(settings.state_file, backups=settings.state_backups)
    state = store.load()
    try:
        store.backup(state)  # a known-good copy from every start, for `portmeter state restore`
    except StorageError as exc:
        log.warning("state_backup_failed", error=str(exc))
    outbox = webhook_outbox(settings.state_dir / "outbox", settings.webhook_url, settings.webhook_secret, log)
    fleet = fleet_outbox(settings.state_dir / "reports", settings.report_url, settings.report_api_key, log)
    history = History(settings.state_dir / "history.sqlite3", settings.history_retention_days)
    sinks: list[UsageSink] = [history]
    if settings.report_url:
        sinks.append(FleetReports(fleet, settings.server_name, state.ensure_instance()))
    for sink in sinks:
        sink.recover(state.generation)
    xray = None if settings.xray_config is None else XrayBridge(settings, log)
    service = Service(settings, store, state, Counters(settings.nft_table), outbox, log, xray, sinks, history)
    started = time.perf_counter()
    await service.reconcile()
    await service.start_xray()
    # Tens of thousands of long-lived objects per thousand keys: left to the cyclic collector,
    # each full collection walks all of them (~0.3 s at 10,000 keys, at random moments).
    gc.collect()
    gc.freeze()
    _return_free_memory()
    stop = anyio.Event()
    async with anyio.create_task_group() as background:
        background.start_soon(service.poll_loop)
        background.start_soon(service.backup_loop)
        background.start_soon(outbox.deliver_forever)
        background.start_soon(fleet.deliver_forever)
        background.start_soon(cleanup_loop, history, log)
        if notifier.watchdog_interval:
            background.start_soon(_watchdog, notifier, notifier.watchdog_interval)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as serving:
                await serving.start(serve, service, stop)  # READY only once the socket listens
                log.info(
                    "daemon_ready", keys=len(state.keys), table=settings.nft_table,
                    socket=str(settings.socket), port_range=str(settings.port_range),
                    startup_seconds=round(time.perf_counter() - started, 3),
                )
                notifier.notify("READY=1\nSTATUS=counting")
                async for signum in signals:
                    log.info("daemon_stopping", signal=signal.Signals(signum).name)
                    notifier.notify("STOPPING=1")
                    break
                stop.set()
        background.cancel_scope.cancel()
    await service.poll_once(final=True)
    log.info("daemon_stopped", keys=len(service.state.keys))


def _return_free_memory() -> None:
    """Give the heap that start-up used and freed (reading the state, rendering Xray's config,
    listing the table) back to the system: about 50 MB at 10,000 keys. glibc only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


async def _watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        notifier.notify("WATCHDOG=1")
        await anyio.sleep(interval)
