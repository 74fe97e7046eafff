"""The only module that talks to nftables: one table, named counters and quotas per port.

Layout (README, "How it counts"): a named counter `rx_<port>` / `tx_<port>` per port, and per hook
one rule that looks the port up in a map and updates the counter it names: one map lookup per
packet whatever the number of ports. A key with a limit (or disabled/expired) also has a quota
`q_<port>`, shared by both directions, and a counter `drop_<port>`. The enforcing rule comes
first in each chain:

    meta l4proto { tcp, udp } quota name th dport map @quota counter name th dport map @dropped drop
    meta l4proto { tcp, udp } counter name th dport map @rx

so a packet over the quota is counted as dropped and never reaches the usage counter: usage is
what got through, dropped bytes are reported separately. (The quota's own `used` also grows with
dropped packets; that is why a changed limit replaces the quota object with the usage from state.)

A key with speed, connection or address limits (README "Speed, connection and device limits") also
has `limit` objects `sr_<port>` / `st_<port>` behind the maps speed_rx / speed_tx, and a chain of
its own reached through the verdict map `guard`; their rules come before the quota's.

Installing, changing or removing a port is one nf_tables transaction sent over netlink, and
reading every counter and quota is one netlink dump (nlcodec.py says why not libnftables there).
libnftables builds the table and repairs it, and checks its layout in full once; after that a
fingerprint of the table's sets, chains and rules, read over netlink at every poll, shows any
change to the layout, which sends the next reading back through the full check. Nothing outside
our own `inet <table>` is read or changed. Both libraries block: every call runs in a worker
thread, one at a time.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import nftables

from daemon import nlcodec as nl
from daemon.accounting import Reading
from daemon.atomic import failure_reason
from daemon.bounds import MAX_KERNEL_QUOTA, MAX_U64
from daemon.limits import Guard, Quota

T = TypeVar("T")

FAMILY = "inet"
DIRECTIONS = ("rx", "tx")
OBJECT_NAME = re.compile(r"^(rx|tx|drop|q|refused|ipref)_(\d{1,5})$")
# Priority "mangle" (-150): before filter tables, so ports count even when a later chain drops.
HOOK_PRIORITY = -150
# First in each chain: a packet that is neither TCP nor UDP has no port of ours, so the chain ends
# for it at once (as its policy would) and the rules after it need no protocol test of their own:
# two comparisons per packet instead of an anonymous set lookup in every rule (README "Data path
# cost").
SKIP_OTHERS: list[dict[str, Any]] = [
    {"match": {"op": "!=", "left": {"meta": {"key": "l4proto"}}, "right": proto}}
    for proto in ("tcp", "udp")
] + [{"accept": None}]
CHAINS = {"rx": ("input", "dport"), "tx": ("output", "sport")}
# First in the output chain: the reset the kernel sends when portmeter closes a stopped key's
# connection (README "Limits, expiry and resets") leaves even when the key's limits drop all else,
# so the client learns at once; it is counted as usage like every packet that leaves.
RESET_LEAVES: list[dict[str, Any]] = [
    {
        "match": {
            "op": "==",
            "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, "rst"]},
            "right": "rst",
        }
    },
    {
        "counter": {
            "map": {"key": {"payload": {"protocol": "tcp", "field": "sport"}}, "data": "@tx"}
        }
    },
    {"accept": None},
]
MAPS = {"rx": "counter", "tx": "counter", "quota": "quota", "dropped": "counter"}
MAP_PREFIX = {"rx": "rx", "tx": "tx", "quota": "q", "dropped": "drop"}
# Kernel limits beyond the quota (README "Speed, connection and device limits"): a named `limit`
# object per direction behind a map, and a verdict map to a chain of the port's own.
SPEED_MAPS = {"rx": "speed_rx", "tx": "speed_tx"}
SPEED_PREFIX = {"rx": "sr", "tx": "st"}
GUARD_MAP = "guard"
GUARD_CHAIN = re.compile(r"^g_(\d{1,5})_(\d+)_(\d+)_(\d+)$")
LIMIT_UNITS = {"bytes": 1, "kbytes": 1024, "mbytes": 1024**2}
NETLINK_NETFILTER = 12
RECEIVE_BUFFER = 1 << 20
GET_SLICE = 256  # get requests per write
DUMP_SEQ = 1  # requests other than dumps count up from 2
DUMP_ATTEMPTS = 5


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


def checked_quota(name: str, quota: Quota) -> Quota:
    """`quota` if the kernel can hold it: a limit up to 2^63 - 1, usage up to the limit."""
    if not 0 <= quota.limit <= MAX_KERNEL_QUOTA:
        raise OutOfRange(f"{name}: a limit of {quota.limit} bytes is outside 0..{MAX_KERNEL_QUOTA}")
    if not 0 <= quota.used <= quota.limit:
        raise OutOfRange(f"{name}: usage {quota.used} is outside 0..{quota.limit} (its limit)")
    return quota


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
        for direction in DIRECTIONS:
            mapped = set(elements.get(direction, {}))
            gaps[f"map {direction}"] = (set(wanted) - mapped, mapped - set(wanted))
    return gaps


def object_name(kind: str, port: int) -> str:
    return f"{kind}_{port}"


def port_of(name: str) -> int | None:
    match = OBJECT_NAME.match(name)
    return int(match.group(2)) if match else None


def _lookup(port_field: str, map_name: str) -> dict[str, Any]:
    return {
        "map": {"key": {"payload": {"protocol": "th", "field": port_field}}, "data": f"@{map_name}"}
    }


def rule_exprs(direction: str) -> list[list[dict[str, Any]]]:
    """The rules of a chain, in order: other protocols out, the guards (input only), the speed
    limit, the quota, the count. A packet a limit drops is neither charged to the quota nor
    counted as usage."""
    _, port_field = CHAINS[direction]
    port = {"payload": {"protocol": "th", "field": port_field}}
    guard: list[dict[str, Any]] = [{"vmap": {"key": port, "data": f"@{GUARD_MAP}"}}]
    speed: list[dict[str, Any]] = [
        {"limit": _lookup(port_field, SPEED_MAPS[direction])},
        {"drop": None},
    ]
    enforce: list[dict[str, Any]] = [
        {"quota": _lookup(port_field, "quota")},
        {"counter": _lookup(port_field, "dropped")},
        {"drop": None},
    ]
    count = [{"counter": _lookup(port_field, direction)}]
    return [SKIP_OTHERS, guard if direction == "rx" else RESET_LEAVES, speed, enforce, count]


def guard_chain(port: int, guard: Guard) -> str:
    """The port's chain, named with its limits so a listing shows what the kernel holds."""
    return f"g_{port}_{guard.connections or 0}_{guard.addresses or 0}_{guard.window}"


