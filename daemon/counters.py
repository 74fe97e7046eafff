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

Installing or removing a port is one transaction; reading every counter and quota is one
`list table` call. Nothing outside our own `inet <table>` is read or changed. libnftables is
blocking and not thread-safe: every call runs in a worker thread, one at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import nftables

from daemon.accounting import Reading
from daemon.limits import Quota

FAMILY = "inet"
DIRECTIONS = ("rx", "tx")
OBJECT_NAME = re.compile(r"^(rx|tx|drop|q)_(\d{1,5})$")
# Priority "mangle" (-150): before filter tables, so ports count even when a later chain drops.
HOOK_PRIORITY = -150
MATCH_TCP_UDP = {
    "match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": {"set": ["tcp", "udp"]}}
}
CHAINS = {"rx": ("input", "dport"), "tx": ("output", "sport")}
MAPS = {"rx": "counter", "tx": "counter", "quota": "quota", "dropped": "counter"}


class NftError(Exception):
    """libnftables refused a command; the message is nft's own."""


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


@dataclass(slots=True)
class TableView:
    """What `list table` shows of our table: its identity, counters, quotas, and layout problems."""

    handle: int
    ports: dict[int, PortReading] = field(default_factory=dict)
    stray: set[int] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


def object_name(kind: str, port: int) -> str:
    return f"{kind}_{port}"


def port_of(name: str) -> int | None:
    match = OBJECT_NAME.match(name)
    return int(match.group(2)) if match else None


def _lookup(port_field: str, map_name: str) -> dict[str, Any]:
    return {"map": {"key": {"payload": {"protocol": "th", "field": port_field}}, "data": f"@{map_name}"}}


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
        self._lock = anyio.Lock()
        self._enforced: set[int] = set()  # ports with a quota installed, as last seen or set

    # --- reading -------------------------------------------------------------------------

    async def read(self) -> TableView | None:
        """Every counter and quota of the table in one call, or None when the table is missing."""
        objects = await self._list({"table": {"family": FAMILY, "name": self.table}}, terse=True)
        if objects is None:
            self._enforced = set()
            return None
        view = _view(objects)
        self._enforced = {port for port, reading in view.ports.items() if reading.quota is not None}
        return view

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
            commands.append({"add": {"map": {**self._ref(), "name": name, "type": "inet_service", "map": kind}}})
        for direction in DIRECTIONS:
            hook, _ = CHAINS[direction]
            chain = {"name": hook, "type": "filter", "hook": hook, "prio": HOOK_PRIORITY, "policy": "accept"}
            commands.append({"add": {"chain": {**self._ref(), **chain}}})
            for expr in rule_exprs(direction):
                commands.append({"add": {"rule": {**self._ref(), "chain": hook, "expr": expr}}})
        for port, quota in sorted(ports.items()):
            commands += self._port_commands("add", port, quota)
        await self._run(commands)
        self._enforced = {port for port, quota in ports.items() if quota is not None}

    async def install(self, port: int, quota: Quota | None = None) -> None:
        """Add fresh counters (and the quota) for `port` in one transaction.

        Fails (NftError) if a counter of that name already exists: a leftover must be removed
        first, or its old bytes would be counted as the new key's.
        """
        await self._run(self._port_commands("create", port, quota))
        if quota is not None:
            self._enforced.add(port)

    async def remove(self, port: int) -> None:
        """Remove the map entries, counters and quota of `port` in one transaction."""
        commands = self._element_commands("delete", port, port in self._enforced)
        commands += self._object_commands("delete", port, None, port in self._enforced)
        await self._run(commands)
        self._enforced.discard(port)

    async def enforce(self, port: int, quota: Quota | None) -> None:
        """Install, replace or lift the quota of `port`, atomically.

        Replacing (not updating) the quota object sets its `used` to the given usage: the kernel's
        own `used` also counted the packets it dropped, which are not usage.
        """
        commands: list[dict[str, Any]] = []
        if port in self._enforced:
            commands += [self._elements_command("delete", m, [port], k) for m, k in _QUOTA_MAPS]
            commands.append({"delete": {"quota": {**self._ref(), "name": object_name("q", port)}}})
            if quota is None:
                commands.append({"delete": {"counter": {**self._ref(), "name": object_name("drop", port)}}})
        if quota is not None:
            if port not in self._enforced:
                commands.append({"add": {"counter": {**self._ref(), "name": object_name("drop", port)}}})
            commands.append(self._quota_command(port, quota))
            commands += [self._elements_command("add", m, [port], k) for m, k in _QUOTA_MAPS]
        await self._run(commands)
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

    def _port_commands(self, verb: str, port: int, quota: Quota | None) -> list[dict[str, Any]]:
        enforced = quota is not None
        return self._object_commands(verb, port, quota, enforced) + self._element_commands(
            "add", port, enforced
        )

    def _object_commands(
        self, verb: str, port: int, quota: Quota | None, enforced: bool
    ) -> list[dict[str, Any]]:
        kinds = [*DIRECTIONS, "drop"] if enforced else list(DIRECTIONS)
        commands = [{verb: {"counter": {**self._ref(), "name": object_name(k, port)}}} for k in kinds]
        if quota is not None:
            commands.append(self._quota_command(port, quota, verb))
        elif enforced:
            commands.append({verb: {"quota": {**self._ref(), "name": object_name("q", port)}}})
        return commands

    def _quota_command(self, port: int, quota: Quota, verb: str = "add") -> dict[str, Any]:
        spec = {"name": object_name("q", port), "bytes": quota.limit, "used": quota.used, "inv": True}
        return {verb: {"quota": {**self._ref(), **spec}}}

    def _element_commands(self, verb: str, port: int, enforced: bool) -> list[dict[str, Any]]:
        maps = [(d, "counter") for d in DIRECTIONS] + (list(_QUOTA_MAPS) if enforced else [])
        return [self._elements_command(verb, name, [port], kind) for name, kind in maps]

    def _elements_command(self, verb: str, map_name: str, ports: Sequence[int], kind: str) -> dict[str, Any]:
        prefix = {"rx": "rx", "tx": "tx", "quota": "q", "dropped": "drop"}[map_name]
        elem = [[p, object_name(prefix, p)] for p in ports]
        return {verb: {"element": {**self._ref(), "name": map_name, "elem": elem}}}

    # --- libnftables ---------------------------------------------------------------------

    async def _run(self, commands: list[dict[str, Any]]) -> None:
        if commands:
            await self._call({"nftables": commands}, terse=False)

    async def _list(self, what: dict[str, Any], *, terse: bool = False) -> list[dict[str, Any]] | None:
        """The listed objects, or None when the table (or the listed map) does not exist."""
        try:
            output = await self._call({"nftables": [{"list": what}]}, terse=terse)
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise
        return [obj for obj in output.get("nftables", []) if "metainfo" not in obj]

    async def _call(self, payload: dict[str, Any], *, terse: bool) -> dict[str, Any]:
        async with self._lock:
            return await anyio.to_thread.run_sync(self._call_blocking, payload, terse)

    def _call_blocking(self, payload: dict[str, Any], terse: bool) -> dict[str, Any]:
        self._nft.set_terse_output(terse)
        rc, output, error = self._nft.json_cmd(payload)
        if rc != 0:
            raise NftError(" ".join(error.replace("internal:0:0-0:", "").split()) or f"nft rc={rc}")
        return output if isinstance(output, dict) else {}


_QUOTA_MAPS = (("quota", "quota"), ("dropped", "counter"))


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
            view.ports[port] = PortReading(parts["rx"], parts["tx"], parts.get("drop"), parts.get("q"))
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
