"""What portmeter's table holds, described once, and both its encodings. Pure.

The description (README "How it counts" and "Speed, connection and device limits"):

- per port, named counters `rx_<port>` and `tx_<port>` behind the maps rx and tx; with a quota
  (a limit, or a disabled or expired key) also the quota `q_<port>`, shared by both directions,
  and the counter `drop_<port>`, behind the maps quota and dropped;
- with a speed limit, the `limit` objects `sr_<port>` / `st_<port>` behind the maps speed_rx and
  speed_tx; with connection or address limits, a chain of the port's own (`GuardChain`) reached
  through the verdict map guard;
- two chains on the hooks (`HOOKS`, `hook_rules`): other protocols out, the guard (input) or the
  resets portmeter sends (output), the speed, the quota, the count. A packet a limit drops is
  neither charged to the quota nor counted as usage. (The quota's own `used` also grows with
  dropped packets; that is why a changed limit replaces the quota object with the usage from
  state.)

From it come libnftables JSON, to build the whole table in one transaction (`build_commands`) and
to clear a port's leftovers (`leftover_commands`), and nf_tables netlink messages, to change one
port in one transaction at any number of keys (`Transaction`). A listing is checked against it
(`problems`), and `fingerprint` keeps what the netlink reads at every poll see of it.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from daemon.bounds import MAX_KERNEL_QUOTA, MAX_U64
from daemon.kernel import OutOfRange
from daemon.limits import Guard, Quota
from daemon.nft import codec as nl
from daemon.nft.exprs import (
    ACCEPT,
    DROP,
    RETURN,
    ByPort,
    ConnectionsOver,
    Count,
    Json,
    JumpByPort,
    L4Proto,
    NetlinkRule,
    NewConnection,
    NfProto,
    RememberSource,
    Rule,
    TcpFlag,
    TcpReset,
    json_rule,
    netlink_rule,
)
from daemon.nft.netlink import Batch

FAMILY = "inet"
# Priority "mangle" (-150): before filter tables, so ports count even when a later chain drops.
HOOK_PRIORITY = -150
DIRECTIONS = ("rx", "tx")

# --- names ---------------------------------------------------------------------------------

OBJECT_NAME = re.compile(r"^(rx|tx|drop|q|refused|ipref)_(\d{1,5})$")
GUARD_CHAIN = re.compile(r"^g_(\d{1,5})_(\d+)_(\d+)_(\d+)$")
GUARD_OBJECT = re.compile(r"^(a4|a6|sr|st)_(\d{1,5})$")
# The objects a port may have, as a reading asks for them by name: (prefix, object type).
PORT_OBJECTS = (
    ("rx", nl.OBJECT_COUNTER),
    ("tx", nl.OBJECT_COUNTER),
    ("drop", nl.OBJECT_COUNTER),
    ("q", nl.OBJECT_QUOTA),
    ("refused", nl.OBJECT_COUNTER),
    ("ipref", nl.OBJECT_COUNTER),
)
OBJECT_KINDS = {nl.OBJECT_COUNTER: "counter", nl.OBJECT_QUOTA: "quota", nl.OBJECT_LIMIT: "limit"}


def object_name(kind: str, port: int) -> str:
    return f"{kind}_{port}"


def port_of(name: str) -> int | None:
    match = OBJECT_NAME.match(name)
    return int(match.group(2)) if match else None


def guard_port(kind: str, name: str) -> int | None:
    """The port a guard's chain, address set or limit object belongs to, by its name."""
    match = (GUARD_CHAIN if kind == "chain" else GUARD_OBJECT).match(name)
    if match is None:
        return None
    return int(match.group(1 if kind == "chain" else 2))


# --- maps ----------------------------------------------------------------------------------
# Every map is keyed by port (inet_service); the value: the kind of object it names.

MAPS = {"rx": "counter", "tx": "counter", "quota": "quota", "dropped": "counter"}
MAP_PREFIX = {"rx": "rx", "tx": "tx", "quota": "q", "dropped": "drop"}
QUOTA_MAPS = ("quota", "dropped")
SPEED_MAPS = {"rx": "speed_rx", "tx": "speed_tx"}
SPEED_PREFIX = {"rx": "sr", "tx": "st"}
GUARD_MAP = "guard"
GUARD_MAPS = {SPEED_MAPS["rx"]: "limit", SPEED_MAPS["tx"]: "limit", GUARD_MAP: "verdict"}
ALL_MAPS = {**MAPS, **GUARD_MAPS}

# --- the chains on the hooks ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hook:
    """A chain on a hook, named after it, counting one direction by one port field."""

    name: str
    direction: str
    field: str


