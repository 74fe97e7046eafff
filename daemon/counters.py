"""The only module that talks to nftables: one table, one named counter per port and direction.

Layout (DESIGN.md): a named counter `rx_<port>` / `tx_<port>` per port, and one rule per hook that
looks the port up in a map and updates the counter it names. The per-packet cost is one map lookup
whatever the number of ports; installing or removing a port is one transaction; reading every
counter is one `list table` call. Nothing outside our own `inet <table>` is read or changed.

libnftables is blocking and not thread-safe: every call runs in a worker thread, one at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import nftables

from daemon.accounting import Reading

FAMILY = "inet"
DIRECTIONS = ("rx", "tx")
COUNTER_NAME = re.compile(r"^(rx|tx)_(\d{1,5})$")
# Priority "mangle" (-150): before filter tables, so ports count even when a later chain drops.
HOOK_PRIORITY = -150
MATCH_TCP_UDP = {
    "match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": {"set": ["tcp", "udp"]}}
}
CHAINS = {"rx": ("input", "dport"), "tx": ("output", "sport")}


class NftError(Exception):
    """libnftables refused a command; the message is nft's own."""


@dataclass(frozen=True, slots=True)
class PortReading:
    rx: Reading
    tx: Reading


@dataclass(slots=True)
class TableView:
    """What `list table` shows of our table: its identity, counters and whether the rules are ours."""

    handle: int
    ports: dict[int, PortReading] = field(default_factory=dict)
    stray_counters: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def counter_name(direction: str, port: int) -> str:
    return f"{direction}_{port}"


def rule_expr(direction: str) -> list[dict[str, Any]]:
    _, port_field = CHAINS[direction]
    lookup = {"map": {"key": {"payload": {"protocol": "th", "field": port_field}}, "data": f"@{direction}"}}
    return [MATCH_TCP_UDP, {"counter": lookup}]


