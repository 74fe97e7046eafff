"""The service's owner of the kernel: readings into totals, and each key settled against them.

Each reading of the kernel also settles every key: its status (active, limited, expired,
disabled), the quota the kernel must enforce for it, and a periodic reset that came due. A key
whose step fails there is logged once, marked (its `error` in the API) and retried at every
poll; the other keys keep being counted (README "Faults and their remedies"). A missing or
damaged table is rebuilt from the state, and the bytes since the last reading are logged as lost
(README "Crashes, restarts, reboots"). A key that leaves `active` has its live connections closed
once the kernel enforces its new status (README "Limits, expiry and resets").

Nothing here takes the service's lock or saves: the front does both around these calls.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any

import anyio
import structlog

from daemon import limits
from daemon.allocator import PortRange
from daemon.errors import Invalid, KernelRefused, OperationError
from daemon.kernel import Host, Kernel, NftError, OutOfRange, PortReading, TableView, port_gaps
from daemon.limits import Quota, Status
from daemon.service.guards import Guards
from daemon.service.index import KeyIndex
from daemon.service.ledger import Ledger, StatusEvents
from daemon.store.state import DirectionModel, KeyRecord, State, now

Log = structlog.typing.FilteringBoundLogger
DIRECTIONS = ("rx", "tx", "dropped", "refused", "ip_refused")


@dataclass(slots=True)
class Refresh:
    """What one reading of the kernel found and did."""

    changed: bool = False
    table_rebuilt: bool = False
    installed: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)  # keys whose kernel reading changed
    read_at: float = 0.0  # monotonic time the reading began


def status_of(key: KeyRecord, moment: datetime, kernel_over: bool, remote: int = 0) -> Status:
    """`remote`: what the other servers of a fleet counted for the key's name since its reset."""
    return limits.status(
        enabled=key.enabled,
        expire_at=key.expire_at,
        limit=limits.allowance(key.data_limit_bytes, remote),
        used=key.used_bytes,
        kernel_over=kernel_over,
        now=moment,
    )


def desired_quota(key: KeyRecord, remote: int = 0) -> Quota | None:
    allowance = limits.allowance(key.data_limit_bytes, remote)
    return limits.kernel_quota(key.status, allowance, key.used_bytes)


def zero(key: KeyRecord, moment: datetime) -> None:
    """Zero a key's totals, keeping what it used as `used_before_reset`; a new epoch begins."""
    key.used_before_reset = key.used_bytes
    key.last_reset_at = moment
    key.epoch += 1
    for direction in DIRECTIONS:
        model: DirectionModel = getattr(key, direction)
        setattr(key, direction, DirectionModel.of(model.account().reset()))


def kernel_refusal(what: str, exc: NftError) -> OperationError:
    """A value the kernel cannot hold is bad input (422); anything else nftables refused is 503,
    marked `denied` only for EPERM/EACCES (then the remedy is root or CAP_NET_ADMIN)."""
    if isinstance(exc, OutOfRange):
        return Invalid(f"{what}: {exc}; nothing was changed")
    return KernelRefused(f"nftables refused to {what}: {exc}", denied=exc.denied)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


async def kernel_call(what: str, call: Awaitable[Any]) -> Any:
    """`call`'s answer; nftables' refusal becomes the OperationError a client is answered."""
    try:
        return await call
    except NftError as exc:
        raise kernel_refusal(what, exc) from None