HOOKS = (Hook("input", "rx", "dport"), Hook("output", "tx", "sport"))
# First in each chain: a packet that is neither TCP nor UDP has no port of ours, so the chain ends
# for it at once (as its policy would) and the rules after it need no protocol test of their own:
# two comparisons per packet instead of an anonymous set lookup in every rule (README "Data path
# cost").
SKIP_OTHERS: Rule = (L4Proto("tcp", equal=False), L4Proto("udp", equal=False), ACCEPT)
# First in the output chain after it: the reset the kernel sends when portmeter closes a stopped
# key's connection (README "Limits, expiry and resets") leaves even when the key's limits drop
# all else, so the client learns at once; it is counted as usage like every packet that leaves.
RESET_LEAVES: Rule = (TcpFlag("rst"), ByPort("counter", "sport", "tx", protocol="tcp"), ACCEPT)


def hook_rules(hook: Hook) -> tuple[Rule, ...]:
    """The rules of a hooked chain, in order: other protocols out, the guards (input) or the
    resets (output), the speed limit, the quota, the count."""
    port = hook.field
    guard: Rule = (JumpByPort(port, GUARD_MAP),)
    speed: Rule = (ByPort("limit", port, SPEED_MAPS[hook.direction]), DROP)
    enforce: Rule = (ByPort("quota", port, "quota"), ByPort("counter", port, "dropped"), DROP)
    count: Rule = (ByPort("counter", port, hook.direction),)
    return (SKIP_OTHERS, guard if hook.direction == "rx" else RESET_LEAVES, speed, enforce, count)


# --- a port's objects and its guard chain ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortObjects:
    """What a port has without its guard: counters, the quota's name, the maps that name them."""

    counters: tuple[str, ...]
    quota: str | None
    maps: tuple[str, ...]


def port_objects(port: int, limited: bool) -> PortObjects:
    """A port's objects; `limited`: it has a quota (and so the counter of dropped bytes)."""
    kinds = (*DIRECTIONS, "drop") if limited else DIRECTIONS
    return PortObjects(
        tuple(object_name(kind, port) for kind in kinds),
        object_name("q", port) if limited else None,
        tuple(MAPS) if limited else DIRECTIONS,
    )


@dataclass(frozen=True, slots=True)
class GuardChain:
    """A port's chain of connection and address limits, with the counters and address sets its
    rules use. Its name holds its limits, so a listing shows what the kernel holds."""

    name: str
    counters: tuple[str, ...]
    sets: tuple[tuple[str, int], ...]  # (name, IP version)
    size: int  # of each address set
    timeout: int  # seconds an address stays in its set
    rules: tuple[NetlinkRule, ...]


def guard_chain(port: int, guard: Guard) -> GuardChain:
    """A new TCP connection over the limit is reset; a packet from an address that finds no
    place left in the port's address sets is refused (TCP reset, UDP dropped). They count in
    `refused_<port>` and `ipref_<port>`."""
    tcp = L4Proto("tcp")
    rules: list[NetlinkRule] = []
    counters: list[str] = []
    sets: list[tuple[str, int]] = []
    if guard.connections is not None:
        counters.append(object_name("refused", port))
        over = ConnectionsOver(guard.connections)
        rules.append((tcp, NewConnection(), over, Count(counters[-1]), TcpReset()))
    if guard.addresses is not None:
        counters.append(object_name("ipref", port))
        sets = [(f"a4_{port}", 4), (f"a6_{port}", 6)]
        rules += [(NfProto(v), RememberSource(v, name), RETURN) for name, v in sets]
        rules += [(Count(counters[-1]),), (tcp, TcpReset()), (DROP,)]
    name = f"g_{port}_{guard.connections or 0}_{guard.addresses or 0}_{guard.window}"
    return GuardChain(
        name, tuple(counters), tuple(sets), guard.addresses or 0, guard.window, tuple(rules)
    )


def chain_part(guard: Guard | None) -> Guard | None:
    """A guard's connection and address limits alone (what its chain holds), or None."""
    if guard is None or not guard.chain:
        return None
    return Guard(None, guard.connections, guard.addresses, guard.window)


def rate_of(guard: Guard | None) -> int | None:
    return None if guard is None else guard.rate


def checked_quota(name: str, quota: Quota) -> Quota:
    """`quota` if the kernel can hold it: a limit up to 2^63 - 1, usage up to the limit."""
    if not 0 <= quota.limit <= MAX_KERNEL_QUOTA:
        raise OutOfRange(f"{name}: a limit of {quota.limit} bytes is outside 0..{MAX_KERNEL_QUOTA}")
    if not 0 <= quota.used <= quota.limit:
        raise OutOfRange(f"{name}: usage {quota.used} is outside 0..{quota.limit} (its limit)")
    return quota