def guard_rules(port: int, guard: Guard) -> list[list[dict[str, Any]]]:
    """The rules of a port's guard chain: a new TCP connection over the limit is reset; a packet
    from an address that finds no place left in the port's address sets is refused (TCP reset,
    UDP dropped). They count in `refused_<port>` and `ipref_<port>`."""
    reset = {"reject": {"type": "tcp reset"}}
    tcp = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}
    rules: list[list[dict[str, Any]]] = []
    if guard.connections is not None:
        new = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}
        over = {"ct count": {"val": guard.connections, "inv": True}}
        rules.append([tcp, new, over, {"counter": object_name("refused", port)}, reset])
    if guard.addresses is not None:
        for family, field_ in (("ip", "a4"), ("ip6", "a6")):
            key = {"payload": {"protocol": family, "field": "saddr"}}
            update = {"set": {"op": "update", "elem": key, "set": f"@{field_}_{port}"}}
            nfproto = {
                "match": {
                    "op": "==",
                    "left": {"meta": {"key": "nfproto"}},
                    "right": ("ipv4" if family == "ip" else "ipv6"),
                }
            }
            rules.append([nfproto, update, {"return": None}])
        rules += [[{"counter": object_name("ipref", port)}], [tcp, reset], [{"drop": None}]]
    return rules


