"""The daemon: key operations under one lock, the poll loop, reconciliation, signals, sd_notify.

Every operation follows one pattern (`_all_or_nothing`): it builds the changed key as a new,
validated record (bounds.py), does the kernel part, pushes Xray and saves the state before it
answers. If any step fails, whatever the error, the steps done are undone newest first and the
memory is put back as it was, so an acknowledged operation is on disk and a refused one left
nothing behind, in the kernel, in Xray, on disk or in memory. A crash between the steps leaves at
most objects that no key owns, which the start-up reconciliation removes.

Each reading of the kernel also settles every key: its status (active, limited, expired,
disabled), the quota the kernel must enforce for it, and a periodic reset that came due. A key
whose step fails there is logged once, marked (its `error` in the API) and retried at every
poll; the other keys keep being counted (README "Faults and their remedies").
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import secrets
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import structlog
from pydantic import ValidationError

from daemon import allocator, limits, metrics, names, netinfo, xray_sync
from daemon.counters import Counters, NftError, OutOfRange, PortReading, TableView, port_gaps
from daemon.errors import (
    Conflict,
    Invalid,
    KernelRefused,
    NotFound,
    OperationError,
    OperationFailed,
    StorageFull,
    StoreUnavailable,
)
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
Undo = Callable[[], Awaitable[object]]


@dataclass(slots=True)
class Refresh:
    """What one reading of the kernel found and did."""

    changed: bool = False
    table_rebuilt: bool = False
    installed: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)  # keys whose kernel reading changed


@dataclass(slots=True)
class Memory:
    """What an operation may change in memory, as it was before it: put back if a step fails.

    Operations never change a key record in place (they build a new one), so the mapping of ids
    to the very same record objects is the keys as they were."""

    keys: dict[str, KeyRecord]
    top: dict[str, Any]  # the state's own fields: generation, REALITY key, table handle ...
    kernel_limits: dict[int, int | None]
    failures: dict[str, str]
    statuses_moved: bool
    settle_everything: bool
    next_deadline: datetime | None


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
        # Keys whose last kernel step failed (id -> error): shown as the key's `error`, retried
        # at every poll. See `_settle`.
        self.failures: dict[str, str] = {}
        # Status events of the operation under way: emitted once it succeeded.
        self._held_events: list[tuple[str, KeyRecord, dict[str, Any]]] | None = None

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
        named = names.find(ref, keys.values(), lambda key: key.name)  # the same name: names.fold
        if named is not None:
            return named
        raise NotFound(f"no key with id, uuid or name {ref!r}")

    def assigned_ports(self) -> dict[str, int]:
        return {key.id: key.port for key in self.state.keys.values()}

    # --- operations ----------------------------------------------------------------------

    async def create_key(
        self, name: str, port: int | None = None, settings: dict[str, Any] | None = None
    ) -> KeyRecord:
        async with self.lock:
            keys = self.state.keys.values()
            if (same := names.same_as(name, (key.name for key in keys))) is not None:
                raise Conflict(f"a key named {same!r} already exists (the same name: {names.SAME})")
            assigned = {key.port for key in keys}
            busy = await anyio.to_thread.run_sync(netinfo.bound_ports, self.settings.port_range)
            try:
                chosen = allocator.allocate(self.settings.port_range, assigned, busy, port)
            except allocator.PortUnavailable as exc:
                raise Conflict(str(exc)) from None
            async with self._all_or_nothing("create key") as undo:
                moment = now()
                key = KeyRecord(
                    id=self._new_id(), name=name, uuid=uuid.uuid4(), port=chosen,
                    created_at=moment, **(settings or {}),
                )
                key.next_reset_at = limits.next_boundary(moment, key.reset_strategy, self.zone)
                key.status = self._status(key, moment, kernel_over=False)
                self._watch_deadlines(key, moment)
                if self.xray is not None:
                    self.xray.prepare(self.state, key)
                await self._install(self._checked(key), undo)
                await self._commit(undo)
            self.log.info(
                "key_created", key_id=key.id, name=key.name, port=key.port,
                limit=key.data_limit_bytes, expire_at=_iso(key.expire_at), status=key.status.value,
            )
            return key

    async def delete_key(self, ref: str) -> KeyRecord:
        async with self.lock:
            key = self.find(ref)
            await self._refresh_keys([key])  # the final totals, reported and logged, are exact
            async with self._all_or_nothing("delete key") as undo:
                del self.state.keys[key.id]
                self._forget(key.id)
                await self._commit(undo)
            await self._uninstall_quietly([key])
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
            async with self._all_or_nothing("reset traffic") as undo:
                fresh = key.model_copy(deep=True)
                self._zero(fresh, now())
                await self._replace(key, fresh, undo, force_quota=True)
            self.log.info(
                "traffic_reset", key_id=fresh.id, port=fresh.port,
                used_before_reset=fresh.used_before_reset, status=fresh.status.value,
            )
            return fresh

    async def update_key(self, ref: str, changes: dict[str, Any]) -> KeyRecord:
        """Change a key's limit, expiry, reset strategy, note or enabled flag; applied at once."""
        unknown = set(changes) - SETTABLE
        if unknown:
            raise Invalid(f"not settable: {', '.join(sorted(unknown))}")
        async with self.lock:
            key = self.find(ref)
            await self._refresh_keys([key])
            async with self._all_or_nothing("change key") as undo:
                changed = KeyRecord.model_validate({**key.model_dump(), **changes})
                if changed.reset_strategy != key.reset_strategy:
                    changed.next_reset_at = limits.next_boundary(
                        now(), changed.reset_strategy, self.zone
                    )
                await self._replace(key, changed, undo)
            self.log.info(
                "key_updated", key_id=changed.id, port=changed.port, status=changed.status.value,
                **{name: _loggable(value) for name, value in changes.items()},
            )
            return changed

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
            view = await self._kernel("read counters", self.counters.read())
            if view is None:
                return [*found, f"nftables table inet {self.counters.table} is missing"]
            found += view.problems
            found += [f"port {port} has an incomplete set of counters" for port in sorted(view.stray)]
            wanted = {key.port for key in self.state.keys.values()}
            elements = await self._kernel("read maps", self.counters.map_elements())
            gaps = port_gaps(wanted, view, elements)
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

    # --- all or nothing ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _all_or_nothing(self, what: str) -> AsyncIterator[list[Undo]]:
        """One operation: each kernel or Xray step it takes adds its undo to the yielded list.

        If anything fails (a refusal, or an error nobody foresaw such as an OverflowError), the
        memory is put back exactly as it was and the undos run newest first; the error becomes
        an OperationError (4xx/503/507), never a 500. Status events wait for success."""
        memory = self._remember()
        undo: list[Undo] = []
        self._held_events = []
        try:
            yield undo
        except BaseException as exc:
            self._restore(memory)
            with anyio.CancelScope(shield=True):  # a cancelled operation is undone all the same
                await self._undo(what, undo)
            if not isinstance(exc, Exception):
                raise
            raise self._refusal(what, exc) from None
        else:
            for name, key, fields in self._held_events:
                self._emit(name, key, **fields)
        finally:
            self._held_events = None

    def _remember(self) -> Memory:
        state = self.state
        return Memory(
            keys=dict(state.keys),
            top={name: getattr(state, name) for name in State.model_fields if name != "keys"},
            kernel_limits=dict(self._kernel_limits),
            failures=dict(self.failures),
            statuses_moved=self._statuses_moved,
            settle_everything=self._settle_everything,
            next_deadline=self._next_deadline,
        )

    def _restore(self, memory: Memory) -> None:
        self.state.keys.clear()
        self.state.keys.update(memory.keys)
        for name, value in memory.top.items():
            setattr(self.state, name, value)
        self._kernel_limits = memory.kernel_limits
        self.failures = memory.failures
        self._statuses_moved = memory.statuses_moved
        self._settle_everything = memory.settle_everything
        self._next_deadline = memory.next_deadline

    async def _undo(self, what: str, undo: list[Undo]) -> None:
        """Run the undos newest first. One that fails is logged and the rest still run; the next
        poll settles every key again, which puts the kernel's quotas right."""
        for step in reversed(undo):
            try:
                await step()
            except Exception as exc:  # noqa: BLE001 (every undo must get its chance)
                self.log.error("undo_failed", operation=what, error=_describe(exc))
                self._settle_everything = True

    def _refusal(self, what: str, exc: Exception) -> OperationError:
        """The error an operation answers with; logged here, once."""
        if isinstance(exc, NftError):
            exc = _kernel_refusal(what, exc)
        if isinstance(exc, ValidationError):
            exc = Invalid(f"{_validation_detail(exc)}; nothing was changed")
        if isinstance(exc, OperationError):
            self.log.warning(
                "operation_refused", operation=what, status=exc.status, error=exc.detail
            )
            return exc
        self.log.error("operation_failed", operation=what, error=_describe(exc), exc_info=exc)
        return OperationFailed(
            f"{what} failed unexpectedly ({_describe(exc)}); nothing was changed. "
            "The daemon log has the details (event=operation_failed)"
        )

    @staticmethod
    def _checked(key: KeyRecord) -> KeyRecord:
        """`key` if every field is within its bounds (bounds.py): a record built or changed in
        memory is validated again before any kernel step, so no out-of-bounds value can reach
        the kernel, the state file or a restart."""
        KeyRecord.model_validate(key.model_dump())
        return key

    async def _replace(
        self, before: KeyRecord, after: KeyRecord, undo: list[Undo], force_quota: bool = False
    ) -> None:
        """Put `after` in the place of `before`: settle it, set its quota, push Xray, save."""
        moment, epoch = now(), after.epoch
        self._settle_status(after, moment, kernel_over=False)
        self.state.keys[after.id] = self._checked(after)
        self._mark(after.id)
        failing = self.failures.pop(after.id, None) is not None  # put back if this fails
        if await self._enforce(after, force_quota or failing or after.epoch != epoch):
            undo.append(lambda: self._enforce(before, force=True))
        self._watch_deadlines(after, moment)
        await self._commit(undo)

    async def _install(self, key: KeyRecord, undo: list[Undo]) -> None:
        """Install a new key's counters and add it to the state."""
        await self._install_fresh(key.port, self._desired_quota(key))
        undo.append(lambda: self._uninstall(key.port))
        self.state.keys[key.id] = key
        self._mark(key.id)

    async def _commit(self, undo: list[Undo], base: dict[str, Any] | None = None) -> None:
        """Push the keys to Xray (its undo joins the others), then save the state."""
        if self.xray is not None:
            pushed = await self._push_xray(self.xray, base=base)
            undo.append(lambda: self._undo_xray(pushed))
        self._save()

    async def _undo_xray(self, pushed: Pushed) -> None:
        self._xray_stale = None  # what Xray has now is the file before: look at every key
        await pushed.undo()

    def _forget(self, key_id: str) -> None:
        """The key was deleted: the next save drops it, and its failure (if any) goes with it."""
        self.failures.pop(key_id, None)
        self._mark(key_id)

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
            async with self._all_or_nothing("migrate") as undo:
                created = [self._checked(self._migrated_key(move)) for move in plan.moves]
                for key in created:
                    await self._install(key, undo)
                await self._commit(undo, base=xray_sync.apply_migration(source.config, plan))
            self._settle_everything = True
            self.log.info("xray_migrated", source=str(source_path), keys=len(created), original_copy=copy)
            return plan.lines(), created

    def _migrated_key(self, move: xray_sync.MigrationMove) -> KeyRecord:
        wanted = move.key(self._new_id())
        key = KeyRecord(
            id=wanted.id, name=wanted.name, uuid=uuid.UUID(wanted.uuid), port=wanted.port,
            created_at=now(), flow=wanted.flow or None, migrated=True, short_id=wanted.short_id,
            extra_short_ids=list(wanted.extra_short_ids), xray_inbound=move.inbound,
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
            async with self._all_or_nothing("roll back the migration"):
                for key in migrated:
                    del self.state.keys[key.id]
                    self._forget(key.id)
                copy = await xray.restore_original()
                self._save()
            await self._uninstall_quietly(migrated)
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

    def _settle_status(self, key: KeyRecord, moment: datetime, kernel_over: bool) -> bool:
        """Apply a reset that came due and the status the key has now; True if either changed
        it. Memory only: `_enforce` brings the kernel in line."""
        changed = False
        if key.next_reset_at is not None and moment >= key.next_reset_at:
            self._zero(key, moment)
            key.next_reset_at = limits.next_boundary(moment, key.reset_strategy, self.zone)
            self._event("key_reset", key, used_before_reset=key.used_before_reset)
            kernel_over, changed = False, True
        new_status = self._status(key, moment, kernel_over)
        if new_status != key.status:
            previous, key.status = key.status, new_status
            self._statuses_moved = True
            self._event(f"key_{new_status.value}", key, previous_status=previous.value)
            changed = True
        if changed:
            self._mark(key.id)
        return changed

    async def _enforce(self, key: KeyRecord, force: bool) -> bool:
        """Give the kernel the quota the key needs, unless it has that limit already (and not
        `force`: a reset or a changed usage needs a fresh quota). True if the kernel changed."""
        desired = self._desired_quota(key)
        wanted_limit = None if desired is None else desired.limit
        if not force and self._kernel_limits.get(key.port) == wanted_limit:
            return False
        await self._kernel("set quota", self.counters.enforce(key.port, desired))
        self._kernel_limits[key.port] = wanted_limit
        return True

    async def _settle(self, key: KeyRecord, moment: datetime, kernel_over: bool) -> bool:
        """Settle one key during a reading: reset, status, quota; True if the key changed.

        A failure is this key's alone: logged once, shown as the key's `error`, retried (with a
        fresh quota) at every poll, while every other key goes on being counted."""
        epoch, changed = key.epoch, False
        try:
            changed = self._settle_status(key, moment, kernel_over)
            await self._enforce(key, force=key.epoch != epoch or key.id in self.failures)
        except Exception as exc:  # noqa: BLE001 (one key's failure, whatever it is, stays its own)
            self._key_failed(key, exc, "set quota")
        else:
            self._key_recovered(key)
        self._watch_deadlines(key, moment)
        return changed

    def _key_failed(self, key: KeyRecord, exc: Exception, what: str) -> None:
        """Mark the key and log it, once per different error (not at every poll)."""
        if isinstance(exc, NftError):
            exc = _kernel_refusal(what, exc)
        error = exc.detail if isinstance(exc, OperationError) else _describe(exc)
        if self.failures.get(key.id) == error:
            return
        self.failures[key.id] = error
        self.log.error(
            "key_failed", key_id=key.id, name=key.name, port=key.port, error=error,
            remedy="retried at every poll; the other keys are counted meanwhile",
            exc_info=None if isinstance(exc, OperationError) else exc,
        )

    def _key_recovered(self, key: KeyRecord) -> None:
        if self.failures.pop(key.id, None) is not None:
            self.log.info("key_recovered", key_id=key.id, name=key.name, port=key.port)

    def _watch_deadlines(self, key: KeyRecord, moment: datetime) -> None:
        """Remember the key's expiry and reset time, so the poll settles every key once due."""
        for deadline in (key.expire_at, key.next_reset_at):
            if deadline is not None and deadline > moment and (
                self._next_deadline is None or deadline < self._next_deadline
            ):
                self._next_deadline = deadline

    def _event(self, name: str, key: KeyRecord, **fields: Any) -> None:
        """A status change or reset: a log event, and a webhook message when configured. Inside
        an operation it waits for the operation to succeed: an undone change never happened."""
        if self._held_events is not None:
            self._held_events.append((name, key, fields))
        else:
            self._emit(name, key, **fields)

    def _emit(self, name: str, key: KeyRecord, **fields: Any) -> None:
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
                view = await self._repair(view, result, check_elements)
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
            wanted = result.touched.union(self.failures)  # failed keys are retried every poll
            keys = [self.state.keys[i] for i in wanted if i in self.state.keys]
        for key in keys:
            reading = None if view is None else view.ports.get(key.port)
            if view is not None and reading is None:
                continue  # no counters: their installation failed (logged), retried next poll
            over = reading is not None and reading.over
            if await self._settle(key, moment, kernel_over=over):
                result.changed = True

    async def _rebuild(self, event: str, result: Refresh, level: str = "error", **fields: Any) -> TableView | None:
        """Recreate the table from the state; bytes since the last reading are lost and logged."""
        ports = {key.port: self._desired_quota(key) for key in self.state.keys.values()}
        try:
            await self.counters.build(ports)
        except NftError as exc:
            if exc.denied or not any(ports.values()):
                raise _kernel_refusal("rebuild table", exc) from None
            # One key's quota must not keep every key from being counted: counters for all
            # now, each key's quota at the settling that follows, where a failure is its own.
            self.log.error(
                "table_built_without_quotas", error=str(exc), remedy="quotas set key by key"
            )
            await self._kernel("rebuild table", self.counters.build(dict.fromkeys(ports)))
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
        view: TableView | None = await self._kernel("read counters", self.counters.read())
        if view is not None:
            self._apply(view, result)
        return view

    async def _repair(
        self, view: TableView, result: Refresh, check_elements: bool
    ) -> TableView | None:
        """Remove what no key owns, install what a key lacks; the reading to settle against."""
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
        installed = []
        for port in sorted(missing):
            key = keys_by_port[port]
            try:
                await self._install_fresh(port, self._desired_quota(key))
            except Exception as exc:  # noqa: BLE001 (this key alone; the others are counted)
                self._key_failed(key, exc, "install counters")
                continue
            installed.append(port)
        if not installed:
            return view
        self.log.warning("missing_counters_installed", ports=installed)
        result.installed = installed
        self._settle_everything = True
        result.changed = True
        fresh: TableView | None = await self._kernel("read counters", self.counters.read())
        if fresh is None:
            return view
        self._apply(fresh, result)
        return fresh

    async def _install_fresh(self, port: int, quota: Quota | None) -> None:
        """Install a port's objects; a leftover set (crash, tampering) is removed first."""
        try:
            await self.counters.install(port, quota)
        except OutOfRange:
            raise
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
            raise _kernel_refusal(what, exc) from None

    async def _uninstall_quietly(self, keys: Sequence[KeyRecord]) -> None:
        """Remove deleted keys' counters. The deletion is saved already: a failure here leaves
        counters no key owns, which the next poll removes."""
        for key in keys:
            try:
                await self._uninstall(key.port)
            except Exception as exc:  # noqa: BLE001 (the deletion stands whatever this was)
                self.log.error(
                    "counter_removal_failed", key_id=key.id, port=key.port,
                    error=exc.detail if isinstance(exc, OperationError) else _describe(exc),
                    remedy="removed at the next poll",
                )

    def _named(self, text: str) -> bool:
        return any(key.name == text for key in self.state.keys.values())

    def _new_id(self) -> str:
        while True:
            candidate = secrets.token_hex(4)
            # Never the name of a key saved before names were checked: the id would shadow it.
            if candidate not in self.state.keys and not self._named(candidate):
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
        except Exception as exc:
            self.state.generation = generation - 1
            for sink in staged:
                sink.rollback(generation)
            if not isinstance(exc, (StorageError, SinkError)):
                raise
            self.log.error("state_write_failed", error=str(exc))
            refusal = StorageFull if exc.disk_full else StoreUnavailable
            raise refusal(f"{exc}; nothing was changed") from None
        for sink in staged:
            sink.commit(generation)
        self._pending.clear()
        self._dirty.clear()
        self._unsaved = False

    def _save_quietly(self, compact: bool = False) -> None:
        """Persist from a background loop: a failure is logged and retried at the next poll."""
        try:
            self._save(compact)
        except (StorageFull, StoreUnavailable):
            pass

    # --- loops ---------------------------------------------------------------------------

    async def poll_loop(self) -> None:
        """Poll forever: nothing that goes wrong in one poll ends the loop. A failure is logged
        once (again when it changes) and the next poll tries again."""
        failing: str | None = None
        while True:
            await anyio.sleep(self.settings.poll_interval)
            try:
                result = await self.poll_once()
            except Exception as exc:  # the loop must outlive any one failure
                error = exc.detail if isinstance(exc, OperationError) else _describe(exc)
                if error != failing:
                    self.log.error(
                        "poll_failed", error=error, remedy="tried again at every poll",
                        exc_info=None if isinstance(exc, OperationError) else exc,
                    )
                failing = error
                continue
            if failing is not None:
                self.log.info("poll_recovered")
                failing = None
            seconds = round(self.last_poll_seconds or 0, 4)
            self.log.debug("poll", seconds=seconds, changed=result.changed)
            if self.settings.metrics_textfile is not None:
                try:
                    await metrics.write_textfile(self, self.settings.metrics_textfile)
                except OSError as exc:
                    self.log.error("metrics_textfile_failed", error=exc.strerror or str(exc))

    async def backup_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.snapshot_interval)
            await self.backup()

    async def backup(self) -> None:
        """Copy the state into backups/ (none if the newest backup holds it); failures logged."""
        try:
            async with self.lock:
                target = self.store.backup(self.state)
        except StorageError as exc:
            self.log.error("state_backup_failed", error=str(exc))
            return
        if target is not None:
            self.log.info("state_backup_written", path=str(target))


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _kernel_refusal(what: str, exc: NftError) -> OperationError:
    """A value the kernel cannot hold is bad input (422); anything else nftables refused is 503,
    marked `denied` only for EPERM/EACCES (then the remedy is root or CAP_NET_ADMIN)."""
    if isinstance(exc, OutOfRange):
        return Invalid(f"{what}: {exc}; nothing was changed")
    return KernelRefused(f"nftables refused to {what}: {exc}", denied=exc.denied)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _validation_detail(exc: ValidationError) -> str:
    """The first problem pydantic found, as `field: message`."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


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
                # A known-good copy from every start that succeeded, for `portmeter state
                # restore`; a start that fails writes none, so restarts never rotate them out.
                await service.backup()
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
