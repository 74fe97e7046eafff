"""The service's front: every operation on keys under the one lock, key lookups, and the reads the
HTTP layer uses (it never reaches into the owners behind the front).

Every operation follows one pattern (`_all_or_nothing`): it builds the changed key as a new,
validated record (bounds.py), does the kernel part, pushes Xray and saves the state before it
answers. If any step fails, whatever the error, the steps done are undone newest first and the
memory is put back as it was, so an acknowledged operation is on disk and a refused one left
nothing behind, in the kernel, in Xray, on disk or in memory. A crash between the steps leaves at
most objects that no key owns, which the start-up reconciliation removes.

Behind the front, each owning its part: kernel_side.py (readings, settling each key, the
table), ledger.py (saving, usage for the sinks, status events), xray_side.py (what Xray serves).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import structlog
from anyio.abc import TaskStatus
from pydantic import ValidationError

from daemon import allocator, limits, names
from daemon.allocator import PortRange
from daemon.bounds import MAX_BATCH_KEYS, PORT_PROBE
from daemon.errors import Conflict, Invalid, NotFound, OperationError, OperationFailed
from daemon.kernel import Host, Kernel, NftError
from daemon.limits import Quota, ResetStrategy
from daemon.service.fleet_port import FleetKeysPort, FleetStatusSource
from daemon.service.guards import Guards
from daemon.service.index import KeyIndex
from daemon.service.kernel_side import (
    Closer,
    Connections,
    Established,
    Failures,
    KernelSide,
    Refresh,
    Settler,
    describe,
    kernel_call,
    kernel_refusal,
    zero,
)
from daemon.service.ledger import Ledger, StatusEvents
from daemon.service.progress import Progress
from daemon.service.xray_side import Pushed, XraySide
from daemon.settings import Settings
from daemon.store.history import History
from daemon.store.outbox import Outbox
from daemon.store.reported import Reported
from daemon.store.state import KeyRecord, State, StateStore, now
from daemon.store.usage import UsageSink
from daemon.units import iso
from daemon.xray.drift import DriftProblem
from daemon.xray.migration import MigrationPlan, apply_migration

Log = structlog.typing.FilteringBoundLogger
SETTABLE = frozenset(
    {"note", "enabled", "data_limit_bytes", "expire_at", "reset_strategy"}
    | {"speed_limit_bps", "max_connections", "max_ips"}
    | {"groups"}
)
Undo = Callable[[], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One new key as asked for: its name, a port (None: the lowest free) and the other fields
    of `POST /api/keys`, checked already (http/schemas.py `key_changes`)."""

    name: str
    port: int | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Memory:
    """What an operation may change in memory, as it was before it: put back if a step fails.

    Operations never change a key record in place (they build a new one), so the mapping of ids
    to the very same record objects is the keys as they were."""

    keys: dict[str, KeyRecord]
    top: dict[str, Any]  # the state's own fields: generation, REALITY key, table handle ...
    kernel_quotas: dict[int, Quota | None]
    failures: dict[str, str]
    statuses_moved: bool
    settle_everything: bool
    next_deadline: datetime | None