class Counters:
    """Our nftables table. Methods are coroutines; nft work happens in a worker thread."""

    def __init__(self, table: str) -> None:
        self.table = table
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(True)
        self._netlink = Netlink()
        self._scanner = nl.ObjectScanner(table)
        self._ports = PortAssembler()
        self._layout: Layout | None = None  # as last checked in full by libnftables
        self._last_view: TableView | None = None
        self._lock = anyio.Lock()
        self._enforced: set[int] = set()  # ports with a quota installed, as last seen or set
        self._guarded: dict[int, Guard] = {}  # ports with a guard, as last listed or set

    # --- reading -------------------------------------------------------------------------

    async def read(self) -> TableView | None:
        """Every counter and quota of the table, or None when the table is missing.

        One netlink dump while the layout is as last checked; the full libnftables listing (and
        its layout check) when it is not, or has not been checked yet."""
        if self._layout is not None:
            view = await self._blocking(self._quick_read, self._layout)
            if view is not None or self._layout is not None:
                return self._seen(view)
        objects = await self._list({"table": {"family": FAMILY, "name": self.table}}, terse=True)
        if objects is None:
            return self._seen(None)
        view = _view(objects)
        self._guarded = dict(view.guards or {})
        if not view.problems:
            self._layout = await self._blocking(self._netlink_layout)
            if self._layout is not None and self._layout.handle != view.handle:
                self._layout = None  # recreated in between: check again next time
        return self._seen(view)

    async def read_ports(self, ports: Iterable[int]) -> TableView | None:
        """The counters and quotas of a few ports (no layout check): the cost does not grow with
        the table. None when the table is missing."""
        return await self._blocking(self._read_ports_blocking, sorted(set(ports)))

    def _seen(self, view: TableView | None) -> TableView | None:
        if view is not None and view is self._last_view:
            return view
        self._last_view = view
        self._enforced = (
            set() if view is None else {p for p, r in view.ports.items() if r.quota is not None}
        )
        return view

    def _quick_read(self, layout: Layout) -> TableView | None:
        handle = self._netlink.table_handle(self.table)
        if handle is None:
            return None
        if self._netlink.layout(self.table, handle) != layout:
            self._layout = None
            return None
        dump = self._netlink.dump(nl.GETOBJ, nl.attr(nl.OBJ_TABLE, nl.text(self.table)))
        if self._netlink.table_handle(self.table) != handle:
            self._layout = None  # replaced while we read: take the full path
            return None
        return self._ports.view(handle, self._scanner.scan(dump))

    def _read_ports_blocking(self, ports: list[int]) -> TableView | None:
        kinds = ("rx", "tx", "drop", "q", "refused", "ipref")
        names = [object_name(kind, port) for port in ports for kind in kinds]
        handle, objects = self._netlink.objects(self.table, names)
        if handle is None:
            return None
        return PortAssembler().view(handle, objects)

    def _netlink_layout(self) -> Layout | None:
        handle = self._netlink.table_handle(self.table)
        return None if handle is None else self._netlink.layout(self.table, handle)

    async def map_elements(self) -> dict[str, dict[int, str]]:
        """Port -> object name for every map (not part of `read`: costly and rarely needed)."""
        result: dict[str, dict[int, str]] = {}
        for name in {**MAPS, **GUARD_MAPS}:
            objects = await self._list({"map": {**self._ref(), "name": name}})
            elements: dict[int, str] = {}
            for obj in objects or []:
                for port, target in obj.get("map", {}).get("elem", []):
                    elements[int(port)] = str(target)
            result[name] = elements
        return result

    # --- changing ------------------------------------------------------------------------

    async def build(
        self, ports: Mapping[int, Quota | None], guards: Mapping[int, Guard] | None = None
    ) -> None:
        """(Re)create the whole table with fresh counters and quotas for `ports`, and the guards
        of those that have one, atomically."""
        table = {"family": FAMILY, "name": self.table}
        commands: list[dict[str, Any]] = [
            {"add": {"table": table}},
            {"delete": {"table": table}},
            {"add": {"table": table}},
        ]
        for name, kind in MAPS.items():
            commands.append(
                {"add": {"map": {**self._ref(), "name": name, "type": "inet_service", "map": kind}}}
            )
        for name, kind in GUARD_MAPS.items():
            commands.append(
                {"add": {"map": {**self._ref(), "name": name, "type": "inet_service", "map": kind}}}
            )
        for direction in DIRECTIONS:
            hook, _ = CHAINS[direction]
            chain = {
                "name": hook,
                "type": "filter",
                "hook": hook,
                "prio": HOOK_PRIORITY,
                "policy": "accept",
            }
            commands.append({"add": {"chain": {**self._ref(), **chain}}})
            for expr in rule_exprs(direction):
                commands.append({"add": {"rule": {**self._ref(), "chain": hook, "expr": expr}}})
        for port, quota in sorted(ports.items()):
            commands += self._port_commands(port, quota)
        held = {port: g for port, g in (guards or {}).items() if port in ports}
        for port, guard in sorted(held.items()):
            commands += self._guard_commands(port, guard)
        await self._run(commands)
        self._layout = None
        self._enforced = {port for port, quota in ports.items() if quota is not None}
        self._guarded = held

    def guard_of(self, port: int) -> Guard | None:
        """The guard the table holds for `port`, as last listed or set."""
        return self._guarded.get(port)

    async def guard(self, port: int, guard: Guard | None) -> None:
        """Install, replace or lift the guard of `port`. The part that changed is replaced in
        one transaction each: the speed over netlink (the frequent change, fast at any number
        of keys), the chain of connection and address limits through libnftables. A replaced
        part starts afresh: its rate bucket full, no connection or address counted yet."""
        old = self._guarded.get(port)
        old_rate, rate = _rate_of(old), _rate_of(guard)
        old_chain, chain = _chain_part(old), _chain_part(guard)
        if old_chain != chain:
            edit = Transaction(self.table)
            edit.guard_chain(port, old_chain, chain)
            await self._commit(edit)
            self._hold(port, old_rate, chain)
        if old_rate != rate:
            edit = Transaction(self.table)
            for direction in DIRECTIONS:
                name = object_name(SPEED_PREFIX[direction], port)
                if old_rate is not None:
                    edit.element(SPEED_MAPS[direction], port, None)
                    edit.delete_object(nl.OBJECT_LIMIT, name)
                if rate is not None:
                    edit.new_limit(name, rate)
                    edit.element(SPEED_MAPS[direction], port, name)
            await self._commit(edit)
            self._hold(port, rate, chain)

    def _hold(self, port: int, rate: int | None, chain: Guard | None) -> None:
        """Remember what the table holds for `port` now."""
        if rate is None and chain is None:
            self._guarded.pop(port, None)
            return
        held = chain or Guard(None, None, None, 0)
        self._guarded[port] = Guard(rate, held.connections, held.addresses, held.window)

    async def client_addresses(self, port: int) -> list[tuple[str, int]]:
        """(address, seconds until it expires) of each client address the port's guard holds."""
        found: list[tuple[str, int]] = []
        for name in (f"a4_{port}", f"a6_{port}"):
            for obj in await self._list({"set": {**self._ref(), "name": name}}) or []:
                for elem in obj.get("set", {}).get("elem", []):
                    value = elem.get("elem", {}) if isinstance(elem, dict) else {"val": elem}
                    found.append((str(value.get("val")), int(value.get("expires", 0))))
        return found

    async def install(self, port: int, quota: Quota | None = None) -> None:
        """Add fresh counters (and the quota) for `port` in one transaction.

        Fails (NftError) if a counter of that name already exists: a leftover must be removed
        first, or its old bytes would be counted as the new key's.
        """
        edit = Transaction(self.table)
        for kind in ("rx", "tx"):
            edit.new_counter(object_name(kind, port))
        if quota is not None:
            edit.new_counter(object_name("drop", port))
            edit.new_quota(object_name("q", port), quota)
        for name in MAPS if quota is not None else DIRECTIONS:
            edit.map_element(True, name, port)
        await self._commit(edit)
        if quota is not None:
            self._enforced.add(port)

    async def remove(self, port: int) -> None:
        """Remove the map entries, counters and quota of `port` in one transaction."""
        await self.guard(port, None)
        enforced = port in self._enforced
        edit = Transaction(self.table)
        for name in MAPS if enforced else DIRECTIONS:
            edit.map_element(False, name, port)
        for kind in ("rx", "tx", "drop") if enforced else ("rx", "tx"):
            edit.delete_object(nl.OBJECT_COUNTER, object_name(kind, port))
        if enforced:
            edit.delete_object(nl.OBJECT_QUOTA, object_name("q", port))
        await self._commit(edit)
        self._enforced.discard(port)

    async def enforce(self, port: int, quota: Quota | None) -> None:
        """Install, replace or lift the quota of `port`, atomically.

        Replacing (not updating) the quota object sets its `used` to the given usage: the kernel's
        own `used` also counted the packets it dropped, which are not usage.
        """
        edit = Transaction(self.table)
        if port in self._enforced:
            for name in QUOTA_MAPS:
                edit.map_element(False, name, port)
            edit.delete_object(nl.OBJECT_QUOTA, object_name("q", port))
            if quota is None:
                edit.delete_object(nl.OBJECT_COUNTER, object_name("drop", port))
        if quota is not None:
            if port not in self._enforced:
                edit.new_counter(object_name("drop", port))
            edit.new_quota(object_name("q", port), quota)
            for name in QUOTA_MAPS:
                edit.map_element(True, name, port)
        await self._commit(edit)
        if quota is None:
            self._enforced.discard(port)
        else:
            self._enforced.add(port)

    async def remove_present(self, ports: Iterable[int]) -> None:
        """Remove whatever exists of `ports` (map entries, counters, quotas), however half-made."""
        wanted = set(ports)
        if not wanted:
            return
        objects = await self._list({"table": {"family": FAMILY, "name": self.table}}, terse=True)
        if objects is None:
            return
        elements = await self.map_elements()
        commands: list[dict[str, Any]] = []
        for name, kind in MAPS.items():
            present = sorted(wanted & set(elements.get(name, {})))
            if present:
                commands.append(self._elements_command("delete", name, present, kind))
        commands += _guard_leftovers(self._ref(), objects, elements, wanted)
        for obj in objects:
            for kind in ("counter", "quota"):
                if kind in obj and port_of(obj[kind]["name"]) in wanted:
                    commands.append({"delete": {kind: {**self._ref(), "name": obj[kind]["name"]}}})
        await self._run(commands)
        self._enforced -= wanted
        self._guarded = {port: g for port, g in self._guarded.items() if port not in wanted}

    # --- commands ------------------------------------------------------------------------

    def _ref(self) -> dict[str, str]:
        return {"family": FAMILY, "table": self.table}

    def _port_commands(self, port: int, quota: Quota | None) -> list[dict[str, Any]]:
        """What `build` adds for one port."""
        kinds = [*DIRECTIONS, "drop"] if quota is not None else list(DIRECTIONS)
        commands: list[dict[str, Any]] = [
            {"add": {"counter": {**self._ref(), "name": object_name(k, port)}}} for k in kinds
        ]
        if quota is not None:
            checked_quota(object_name("q", port), quota)
            spec = {
                "name": object_name("q", port),
                "bytes": quota.limit,
                "used": quota.used,
                "inv": True,
            }
            commands.append({"add": {"quota": {**self._ref(), **spec}}})
        maps = MAPS if quota is not None else DIRECTIONS
        return commands + [self._elements_command("add", name, [port], MAPS[name]) for name in maps]

    def _guard_commands(self, port: int, guard: Guard) -> list[dict[str, Any]]:
        """What `build` adds for a port's guard (a change later goes over netlink: `guard`)."""
        ref = self._ref()
        objects: list[dict[str, Any]] = []
        elements: list[dict[str, Any]] = []
        if guard.rate is not None:
            for direction in DIRECTIONS:
                name = object_name(SPEED_PREFIX[direction], port)
                spec = {"rate": guard.rate, "per": "second", "rate_unit": "bytes", "inv": True}
                objects.append({"limit": {**ref, "name": name, **spec}})
                elements.append(
                    {"element": {**ref, "name": SPEED_MAPS[direction], "elem": [[port, name]]}}
                )
        if guard.chain:
            chain = guard_chain(port, guard)
            if guard.connections is not None:
                objects.append({"counter": {**ref, "name": object_name("refused", port)}})
            if guard.addresses is not None:
                objects.append({"counter": {**ref, "name": object_name("ipref", port)}})
                for name, kind in ((f"a4_{port}", "ipv4_addr"), (f"a6_{port}", "ipv6_addr")):
                    spec = {
                        "type": kind,
                        "flags": ["timeout"],
                        "size": guard.addresses,
                        "timeout": guard.window,
                    }
                    objects.append({"set": {**ref, "name": name, **spec}})
            objects.append({"chain": {**ref, "name": chain}})
            objects += [
                {"rule": {**ref, "chain": chain, "expr": expr}} for expr in guard_rules(port, guard)
            ]
            elements.append(
                {
                    "element": {
                        **ref,
                        "name": GUARD_MAP,
                        "elem": [[port, {"jump": {"target": chain}}]],
                    }
                }
            )
        return [{"add": item} for item in objects + elements]

    def _elements_command(
        self, verb: str, map_name: str, ports: Sequence[int], kind: str
    ) -> dict[str, Any]:
        elem = [[p, object_name(MAP_PREFIX[map_name], p)] for p in ports]
        return {verb: {"element": {**self._ref(), "name": map_name, "elem": elem}}}

    # --- libnftables and netlink ---------------------------------------------------------

    async def _commit(self, edit: Transaction) -> None:
        await self._blocking(self._netlink.transact, edit)

    async def _blocking(self, call: Callable[..., T], *args: Any) -> T:
        async with self._lock:
            return await anyio.to_thread.run_sync(call, *args)

    async def _run(self, commands: list[dict[str, Any]]) -> None:
        if commands:
            await self._call({"nftables": commands}, terse=False)

    async def _list(
        self, what: dict[str, Any], *, terse: bool = False
    ) -> list[dict[str, Any]] | None:
        """The listed objects, or None when the table (or the listed map) does not exist."""
        try:
            output = await self._call({"nftables": [{"list": what}]}, terse=terse)
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise
        return [obj for obj in output.get("nftables", []) if "metainfo" not in obj]

    async def _call(self, payload: dict[str, Any], *, terse: bool) -> dict[str, Any]:
        return await self._blocking(self._call_blocking, payload, terse)

    def _call_blocking(self, payload: dict[str, Any], terse: bool) -> dict[str, Any]:
        self._nft.set_terse_output(terse)
        rc, output, error = self._nft.json_cmd(payload)
        if rc != 0:
            message = " ".join(error.replace("internal:0:0-0:", "").split()) or f"nft rc={rc}"
            raise NftError(message, _errno_in(message))
        return output if isinstance(output, dict) else {}