# --- libnftables JSON: the whole table, and a port's leftovers -------------------------------


def build_commands(
    table: str, ports: Mapping[int, Quota | None], guards: Mapping[int, Guard]
) -> list[Json]:
    """(Re)create the whole table with fresh counters and quotas for `ports` and the given
    guards (of ports among them), in one transaction."""
    ref = {"family": FAMILY, "table": table}
    named = {"family": FAMILY, "name": table}
    commands: list[Json] = [
        {"add": {"table": named}},
        {"delete": {"table": named}},
        {"add": {"table": named}},
    ]
    for name, kind in ALL_MAPS.items():
        commands.append(
            {"add": {"map": {**ref, "name": name, "type": "inet_service", "map": kind}}}
        )
    for hook in HOOKS:
        chain = {"name": hook.name, "type": "filter", "hook": hook.name, "prio": HOOK_PRIORITY}
        commands.append({"add": {"chain": {**ref, **chain, "policy": "accept"}}})
        for rule in hook_rules(hook):
            commands.append({"add": {"rule": {**ref, "chain": hook.name, "expr": json_rule(rule)}}})
    for port, quota in sorted(ports.items()):
        commands += _port_commands(ref, port, quota)
    for port, guard in sorted(guards.items()):
        commands += _guard_commands(ref, port, guard)
    return commands


def _port_commands(ref: Mapping[str, str], port: int, quota: Quota | None) -> list[Json]:
    made = port_objects(port, quota is not None)
    items: list[Json] = [{"counter": {**ref, "name": name}} for name in made.counters]
    if made.quota is not None and quota is not None:
        checked_quota(made.quota, quota)
        spec = {"name": made.quota, "bytes": quota.limit, "used": quota.used, "inv": True}
        items.append({"quota": {**ref, **spec}})
    items += [_element(ref, name, [port]) for name in made.maps]
    return [{"add": item} for item in items]


def _guard_commands(ref: Mapping[str, str], port: int, guard: Guard) -> list[Json]:
    """What `build` adds for a port's guard (a change later goes over netlink: Transaction)."""
    objects: list[Json] = []
    elements: list[Json] = []
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
        objects += [{"counter": {**ref, "name": name}} for name in chain.counters]
        for name, version in chain.sets:
            spec = {"type": f"ipv{version}_addr", "flags": ["timeout"], "size": chain.size}
            objects.append({"set": {**ref, "name": name, **spec, "timeout": chain.timeout}})
        objects.append({"chain": {**ref, "name": chain.name}})
        objects += [
            {"rule": {**ref, "chain": chain.name, "expr": json_rule(r)}} for r in chain.rules
        ]
        jump = [[port, {"jump": {"target": chain.name}}]]
        elements.append({"element": {**ref, "name": GUARD_MAP, "elem": jump}})
    return [{"add": item} for item in objects + elements]


def _element(ref: Mapping[str, str], map_name: str, ports: Sequence[int]) -> Json:
    elem = [[p, object_name(MAP_PREFIX[map_name], p)] for p in ports]
    return {"element": {**ref, "name": map_name, "elem": elem}}


def leftover_commands(
    table: str,
    objects: Sequence[Json],
    elements: Mapping[str, Mapping[int, str]],
    wanted: AbstractSet[int],
) -> list[Json]:
    """Deletions of whatever a listing (`objects`, and the maps' `elements`) shows of the
    `wanted` ports, however half-made: map elements first (an object in use cannot go), then
    the guards' chains, sets and limit objects, then the counters and quotas."""
    ref = {"family": FAMILY, "table": table}
    commands: list[Json] = []
    for name in MAPS:
        present = sorted(wanted & set(elements.get(name, {})))
        if present:
            commands.append({"delete": _element(ref, name, present)})
    for name in GUARD_MAPS:
        present = sorted(wanted & set(elements.get(name, {})))
        if present:
            commands.append({"delete": {"element": {**ref, "name": name, "elem": present}}})
    found = [
        (kind, obj[kind]["name"])
        for kind in ("chain", "set", "limit")
        for obj in objects
        if kind in obj and guard_port(kind, obj[kind]["name"]) in wanted
    ]
    commands += [{"flush": {"chain": {**ref, "name": n}}} for kind, n in found if kind == "chain"]
    commands += [{"delete": {kind: {**ref, "name": name}}} for kind, name in found]
    for obj in objects:
        for kind in ("counter", "quota"):
            if kind in obj and port_of(obj[kind]["name"]) in wanted:
                commands.append({"delete": {kind: {**ref, "name": obj[kind]["name"]}}})
    return commands