class Failures:
    """Keys whose last kernel step failed (id -> error): shown as the key's `error`, retried at
    every poll, logged once per different error (not at every poll)."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.errors: dict[str, str] = {}

    def failed(self, key: KeyRecord, exc: Exception, what: str) -> None:
        if isinstance(exc, NftError):
            exc = kernel_refusal(what, exc)
        error = exc.detail if isinstance(exc, OperationError) else describe(exc)
        if self.errors.get(key.id) == error:
            return
        self.errors[key.id] = error
        self.log.error(
            "key_failed",
            key_id=key.id,
            name=key.name,
            port=key.port,
            error=error,
            remedy="retried at every poll; the other keys are counted meanwhile",
            exc_info=None if isinstance(exc, OperationError) else exc,
        )

    def recovered(self, key: KeyRecord) -> None:
        if self.errors.pop(key.id, None) is not None:
            self.log.info("key_recovered", key_id=key.id, name=key.name, port=key.port)


@dataclass(frozen=True, slots=True)
class Established:
    """Established TCP connections per port as one read of the kernel found them, and the Unix
    time that read began (None before the first read)."""

    by_port: Mapping[int, int] = field(default_factory=dict)
    at: float | None = None

    def count(self, port: int) -> int:
        return self.by_port.get(port, 0)

    def total(self, ports: Iterable[int]) -> int:
        return sum(self.by_port.get(port, 0) for port in ports)

    def stamp(self) -> int | None:
        """`at` as the answers give it: whole Unix seconds, as their `timestamp`."""
        return None if self.at is None else int(self.at)


class Connections:
    """Established connections per port, read once per poll (README "API"): answers
    serve the latest read with its time and never wait for the kernel. A read that fails is
    logged (once, and again when the error changes) and keeps the previous figure and its time,
    so an answer shows how old its figure is."""

    def __init__(self, host: Host, port_range: PortRange, log: Log) -> None:
        self.host = host
        self.port_range = port_range
        self.log = log
        self.latest = Established()
        self._failing: str | None = None

    async def read(self) -> Established:
        """Read the kernel now (a few sockets' worth of work: it filters by port itself)."""
        started = time.time()
        try:
            counts = await anyio.to_thread.run_sync(self.host.established_by_port, self.port_range)
        except OSError as exc:
            if describe(exc) != self._failing:
                self._failing = describe(exc)
                self.log.warning(
                    "connections_read_failed",
                    error=self._failing,
                    remedy="tried again at every poll; answers show the last figure and its time",
                )
            return self.latest
        if self._failing is not None:
            self._failing = None
            self.log.info("connections_read_recovered")
        self.latest = Established(counts, started)
        return self.latest


class Closer:
    """Closes a key's live TCP connections when it may no longer pass traffic, so the proxy
    frees them and the client cannot keep using a connection opened before. A failure is logged
    and never fails what caused it."""

    def __init__(self, host: Host, log: Log) -> None:
        self.host = host
        self.log = log

    async def close(self, key: KeyRecord, reason: str) -> None:
        try:
            count = await anyio.to_thread.run_sync(self.host.close_connections, key.port)
        except Exception as exc:  # noqa: BLE001 (closing is a courtesy: whatever failed, log it)
            self.log.warning(
                "connections_close_failed",
                key_id=key.id,
                port=key.port,
                reason=reason,
                error=describe(exc),
                remedy="needs CAP_NET_ADMIN and a kernel with CONFIG_INET_DIAG_DESTROY",
            )
            return
        self.log.info(
            "connections_closed", key_id=key.id, port=key.port, count=count, reason=reason
        )


class Settler:
    """Settles keys: a reset that came due, the status they have now, the quota the kernel must
    enforce for it. Knows the quota the kernel holds per port and when a key's expiry or reset
    comes, so a poll settles only the keys whose reading changed until then."""

    def __init__(
        self,
        kernel: Kernel,
        state: State,
        ledger: Ledger,
        events: StatusEvents,
        zone: tzinfo,
        failures: Failures,
        closer: Closer,
    ) -> None:
        self.kernel = kernel
        self.state = state
        self.ledger = ledger
        self.events = events
        self.zone = zone
        self.failures = failures
        self.closer = closer
        # Keys that left `active` (id -> the status they moved to) whose connections are closed
        # once the kernel enforces that status.
        self.closing: dict[str, Status] = {}
        # The quota the kernel holds per port (None: none), as last read or set: a refused
        # operation puts it back as it was, usage included.
        self.quotas: dict[int, Quota | None] = {}
        # Unless a key's expiry or reset time has come (the earliest is kept here) or something
        # asks for all of them, a poll settles only the keys whose reading changed.
        self.next_deadline: datetime | None = None
        self.everything = True
        # A fleet's usage of each key name on the other servers (daemon/fleet/limits.py), and
        # who hears of an operation's resets here (to pass them on to them as one message): the
        # keys reset, the users reset with them, and the state generation whose usage they follow.
        self.remote: dict[str, int] = {}
        self.on_reset: Callable[[Sequence[KeyRecord], Sequence[str], int], Awaitable[None]] | None
        self.on_reset = None
        # Periodic resets are passed on together after each settling pass (`pass_on_resets`).
        self.on_resets: Callable[[Sequence[KeyRecord], int], None] | None = None
        self.resets_due: list[KeyRecord] = []
        # Speed, connection and address limits (service/guards.py), when the front gives them.
        self.guards: Guards | None = None

    async def settle_all(self, view: TableView | None, result: Refresh) -> None:
        moment = now()
        due = self.next_deadline is not None and moment >= self.next_deadline
        if self.everything or due or view is None:
            keys = list(self.state.keys.values())
            self.everything, self.next_deadline = False, None
        else:
            wanted = result.touched.union(self.failures.errors)  # failed keys: retried each poll
            keys = [self.state.keys[i] for i in wanted if i in self.state.keys]
        for key in keys:
            reading = None if view is None else view.ports.get(key.port)
            if view is not None and reading is None:
                continue  # no counters: their installation failed (logged), retried next poll
            over = reading is not None and reading.over
            if await self.settle(key, moment, kernel_over=over):
                result.changed = True
        self.pass_on_resets()

    def pass_on_resets(self) -> None:
        """Hand the periodic resets of a settling pass to the fleet at once, for the next save
        (which holds the usage before them); one an operation undid meanwhile (the key is back
        at its earlier epoch, or gone) is dropped."""
        due, self.resets_due = self.resets_due, []
        kept = [
            key
            for key in due
            if (current := self.state.keys.get(key.id)) is not None and current.epoch >= key.epoch
        ]
        if kept and self.on_resets is not None:
            self.on_resets(kept, self.state.generation + 1)
            self.ledger.unsaved = True

    async def settle(self, key: KeyRecord, moment: datetime, kernel_over: bool) -> bool:
        """Settle one key during a reading: reset, status, quota; True if the key changed.

        A failure is this key's alone: logged once, shown as the key's `error`, retried (with a
        fresh quota) at every poll, while every other key goes on being counted."""
        epoch, changed = key.epoch, False
        try:
            changed = self.settle_status(key, moment, kernel_over)
            await self.enforce(key, force=key.epoch != epoch or key.id in self.failures.errors)
            if self.guards is not None:
                await self.guards.settle(key)
        except Exception as exc:  # noqa: BLE001 (one key's failure, whatever it is, stays its own)
            self.failures.failed(key, exc, "set quota")
        else:
            self.failures.recovered(key)
            await self.close_left(key)
        self.watch(key, moment)
        return changed

    def settle_status(self, key: KeyRecord, moment: datetime, kernel_over: bool) -> bool:
        """Apply a reset that came due and the status the key has now; True if either changed
        it. Memory only: `enforce` brings the kernel in line."""
        changed = status_moved = False
        if key.next_reset_at is not None and moment >= key.next_reset_at:
            zero(key, moment)
            key.next_reset_at = limits.next_boundary(moment, key.reset_strategy, self.zone)
            self.events.report("key_reset", key, used_before_reset=key.used_before_reset)
            kernel_over, changed = False, True
            if self.on_resets is not None:
                self.resets_due.append(key)
        new_status = self.status_for(key, moment, kernel_over)
        if new_status != key.status:
            previous, key.status = key.status, new_status
            self.events.report(f"key_{new_status.value}", key, previous_status=previous.value)
            changed = status_moved = True
            if new_status is Status.ACTIVE:
                self.closing.pop(key.id, None)
            else:
                self.closing[key.id] = new_status
        if changed:
            self.ledger.mark(key.id, status=status_moved)
        return changed

    def status_for(self, key: KeyRecord, moment: datetime, kernel_over: bool) -> Status:
        """The key's status now, the fleet's other servers' usage of its name included."""
        return status_of(key, moment, kernel_over, self.remote.get(key.name, 0))

    def quota_for(self, key: KeyRecord) -> Quota | None:
        """The quota the kernel must hold for the key, the other servers' usage of its name
        (as last read from the fleet) included: at every install, rebuild and settle alike."""
        return desired_quota(key, self.remote.get(key.name, 0))

    async def enforce(self, key: KeyRecord, force: bool) -> bool:
        """Give the kernel the quota the key needs, unless it has that limit already (and not
        `force`: a reset or a changed usage needs a fresh quota). True if the kernel changed."""
        desired = self.quota_for(key)
        wanted_limit = None if desired is None else desired.limit
        held = self.quotas.get(key.port)
        if not force and (None if held is None else held.limit) == wanted_limit:
            return False
        await self.put(key.port, desired)
        return True

    async def close_left(self, key: KeyRecord) -> None:
        """Close the connections of a key that left `active`, once its quota is in place (so the
        client cannot reconnect and pass). An entry whose status the key no longer has (it moved
        on, or the operation that moved it was undone) is dropped."""
        left = self.closing.pop(key.id, None)
        if left is not None and left == key.status:
            await self.closer.close(key, left.value)

    async def close_deleted(self, keys: Sequence[KeyRecord]) -> None:
        """The keys are deleted (and saved so): close what is still connected to their ports."""
        for key in keys:
            self.closing.pop(key.id, None)
            await self.closer.close(key, "deleted")

    async def put(self, port: int, quota: Quota | None) -> None:
        """Set this quota in the kernel, whatever it holds."""
        await kernel_call("set quota", self.kernel.enforce(port, quota))
        self.quotas[port] = quota

    def watch(self, key: KeyRecord, moment: datetime) -> None:
        """Remember the key's expiry and reset time, so the poll settles every key once due."""
        for deadline in (key.expire_at, key.next_reset_at):
            if (
                deadline is not None
                and deadline > moment
                and (self.next_deadline is None or deadline < self.next_deadline)
            ):
                self.next_deadline = deadline


class KernelSide:
    """Reads the kernel into the keys' totals and keeps the table matching the state: installs
    and removes ports, rebuilds a missing or damaged table, repairs missing or orphaned parts."""

    def __init__(
        self,
        kernel: Kernel,
        state: State,
        ledger: Ledger,
        settler: Settler,
        failures: Failures,
        log: Log,
        index: KeyIndex,
    ) -> None:
        self.kernel = kernel
        self.state = state
        self.index = index  # keys by port: a poll looks only at the ports whose reading moved
        self.ledger = ledger
        self.settler = settler
        self.failures = failures
        self.log = log
        self.last_poll_at: float | None = None
        self.last_poll_seconds: float | None = None
        self.read_started = 0.0  # monotonic time the last kernel reading began
        self._applied: TableView | None = None  # the last full reading taken into the totals

    # --- reading -----------------------------------------------------------------------------

    async def refresh(self, check_elements: bool = False) -> Refresh:
        """Read every counter into the totals, mend the table, settle the keys."""
        self.read_started = time.monotonic()
        result = Refresh(read_at=self.read_started)
        view = await kernel_call("read counters", self.kernel.read())
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
        await self.settler.settle_all(view, result)
        self.last_poll_at = time.time()
        self.last_poll_seconds = time.monotonic() - self.read_started
        self.ledger.unsaved = self.ledger.unsaved or result.changed
        return result

    async def refresh_keys(self, keys: Sequence[KeyRecord]) -> None:
        """Take these keys' readings into their totals and settle them; falls back to a full
        reading when the table is missing, was replaced, or lacks one of them."""
        ports = [key.port for key in keys]
        view = await kernel_call("read counters", self.kernel.read_ports(ports))
        if (
            view is None
            or view.handle != self.state.table_handle
            or any(port not in view.ports for port in ports)
        ):
            await self.refresh()
            return
        result = Refresh()
        moment = now()
        for key in keys:
            reading = view.ports[key.port]
            self._apply_reading(key, reading, result)
            self.settler.quotas[key.port] = _held(reading)
            if await self.settler.settle(key, moment, kernel_over=reading.over):
                result.changed = True
        self.settler.pass_on_resets()
        self.ledger.unsaved = self.ledger.unsaved or result.changed

    def _apply(self, view: TableView, result: Refresh) -> None:
        if view is self._applied:
            return  # the kernel showed exactly the last reading again: nothing moved
        if self.state.table_handle != view.handle:
            self.state.table_handle = view.handle
            result.changed = True
        before = {} if self._applied is None else self._applied.ports
        on_port = self.index.on_port
        for port, reading in view.ports.items():
            if reading is not before.get(port) and (key := on_port(port)) is not None:
                self._apply_reading(key, reading, result)
        self.settler.quotas = {port: _held(reading) for port, reading in view.ports.items()}
        self._applied = view

    def _apply_reading(self, key: KeyRecord, reading: PortReading, result: Refresh) -> None:
        result.touched.add(key.id)
        before = (key.rx.bytes, key.tx.bytes, key.rx.packets, key.tx.packets)
        if _advance(key, reading):
            result.changed = True
            self.ledger.mark(key.id)
            self.ledger.note_usage(key, before)

    # --- mending the table -------------------------------------------------------------------

    async def _rebuild(
        self, event: str, result: Refresh, level: str = "error", **fields: Any
    ) -> TableView | None:
        """Recreate the table from the state; bytes since the last reading are lost and logged."""
        ports = {key.port: self.settler.quota_for(key) for key in self.state.keys.values()}
        guards = self.settler.guards
        try:
            await self.kernel.build(
                ports, None if guards is None else guards.all_desired(self.state.keys.values())
            )
        except NftError as exc:
            if exc.denied or not any(ports.values()):
                raise kernel_refusal("rebuild table", exc) from None
            # One key's quota must not keep every key from being counted: counters for all
            # now, each key's quota at the settling that follows, where a failure is its own.
            self.log.error(
                "table_built_without_quotas", error=str(exc), remedy="quotas set key by key"
            )
            await kernel_call("rebuild table", self.kernel.build(dict.fromkeys(ports)))
        if level == "info":
            self.log.info(event, table=self.kernel.table, keys=len(ports))
        else:
            last = self.last_poll_at
            since = None if last is None else round(time.time() - last, 1)
            self.log.error(
                event,
                table=self.kernel.table,
                keys=len(ports),
                action="table rebuilt from state",
                lost="traffic since the last reading",
                seconds_since_last_reading=since,
                **fields,
            )
        result.table_rebuilt = result.changed = True
        self.settler.everything = True
        view: TableView | None = await kernel_call("read counters", self.kernel.read())
        if view is not None:
            self._apply(view, result)
        return view

    async def _repair(
        self, view: TableView, result: Refresh, check_elements: bool
    ) -> TableView | None:
        """Remove what no key owns, install what a key lacks; the reading to settle against."""
        wanted = set(self.index.ports())
        elements = (
            await kernel_call("read maps", self.kernel.map_elements()) if check_elements else None
        )
        missing: set[int] = set()
        orphans = view.stray - wanted  # half-made leftovers of ports no key owns
        for absent, unowned in port_gaps(wanted, view, elements).values():
            missing |= absent
            orphans |= unowned
        if orphans:
            await kernel_call("remove orphans", self.kernel.remove_present(orphans))
            self.log.warning("orphan_counters_removed", ports=sorted(orphans))
            result.removed = sorted(orphans)
        installed = []
        for port in sorted(missing):
            key = self.index.on_port(port)
            if key is None:
                continue
            try:
                await self.install(port, self.settler.quota_for(key))
            except Exception as exc:  # noqa: BLE001 (this key alone; the others are counted)
                self.failures.failed(key, exc, "install counters")
                continue
            installed.append(port)
        if not installed:
            return view
        self.log.warning("missing_counters_installed", ports=installed)
        result.installed = installed
        self.settler.everything = True
        result.changed = True
        fresh: TableView | None = await kernel_call("read counters", self.kernel.read())
        if fresh is None:
            return view
        self._apply(fresh, result)
        return fresh

    # --- a port's objects ----------------------------------------------------------------------

    async def install(self, port: int, quota: Quota | None) -> None:
        """Install a port's objects; a leftover set (crash, tampering) is removed first."""
        try:
            await self.kernel.install(port, quota)
        except OutOfRange:
            raise
        except NftError:
            await kernel_call("remove leftover counters", self.kernel.remove_present([port]))
            await kernel_call("install counters", self.kernel.install(port, quota))
            self.log.warning("leftover_counters_replaced", port=port)
        self.settler.quotas[port] = quota

    async def uninstall(self, port: int) -> None:
        try:
            await self.kernel.remove(port)
        except NftError as exc:
            self.log.warning("counter_removal_retried", port=port, error=str(exc))
            await kernel_call("remove counters", self.kernel.remove_present([port]))
        self.settler.quotas.pop(port, None)

    async def uninstall_quietly(self, keys: Sequence[KeyRecord]) -> None:
        """Remove deleted keys' counters. The deletion is saved already: a failure here leaves
        counters no key owns, which the next poll removes."""
        for key in keys:
            try:
                await self.uninstall(key.port)
            except Exception as exc:  # noqa: BLE001 (the deletion stands whatever this was)
                self.log.error(
                    "counter_removal_failed",
                    key_id=key.id,
                    port=key.port,
                    error=exc.detail if isinstance(exc, OperationError) else describe(exc),
                    remedy="removed at the next poll",
                )

    # --- the consistency report ------------------------------------------------------------------

    async def problems(self) -> list[str]:
        """Every disagreement between the state and the kernel table, as readable lines."""
        view = await kernel_call("read counters", self.kernel.read())
        if view is None:
            return [f"nftables table inet {self.kernel.table} is missing"]
        found = list(view.problems)
        found += [f"port {port} has an incomplete set of counters" for port in sorted(view.stray)]
        wanted = {key.port for key in self.state.keys.values()}
        elements = await kernel_call("read maps", self.kernel.map_elements())
        gaps = port_gaps(wanted, view, elements)
        missing, orphaned = gaps.pop("counters")
        found += [f"port {p} has a key but no counters in the kernel" for p in sorted(missing)]
        found += [f"port {p} has counters in the kernel but no key" for p in sorted(orphaned)]
        for where, (missing, orphaned) in gaps.items():
            found += [f"port {port} is missing from {where}" for port in sorted(missing)]
            found += [f"{where} holds port {port} that no key owns" for port in sorted(orphaned)]
        for key in self.state.keys.values():
            desired = self.settler.quota_for(key)
            installed = view.ports.get(key.port)
            have = None if installed is None or installed.quota is None else installed.quota.limit
            if (None if desired is None else desired.limit) != have:
                found.append(f"port {key.port} should have quota {desired} but has limit {have}")
        return found


def _held(reading: PortReading) -> Quota | None:
    """The quota the kernel holds as a reading shows it (usage capped at the limit)."""
    quota = reading.quota
    return None if quota is None else Quota(quota.limit, quota.used)


def _advance(key: KeyRecord, reading: PortReading) -> bool:
    """Take a reading into the key's totals, direction by direction; True if any moved."""
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