QUOTA_MAPS = ("quota", "dropped")
OBJECT_KINDS = {nl.OBJECT_COUNTER: "counter", nl.OBJECT_QUOTA: "quota", nl.OBJECT_LIMIT: "limit"}
GUARD_MAPS = {SPEED_MAPS["rx"]: "limit", SPEED_MAPS["tx"]: "limit", GUARD_MAP: "verdict"}


def _address_sets(port: int, guard: Guard) -> list[tuple[str, int]]:
    """(name, IP version) of the address sets a guard has."""
    return [] if guard.addresses is None else [(f"a4_{port}", 4), (f"a6_{port}", 6)]


def _refusal_counters(port: int, guard: Guard) -> list[str]:
    kinds = [("refused", guard.connections), ("ipref", guard.addresses)]
    return [object_name(kind, port) for kind, limit in kinds if limit is not None]


def _rate_of(guard: Guard | None) -> int | None:
    return None if guard is None else guard.rate


def _chain_part(guard: Guard | None) -> Guard | None:
    """A guard's connection and address limits alone (what its chain holds), or None."""
    if guard is None or not guard.chain:
        return None
    return Guard(None, guard.connections, guard.addresses, guard.window)


def _guard_leftovers(
    ref: dict[str, str],
    objects: Sequence[dict[str, Any]],
    elements: Mapping[str, Mapping[int, str]],
    wanted: AbstractSet[int],
) -> list[dict[str, Any]]:
    """Deletions of whatever a listing shows of the guards of `wanted` ports: map elements
    first (a chain or object in use cannot go), then chains, sets and limit objects. The
    `refused_` counters go with the other counters."""
    deletions: list[dict[str, Any]] = []
    for name in GUARD_MAPS:
        present = sorted(wanted & set(elements.get(name, {})))
        if present:
            deletions.append({"delete": {"element": {**ref, "name": name, "elem": present}}})
    found = [
        (kind, obj[kind]["name"])
        for kind in ("chain", "set", "limit")
        for obj in objects
        if kind in obj and _guard_port(kind, obj[kind]["name"]) in wanted
    ]
    deletions += [{"flush": {"chain": {**ref, "name": n}}} for kind, n in found if kind == "chain"]
    return deletions + [{"delete": {kind: {**ref, "name": name}}} for kind, name in found]