# --- netlink: a change to one port, one transaction ------------------------------------------


class Transaction(Batch):
    """Changes to the table's ports as nf_tables messages, applied together or not at all."""

    def __init__(self, table: str) -> None:
        super().__init__(table)
        self._set_ids = itertools.count(1)

    def install(self, port: int, quota: Quota | None) -> None:
        """Fresh counters (and the quota) of `port`, with their map elements."""
        made = port_objects(port, quota is not None)
        for name in made.counters:
            self.new_counter(name)
        if made.quota is not None and quota is not None:
            self.new_quota(made.quota, quota)
        for name in made.maps:
            self.map_element(True, name, port)

    def remove(self, port: int, limited: bool) -> None:
        """The map elements, counters and quota of `port` (`limited`: it has a quota)."""
        made = port_objects(port, limited)
        for name in made.maps:
            self.map_element(False, name, port)
        for name in made.counters:
            self.delete_object(nl.OBJECT_COUNTER, name)
        if made.quota is not None:
            self.delete_object(nl.OBJECT_QUOTA, made.quota)

    def quota(self, port: int, limited: bool, quota: Quota | None) -> None:
        """Replace, install or lift the quota of `port` (`limited`: it has one now) with its
        counter of dropped bytes and their map elements."""
        if limited:
            for name in QUOTA_MAPS:
                self.map_element(False, name, port)
            self.delete_object(nl.OBJECT_QUOTA, object_name("q", port))
            if quota is None:
                self.delete_object(nl.OBJECT_COUNTER, object_name("drop", port))
        if quota is not None:
            if not limited:
                self.new_counter(object_name("drop", port))
            self.new_quota(object_name("q", port), quota)
            for name in QUOTA_MAPS:
                self.map_element(True, name, port)

    def speed(self, port: int, old: int | None, new: int | None) -> None:
        """Replace the limit objects of a port's speed (`old` -> `new` bytes/s, either None)."""
        for direction in DIRECTIONS:
            name = object_name(SPEED_PREFIX[direction], port)
            if old is not None:
                self.element(SPEED_MAPS[direction], port, None)
                self.delete_object(nl.OBJECT_LIMIT, name)
            if new is not None:
                self.new_limit(name, new)
                self.element(SPEED_MAPS[direction], port, name)

    def guard_chain(self, port: int, old: Guard | None, new: Guard | None) -> None:
        """Replace the chain of a port's connection and address limits (`old` -> `new`, either
        None), with its verdict map element, address sets and refusal counters."""
        if old is not None:
            self._drop_chain(port, guard_chain(port, old))
        if new is not None:
            self._make_chain(port, guard_chain(port, new))

    def _drop_chain(self, port: int, chain: GuardChain) -> None:
        self._jump(port, None)
        rules = self.named(nl.RULE_TABLE, nl.RULE_CHAIN, chain.name)
        self.add(f"flush chain {chain.name}", nl.DELRULE, 0, rules)
        named = self.named(nl.CHAIN_TABLE, nl.CHAIN_NAME, chain.name)
        self.add(f"delete chain {chain.name}", nl.DELCHAIN, 0, named)
        for name, _version in chain.sets:
            self.add(
                f"delete set {name}", nl.DELSET, 0, self.named(nl.SET_TABLE, nl.SET_NAME, name)
            )
        for counter in chain.counters:
            self.delete_object(nl.OBJECT_COUNTER, counter)

    def _make_chain(self, port: int, chain: GuardChain) -> None:
        for counter in chain.counters:
            self.new_counter(counter)
        set_ids: dict[str, int] = {}
        for name, version in chain.sets:
            set_ids[name] = next(self._set_ids)
            attrs = nl.address_set_attrs(
                self.table, name, version, chain.size, chain.timeout * 1000, set_ids[name]
            )
            self.add(f"create set {name}", nl.NEWSET, nl.CREATE | nl.EXCL, attrs)
        named = self.named(nl.CHAIN_TABLE, nl.CHAIN_NAME, chain.name)
        self.add(f"create chain {chain.name}", nl.NEWCHAIN, nl.CREATE | nl.EXCL, named)
        for rule in chain.rules:
            attrs = nl.rule_message_attrs(self.table, chain.name, netlink_rule(rule, set_ids))
            self.add(f"add rule to {chain.name}", nl.NEWRULE, nl.CREATE | nl.APPEND, attrs)
        self._jump(port, chain.name)

    def _jump(self, port: int, chain: str | None) -> None:
        """Add `port` -> jump `chain` to the guard map, or delete `port` from it (None)."""
        attrs = (
            nl.attr(nl.ELEM_LIST_TABLE, nl.text(self.table))
            + nl.attr(nl.ELEM_LIST_SET, nl.text(GUARD_MAP))
            + nl.nest(nl.ELEM_LIST_ELEMENTS, nl.jump_element(port, chain))
        )
        what = f"{'add' if chain else 'delete'} element {port} of map {GUARD_MAP}"
        self.add(what, nl.NEWSETELEM if chain else nl.DELSETELEM, nl.CREATE if chain else 0, attrs)

    def new_counter(self, name: str) -> None:
        self._object(
            f"create counter {name}", nl.NEWOBJ, nl.OBJECT_COUNTER, name, nl.counter_data()
        )

    def new_quota(self, name: str, quota: Quota) -> None:
        checked_quota(name, quota)
        data = nl.quota_data(quota.limit, quota.used)
        self._object(f"create quota {name}", nl.NEWOBJ, nl.OBJECT_QUOTA, name, data)

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
        self.add(what, nl.NEWSETELEM if add else nl.DELSETELEM, nl.CREATE if add else 0, attrs)

    def _object(self, what: str, kind: int, obj_type: int, name: str, data: bytes = b"") -> None:
        attrs = self.named(nl.OBJ_TABLE, nl.OBJ_NAME, name) + nl.attr(
            nl.OBJ_TYPE, nl.be32(obj_type)
        )
        self.add(what, kind, nl.CREATE | nl.EXCL if kind == nl.NEWOBJ else 0, attrs + data)


