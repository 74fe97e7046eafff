"""Readings: what the kernel's objects say about each port. Pure but for the netlink reads
`Readings` asks for.

A poll reads every port in one netlink dump of the table's objects (decoded by
codec.ObjectScanner); a few ports are read by name; the full libnftables listing, read at start
and after a change of layout, also shows the guards and the layout's problems (layout.problems).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from daemon.accounting import Reading
from daemon.kernel import KernelQuota, PortReading, TableView
from daemon.limits import Guard
from daemon.nft import codec as nl
from daemon.nft import layout
from daemon.nft.netlink import Netlink

Json = dict[str, Any]
LIMIT_UNITS = {"bytes": 1, "kbytes": 1024, "mbytes": 1024**2}


class Readings:
    """The readings of one table over netlink."""

    def __init__(self, table: str) -> None:
        self.table = table
        self._scanner = nl.ObjectScanner(table)
        self._ports = PortAssembler()

    def every_port(self, link: Netlink, handle: int) -> TableView | None:
        """Every port's counters and quota, in one dump; None if the table was replaced (it no
        longer has `handle`) while the dump ran."""
        dump = link.dump(nl.GETOBJ, nl.attr(nl.OBJ_TABLE, nl.text(self.table)))
        if link.table_handle(self.table) != handle:
            return None
        return self._ports.view(handle, self._scanner.scan(dump))

    def some_ports(self, link: Netlink, ports: Iterable[int]) -> TableView | None:
        """The objects of `ports`, asked for by name in one exchange (the cost does not grow with
        the table); None when the table is missing."""
        wanted = [
            (layout.object_name(kind, port), obj_type)
            for port in ports
            for kind, obj_type in layout.PORT_OBJECTS
        ]
        handle, objects = link.objects(self.table, wanted)
        if handle is None:
            return None
        return PortAssembler().view(handle, objects)


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
                match = layout.OBJECT_NAME.match(obj.name)
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


# --- the full listing (libnftables JSON) ------------------------------------------------------


def listed_view(objects: Sequence[Json]) -> TableView:
    """The table as a full listing shows it: readings, guards, and what differs from the layout."""
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
            match = layout.OBJECT_NAME.match(spec["name"])
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
    view.problems = layout.problems(maps, chains, rules)
    return view


def _rate(spec: Mapping[str, Any]) -> int:
    """A limit object's rate in bytes per second, as nft lists it (in its own unit)."""
    return int(spec["rate"]) * LIMIT_UNITS.get(str(spec.get("rate_unit", "bytes")), 0)


def _guards(chains: Mapping[str, Any], rates: Mapping[str, int]) -> dict[int, Guard]:
    """The guards a listing shows: a port's chain names its connection and address limits and
    window, its limit objects the rate."""
    guards: dict[int, Guard] = {}
    for name in chains:
        match = layout.GUARD_CHAIN.match(name)
        if match:
            port, conns, addresses, window = (int(part) for part in match.groups())
            guards[port] = Guard(None, conns or None, addresses or None, window)
    for name, rate in rates.items():
        owner = layout.guard_port("limit", name)
        if owner is not None and name.startswith("sr_"):
            held = guards.get(owner, Guard(None, None, None, 0))
            guards[owner] = Guard(rate, held.connections, held.addresses, held.window)
    return guards


def map_elements(objects: Iterable[Json]) -> dict[int, str]:
    """Port -> what it maps to, from the listing of a map."""
    elements: dict[int, str] = {}
    for obj in objects:
        for port, target in obj.get("map", {}).get("elem", []):
            elements[int(port)] = str(target)
    return elements


def set_addresses(objects: Iterable[Json]) -> list[tuple[str, int]]:
    """(address, seconds until it expires) of each element, from the listing of an address set."""
    found: list[tuple[str, int]] = []
    for obj in objects:
        for elem in obj.get("set", {}).get("elem", []):
            value = elem.get("elem", {}) if isinstance(elem, dict) else {"val": elem}
            found.append((str(value.get("val")), int(value.get("expires", 0))))
    return found