def _guard_port(kind: str, name: str) -> int | None:
    """The port a guard's chain, address set or limit object belongs to, by its name."""
    if kind == "chain":
        match = GUARD_CHAIN.match(name)
        return int(match.group(1)) if match else None
    match = re.match(r"^(a4|a6|sr|st)_(\d{1,5})$", name)
    return int(match.group(2)) if match else None


def _errno_in(message: str) -> int | None:
    """The errno libnftables names in its message (it prints strerror), if any."""
    for code in (errno.EPERM, errno.EACCES, errno.ENOENT, errno.EEXIST, errno.EOVERFLOW):
        if os.strerror(code) in message:
            return code
    return None


def _view(objects: Sequence[dict[str, Any]]) -> TableView:
    table = next(obj["table"] for obj in objects if "table" in obj)
    view = TableView(handle=int(table["handle"]))
    found: dict[int, dict[str, Any]] = {}
    rules: dict[str, list[list[Any]]] = {}
    maps: dict[str, dict[str, Any]] = {}
    chains: dict[str, dict[str, Any]] = {}
    rates: dict[str, int] = {}
    for obj in objects:
        if "counter" in obj or "quota" in obj:
            kind = "counter" if "counter" in obj else "quota"
            spec = obj[kind]
            match = OBJECT_NAME.match(spec["name"])
            if match is None:
                continue  # not ours by name: left alone, reported by the layout check
            prefix, port = match.group(1), int(match.group(2))
            if kind == "quota":
                found.setdefault(port, {})["q"] = KernelQuota(spec["bytes"], spec.get("used", 0))
            else:
                reading = Reading(view.handle, spec["handle"], spec["packets"], spec["bytes"])
                found.setdefault(port, {})[prefix] = reading
        elif "rule" in obj:
            rules.setdefault(obj["rule"]["chain"], []).append(obj["rule"]["expr"])
        elif "map" in obj:
            maps[obj["map"]["name"]] = obj["map"]
        elif "chain" in obj:
            chains[obj["chain"]["name"]] = obj["chain"]
        elif "limit" in obj:
            rates[obj["limit"]["name"]] = _rate(obj["limit"])
    view.guards = _guards(chains, rates)
    for port, parts in found.items():
        if "rx" in parts and "tx" in parts:
            view.ports[port] = PortReading(
                parts["rx"],
                parts["tx"],
                parts.get("drop"),
                parts.get("q"),
                parts.get("refused"),
                parts.get("ipref"),
            )
        else:
            view.stray.add(port)
    view.problems = _layout_problems(maps, chains, rules)
    return view


def _rate(spec: Mapping[str, Any]) -> int:
    """A limit object's rate in bytes per second, as nft lists it (in its own unit)."""
    return int(spec["rate"]) * LIMIT_UNITS.get(str(spec.get("rate_unit", "bytes")), 0)


def _guards(chains: Mapping[str, Any], rates: Mapping[str, int]) -> dict[int, Guard]:
    """The guards a listing shows: a port's chain names its connection and address limits and
    window, its limit objects the rate."""
    guards: dict[int, Guard] = {}
    for name in chains:
        match = GUARD_CHAIN.match(name)
        if match:
            port, conns, addresses, window = (int(part) for part in match.groups())
            guards[port] = Guard(None, conns or None, addresses or None, window)
    for name, rate in rates.items():
        owner = _guard_port("limit", name)
        if owner is not None and name.startswith("sr_"):
            held = guards.get(owner, Guard(None, None, None, 0))
            guards[owner] = Guard(rate, held.connections, held.addresses, held.window)
    return guards