class Service:
    """The daemon's one entry for operations and reads: one lock makes them take turns, so each
    sees the keys, the kernel and the files as the one before left them."""

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        state: State,
        kernel: Kernel,
        outbox: Outbox,
        log: Log,
        *,
        host: Host,
        xray: XraySide | None = None,
        sinks: Sequence[UsageSink] = (),
        history: History | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.log = log
        self.xray = xray
        self.history = history
        self.host = host
        self.zone = ZoneInfo(settings.timezone)
        self.lock = anyio.Lock()
        self.ledger = Ledger(store, state, sinks, log)
        self.events = StatusEvents(outbox, log)
        self.failures = Failures(log)
        closer = Closer(host, log)
        self.settler = Settler(
            kernel, state, self.ledger, self.events, self.zone, self.failures, closer
        )
        self.settler.guards = Guards(kernel, self.events, settings.ip_window)
        self.index = KeyIndex(state.keys)
        self.progress = Progress()  # of a long operation, read without the lock
        self.ledger.followers.append(self.index.follow)
        self.kernel = KernelSide(
            kernel, state, self.ledger, self.settler, self.failures, log, self.index
        )
        self._connections = Connections(host, settings.port_range, log)
        self.fleet_reads: Reported | None = None  # other servers' usage, from a fleet database
        self.fleet: FleetStatusSource | None = None  # the fleet database side, when configured
        self.fleet_keys: FleetKeysPort | None = None  # the fleet's keys, followed and written
        if xray is not None:
            self.ledger.followers.append(xray.follow)

    # --- lookups -----------------------------------------------------------------------------

    def find(self, ref: str) -> KeyRecord:
        """A key by id, uuid or name (in that order; the same name: names.fold)."""
        found = self.index.find(ref)
        if found is not None:
            return found
        raise NotFound(f"no key with id, uuid or name {ref!r}")

    def assigned_ports(self) -> dict[str, int]:
        return {key.id: key.port for key in self.state.keys.values()}

    # --- operations --------------------------------------------------------------------------

    async def create_key(
        self,
        name: str,
        port: int | None = None,
        settings: dict[str, Any] | None = None,
        *,
        local: bool = False,
        identity: dict[str, Any] | None = None,
    ) -> KeyRecord:
        """A new key. With a fleet database, a fleet key unless `local`; `identity` (id, uuid
        ...) is a fleet key's as the database holds it, followed here (README "Keys created
        once")."""
        async with self.lock:
            if identity is not None and identity["id"] in self.state.keys:
                return self.state.keys[identity["id"]]  # followed already
            spec = KeySpec(name, port, settings or {})
            fleet = self._fleet_scope([spec], local)
            self._check_new_names([spec])
            (chosen,) = await self._free_ports([port])
            async with self._all_or_nothing("create key") as undo:
                key = await self._new_key(spec, chosen, fleet, undo, identity)
                await self._commit(undo)
                await self._publish(local, undo, [key.id], lambda fleet: fleet.created(key))
            self._log_created(key)
            return key

    async def create_many(
        self, specs: Sequence[KeySpec], *, local: bool = False
    ) -> list[KeyRecord]:
        """New keys, all or nothing (README "Batch create"): one hold of the lock, every name
        and port checked before any step, one Xray push, one save and one fleet write. A refusal
        names the first item at fault (`keys[i]`)."""
        if not 1 <= len(specs) <= MAX_BATCH_KEYS:
            raise Invalid(f"keys: from 1 to {MAX_BATCH_KEYS} keys per batch, not {len(specs)}")
        async with self.lock:
            fleet = self._fleet_scope(specs, local)
            self._check_new_names(specs, batch=True)
            chosen = await self._free_ports([spec.port for spec in specs], batch=True)
            async with self._all_or_nothing("create keys") as undo:
                created = [
                    await self._new_key(spec, port, fleet, undo)
                    for spec, port in zip(specs, chosen, strict=True)
                ]
                await self._commit(undo)
                ids = [key.id for key in created]
                await self._publish(local, undo, ids, lambda fleet: fleet.created_many(created))
            for key in created:
                self._log_created(key)
            self.log.info("keys_created", count=len(created), first_port=min(chosen))
            return created

    def _fleet_scope(self, specs: Sequence[KeySpec], local: bool) -> bool:
        """Whether new keys are fleet keys; with a fleet database this server must serve their
        groups (else 422)."""
        if self.fleet_keys is None or local:
            return False
        for spec in specs:
            self.fleet_keys.check_serves(spec.settings.get("groups", ()))
        return True

    def _check_new_names(self, specs: Sequence[KeySpec], *, batch: bool = False) -> None:
        """409 for the first name a key has, or an earlier item has (names.fold); `batch`: the
        refusal names the item (`keys[i]`)."""
        seen: dict[str, int] = {}
        tail = "; nothing was created" * batch
        for at, spec in enumerate(specs):
            where = f"keys[{at}]: " * batch
            if (same := self.index.same_name(spec.name)) is not None:
                raise Conflict(
                    f"{where}a key named {same!r} already exists (the same name: {names.SAME})"
                    + tail
                )
            folded = names.fold(spec.name)
            if folded in seen:
                raise Conflict(
                    f"{where}{spec.name!r} has the same name as keys[{seen[folded]}] "
                    f"({names.SAME}){tail}"
                )
            seen[folded] = at

    async def _new_key(
        self,
        spec: KeySpec,
        port: int,
        fleet: bool,
        undo: list[Undo],
        identity: dict[str, Any] | None = None,
    ) -> KeyRecord:
        """Build a new key on `port` (checked against bounds.py) and install its counters."""
        moment = now()
        # A subscription token even without Xray: a fleet key's is unique fleet-wide, and the
        # servers that have Xray serve its subscription. After a migration the key joins the
        # routing rules of the shared inbounds it replaced (README "Xray").
        made = {
            "id": new_id(self.index),
            "uuid": uuid.uuid4(),
            "created_at": moment,
            "sub_token": secrets.token_urlsafe(24),
            "route_sources": self.state.route_sources,
        }
        key = KeyRecord(
            name=spec.name,
            port=port,
            **{**made, "fleet": fleet, **(identity or {})},
            **spec.settings,
        )
        key.next_reset_at = limits.next_boundary(moment, key.reset_strategy, self.zone)
        key.status = self.settler.status_for(key, moment, kernel_over=False)
        self.settler.watch(key, moment)
        if self.xray is not None:
            self.xray.prepare(self.state, key)
        await self._install(checked(key), undo)
        return key

    def _log_created(self, key: KeyRecord) -> None:
        self.log.info(
            "key_created",
            key_id=key.id,
            name=key.name,
            port=key.port,
            limit=key.data_limit_bytes,
            expire_at=iso(key.expire_at),
            status=key.status.value,
        )

    async def delete_key(self, ref: str, *, local: bool = False) -> KeyRecord:
        async with self.lock:
            key = self.find(ref)
            await self.kernel.refresh_keys([key])  # the final totals, reported and logged: exact
            async with self._all_or_nothing("delete key") as undo:
                del self.state.keys[key.id]
                self._forget(key.id)
                await self._commit(undo)
                await self._publish(local, undo, [key.id], lambda fleet: fleet.deleted(key))
            await self.kernel.uninstall_quietly([key])
            await self.settler.close_deleted([key])
            self.log.info(
                "key_deleted",
                key_id=key.id,
                name=key.name,
                port=key.port,
                rx_bytes=key.rx.bytes,
                tx_bytes=key.tx.bytes,
            )
            return key

    async def reset_traffic(self, ref: str) -> KeyRecord:
        """Zero a key's totals; what the kernel counts from now on is its new usage."""
        return (await self.reset_many([ref]))[0]

    async def reset_many(self, refs: Sequence[str], names: Sequence[str] = ()) -> list[KeyRecord]:
        """Zero these keys' totals in one hold of the lock. A fleet's other servers hear of them,
        and of the users `names` reset with them (their usage elsewhere), in ONE message
        (`settler.on_reset`), even when a key fails on the way: one operation is one write."""
        async with self.lock:
            done: list[KeyRecord] = []
            try:
                for ref in refs:
                    done.append(await self._reset(self.find(ref)))
            finally:
                if self.settler.on_reset is not None and (done or names):
                    # Saved: the usage before them is staged. Under the lock, so no later
                    # generation's usage is saved before the message is written.
                    await self.settler.on_reset(done, names, self.state.generation)
            return done

    async def settle_remote(self, remote: dict[str, int], resets: dict[str, datetime]) -> None:
        """A fleet's figures (daemon/fleet/limits.py): usage of each key name on the other
        servers, and the latest reset of each name. A key reset elsewhere after its own last
        reset is reset here (not passed back); keys whose allowance moved are settled now."""
        async with self.lock:
            settler, moved = self.settler, []
            for key in list(self.state.keys.values()):
                since = key.last_reset_at or key.created_at
                if key.name in resets and resets[key.name] > since:
                    # Never before the reset's own moment: with this node's clock behind the
                    # other's, the key would otherwise be reset again at every refresh.
                    key = await self._reset(key, at=max(now(), resets[key.name]))
                limited = key.data_limit_bytes is not None  # others' usage moves only limits
                if limited and remote.get(key.name, 0) != settler.remote.get(key.name, 0):
                    moved.append(key)
            settler.remote = remote
            if moved:
                await self.kernel.refresh_keys(moved)
                if self.ledger.unsaved:
                    self.ledger.save_quietly()

    async def _reset(self, key: KeyRecord, at: datetime | None = None) -> KeyRecord:
        """Zero one key's totals (under the lock) as of `at` (default now): read it first, so
        nothing counted is lost."""
        await self.kernel.refresh_keys([key])
        async with self._all_or_nothing("reset traffic") as undo:
            fresh = key.model_copy(deep=True)
            zero(fresh, at or now())
            await self._replace(key, fresh, undo, force_quota=True)
        await self.settler.close_left(fresh)
        self.log.info(
            "traffic_reset",
            key_id=fresh.id,
            port=fresh.port,
            used_before_reset=fresh.used_before_reset,
            status=fresh.status.value,
        )
        return fresh

    async def update_key(
        self, ref: str, changes: dict[str, Any], *, local: bool = False
    ) -> KeyRecord:
        """Change a key's limit, expiry, reset strategy, note or enabled flag; applied at once."""
        unknown = set(changes) - SETTABLE
        if unknown:
            raise Invalid(f"not settable: {', '.join(sorted(unknown))}")
        async with self.lock:
            key = self.find(ref)
            await self.kernel.refresh_keys([key])
            async with self._all_or_nothing("change key") as undo:
                changed = KeyRecord.model_validate({**key.model_dump(), **changes})
                if changed.reset_strategy != key.reset_strategy:
                    changed.next_reset_at = limits.next_boundary(
                        now(), changed.reset_strategy, self.zone
                    )
                await self._replace(key, changed, undo)
                await self._publish(
                    local, undo, [key.id], lambda fleet: fleet.changed(key, changed)
                )
            await self.settler.close_left(changed)
            self.log.info(
                "key_updated",
                key_id=changed.id,
                port=changed.port,
                status=changed.status.value,
                **{name: _loggable(value) for name, value in changes.items()},
            )
            return changed

    async def refresh(self) -> Refresh:
        """Read the kernel now, so answers are exact to this moment.

        Requests that queue up behind one reading share the next: a reading that started after a
        request arrived is as exact for it as one of its own."""
        arrived = time.monotonic()
        async with self.lock:
            if self.kernel.read_started > arrived:
                return Refresh(read_at=self.kernel.read_started)
            return await self.kernel.refresh()

    async def client_ips(self, key: KeyRecord) -> list[dict[str, Any]]:
        """The client addresses holding places of the key's max_ips, each with the time it was
        last seen (README "Speed, connection and device limits"); [] without max_ips."""
        guards = self.settler.guards
        if guards is None or key.max_ips is None:
            return []
        async with self.lock:
            held = await kernel_call(
                "read client addresses", guards.kernel.client_addresses(key.port)
            )
        moment = now()
        return [
            {
                "address": address,
                "last_seen": iso(moment - timedelta(seconds=guards.window - expires)),
            }
            for address, expires in sorted(held)
        ]

    async def refresh_keys(
        self, refs: Sequence[str], *, skip_missing: bool = False, save: bool = False
    ) -> list[KeyRecord]:
        """Read just these keys' counters now: the cost does not grow with the number of keys.
        With `skip_missing`, keys deleted meanwhile are left out instead of refused; with `save`,
        what moved is saved, so the history holds every byte counted so far."""
        async with self.lock:
            keys = (
                [self.state.keys[r] for r in refs if r in self.state.keys]
                if skip_missing
                else [self.find(ref) for ref in refs]
            )
            if keys:
                await self.kernel.refresh_keys(keys)
            if save and self.ledger.unsaved:
                self.ledger.save_quietly()
            return keys

    async def poll_once(self, *, final: bool = False) -> Refresh:
        """Read the kernel, settle every key and persist the totals if anything moved; then count
        the established connections the answers serve until the next poll.

        `final`: the last save before exit, always written as a full snapshot, so the next
        start reads one file and no journal."""
        async with self.lock:
            result = await self.kernel.refresh()
            if self.xray is not None:
                await self.xray.follow_statuses(self.state)
            if self.ledger.unsaved or final:
                self.ledger.save_quietly(compact=final)
        await self._connections.read()  # needs no lock: it reads sockets, not the state
        return result

    async def reconcile(self) -> Refresh:
        """Make the kernel table match the state: rebuild a damaged table, fix missing entries."""
        async with self.lock:
            result = await self.kernel.refresh(check_elements=True)
            self.ledger.save_quietly()
            return result

    async def backup(self) -> None:
        """Copy the state into backups/ (none if the newest backup holds it); failures logged."""
        async with self.lock:
            self.ledger.backup()

    async def start_xray(self) -> None:
        """Before READY: give older keys their Xray fields. Drift is `finish_start`'s."""
        if self.xray is None:
            return
        async with self.lock:
            server_key = self.state.reality_private_key
            for key in self.state.keys.values():
                if self.xray.prepare(self.state, key):
                    self.ledger.mark(key.id)
            if self.ledger.dirty or self.state.reality_private_key != server_key:
                self.ledger.save_quietly()

    async def finish_start(
        self, ready: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The start's work READY need not wait for, done once `ready` is set, holding the lock
        from before READY on, so every operation and drift report comes after it (README
        "Start-up and memory"): a snapshot that folds in the previous run's journal, a backup
        of the state this start succeeded with, and Xray's drift reported and, if configured,
        repaired."""
        async with self.lock:
            task_status.started()
            await ready.wait()
            self.ledger.save_quietly(compact=True)
            self.ledger.backup()
            if self.xray is not None:
                await self._start_xray_sync(self.xray)

    async def _start_xray_sync(self, xray: XraySide) -> None:
        """Xray's drift, logged once per start; with autosync, the config rendered from the keys
        (a repair if it drifted) and kept in memory for later operations to splice."""
        problems = await xray.report_drift(self.state)
        if problems is None or not self.settings.xray_autosync or not (problems or self.state.keys):
            return
        try:
            # Without drift this writes nothing, but leaves the rendered config in memory, so
            # the first key operation does not pay for rendering every key.
            await xray.sync(self.state)
            self.ledger.save_quietly()
            if problems:
                self.log.info("xray_drift_repaired", problems=len(problems))
        except OperationError as exc:
            self.log.error("xray_sync_failed", error=exc.detail)

    async def connections(self) -> Established:
        """Established connections per port as the last poll read them, with that read's time;
        read now only if no poll has yet."""
        latest = self._connections.latest
        return latest if latest.at is not None else await self._connections.read()

    async def interface_bytes(self) -> dict[str, dict[str, int]]:
        """rx/tx byte counters of every interface of this host's network namespace."""
        return await anyio.to_thread.run_sync(self.host.interface_bytes)

    async def check(self) -> list[str]:
        """Every disagreement between state, kernel table and allocator, as readable lines."""
        async with self.lock:
            found = allocator.problems(self.settings.port_range, self.assigned_ports())
            return found + await self.kernel.problems()

    async def sync_xray(self, force_restart: bool = False) -> Pushed:
        """Re-render Xray's config from the state and apply it (repairs drift)."""
        xray = self._require_xray()
        async with self.lock:
            pushed = await xray.sync(self.state, force_restart=force_restart)
            self.ledger.save_quietly()
            return pushed

    async def migrate(
        self, source_path: Path, dry_run: bool, replace: bool = False
    ) -> tuple[list[str], list[KeyRecord]]:
        """Give every client of a shared VLESS inbound its own key, port and inbound.

        uuid and name (email) are kept, so clients only change port. Idempotent: a second run
        finds nothing to move. The live config is kept as a pre-migration copy first. A source
        that is not the live config replaces it, so it is refused unless `replace`; the plan
        then says what the live config loses. `progress` says how far it got meanwhile.
        """
        xray = self._require_xray()
        async with self.lock:
            with self.progress.running("migrate") as progress:
                progress.enter(f"reading {source_path}")
                source = await xray.read_source(source_path)
                replaces = await xray.replacement(source, replace)
                progress.enter("planning")
                plan = xray.plan(source, self.state, await self._bound_ports(), replaces)
                if dry_run or plan.is_empty:
                    return plan.lines(), []
                created, copy = await self._migrate(
                    xray, plan, apply_migration(source.config, plan)
                )
            self.settler.everything = True
            self.log.info(
                "xray_migrated",
                source=str(source_path),
                keys=len(created),
                original_copy=None if copy is None else str(copy),
            )
            return plan.lines(), created

    async def _migrate(
        self, xray: XraySide, plan: MigrationPlan, base: dict[str, Any]
    ) -> tuple[list[KeyRecord], Path | None]:
        """Carry out a migration plan, all or nothing: the pre-migration copy, each moved
        client's key and counters, then Xray's config on `base`."""
        progress = self.progress
        async with self._all_or_nothing("migrate") as undo:
            progress.enter("keeping a copy of the live config")
            copy = await xray.keep_original()
            undo.append(lambda: xray.discard_original(copy))
            created = [
                checked(xray.migrated_key(self.state, move, new_id(self.index)))
                for move in plan.moves
            ]
            progress.enter("installing counters", len(created))
            for key in created:
                await self._install(key, undo)
                progress.step()
            routed = self.state.route_sources
            self.state.route_sources = (*routed, *(t for t in plan.routed if t not in routed))
            progress.enter("writing and applying Xray's config, saving the keys")
            await self._commit(undo, base=base)
        return created, copy

    async def rollback_migration(self) -> tuple[str, list[KeyRecord]]:
        """Restore the pre-migration config byte for byte and delete the keys migration made;
        keys created since then no longer join the rules of the shared inbounds it replaced."""
        xray = self._require_xray()
        async with self.lock:
            with self.progress.running("rollback") as progress:
                progress.enter("reading the counters")
                await self.kernel.refresh()
                migrated = [key for key in self.state.keys.values() if key.migrated]
                async with self._all_or_nothing("roll back the migration") as undo:
                    for key in migrated:
                        del self.state.keys[key.id]
                        self._forget(key.id)
                    self._leave_routes()
                    progress.enter("restoring the pre-migration config")
                    restored = await xray.restore_original()
                    undo.append(restored.undo)
                    progress.enter("saving")
                    self.ledger.save()
                progress.enter("removing the keys' counters and connections")
                await self.kernel.uninstall_quietly(migrated)
                await self.settler.close_deleted(migrated)
            copy = str(restored.copy)
            self.log.info("xray_migration_rolled_back", restored=copy, keys_removed=len(migrated))
            return copy, migrated

    def _leave_routes(self) -> None:
        """No shared inbound is replaced any more: no key joins its routing rules."""
        self.state.route_sources = ()
        for key in [key for key in self.state.keys.values() if key.route_sources]:
            self.state.keys[key.id] = key.model_copy(update={"route_sources": ()})
            self.ledger.mark(key.id)

    # --- the steps of an operation -------------------------------------------------------------

    async def _replace(
        self, before: KeyRecord, after: KeyRecord, undo: list[Undo], force_quota: bool = False
    ) -> None:
        """Put `after` in the place of `before`: settle it, set its quota, push Xray, save."""
        moment, epoch = now(), after.epoch
        settler = self.settler
        settler.settle_status(after, moment, kernel_over=False)
        self.state.keys[after.id] = checked(after)
        self.ledger.mark(after.id)
        failing = self.failures.errors.pop(after.id, None) is not None  # put back if this fails
        held = settler.quotas.get(after.port, settler.quota_for(before))  # as the kernel has it
        if await settler.enforce(after, force_quota or failing or after.epoch != epoch):
            undo.append(lambda: settler.put(after.port, held))
        await self._guard(after, undo)
        settler.watch(after, moment)
        await self._commit(undo)

    async def _guard(self, key: KeyRecord, undo: list[Undo]) -> None:
        """Give the kernel the key's speed, connection and address limits; the guard it held
        is put back if the operation fails."""
        guards = self.settler.guards
        if guards is None:
            return
        held = guards.kernel.guard_of(key.port)
        if await guards.settle(key):
            undo.append(lambda: guards.kernel.guard(key.port, held))

    async def _publish(
        self,
        local: bool,
        undo: list[Undo],
        key_ids: Sequence[str],
        step: Callable[[FleetKeysPort], Awaitable[None]],
    ) -> None:
        """The last step of a fleet key operation, unless `local`: write it to the fleet
        database, so the other nodes hear only of what is saved here. A write that fails takes
        this node's side back, the key's saved state with it (README "Keys created once")."""
        if self.fleet_keys is None or local:
            return
        saved = self.state.generation
        undo.append(lambda: self._save_again(key_ids, saved))
        await step(self.fleet_keys)

    async def _save_again(self, key_ids: Sequence[str], saved: int) -> None:
        """Undo of a save: the keys as memory has them again, saved as the generation after the
        one saved (memory holds the one before; a generation is never saved twice)."""
        self.state.generation = max(self.state.generation, saved)
        for key_id in key_ids:
            self.ledger.mark(key_id)
        self.ledger.save()

    async def _install(self, key: KeyRecord, undo: list[Undo]) -> None:
        """Install a new key's counters and add it to the state."""
        await self.kernel.install(key.port, self.settler.quota_for(key))
        undo.append(lambda: self.kernel.uninstall(key.port))
        await self._guard(key, undo)
        self.state.keys[key.id] = key
        self.ledger.mark(key.id)

    async def _commit(self, undo: list[Undo], base: dict[str, Any] | None = None) -> None:
        """Push the keys to Xray (its undo joins the others), then save the state."""
        xray = self.xray
        if xray is not None:
            pushed = await xray.push_changes(self.state, base=base)
            undo.append(lambda: xray.take_back(pushed))
        self.ledger.save()

    def _forget(self, key_id: str) -> None:
        """The key was deleted: the next save drops it, and its failure (if any) goes with it."""
        self.failures.errors.pop(key_id, None)
        self.ledger.mark(key_id)
        if self.settler.guards is not None:
            self.settler.guards.forget(key_id)

    # --- all or nothing ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _all_or_nothing(self, what: str) -> AsyncIterator[list[Undo]]:
        """One operation: each kernel or Xray step it takes adds its undo to the yielded list.

        If anything fails (a refusal, or an error nobody foresaw such as an OverflowError), the
        memory is put back exactly as it was and the undos run newest first; the error becomes
        an OperationError (4xx/503/507), never a 500. Status events wait for success."""
        memory = self._remember()
        undo: list[Undo] = []
        succeeded = False
        self.events.hold()
        try:
            yield undo
            succeeded = True
        except BaseException as exc:
            self._restore(memory)
            with anyio.CancelScope(shield=True):  # a cancelled operation is undone all the same
                await self._undo(what, undo)
            if not isinstance(exc, Exception):
                raise
            raise self._refusal(what, exc) from None
        finally:
            self.events.release(emit=succeeded)

    def _remember(self) -> Memory:
        state, settler = self.state, self.settler
        return Memory(
            keys=dict(state.keys),
            top={name: getattr(state, name) for name in State.model_fields if name != "keys"},
            kernel_quotas=dict(settler.quotas),
            failures=dict(self.failures.errors),
            statuses_moved=self.xray is not None and self.xray.statuses_moved,
            settle_everything=settler.everything,
            next_deadline=settler.next_deadline,
        )

    def _restore(self, memory: Memory) -> None:
        self.state.keys.clear()
        self.state.keys.update(memory.keys)
        self.index.rebuild()
        for name, value in memory.top.items():
            setattr(self.state, name, value)
        settler = self.settler
        settler.quotas, self.failures.errors = memory.kernel_quotas, memory.failures
        settler.everything, settler.next_deadline = memory.settle_everything, memory.next_deadline
        if self.xray is not None:
            self.xray.statuses_moved = memory.statuses_moved

    async def _undo(self, what: str, undo: list[Undo]) -> None:
        """Run the undos newest first. One that fails is logged and the rest still run; the next
        poll settles every key again, which puts the kernel's quotas right."""
        for step in reversed(undo):
            try:
                await step()
            except Exception as exc:  # noqa: BLE001 (every undo must get its chance)
                self.log.error("undo_failed", operation=what, error=describe(exc))
                self.settler.everything = True

    def _refusal(self, what: str, exc: Exception) -> OperationError:
        """The error an operation answers with; logged here, once."""
        if isinstance(exc, NftError):
            exc = kernel_refusal(what, exc)
        if isinstance(exc, ValidationError):
            exc = Invalid(f"{_validation_detail(exc)}; nothing was changed")
        if isinstance(exc, OperationError):
            self.log.warning(
                "operation_refused", operation=what, status=exc.status, error=exc.detail
            )
            return exc
        self.log.error("operation_failed", operation=what, error=describe(exc), exc_info=exc)
        return OperationFailed(
            f"{what} failed unexpectedly ({describe(exc)}); nothing was changed. "
            "The daemon log has the details (event=operation_failed)"
        )

    # --- reads for the HTTP layer ----------------------------------------------------------------

    def keys_by_port(self, offset: int = 0, limit: int | None = None) -> list[KeyRecord]:
        """The keys ordered by port (a new list), from `offset` on, at most `limit` of them."""
        return self.index.in_port_order(offset, limit)

    def key_with_token(self, token: str) -> KeyRecord | None:
        """The key whose subscription token is `token` (compared in constant time)."""
        return self.index.with_token(token)

    def keys_named(self, name: str) -> list[KeyRecord]:
        """The keys named `name`, ordered by port."""
        return self.index.named(name)

    def has_key(self, key_id: str) -> bool:
        return key_id in self.state.keys

    def key_count(self) -> int:
        return len(self.state.keys)

    def key_error(self, key_id: str) -> str | None:
        """This key's failed kernel step, if any."""
        return self.failures.errors.get(key_id)

    def timezone(self) -> ZoneInfo:
        """The zone dates like "+30d" and reset boundaries are read in."""
        return self.zone

    def polled_at(self) -> float | None:
        """Unix time the last kernel reading finished."""
        return self.kernel.last_poll_at

    def poll_seconds(self) -> float | None:
        return self.kernel.last_poll_seconds

    def port_range(self) -> PortRange:
        return self.settings.port_range

    def nft_table(self) -> str:
        return self.settings.nft_table

    def xray_enabled(self) -> bool:
        return self.xray is not None

    def xray_apply_mode(self) -> str:
        return self.settings.xray_apply

    def xray_removes_inactive(self) -> bool:
        return self.settings.xray_remove_inactive

    def link(self, key: KeyRecord) -> str | None:
        """The key's vless:// link; None when Xray is off (XrayError when it cannot be built)."""
        return None if self.xray is None else self.xray.link(self.state, key)

    async def xray_status(self) -> dict[str, Any] | None:
        await self._current_operation()
        return None if self.xray is None else await self.xray.status(self.state)

    async def xray_drift(self, reuse: bool = False) -> list[DriftProblem]:
        """Drift problems (XrayError when the config cannot be read); `reuse`: see
        XraySide.drift."""
        await self._current_operation()
        return await self._require_xray().drift(self.state, reuse)

    async def _current_operation(self) -> None:
        """Wait for the operation under way, if any (right after READY: `finish_start`, which
        may be repairing Xray's config), so a report never shows a config being rewritten."""
        async with self.lock:
            pass

    def operation(self) -> dict[str, Any]:
        """The long operation under way and how far it got (Progress.answer); no lock taken."""
        return self.progress.answer()

    def xray_expected_inbounds(self) -> int:
        return 0 if self.xray is None else len(self.xray.served(self.state))

    def usage_history(self) -> History | None:
        return self.history

    def server_label(self) -> str:
        """This server's name in usage answers: PORTMETER_SERVER_NAME when set (the name its fleet
        reports carry), else PORTMETER_PUBLIC_HOST, else the host name."""
        settings = self.settings
        explicit = "server_name" in settings.model_fields_set
        name = settings.server_name
        return (name if explicit else "") or settings.public_host or name or socket.gethostname()

    def own_server_names(self) -> frozenset[str]:
        """Case-folded names fleet reports may not carry: they are this server's own."""
        return frozenset({self.server_label().casefold(), self.settings.server_name.casefold()})

    # --- helpers ---------------------------------------------------------------------------------

    def _require_xray(self) -> XraySide:
        if self.xray is None:
            raise Invalid("the Xray integration is off (PORTMETER_XRAY_CONFIG is empty)")
        return self.xray

    async def _free_ports(
        self, requested: Sequence[int | None], *, batch: bool = False
    ) -> list[int]:
        """The ports for new keys, in order (allocator.allocate): the requested ones first, then
        the lowest free for the others, each counting the ones chosen before it as taken. The
        kernel is asked only whether ports near a candidate are bound by others, each stretch
        of PORT_PROBE ports once: a full look at the range would list every port Xray listens
        on, 30,000 sockets at 30,000 keys. `batch`: a refusal names the item (`keys[i]`)."""
        port_range, taken = self.settings.port_range, set(self.index.ports())
        held = set() if self.xray is None else await self.xray.operator_ports(port_range)
        busy, probed, chosen = set(held), set[int](), dict[int, int]()
        floor = port_range.first  # below it every port is taken or busy: the scan starts here
        for at in sorted(range(len(requested)), key=lambda at: requested[at] is None):
            port = requested[at]
            if port in held and port not in taken:
                raise Conflict(
                    f"{f'keys[{at}]: ' * batch}port {port} is used by an inbound of Xray's "
                    "config that is not portmeter's"
                )
            while True:
                candidate = self._allocate(port, taken, busy, floor, f"keys[{at}]: " * batch)
                if candidate not in probed:
                    near = PortRange(candidate, min(port_range.last, candidate + PORT_PROBE - 1))
                    busy |= await anyio.to_thread.run_sync(self.host.bound_ports, near)
                    probed.update(range(near.first, near.last + 1))
                if candidate not in busy:
                    break
            taken.add(candidate)
            chosen[at] = candidate
            floor = candidate if port is None else floor
        return [chosen[at] for at in range(len(requested))]

    def _allocate(
        self, requested: int | None, taken: set[int], busy: set[int], floor: int, where: str
    ) -> int:
        """allocator.allocate, scanning for the lowest free port from `floor` on; 409 (Conflict)
        saying why, after `where`, when there is none."""
        port_range = self.settings.port_range
        scanned = port_range if requested is not None else PortRange(floor, port_range.last)
        try:
            return allocator.allocate(scanned, taken, busy, requested)
        except allocator.PortUnavailable:
            try:  # the reason as the whole range gives it
                return allocator.allocate(port_range, taken, busy, requested)
            except allocator.PortUnavailable as exc:
                raise Conflict(f"{where}{exc}") from None

    async def _bound_ports(self) -> set[int]:
        """Ports of the range other processes hold (blocking netlink: in a worker thread)."""
        return await anyio.to_thread.run_sync(self.host.bound_ports, self.settings.port_range)


def new_id(index: KeyIndex) -> str:
    """A fresh key id; never the name of a key saved before names were checked, which it would
    shadow in lookups."""
    while True:
        candidate = secrets.token_hex(4)
        if candidate not in index.keys and not index.named(candidate):
            return candidate


def checked(key: KeyRecord) -> KeyRecord:
    """`key` if every field is within its bounds (bounds.py): a record built or changed in memory
    is validated again before any kernel step, so no out-of-bounds value can reach the kernel,
    the state file or a restart."""
    KeyRecord.model_validate(key.model_dump())
    return key


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
