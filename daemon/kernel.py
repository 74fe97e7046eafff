"""The service's seam to the kernel: what it calls on the nftables table (`Kernel`), what the
table answers (`TableView`, `PortReading`, `KernelQuota`) and refuses with (`NftError`,
`OutOfRange`), and which facts it asks about the host (`Host`), with in-memory doubles of both
for tests that run without root.

The real table is counters.Counters (with its parts in daemon/nft/) and the real host is the
module netinfo. Neither this module nor the service imports them: only main.py wires them in.
`MemoryKernel` keeps the semantics the service relies on (README "Limits, expiry and resets" and
"How it counts"): counters that only grow, a quota shared by both directions that drops the packet
which would pass its limit (dropped bytes are counted apart, never as usage), handles that change
when the table or a port's objects are made again, and the errors the kernel gives for an object
that exists already or is missing.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import Protocol

from daemon.accounting import Reading
from daemon.allocator import PortRange
from daemon.limits import Guard, Quota

PACKET = 1500  # bytes per packet `MemoryKernel.add_traffic` sends: an Ethernet MTU
Contents = tuple[int | None, dict[int, tuple[int | None, int | None, int, int, int]]]


class NftError(Exception):
    """libnftables or the kernel refused a command; the message is nft's (or the kernel's) own.

    `code` is the errno when it is known: only EPERM and EACCES mean missing privileges."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code

    @property
    def denied(self) -> bool:
        return self.code in (errno.EPERM, errno.EACCES)


class OutOfRange(NftError):
    """A value nf_tables cannot hold (bounds.MAX_KERNEL_QUOTA, MAX_U64); refused before sending."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errno.EOVERFLOW)


@dataclass(frozen=True, slots=True)
class KernelQuota:
    limit: int
    used: int

    @property
    def over(self) -> bool:
        """The allowance is used up: the kernel reports `used` capped at the limit once over."""
        return self.used >= self.limit


@dataclass(frozen=True, slots=True)
class PortReading:
    rx: Reading
    tx: Reading
    dropped: Reading | None = None
    quota: KernelQuota | None = None
    refused: Reading | None = None  # new connections over max_connections, refused
    ip_refused: Reading | None = None  # packets from addresses over max_ips, refused

    @property
    def over(self) -> bool:
        """The kernel enforces a quota on this port and its allowance is used up."""
        return self.quota is not None and self.quota.over


@dataclass(slots=True)
class TableView:
    """What `list table` shows of our table: its identity, counters, quotas, and layout problems."""

    handle: int
    ports: dict[int, PortReading] = field(default_factory=dict)
    stray: set[int] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    guards: dict[int, Guard] | None = None  # known from a full listing only


def port_gaps(
    wanted: AbstractSet[int],
    view: TableView,
    elements: Mapping[str, Mapping[int, str]] | None = None,
) -> dict[str, tuple[set[int], set[int]]]:
    """Where the table disagrees with the keys' ports: for the counters (and, given the maps'
    elements, for maps rx and tx) the ports a key has that are missing there, and the ports
    there that no key owns. One answer for the consistency report and for the repair."""
    present = set(view.ports)
    gaps = {"counters": (set(wanted) - present, present - set(wanted))}
    if elements is not None:
        for direction in ("rx", "tx"):
            mapped = set(elements.get(direction, {}))
            gaps[f"map {direction}"] = (set(wanted) - mapped, mapped - set(wanted))
    return gaps


class Kernel(Protocol):
    """The nftables table as the service uses it: every method the service calls on Counters."""

    @property
    def table(self) -> str: ...

    async def read(self) -> TableView | None: ...

    async def read_ports(self, ports: Iterable[int]) -> TableView | None: ...

    async def map_elements(self) -> dict[str, dict[int, str]]: ...

    async def build(
        self, ports: Mapping[int, Quota | None], guards: Mapping[int, Guard] | None = None
    ) -> None: ...

    def guard_of(self, port: int) -> Guard | None: ...

    async def guard(self, port: int, guard: Guard | None) -> None: ...

    async def client_addresses(self, port: int) -> list[tuple[str, int]]: ...

    async def install(self, port: int, quota: Quota | None = None) -> None: ...

    async def remove(self, port: int) -> None: ...

    async def enforce(self, port: int, quota: Quota | None) -> None: ...

    async def remove_present(self, ports: Iterable[int]) -> None: ...


class Host(Protocol):
    """Facts about this host's sockets and interfaces, and closing a port's connections
    (blocking: run in a thread)."""

    def bound_ports(self, port_range: PortRange) -> set[int]: ...

    def established_by_port(self, port_range: PortRange) -> dict[int, int]: ...

    def interface_bytes(self) -> dict[str, dict[str, int]]: ...

    def close_connections(self, port: int) -> int: ...


@dataclass
class MemoryHost:
    """Host facts a test sets: ports other processes hold, connections, interface counters.
    Closing a port's connections drops them from `connections` and appends the port to `closed`;
    `refuse_close` is raised by every close instead, `refuse_read` by every count of
    connections."""

    bound: set[int]
    connections: dict[int, int]
    interfaces: dict[str, dict[str, int]]
    closed: list[int] = field(default_factory=list)
    refuse_close: OSError | None = None
    refuse_read: OSError | None = None

    @classmethod
    def quiet(cls) -> MemoryHost:
        """A host where nothing else holds a port and nobody is connected."""
        return cls(set(), {}, {"lo": {"rx_bytes": 0, "tx_bytes": 0}})

    def bound_ports(self, port_range: PortRange) -> set[int]:
        return {port for port in self.bound if port in port_range}

    def established_by_port(self, port_range: PortRange) -> dict[int, int]:
        if self.refuse_read is not None:
            raise self.refuse_read
        return {port: n for port, n in self.connections.items() if port in port_range}

    def interface_bytes(self) -> dict[str, dict[str, int]]:
        return {name: dict(counts) for name, counts in self.interfaces.items()}

    def close_connections(self, port: int) -> int:
        if self.refuse_close is not None:
            raise self.refuse_close
        self.closed.append(port)
        return self.connections.pop(port, 0)


@dataclass(slots=True)
class _Port:
    """One port's objects: its counters, and the quota as set with what it has consumed since."""

    rx: Reading
    tx: Reading
    dropped: Reading | None = None
    quota: Quota | None = None
    consumed: int = 0  # the quota's own `used`: it grows with dropped packets too

    def reading(self) -> PortReading:
        quota = self.quota
        if quota is None:
            return PortReading(self.rx, self.tx, self.dropped)
        used = min(self.consumed, quota.limit)  # the kernel reports it capped at the limit
        return PortReading(self.rx, self.tx, self.dropped, KernelQuota(quota.limit, used))