def _layout_problems(
    maps: dict[str, dict[str, Any]],
    chains: dict[str, dict[str, Any]],
    rules: dict[str, list[list[Any]]],
) -> list[str]:
    """What differs from the layout `build` makes, so a damaged table can be rebuilt."""
    found = []
    for name, kind in {**MAPS, **GUARD_MAPS}.items():
        spec = maps.get(name)
        if spec is None or spec.get("type") != "inet_service" or spec.get("map") != kind:
            found.append(f"map {name} is missing or has the wrong type")
    for direction in DIRECTIONS:
        hook, _ = CHAINS[direction]
        chain = chains.get(hook)
        if chain is None or chain.get("hook") != hook:
            found.append(f"chain {hook} is missing or not attached to the {hook} hook")
        if rules.get(hook, []) != rule_exprs(direction):
            found.append(f"chain {hook} does not hold exactly the enforcing and counting rules")
    return found


# --- netlink -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layout:
    """Fingerprint of the table's structure: any change to its maps, chains or rules alters it."""

    handle: int
    sets: tuple[tuple[bytes | None, ...] | None, ...]
    chains: tuple[tuple[bytes | None, ...] | None, ...]
    rules: tuple[tuple[bytes | None, ...], ...]


class Transaction:
    """nf_tables messages applied together or not at all, each described for error messages."""

    def __init__(self, table: str) -> None:
        self.table = table
        self.steps: list[tuple[str, int, int, bytes]] = []  # what, message type, flags, attributes
        self._set_ids = itertools.count(1)

    def guard_chain(self, port: int, old: Guard | None, new: Guard | None) -> None:
        """Replace the chain of a port's connection and address limits (`old` -> `new`, either
        None), with its verdict map element, address sets and refusal counters."""
        if old is not None:
            self._drop_chain(port, old)
        if new is not None:
            self._make_chain(port, new)

    def _drop_chain(self, port: int, guard: Guard) -> None:
        chain = guard_chain(port, guard)
        self._jump(port, None)
        named = nl.attr(nl.CHAIN_TABLE, nl.text(self.table)) + nl.attr(
            nl.CHAIN_NAME, nl.text(chain)
        )
        rules = nl.attr(nl.RULE_TABLE, nl.text(self.table)) + nl.attr(nl.RULE_CHAIN, nl.text(chain))
        self.steps.append((f"flush chain {chain}", nl.DELRULE, 0, rules))
        self.steps.append((f"delete chain {chain}", nl.DELCHAIN, 0, named))
        for name, _version in _address_sets(port, guard):
            attrs = nl.attr(nl.SET_TABLE, nl.text(self.table)) + nl.attr(nl.SET_NAME, nl.text(name))
            self.steps.append((f"delete set {name}", nl.DELSET, 0, attrs))
        for counter in _refusal_counters(port, guard):
            self.delete_object(nl.OBJECT_COUNTER, counter)

    def _make_chain(self, port: int, guard: Guard) -> None:
        chain = guard_chain(port, guard)
        for counter in _refusal_counters(port, guard):
            self.new_counter(counter)
        rules: list[bytes] = []
        if guard.connections is not None:
            rules.append(nl.connection_rule(guard.connections, object_name("refused", port)))
        for name, version in _address_sets(port, guard):
            set_id = next(self._set_ids)
            assert guard.addresses is not None
            attrs = nl.address_set_attrs(
                self.table, name, version, guard.addresses, guard.window * 1000, set_id
            )
            self.steps.append((f"create set {name}", nl.NEWSET, nl.CREATE | nl.EXCL, attrs))
            rules.append(nl.address_rule(version, name, set_id))
        if guard.addresses is not None:
            rules += nl.refusal_rules(object_name("ipref", port))
        named = nl.attr(nl.CHAIN_TABLE, nl.text(self.table)) + nl.attr(
            nl.CHAIN_NAME, nl.text(chain)
        )
        self.steps.append((f"create chain {chain}", nl.NEWCHAIN, nl.CREATE | nl.EXCL, named))
        for rule in rules:
            attrs = nl.rule_message_attrs(self.table, chain, rule)
            self.steps.append((f"add rule to {chain}", nl.NEWRULE, nl.CREATE | nl.APPEND, attrs))
        self._jump(port, chain)

    def _jump(self, port: int, chain: str | None) -> None:
        """Add `port` -> jump `chain` to the guard map, or delete `port` from it (None)."""
        attrs = (
            nl.attr(nl.ELEM_LIST_TABLE, nl.text(self.table))
            + nl.attr(nl.ELEM_LIST_SET, nl.text(GUARD_MAP))
            + nl.nest(nl.ELEM_LIST_ELEMENTS, nl.jump_element(port, chain))
        )
        what = f"{'add' if chain else 'delete'} element {port} of map {GUARD_MAP}"
        self.steps.append(
            (what, nl.NEWSETELEM if chain else nl.DELSETELEM, nl.CREATE if chain else 0, attrs)
        )

    def new_counter(self, name: str) -> None:
        self._object(
            f"create counter {name}", nl.NEWOBJ, nl.OBJECT_COUNTER, name, nl.counter_data()
        )

    def new_quota(self, name: str, quota: Quota) -> None:
        checked_quota(name, quota)
        self._object(
            f"create quota {name}",
            nl.NEWOBJ,
            nl.OBJECT_QUOTA,
            name,
            nl.quota_data(quota.limit, quota.used),
        )

    def new_limit(self, name: str, rate: int) -> None:
        if not 0 < rate <= MAX_U64:
            raise OutOfRange(f"{name}: a rate of {rate} bytes/s is outside 1..{MAX_U64}")
        self._object(f"create limit {name}", nl.NEWOBJ, nl.OBJECT_LIMIT, name, nl.limit_data(rate))

    def delete_object(self, kind: int, name: str) -> None:
        self._object(f"delete {OBJECT_KINDS[kind]} {name}", nl.DELOBJ, kind, name)

    def map_element(self, add: bool, map_name: str, port: int) -> None:
        target = object_name(MAP_PREFIX[map_name], port) if add else None
        self.element(map_name, port, target)

    def element(self, map_name: str, port: int, target: str | None) -> None:
        """Add the element `port` -> `target` to a map, or delete `port` (target None)."""
        add = target is not None
        what = f"{'add' if add else 'delete'} element {port} of map {map_name}"
        try:
            element = nl.port_element(port, target)
        except nl.EncodeError as exc:
            raise OutOfRange(f"{what}: {exc}") from None
        attrs = (
            nl.attr(nl.ELEM_LIST_TABLE, nl.text(self.table))
            + nl.attr(nl.ELEM_LIST_SET, nl.text(map_name))
            + nl.nest(nl.ELEM_LIST_ELEMENTS, element)
        )
        self.steps.append(
            (what, nl.NEWSETELEM if add else nl.DELSETELEM, nl.CREATE if add else 0, attrs)
        )

    def _object(self, what: str, kind: int, obj_type: int, name: str, data: bytes = b"") -> None:
        attrs = nl.attr(nl.OBJ_TABLE, nl.text(self.table)) + nl.attr(nl.OBJ_NAME, nl.text(name))
        attrs += nl.attr(nl.OBJ_TYPE, nl.be32(obj_type)) + data
        self.steps.append((what, kind, nl.CREATE | nl.EXCL if kind == nl.NEWOBJ else 0, attrs))


