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
from daemon.bounds import MAX_KERNEL_QUOTA
from daemon.limits import Quota

T = TypeVar("T")

FAMILY = "inet"
DIRECTIONS = ("rx", "tx")
OBJECT_NAME = re.compile(r"^(rx|tx|drop|q)_(\d{1,5})$")
# Priority "mangle" (-150): before filter tables, so ports count even when a later chain drops.
HOOK_PRIORITY = -150
MATCH_TCP_UDP: dict[str, Any] = {
    "match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": {"set": ["tcp", "udp"]}}
}
CHAINS = {"rx": ("input", "dport"), "tx": ("output", "sport")}
MAPS = {"rx": "counter", "tx": "counter", "quota": "quota", "dropped": "counter"}
MAP_PREFIX = {"rx": "rx", "tx": "tx", "quota": "q", "dropped": "drop"}
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
    """The two rules of a chain, in order: enforce the quota, then count."""
    _, port_field = CHAINS[direction]
    enforce = [
        MATCH_TCP_UDP,
        {"quota": _lookup(port_field, "quota")},
        {"counter": _lookup(port_field, "dropped")},
        {"drop": None},
    ]
    count = [MATCH_TCP_UDP, {"counter": _lookup(port_field, direction)}]
    return [enforce, count]


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
        names = [object_name(kind, port) for port in ports for kind in ("rx", "tx", "drop", "q")]
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
        for name in MAPS:
            objects = await self._list({"map": {**self._ref(), "name": name}})
            elements: dict[int, str] = {}
            for obj in objects or []:
                for port, target in obj.get("map", {}).get("elem", []):
                    elements[int(port)] = str(target)
            result[name] = elements
        return result

    # --- changing ------------------------------------------------------------------------

    async def build(self, ports: Mapping[int, Quota | None]) -> None:
        """(Re)create the whole table with fresh counters and quotas for `ports`, atomically."""
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
        await self._run(commands)
        self._layout = None
        self._enforced = {port for port, quota in ports.items() if quota is not None}

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
        for obj in objects:
            for kind in ("counter", "quota"):
                if kind in obj and port_of(obj[kind]["name"]) in wanted:
                    commands.append({"delete": {kind: {**self._ref(), "name": obj[kind]["name"]}}})
        await self._run(commands)
        self._enforced -= wanted

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
    for port, parts in found.items():
        if "rx" in parts and "tx" in parts:
            view.ports[port] = PortReading(
                parts["rx"], parts["tx"], parts.get("drop"), parts.get("q")
            )
        else:
            view.stray.add(port)
    view.problems = _layout_problems(maps, chains, rules)
    return view


def _layout_problems(
    maps: dict[str, dict[str, Any]],
    chains: dict[str, dict[str, Any]],
    rules: dict[str, list[list[Any]]],
) -> list[str]:
    """What differs from the layout `build` makes, so a damaged table can be rebuilt."""
    found = []
    for name, kind in MAPS.items():
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
    sets: tuple[tuple[bytes | None, ...], ...]
    chains: tuple[tuple[bytes | None, ...] | None, ...]
    rules: tuple[tuple[bytes | None, ...], ...]


class Transaction:
    """nf_tables messages applied together or not at all, each described for error messages."""

    def __init__(self, table: str) -> None:
        self.table = table
        self.steps: list[tuple[str, int, int, bytes]] = []  # what, message type, flags, attributes

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

    def delete_object(self, kind: int, name: str) -> None:
        self._object(
            f"delete {'quota' if kind == nl.OBJECT_QUOTA else 'counter'} {name}",
            nl.DELOBJ,
            kind,
            name,
        )

    def map_element(self, add: bool, map_name: str, port: int) -> None:
        target = object_name(MAP_PREFIX[map_name], port) if add else None
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
        name = nl.text(table)
        sets = [
            nl.selected(
                nl.attrs(m.body),
                (
                    nl.SET_NAME,
                    nl.SET_FLAGS,
                    nl.SET_KEY_TYPE,
                    nl.SET_KEY_LEN,
                    nl.SET_DATA_TYPE,
                    nl.SET_OBJ_TYPE,
                ),
            )
            for m in nl.messages(self.dump(nl.GETSET, nl.attr(nl.SET_TABLE, name)))
        ]
        chains = self._get(
            [
                (nl.GETCHAIN, nl.attr(nl.CHAIN_TABLE, name) + nl.attr(nl.CHAIN_NAME, nl.text(hook)))
                for hook, _ in CHAINS.values()
            ]
        )
        rules = [
            nl.selected(nl.attrs(m.body), (nl.RULE_CHAIN, nl.RULE_EXPRESSIONS))
            for m in nl.messages(self.dump(nl.GETRULE, nl.attr(nl.RULE_TABLE, name)))
        ]
        return Layout(
            handle,
            tuple(sorted(sets, key=repr)),
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
        rx, tx, counter("drop"), None if quota is None else KernelQuota(quota.first, quota.second)
    )