class Counters:
    """Our nftables table. Methods are coroutines; nft work happens in a worker thread."""

    def __init__(self, table: str) -> None:
        self.table = table
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(True)
        self._lock = anyio.Lock()

    # --- reading -------------------------------------------------------------------------

    async def read(self) -> TableView | None:
        """Every counter of the table in one call, or None when the table does not exist."""
        objects = await self._list({"table": self._ref(name_key="name")}, terse=True, missing_ok=True)
        return None if objects is None else self._view(objects)

    async def map_elements(self) -> dict[str, dict[int, str]]:
        """Port -> counter name for both maps (not part of `read`: costly and rarely needed)."""
        result: dict[str, dict[int, str]] = {}
        for direction in DIRECTIONS:
            objects = await self._list({"map": {**self._ref(), "name": direction}}, missing_ok=True)
            elements: dict[int, str] = {}
            for obj in objects or []:
                for port, name in obj.get("map", {}).get("elem", []):
                    elements[int(port)] = str(name)
            result[direction] = elements
        return result

    def _view(self, objects: Sequence[dict[str, Any]]) -> TableView:
        table = next(obj["table"] for obj in objects if "table" in obj)
        view = TableView(handle=int(table["handle"]))
        partial: dict[int, dict[str, Reading]] = {}
        rules: dict[str, list[list[Any]]] = {}
        maps: dict[str, dict[str, Any]] = {}
        chains: dict[str, dict[str, Any]] = {}
        for obj in objects:
            if "counter" in obj:
                counter = obj["counter"]
                match = COUNTER_NAME.match(counter["name"])
                if not match:
                    view.stray_counters.append(counter["name"])
                    continue
                reading = Reading(view.handle, counter["handle"], counter["packets"], counter["bytes"])
                partial.setdefault(int(match.group(2)), {})[match.group(1)] = reading
            elif "rule" in obj:
                rules.setdefault(obj["rule"]["chain"], []).append(obj["rule"]["expr"])
            elif "map" in obj:
                maps[obj["map"]["name"]] = obj["map"]
            elif "chain" in obj:
                chains[obj["chain"]["name"]] = obj["chain"]
        for port, pair in partial.items():
            if len(pair) == 2:
                view.ports[port] = PortReading(rx=pair["rx"], tx=pair["tx"])
            else:
                view.stray_counters.extend(counter_name(d, port) for d in pair)
        view.problems = _structure_problems(maps, chains, rules)
        return view

    # --- changing ------------------------------------------------------------------------

    async def build(self, ports: Iterable[int]) -> None:
        """(Re)create the whole table with fresh counters for `ports`, atomically."""
        table = {"family": FAMILY, "name": self.table}
        commands: list[dict[str, Any]] = [
            {"add": {"table": table}},
            {"delete": {"table": table}},
            {"add": {"table": table}},
        ]
        for direction in DIRECTIONS:
            hook, _ = CHAINS[direction]
            commands.append(
                {"add": {"map": {**self._ref(), "name": direction, "type": "inet_service", "map": "counter"}}}
            )
            commands.append(
                {
                    "add": {
                        "chain": {
                            **self._ref(),
                            "name": hook,
                            "type": "filter",
                            "hook": hook,
                            "prio": HOOK_PRIORITY,
                            "policy": "accept",
                        }
                    }
                }
            )
            commands.append({"add": {"rule": {**self._ref(), "chain": hook, "expr": rule_expr(direction)}}})
        commands.extend(self._port_commands("add", sorted(set(ports))))
        await self._run(commands)

    async def install(self, ports: Iterable[int]) -> None:
        """Add fresh counters and map entries for `ports` in one transaction.

        Fails (NftError) if a counter of that name already exists: a leftover must be removed
        first, or its old bytes would be counted as the new key's.
        """
        await self._run(self._port_commands("create", sorted(set(ports))))

    async def remove(self, ports: Iterable[int]) -> None:
        """Remove the map entries and counters of `ports` in one transaction."""
        commands = self._element_commands("delete", sorted(set(ports)))
        commands += self._counter_commands("delete", sorted(set(ports)))
        await self._run(commands)

    async def remove_present(self, ports: Iterable[int]) -> None:
        """Remove whatever exists of `ports` (map entries, counters), tolerating half-installed ones."""
        wanted = set(ports)
        view = await self.read()
        if view is None or not wanted:
            return
        elements = await self.map_elements()
        commands: list[dict[str, Any]] = []
        for direction in DIRECTIONS:
            present = sorted(wanted & set(elements.get(direction, {})))
            if present:
                commands.append(self._elements_command("delete", direction, present))
        names = {counter_name(d, p) for p in wanted & set(view.ports) for d in DIRECTIONS}
        names |= {n for n in view.stray_counters if port_of(n) in wanted}
        commands += [{"delete": {"counter": {**self._ref(), "name": n}}} for n in sorted(names)]
        if commands:
            await self._run(commands)

    async def delete_table(self) -> None:
        table = {"family": FAMILY, "name": self.table}
        await self._run([{"add": {"table": table}}, {"delete": {"table": table}}])

    # --- helpers -------------------------------------------------------------------------

    def _ref(self, name_key: str = "table") -> dict[str, str]:
        return {"family": FAMILY, name_key: self.table}

    def _port_commands(self, verb: str, ports: Sequence[int]) -> list[dict[str, Any]]:
        return self._counter_commands(verb, ports) + self._element_commands("add", ports)

    def _counter_commands(self, verb: str, ports: Sequence[int]) -> list[dict[str, Any]]:
        return [
            {verb: {"counter": {**self._ref(), "name": counter_name(d, p)}}}
            for p in ports
            for d in DIRECTIONS
        ]

    def _element_commands(self, verb: str, ports: Sequence[int]) -> list[dict[str, Any]]:
        if not ports:
            return []
        return [self._elements_command(verb, d, ports) for d in DIRECTIONS]

    def _elements_command(self, verb: str, direction: str, ports: Sequence[int]) -> dict[str, Any]:
        elem = [[p, counter_name(direction, p)] for p in ports]
        return {verb: {"element": {**self._ref(), "name": direction, "elem": elem}}}

    async def _run(self, commands: list[dict[str, Any]]) -> None:
        if commands:
            await self._call({"nftables": commands}, terse=False)

    async def _list(
        self, what: dict[str, Any], *, terse: bool = False, missing_ok: bool = False
    ) -> list[dict[str, Any]] | None:
        try:
            output = await self._call({"nftables": [{"list": what}]}, terse=terse)
        except NftError as exc:
            if missing_ok and "No such file or directory" in str(exc):
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


def port_of(name: str) -> int | None:
    match = COUNTER_NAME.match(name)
    return int(match.group(2)) if match else None


def _structure_problems(
    maps: dict[str, dict[str, Any]],
    chains: dict[str, dict[str, Any]],
    rules: dict[str, list[list[Any]]],
) -> list[str]:
    """What differs from the layout `build` makes, so a damaged table can be rebuilt."""
    found = []
    for direction in DIRECTIONS:
        hook, _ = CHAINS[direction]
        spec = maps.get(direction)
        if spec is None or spec.get("type") != "inet_service" or spec.get("map") != "counter":
            found.append(f"map {direction} is missing or has the wrong type")
        chain = chains.get(hook)
        if chain is None or chain.get("hook") != hook:
            found.append(f"chain {hook} is missing or not attached to the {hook} hook")
        if rules.get(hook, []) != [rule_expr(direction)]:
            found.append(f"chain {hook} does not hold exactly the {direction} counting rule")
    return found