class Netlink:
    """One NETLINK_NETFILTER socket of the daemon's network namespace. Blocking; one caller at a
    time (Counters' lock)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = itertools.count(DUMP_SEQ + 1)

    def table_handle(self, table: str) -> int | None:
        return self.objects(table, [])[0]

    def objects(self, table: str, names: Sequence[str]) -> tuple[int | None, list[nl.KernelObject]]:
        """The table's handle and those of the named objects that exist, read in one exchange."""
        requests = [(nl.GETTABLE, nl.attr(nl.TABLE_NAME, nl.text(table)))]
        for name in names:
            obj_type = nl.OBJECT_QUOTA if name.startswith("q_") else nl.OBJECT_COUNTER
            requests.append(
                (
                    nl.GETOBJ,
                    nl.attr(nl.OBJ_TABLE, nl.text(table))
                    + nl.attr(nl.OBJ_NAME, nl.text(name))
                    + nl.attr(nl.OBJ_TYPE, nl.be32(obj_type)),
                )
            )
        table_reply, *replies = self._get(requests)
        if table_reply is None:
            return None, []
        handle = nl.uint(nl.attrs(table_reply)[nl.TABLE_HANDLE])
        return handle, [nl.kernel_object(body) for body in replies if body is not None]

    def layout(self, table: str, handle: int) -> Layout:
        """The fingerprint of the maps and the two hooked chains with their rules. Read by name
        and by chain: the guards' own sets and chains (one per limited key) are not read at
        every poll."""
        name = nl.text(table)
        maps = self._get(
            [
                (nl.GETSET, nl.attr(nl.SET_TABLE, name) + nl.attr(nl.SET_NAME, nl.text(m)))
                for m in sorted({**MAPS, **GUARD_MAPS})
            ]
        )
        sets = [
            None
            if body is None
            else nl.selected(
                nl.attrs(body),
                (
                    nl.SET_NAME,
                    nl.SET_FLAGS,
                    nl.SET_KEY_TYPE,
                    nl.SET_KEY_LEN,
                    nl.SET_DATA_TYPE,
                    nl.SET_OBJ_TYPE,
                ),
            )
            for body in maps
        ]
        chains = self._get(
            [
                (nl.GETCHAIN, nl.attr(nl.CHAIN_TABLE, name) + nl.attr(nl.CHAIN_NAME, nl.text(hook)))
                for hook, _ in CHAINS.values()
            ]
        )
        rules = [
            nl.selected(nl.attrs(m.body), (nl.RULE_CHAIN, nl.RULE_EXPRESSIONS))
            for hook, _ in CHAINS.values()
            for m in nl.messages(
                self.dump(
                    nl.GETRULE, nl.attr(nl.RULE_TABLE, name), nl.attr(nl.RULE_CHAIN, nl.text(hook))
                )
            )
        ]
        return Layout(
            handle,
            tuple(sets),
            tuple(
                None
                if c is None
                else nl.selected(
                    nl.attrs(c), (nl.CHAIN_NAME, nl.CHAIN_HOOK, nl.CHAIN_POLICY, nl.CHAIN_TYPE)
                )
                for c in chains
            ),
            tuple(rules),
        )

    def dump(self, kind: int, *attrs: bytes) -> bytes:
        """The messages a dump request returns, concatenated, without the closing NLMSG_DONE.

        Every dump uses the same sequence number, so an unchanged table dumps to the same bytes
        (see nlcodec.ObjectScanner); a dump is read to its end or the socket is replaced. A
        dump the kernel marks inconsistent (another program changed the ruleset meanwhile) is
        taken again, as libnftables does: a port missing from it would look like lost counters.
        """
        for _ in range(DUMP_ATTEMPTS):
            data, ended, interrupted = self._dump_once(kind, *attrs)
            if ended.kind == nl.NLMSG_ERROR:
                code, _ = nl.error_code(ended.body)
                if code:
                    raise NftError(f"netlink dump: {os.strerror(code)}", code)
            if not interrupted:
                return data
        raise NftError(
            f"the ruleset kept changing during {DUMP_ATTEMPTS} readings; trying again at the next"
        )

    def _dump_once(self, kind: int, *attrs: bytes) -> tuple[bytes, nl.Message, bool]:
        with self._exchange() as sock:
            sock.send(nl.message(kind, nl.REQUEST | nl.DUMP, DUMP_SEQ, *attrs))
            parts, interrupted = [], False
            while True:
                chunk = sock.recv(RECEIVE_BUFFER)
                end, last, marked = nl.dump_part(chunk)
                parts.append(chunk[:end])
                interrupted = interrupted or marked
                if last is not None:
                    return b"".join(parts), last, interrupted

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @contextlib.contextmanager
    def _exchange(self) -> Iterator[socket.socket]:
        """The socket for one request and its answers. A failure half-way leaves answers queued
        that the next request would misread: the socket is replaced instead."""
        try:
            yield self._socket()
        except OSError as exc:
            self.close()
            raise NftError(f"netlink: {failure_reason(exc)}", exc.errno) from None
        except BaseException:
            self.close()
            raise

    def transact(self, edit: Transaction) -> None:
        """Send `edit` as one batch; raise NftError naming the step the kernel refused."""
        if not edit.steps:
            return
        first = next(self._seq)
        described = {}
        messages = []
        for what, kind, flags, attrs in edit.steps:
            seq = next(self._seq)
            described[seq] = what
            messages.append(nl.message(kind, nl.REQUEST | nl.ACK | flags, seq, attrs))
        with self._exchange() as sock:
            sock.send(nl.batch(messages, first, next(self._seq)))
            answers = self._answers(sock, len(messages))
        codes = [(code, seq) for code, seq in answers if code]
        if codes:
            refused = [f"{described.get(seq, 'transaction')}: {os.strerror(c)}" for c, seq in codes]
            raise NftError("; ".join(refused), codes[0][0])

    @staticmethod
    def _answers(sock: socket.socket, expected: int) -> list[tuple[int, int]]:
        """(errno, sequence) of each ACK or error. The kernel handles a batch inside send(), so
        all answers are queued once it returns: wait for the first, then take what is there."""
        answers: list[tuple[int, int]] = []
        flags = 0
        while len(answers) < expected:
            try:
                chunk = sock.recv(RECEIVE_BUFFER, flags)
            except BlockingIOError:
                break
            answers += [
                nl.error_code(m.body) for m in nl.messages(chunk) if m.kind == nl.NLMSG_ERROR
            ]
            flags = socket.MSG_DONTWAIT
        return answers

    def _get(self, requests: Sequence[tuple[int, bytes]]) -> list[bytes | None]:
        """One reply per request, in order: the object's attributes, or None if it does not exist.
        Sent in slices: one write must fit the socket's send buffer."""
        replies: list[bytes | None] = []
        for start in range(0, len(requests), GET_SLICE):
            replies += self._get_slice(requests[start : start + GET_SLICE])
        return replies

    def _get_slice(self, requests: Sequence[tuple[int, bytes]]) -> list[bytes | None]:
        with self._exchange() as sock:
            return self._get_answers(sock, requests)

    def _get_answers(
        self, sock: socket.socket, requests: Sequence[tuple[int, bytes]]
    ) -> list[bytes | None]:
        wanted: dict[int, int] = {}
        payload = []
        for index, (kind, attrs) in enumerate(requests):
            seq = next(self._seq)
            wanted[seq] = index
            payload.append(nl.message(kind, nl.REQUEST, seq, attrs))
        sock.send(b"".join(payload))
        replies: list[bytes | None] = [None] * len(requests)
        pending = set(wanted)
        while pending:
            for reply in nl.messages(sock.recv(RECEIVE_BUFFER)):
                if reply.seq not in pending:
                    continue
                pending.discard(reply.seq)
                if reply.kind == nl.NLMSG_ERROR:
                    code, _ = nl.error_code(reply.body)
                    if code not in (0, errno.ENOENT):
                        raise NftError(f"netlink get: {os.strerror(code)}", code)
                    continue
                replies[wanted[reply.seq]] = reply.body
        return replies

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.settimeout(10)
            sock.bind((0, 0))
            self._sock = sock
        return self._sock


