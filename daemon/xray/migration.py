"""Migration from shared inbounds: every client of a shared VLESS inbound gets a key, a port and
an inbound of its own.

`plan_migration` says what would happen (and why any inbound is left alone), `apply_migration`
takes the moved clients out of the config; rendering their keys' inbounds is `render`'s part
and writing the result is the caller's. Both are pure: config dicts in, a plan or a new dict
out, and running the result through `plan_migration` again gives an empty plan.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from daemon import names as names_rule
from daemon.allocator import PortRange, lowest_free
from daemon.names import fold
from daemon.xray.drift import reality_problems
from daemon.xray.model import (
    Config,
    Reality,
    XrayConfigError,
    XrayKey,
    XrayOptions,
    clients,
    inbound_port,
    inbounds_of,
    is_portmeter_inbound,
    mapping,
    parse_keys,
    port_spans,
    portmeter_inbounds,
    ports_among,
    reality_settings,
    routing_rules,
    rule_inbound_tags,
    tag_uuid,
    unix_listen,
    xray_uuid,
)
from daemon.xray.reality import reality_from_private
from daemon.xray.vlessenc import client_encryption

# The transports Xray serves REALITY on (Xray's names, lowercased as it reads them).
REALITY_NETWORKS = ("tcp", "raw", "xhttp", "splithttp", "grpc")


@dataclass(frozen=True, slots=True)
class MigrationMove:
    """One client leaving a shared inbound for an inbound and port of its own.

    `client_id` is the id as the source wrote it (a uuid, or any string of 1-30 bytes that
    Xray maps to `uuid`); `inbound` is the source inbound with this client alone: the key's
    inbound repeats it except for port and tag.
    """

    uuid: str
    name: str
    email: str
    flow: str
    source_index: int
    source_tag: str | None
    source_port: int | None
    port: int
    short_ids: tuple[str, ...] = ()
    reality: Reality | None = None
    client_id: str = ""
    inbound: Config | None = None

    def key(self, key_id: str) -> XrayKey:
        """The key to create for this client: same id, REALITY pair, short ids and inbound; the
        routing rules that name its shared inbound name it too."""
        source = self.source_tag if isinstance(self.source_tag, str) else ""
        first = next((s for s in self.short_ids if s), self.short_ids[0] if self.short_ids else "")
        extra = tuple(s for s in self.short_ids if s != first)
        return XrayKey(
            id=key_id,
            name=self.name,
            uuid=self.uuid,
            port=self.port,
            short_id=first,
            reality=self.reality,
            flow=self.flow,
            extra_short_ids=extra,
            template="" if self.inbound is None else json.dumps(self.inbound, ensure_ascii=False),
            route_sources=(source,) if source else (),
        )


@dataclass(frozen=True, slots=True)
class MigrationPlan:
    """What migrating a shared-inbound config does; empty when there is nothing left to do."""

    moves: tuple[MigrationMove, ...] = ()
    # (inbound index, client uuid) of clients dropped from a shared inbound because they already
    # have a key of their own (a second run, or the same client listed twice).
    dropped: tuple[tuple[int, str], ...] = ()
    # Indexes of shared inbounds that end up without clients and are removed.
    emptied: tuple[int, ...] = ()
    unplaced: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    # Inbounds left exactly as they are, each with the reason.
    skipped: tuple[str, ...] = ()
    # What an operator should know: renamed keys, comments a rewrite drops.
    notes: tuple[str, ...] = ()
    # Routing rules that name a shared inbound and will name its clients' keys too (and keys
    # created later: `routed` holds the tags of those shared inbounds).
    routes: tuple[str, ...] = ()
    routed: tuple[str, ...] = ()
    # What the live config loses when another file replaces it (`migrate --replace`).
    replaces: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.moves or self.dropped or self.emptied)

    def lines(self) -> list[str]:
        """The plan as an operator reads it (`portmeter migrate --dry-run`)."""
        out = []
        if self.is_empty and not self.unplaced:
            out.append(
                "nothing to migrate: no VLESS+REALITY inbound portmeter can split has a client left"
            )
        out += [
            f"move {m.client_id or m.uuid} ({m.name}) from "
            f"{m.source_tag or f'inbound #{m.source_index}'} port {m.source_port} to port {m.port}"
            for m in self.moves
        ]
        out += [
            f"drop {uuid} from inbound #{index}: it already has a key"
            for index, uuid in self.dropped
        ]
        out += [f"remove inbound #{index}: all its clients moved" for index in self.emptied]
        out += [f"cannot move {uuid}: no free port left in the range" for uuid in self.unplaced]
        out += list(self.skipped)
        out += list(self.routes)
        out += list(self.replaces)
        out += [f"note: {n}" for n in self.notes]
        out += [f"warning: {w}" for w in self.warnings]
        return out


def plan_migration(
    config: Mapping[str, Any],
    port_range: PortRange,
    taken_ports: Collection[int],
    opts: XrayOptions | None = None,
    *,
    known_uuids: Collection[str] = (),
    taken_names: Collection[str] = (),
    tags: Collection[str] | None = None,
    commented: Sequence[str] = (),
) -> MigrationPlan:
    """Give every client of every shared VLESS+REALITY inbound its own port and inbound.

    Shared inbounds are VLESS inbounds that are not portmeter's, whose security is the one
    portmeter's keys use (REALITY; "none" in test setups), or with `tags` only those. Every
    other inbound is listed as skipped and left exactly as it is, and so are shared inbounds a
    port per key cannot serve: on a unix socket, or behind a front proxy. A client keeps its id
    (as written), flow, level and email, and its key's inbound everything of the shared one but
    port, tag and the other clients; a uuid listed twice keeps the entry Xray serves, the last.
    A client whose uuid already has a portmeter inbound or is in `known_uuids` is not moved but
    dropped from the shared inbound; one this run moves from another inbound stays where it is,
    so its connection there keeps working (a key serves one inbound). Ports come from
    `port_range`, lowest first, skipping `taken_ports` and every port an inbound of the config
    listens on (ranges and lists too). Routing rules that name a shared inbound name its keys
    too (`routes`), and keys created later (`routed`: those inbounds' tags). `commented`: the
    files with comments that carrying out the plan rewrites. Linear in the clients. Running the
    plan's result through `plan_migration` again gives an empty plan.
    """
    inbounds = inbounds_of(config)
    found = _Found(
        have={xray_uuid(u) or u for u in known_uuids} | set(parse_keys(config)),
        used=set(taken_ports) | _listened(inbounds, port_range),
        names={fold(name) for name in taken_names},
        ours={tag_uuid(i.get("tag")): i for i in portmeter_inbounds(config)},
        floor=port_range.first,
    )
    security = "reality" if opts is None else opts.security
    api = config.get("api")
    api_tag = api.get("tag") if isinstance(api, Mapping) else None
    for index, inbound in enumerate(inbounds):
        reason = _not_shared(inbound, security, tags, api_tag)
        if reason is None:
            _plan_inbound(found, index, inbound, port_range)
        elif reason:
            found.skipped.append(f"skip inbound {_where(inbound, index)}: {reason}; left as it is")
    if found.moves or found.dropped or found.emptied:
        found.notes += [
            f"{path} has comments: the rewritten config will not keep them (the original stays "
            "in the pre-migration copy: `portmeter migrate --rollback` restores it byte for byte)"
            for path in commented
        ]
    routes, routed = _routes(config, found.moves)
    return MigrationPlan(
        tuple(found.moves),
        tuple(found.dropped),
        tuple(found.emptied),
        tuple(found.unplaced),
        tuple(found.warnings),
        tuple(found.skipped),
        tuple(found.notes),
        tuple(routes),
        tuple(routed),
    )


@dataclass(slots=True)
class _Found:
    """What planning has found so far, inbound after inbound."""

    have: set[str]  # uuids with a key already
    used: set[int]  # ports taken
    names: set[str]  # folded names taken
    ours: dict[str | None, Mapping[str, Any]]  # uuid -> its key's inbound in the config
    floor: int  # the lowest port that may still be free
    moving: dict[str, int] = field(default_factory=dict)  # uuid -> inbound moved from
    moves: list[MigrationMove] = field(default_factory=list)
    dropped: list[tuple[int, str]] = field(default_factory=list)
    emptied: list[int] = field(default_factory=list)
    unplaced: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _plan_inbound(
    found: _Found, index: int, inbound: Mapping[str, Any], port_range: PortRange
) -> None:
    """Plan the clients of one shared inbound: each moved, dropped, skipped or unplaced."""
    pair, short_ids = _source_reality(inbound)
    shell = _shell(inbound)
    listed = clients(inbound)
    last = {xray_uuid(c.get("id")): at for at, c in enumerate(listed)}
    shadowed: dict[str, int] = {}  # uuid -> entries before the one Xray serves
    leaving = 0
    for at, client in enumerate(listed):
        client_id = client.get("id")
        uuid = xray_uuid(client_id)
        if uuid is None:
            found.warnings.append(
                f"inbound #{index}: client id {client_id!r} is neither a uuid nor a string "
                "of 1-30 bytes; left in place"
            )
            continue
        if last[uuid] != at:
            shadowed[uuid] = shadowed.get(uuid, 0) + 1
            continue
        if shadowed.get(uuid):
            found.notes.append(_served_entry(client, inbound, index, shadowed[uuid] + 1))
        earlier = found.moving.get(uuid, index)
        if earlier != index or _served_elsewhere(found.ours.get(uuid), inbound):
            source = "another inbound" if earlier == index else f"inbound #{earlier}"
            found.skipped.append(
                f"skip client {client_id} of inbound {_where(inbound, index)}: uuid {uuid} "
                f"is already migrated from {source}; a key serves one inbound: left as it was"
            )
            continue
        if uuid in found.have:
            found.dropped.append((index, uuid))
        elif not _move(found, index, inbound, client, uuid, port_range, (pair, short_ids, shell)):
            continue
        leaving += 1 + shadowed.get(uuid, 0)
    if listed and leaving == len(listed):
        found.emptied.append(index)


def _move(
    found: _Found,
    index: int,
    inbound: Mapping[str, Any],
    client: Mapping[str, Any],
    uuid: str,
    port_range: PortRange,
    source: tuple[Reality | None, tuple[str, ...], str],
) -> bool:
    """Give the client a port and its key; False when the range has no port left."""
    # Every port below the last one given is used: the scan starts there (linear, not
    # quadratic, in the clients).
    port = lowest_free(PortRange(found.floor, port_range.last), found.used, set())
    if port is None:
        found.unplaced.append(uuid)
        return False
    pair, short_ids, shell = source
    found.used.add(port)
    found.floor = port
    found.moving[uuid] = index
    own_id = str(client["id"])  # as written: Xray reads it as `uuid` (model.is_client_of)
    email = str(client.get("email") or "")
    name, note = _key_name(email, own_id, uuid, found.names)
    if note:
        found.notes.append(f"client {own_id} of inbound {_where(inbound, index)}: {note}")
    template: Config = json.loads(shell)
    template["settings"]["clients"] = [copy.deepcopy(dict(client))]
    found.moves.append(
        MigrationMove(
            uuid,
            name,
            email,
            str(client.get("flow") or ""),
            index,
            inbound.get("tag"),
            inbound_port(inbound),
            port,
            short_ids,
            pair,
            own_id,
            template,
        )
    )
    return True


def _served_entry(client: Mapping[str, Any], inbound: Mapping[str, Any], index: int, n: int) -> str:
    """The note for a uuid listed `n` times in one inbound: Xray keeps the last entry."""
    return (
        f"client {client.get('id')} is listed {n} times in inbound {_where(inbound, index)}: "
        f"Xray serves the last entry (email {client.get('email') or ''!r}, flow "
        f"{client.get('flow') or ''!r}), and its key keeps that one"
    )


def _listened(inbounds: Sequence[object], port_range: PortRange) -> set[int]:
    """The ports of the range any inbound listens on (a port, a range or a list of them)."""
    spans = (
        span
        for inbound in inbounds
        if isinstance(inbound, Mapping) and unix_listen(inbound) is None
        for span in port_spans(inbound)
    )
    return ports_among(spans, port_range.first, port_range.last)


def _routes(
    config: Mapping[str, Any], moves: Sequence[MigrationMove]
) -> tuple[list[str], list[str]]:
    """One line per routing rule that names a shared inbound: it will name the keys too, and
    those created later; and the tags of the shared inbounds such rules name, in rule order."""
    moved: dict[str, int] = {}
    for move in moves:
        if isinstance(move.source_tag, str) and move.source_tag:
            moved[move.source_tag] = moved.get(move.source_tag, 0) + 1
    lines: list[str] = []
    routed: dict[str, None] = {}  # ordered, each once
    for at, rule in enumerate(routing_rules(config)):
        named = [tag for tag in rule_inbound_tags(rule) if tag in moved]
        if named:
            keys = sum(moved[tag] for tag in named)
            sources = ", ".join(map(repr, named))
            target = rule.get("outboundTag") or rule.get("balancerTag")
            lines.append(
                f"routing rule #{at} (inboundTag {sources} -> {target!r}) will also name the "
                f"inbounds of the {keys} keys moved from there, and of keys added later"
            )
            routed.update(dict.fromkeys(named))
    return lines, list(routed)


def replaced_parts(live: Mapping[str, Any], source: Mapping[str, Any], where: str) -> list[str]:
    """What the live config (at `where`) loses when the migration of another file `source`
    replaces it: its own inbounds the source lacks (key inbounds excepted: they are rendered
    again from the keys) and every section the source has otherwise or not at all."""
    others = [i for i in inbounds_of(source) if isinstance(i, Mapping)]
    lost = [
        f"replace {where}: its inbound {_where(inbound, index)} goes"
        for index, inbound in enumerate(inbounds_of(live))
        if not is_portmeter_inbound(inbound) and inbound not in others
    ]
    for name, value in live.items():
        if name == "inbounds":
            continue
        if name not in source:
            lost.append(f"replace {where}: its section {name!r} goes (the source has none)")
        elif source[name] != value:
            lost.append(f"replace {where}: its section {name!r} goes for the source's")
    return lost


def apply_migration(config: Mapping[str, Any], plan: MigrationPlan) -> Config:
    """`config` without the clients the plan moves or drops (and without emptied inbounds).

    Feed the result to `render_config` with the existing keys plus `move.key(...)` of each move.
    """
    result: Config = copy.deepcopy(dict(config))
    inbounds = inbounds_of(result)
    leaving: dict[int, set[str]] = {}
    for move in plan.moves:
        leaving.setdefault(move.source_index, set()).add(move.uuid)
    for index, uuid in plan.dropped:
        leaving.setdefault(index, set()).add(uuid)
    for index, uuids in leaving.items():
        if index >= len(inbounds) or not isinstance(inbounds[index], dict):
            raise XrayConfigError(
                f"the config changed since the migration was planned (inbound #{index})"
            )
        settings = inbounds[index]["settings"]
        settings["clients"] = [
            c for c in settings["clients"] if xray_uuid(c.get("id")) not in uuids
        ]
    if "inbounds" in result:
        result["inbounds"] = [i for n, i in enumerate(inbounds) if n not in set(plan.emptied)]
    return result


def _not_shared(
    inbound: object, security: str, tags: Collection[str] | None, api_tag: object
) -> str | None:
    """None for a shared inbound whose clients get keys; else why not ("" when it goes without
    saying: portmeter's own inbounds, and those not among `tags`)."""
    if not isinstance(inbound, Mapping):
        return "not a JSON object"
    if is_portmeter_inbound(inbound) or (tags is not None and inbound.get("tag") not in tags):
        return ""
    protocol = inbound.get("protocol")
    if not isinstance(protocol, str) or protocol.lower() != "vless":  # Xray reads any case
        if api_tag is not None and inbound.get("tag") == api_tag:
            return "Xray's API inbound"
        return f"protocol {protocol!r}; only VLESS clients get keys"
    stream = mapping(inbound.get("streamSettings"))
    found = str(stream.get("security") or "none")
    if found.lower() != security:
        certificates = " with certificates" if found.lower() == "tls" else ""
        wanted = "REALITY" if security == "reality" else f"security {security!r}"
        return f"VLESS with security {found!r}{certificates}; portmeter's keys use {wanted}"
    if security == "reality" and (refused := _reality_refused(stream)):
        return f"Xray refuses its REALITY settings ({refused})"
    settings = mapping(inbound.get("settings"))
    try:
        client_encryption(settings.get("decryption"))
    except ValueError as exc:
        return f"Xray refuses its VLESS settings ({exc})"
    if settings.get("decryption") != "none" and settings.get("fallbacks"):
        return (
            'Xray refuses its VLESS settings (VLESS settings: "fallbacks" can not be used '
            'together with "decryption")'
        )
    if (socket := unix_listen(inbound)) is not None:
        return (
            f"it listens on the unix socket {socket!r}, not on a port (a front proxy connects "
            "there); keys need ports of their own"
        )
    if (front := _behind_front(inbound)) is not None:
        return front
    if not clients(inbound):
        return "no clients"
    return None


def _served_elsewhere(own: Mapping[str, Any] | None, inbound: Mapping[str, Any]) -> bool:
    """The key's inbound `own` is not a copy of `inbound` (it repeats its source but port, tag
    and the other clients): the key was migrated from another inbound of its user."""
    return own is not None and _shape(own) != _shape(inbound)


def _shape(inbound: Mapping[str, Any]) -> dict[str, Any]:
    settings = {k: v for k, v in mapping(inbound.get("settings")).items() if k != "clients"}
    return {k: v for k, v in inbound.items() if k not in ("port", "tag")} | {"settings": settings}


def _key_name(email: str, own_id: str, uuid: str, taken: set[str]) -> tuple[str, str]:
    """The name of a moved client's key (its email, else its own id) and, when that name had
    to change, a note saying why ("" otherwise). The name is added to `taken`."""
    wanted = email or (own_id if own_id != uuid else f"client-{uuid[:8]}")
    usable = names_rule.usable(wanted, f"client-{uuid[:8]}")
    name = _unique_name(usable, taken)
    if name == wanted:
        return name, ""
    why = "is taken (another key or client)"
    if usable != wanted:
        why = f"breaks the name rule ({names_rule.RULE})"
    return name, f"the name {wanted!r} {why}, so its key is named {name!r}"


def _where(inbound: object, index: int) -> str:
    """An inbound as the plan names it: tag (or position), protocol and port."""
    if not isinstance(inbound, Mapping):
        return f"#{index}"
    tag = inbound.get("tag")
    name = repr(tag) if tag else f"#{index}"
    return f"{name} ({inbound.get('protocol', '?')}, port {inbound.get('port')})"


def _source_reality(inbound: Mapping[str, Any]) -> tuple[Reality | None, tuple[str, ...]]:
    """The REALITY pair and short ids the clients of a shared inbound use (None, (): none)."""
    settings = reality_settings(inbound)
    try:
        pair = reality_from_private(settings.get("privateKey"))  # type: ignore[arg-type]
    except ValueError:
        return None, ()
    # Hex in either case is one short id to Xray; the key's own are written in lower case.
    short_ids = tuple(s.lower() for s in settings.get("shortIds") or [] if isinstance(s, str))
    return pair, short_ids


def _reality_refused(stream: Mapping[str, Any]) -> str:
    """Why Xray refuses REALITY on this stream, in its words ("" when it takes it): the
    transport first, then the settings (drift.reality_problems)."""
    network = str(stream.get("network") or "tcp").lower()
    if network not in REALITY_NETWORKS:
        return "REALITY only supports RAW, XHTTP and gRPC for now."
    problems = reality_problems(mapping(stream.get("realitySettings")))
    return "; ".join(problems)


def _behind_front(inbound: Mapping[str, Any]) -> str | None:
    """Why the inbound is behind a front proxy (None: it is not). One that listens on a
    loopback address only, or takes the PROXY protocol, is reached through something that
    forwards to its port; keys on ports of their own would cut every client off."""
    listen = inbound.get("listen")
    local = isinstance(listen, str) and _loopback(listen)
    proxied = _accepts_proxy_protocol(mapping(inbound.get("streamSettings")))
    if not (local or proxied):
        return None
    port = inbound.get("port")
    if local and proxied:
        where = f"it listens on {listen} port {port} only and accepts the PROXY protocol"
    elif local:
        where = f"it listens on {listen} port {port} only"
    else:
        where = f"it accepts the PROXY protocol on port {port}"
    return (
        f"{where}: a front proxy (nginx, HAProxy) forwards its clients to that port and would "
        "not reach keys on ports of their own"
    )


def _loopback(listen: str) -> bool:
    if listen.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(listen.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def _accepts_proxy_protocol(stream: Mapping[str, Any]) -> bool:
    """`acceptProxyProtocol` set in sockopt or in the transport's settings (Xray reads both)."""
    return any(
        mapping(value).get("acceptProxyProtocol") is True
        for name, value in stream.items()
        if name == "sockopt" or name.endswith("Settings")
    )


def _shell(inbound: Mapping[str, Any]) -> str:
    """The shared inbound without its clients, as JSON: each moved client's template is this
    with the client put in, so making them costs the clients once, not once per client."""
    settings = {k: [] if k == "clients" else v for k, v in mapping(inbound.get("settings")).items()}
    return json.dumps({**inbound, "settings": settings}, ensure_ascii=False)


def _unique_name(wanted: str, taken: set[str]) -> str:
    """`wanted`, or `wanted-N`, so that no two names are the same name (`taken` is folded)."""
    name, n = wanted, 2
    while fold(name) in taken:
        name, n = f"{wanted}-{n}", n + 1
    taken.add(fold(name))
    return name