# --- the check: a listing against the description, and the fingerprint -----------------------


def problems(
    maps: Mapping[str, Mapping[str, Any]],
    chains: Mapping[str, Mapping[str, Any]],
    rules: Mapping[str, Sequence[Sequence[Any]]],
) -> list[str]:
    """What a listing (maps, chains and each chain's rules by name) shows differing from the
    layout `build_commands` makes, so a damaged table can be rebuilt."""
    found = []
    for name, kind in ALL_MAPS.items():
        spec = maps.get(name)
        if spec is None or spec.get("type") != "inet_service" or spec.get("map") != kind:
            found.append(f"map {name} is missing or has the wrong type")
    for hook in HOOKS:
        chain = chains.get(hook.name)
        if chain is None or chain.get("hook") != hook.name:
            found.append(f"chain {hook.name} is missing or not attached to the {hook.name} hook")
        if rules.get(hook.name, []) != [json_rule(rule) for rule in hook_rules(hook)]:
            found.append(
                f"chain {hook.name} does not hold exactly the enforcing and counting rules"
            )
    return found


# What the netlink reads at every poll compare: the maps by name, the hooked chains and their
# rules. The guards' own sets and chains (one per limited key) are not read at every poll.
FINGERPRINTED_MAPS = tuple(sorted(ALL_MAPS))
FINGERPRINTED_CHAINS = tuple(hook.name for hook in HOOKS)
Attrs = tuple[bytes | None, ...]


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """The table's structure as netlink shows it: any change to its maps, chains or rules
    alters it."""

    handle: int
    sets: tuple[Attrs | None, ...]
    chains: tuple[Attrs | None, ...]
    rules: tuple[Attrs, ...]


def fingerprint(
    handle: int,
    sets: Iterable[Mapping[int, bytes] | None],
    chains: Iterable[Mapping[int, bytes] | None],
    rules: Iterable[Mapping[int, bytes]],
) -> Fingerprint:
    """The fingerprint of what netlink read: the FINGERPRINTED_MAPS, FINGERPRINTED_CHAINS and
    the rules of those chains, each as the attributes that define it."""
    set_keys = (
        nl.SET_NAME,
        nl.SET_FLAGS,
        nl.SET_KEY_TYPE,
        nl.SET_KEY_LEN,
        nl.SET_DATA_TYPE,
        nl.SET_OBJ_TYPE,
    )
    chain_keys = (nl.CHAIN_NAME, nl.CHAIN_HOOK, nl.CHAIN_POLICY, nl.CHAIN_TYPE)
    return Fingerprint(
        handle,
        tuple(None if s is None else nl.selected(s, set_keys) for s in sets),
        tuple(None if c is None else nl.selected(c, chain_keys) for c in chains),
        tuple(nl.selected(r, (nl.RULE_CHAIN, nl.RULE_EXPRESSIONS)) for r in rules),
    )