class PortAssembler:
    """Kernel objects -> readings per port. Keeps what it built last, so an unchanged port costs
    a dictionary lookup, and an unchanged reading is the same object as before."""

    def __init__(self) -> None:
        self._names: dict[str, tuple[str, int] | None] = {}
        self._built: dict[int, tuple[tuple[nl.KernelObject, ...], PortReading]] = {}
        self._handle: int | None = None
        self._last: tuple[Sequence[nl.KernelObject], TableView] | None = None

    def view(self, handle: int, objects: Sequence[nl.KernelObject]) -> TableView:
        if self._last is not None and self._last[0] is objects and handle == self._handle:
            return self._last[1]  # the scanner saw exactly the last dump again
        if handle != self._handle:
            self._built, self._handle = {}, handle  # readings name their table: none carries over
        parts: dict[int, dict[str, nl.KernelObject]] = {}
        for obj in objects:
            try:
                parsed = self._names[obj.name]
            except KeyError:
                match = OBJECT_NAME.match(obj.name)
                parsed = self._names[obj.name] = (
                    None if match is None else (match.group(1), int(match.group(2)))
                )
            if parsed is not None:
                parts.setdefault(parsed[1], {})[parsed[0]] = obj
        view = TableView(handle=handle)
        built: dict[int, tuple[tuple[nl.KernelObject, ...], PortReading]] = {}
        for port, found in parts.items():
            if "rx" not in found or "tx" not in found:
                view.stray.add(port)
                continue
            signature = tuple(found.values())
            previous = self._built.get(port)
            if previous is not None and previous[0] == signature:
                reading = previous[1]
            else:
                reading = _port_reading(handle, found)
            built[port] = (signature, reading)
            view.ports[port] = reading
        self._built = built
        self._last = (objects, view)
        return view


def _port_reading(handle: int, found: Mapping[str, nl.KernelObject]) -> PortReading:
    def counter(kind: str) -> Reading | None:
        obj = found.get(kind)
        return None if obj is None else Reading(handle, obj.handle, obj.first, obj.second)

    quota = found.get("q")
    rx, tx = counter("rx"), counter("tx")
    assert rx is not None and tx is not None
    return PortReading(
        rx,
        tx,
        counter("drop"),
        None if quota is None else KernelQuota(quota.first, quota.second),
        counter("refused"),
        counter("ipref"),
    )