class MemoryKernel:
    """The nftables table in memory, for in-process tests.

    A test sends traffic (`add_traffic`), takes the table away as a reboot or `nft flush ruleset`
    does (`drop_table`), deletes a port's objects behind the daemon's back (`delete_port`) or
    alters the layout (`damage`). `refuse` maps a method name and a port (None: any call) to the
    exception that call raises; a port is consulted by the calls about it, and by `build` for the
    ports it gives a quota. `refused` counts the refusals."""

    def __init__(self, table: str = "memory") -> None:
        self.table = table
        self.handle: int | None = None  # the table's; None while it does not exist
        self.problems: list[str] = []
        self.refuse: dict[tuple[str, int | None], Exception] = {}
        self.refused = 0
        self._ports: dict[int, _Port] = {}
        self._guards: dict[int, Guard] = {}
        self._handles = itertools.count(1)

    # --- what a test does and sees ------------------------------------------------------------

    def add_traffic(self, port: int, rx: int = 0, tx: int = 0) -> None:
        """`rx` bytes entering and `tx` bytes leaving through `port`, in packets of PACKET bytes
        (the last one shorter). A port without counters counts nothing, as in the kernel."""
        found = self._ports.get(port)
        if found is None:
            return
        for direction, total in (("rx", rx), ("tx", tx)):
            for start in range(0, total, PACKET):
                self._packet(found, direction, min(PACKET, total - start))

    def drop_table(self) -> None:
        """The table is gone (reboot, `nft flush ruleset`): every counter with it."""
        self.handle, self.problems, self._ports, self._guards = None, [], {}, {}

    def delete_port(self, port: int) -> None:
        """Someone else deleted this port's counters, quota and map elements."""
        self._ports.pop(port, None)

    def damage(self, *problems: str) -> None:
        """The layout was altered (a flushed chain, an extra rule): reads report `problems`."""
        self.problems = list(problems)

    @property
    def quotas(self) -> dict[int, Quota | None]:
        """Each port that has counters, with its quota as last set (None: no quota)."""
        return {port: found.quota for port, found in self._ports.items()}

    def used(self, port: int) -> int | None:
        """What the port's quota reports as used (capped at its limit); None without a quota."""
        quota = self._ports[port].reading().quota
        return None if quota is None else quota.used

    def contents(self) -> Contents:
        """Everything the table holds, to compare: its handle, and per port the quota's limit
        and usage, the rx counter's handle, and the rx and tx bytes."""
        return self.handle, {
            port: (
                None if found.quota is None else found.quota.limit,
                self.used(port),
                found.rx.handle,
                found.rx.bytes,
                found.tx.bytes,
            )
            for port, found in self._ports.items()
        }

    # --- the Kernel protocol ------------------------------------------------------------------

    async def read(self) -> TableView | None:
        self._step("read")
        return self._view(self._ports)

    async def read_ports(self, ports: Iterable[int]) -> TableView | None:
        wanted = list(ports)
        self._step("read_ports", wanted)
        return self._view(wanted)

    async def map_elements(self) -> dict[str, dict[int, str]]:
        self._step("map_elements")
        limited = [port for port, found in self._ports.items() if found.quota is not None]
        return {
            "rx": {port: f"rx_{port}" for port in self._ports},
            "tx": {port: f"tx_{port}" for port in self._ports},
            "quota": {port: f"q_{port}" for port in limited},
            "dropped": {port: f"drop_{port}" for port in limited},
        }

    async def build(
        self, ports: Mapping[int, Quota | None], guards: Mapping[int, Guard] | None = None
    ) -> None:
        self._step("build", [port for port, quota in ports.items() if quota is not None])
        self.handle, self.problems, self._ports = next(self._handles), [], {}
        for port, quota in ports.items():
            self._ports[port] = self._fresh(quota)
        self._guards = {port: g for port, g in (guards or {}).items() if port in ports}

    def guard_of(self, port: int) -> Guard | None:
        """The port's guard as last set (the kernel's speed, connection and address limits)."""
        return self._guards.get(port)

    async def guard(self, port: int, guard: Guard | None) -> None:
        self._step("guard", [port])
        self._require_table("add limit")
        if guard is None:
            self._guards.pop(port, None)
        else:
            self._guards[port] = guard

    async def client_addresses(self, port: int) -> list[tuple[str, int]]:
        self._step("client_addresses", [port])
        return []

    async def install(self, port: int, quota: Quota | None = None) -> None:
        self._step("install", [port])
        self._require_table("create counter")
        if port in self._ports:
            raise NftError(f"create counter rx_{port}: File exists", errno.EEXIST)
        self._ports[port] = self._fresh(quota)

    async def remove(self, port: int) -> None:
        self._step("remove", [port])
        if port not in self._ports:
            raise NftError(f"delete counter rx_{port}: No such file or directory", errno.ENOENT)
        del self._ports[port]
        self._guards.pop(port, None)

    async def enforce(self, port: int, quota: Quota | None) -> None:
        self._step("enforce", [port])
        found = self._ports.get(port)
        if found is None:
            raise NftError(f"create quota q_{port}: No such file or directory", errno.ENOENT)
        if quota is None:
            found.dropped = None
        elif found.dropped is None:
            found.dropped = self._counter()
        found.quota, found.consumed = quota, 0 if quota is None else quota.used

    async def remove_present(self, ports: Iterable[int]) -> None:
        wanted = list(ports)
        self._step("remove_present", wanted)
        for port in wanted:
            self._ports.pop(port, None)
            self._guards.pop(port, None)

    # --- inside -------------------------------------------------------------------------------

    def _step(self, name: str, ports: Iterable[int] = ()) -> None:
        for port in (None, *ports):
            refused = self.refuse.get((name, port))
            if refused is not None:
                self.refused += 1
                raise refused

    def _require_table(self, what: str) -> int:
        if self.handle is None:
            raise NftError(f"{what}: No such file or directory", errno.ENOENT)
        return self.handle

    def _counter(self) -> Reading:
        return Reading(self._require_table("create counter"), next(self._handles), 0, 0)

    def _fresh(self, quota: Quota | None) -> _Port:
        made = _Port(self._counter(), self._counter())
        if quota is not None:
            made.dropped, made.quota, made.consumed = self._counter(), quota, quota.used
        return made

    def _view(self, ports: Iterable[int]) -> TableView | None:
        if self.handle is None:
            return None
        readings = {port: self._ports[port].reading() for port in ports if port in self._ports}
        return TableView(self.handle, readings, problems=list(self.problems))

    @staticmethod
    def _packet(found: _Port, direction: str, length: int) -> None:
        """The enforcing rule first: a packet that would take the quota past its limit is
        counted as dropped and never reaches the usage counter."""
        if found.quota is not None:
            found.consumed += length
            if found.consumed > found.quota.limit:
                assert found.dropped is not None
                found.dropped = _plus(found.dropped, length)
                return
        setattr(found, direction, _plus(getattr(found, direction), length))


def _plus(reading: Reading, length: int) -> Reading:
    return replace(reading, packets=reading.packets + 1, bytes=reading.bytes + length)
