"""Migration from shared inbounds: every client of a shared VLESS inbound gets a key, a port and
an inbound of its own.

`plan_migration` says what would happen (and why any inbound is left alone), `apply_migration`
takes the moved clients out of the config; rendering their keys' inbounds is `render`'s part
and writing the result is the caller's. Both are pure: config dicts in, a plan or a new dict
out, and running the result through `plan_migration` again gives an empty plan.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
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
    is_client_of,
    is_portmeter_inbound,
    mapping,
    parse_keys,
    portmeter_inbounds,
    reality_settings,
    tag_uuid,
    xray_uuid,
)
from daemon.xray.reality import reality_from_private


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
        """The key to create for this client: same id, REALITY pair, short ids and inbound."""
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

    @property
    def is_empty(self) -> bool:
        return not (self.moves or self.dropped or self.emptied)

    def lines(self) -> list[str]:
        """The plan as an operator reads it (`portmeter migrate --dry-run`)."""
        out = []
        if self.is_empty and not self.unplaced:
            out.append("nothing to migrate: every VLESS+REALITY client already has its own inbound")
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
    other inbound is listed as skipped and left exactly as it is. A client keeps its id, flow,
    level and email, and its key's inbound everything of the shared one but port, tag and the
    other clients. A client whose uuid already has a portmeter inbound or is in `known_uuids`
    is not moved but dropped from the shared inbound; one this run moves from another inbound
    stays where it is, so its connection there keeps working (a key serves one inbound). Ports
    come from `port_range`, lowest first, skipping `taken_ports` and every port an inbound of
    the config uses. `commented`: the files with comments that carrying out the plan rewrites.
    Running the plan's result through `plan_migration` again gives an empty plan.
    """
    inbounds = inbounds_of(config)
    have = {xray_uuid(u) or u for u in known_uuids} | set(parse_keys(config))
    used = set(taken_ports) | {
        p for i in inbounds if isinstance(i, Mapping) if (p := inbound_port(i))
    }
    names = {fold(name) for name in taken_names}
    moving: dict[str, int] = {}  # uuid -> the inbound it is moved from in this run
    # uuid -> its key's inbound: a key migrated earlier from another inbound of the same user
    ours = {tag_uuid(i.get("tag")): i for i in portmeter_inbounds(config)}
    moves: list[MigrationMove] = []
    dropped: list[tuple[int, str]] = []
    emptied: list[int] = []
    unplaced: list[str] = []
    warnings: list[str] = []
    skipped: list[str] = []
    notes: list[str] = []
    security = "reality" if opts is None else opts.security
    api = config.get("api")
    api_tag = api.get("tag") if isinstance(api, Mapping) else None
    for index, inbound in enumerate(inbounds):
        reason = _not_shared(inbound, security, tags, api_tag)
        if reason is not None:
            if reason:
                skipped.append(f"skip inbound {_where(inbound, index)}: {reason}; left as it is")
            continue
        pair, short_ids = _source_reality(inbound)
        leaving = 0
        found = clients(inbound)
        for client in found:
            client_id = client.get("id")
            uuid = xray_uuid(client_id)
            if uuid is None:
                warnings.append(
                    f"inbound #{index}: client id {client_id!r} is neither a uuid nor a string "
                    "of 1-30 bytes; left in place"
                )
                continue
            earlier = moving.get(uuid, index)
            if earlier != index or _served_elsewhere(ours.get(uuid), inbound):
                source = "another inbound" if earlier == index else f"inbound #{earlier}"
                skipped.append(
                    f"skip client {client_id} of inbound {_where(inbound, index)}: uuid {uuid} "
                    f"is already migrated from {source}; a key serves one inbound: left as it was"
                )
                continue
            if uuid in have or uuid in moving:
                dropped.append((index, uuid))
                leaving += 1
                continue
            port = lowest_free(port_range, used, set())
            if port is None:
                unplaced.append(uuid)
                continue
            used.add(port)
            moving[uuid] = index
            own_id = str(client_id) if is_client_of(client_id, uuid) else uuid
            email = str(client.get("email") or "")
            name, note = _key_name(email, own_id, uuid, names)
            if note:
                notes.append(f"client {own_id} of inbound {_where(inbound, index)}: {note}")
            moves.append(
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
                    _template(inbound, {**client, "id": own_id}),
                )
            )
            leaving += 1
        if found and leaving == len(found):
            emptied.append(index)
    if moves or dropped or emptied:
        notes += [
            f"{path} has comments: the rewritten config will not keep them (the original stays "
            "in the pre-migration copy: `portmeter migrate --rollback` restores it byte for byte)"
            for path in commented
        ]
    return MigrationPlan(
        tuple(moves),
        tuple(dropped),
        tuple(emptied),
        tuple(unplaced),
        tuple(warnings),
        tuple(skipped),
        tuple(notes),
    )


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
    if protocol != "vless":
        if api_tag is not None and inbound.get("tag") == api_tag:
            return "Xray's API inbound"
        return f"protocol {protocol!r}; only VLESS clients get keys"
    stream = mapping(inbound.get("streamSettings"))
    found = str(stream.get("security") or "none")
    if found != security:
        certificates = " with certificates" if found == "tls" else ""
        wanted = "REALITY" if security == "reality" else f"security {security!r}"
        return f"VLESS with security {found!r}{certificates}; portmeter's keys use {wanted}"
    if security == "reality" and (problems := reality_problems(reality_settings(inbound))):
        return f"its REALITY settings are incomplete ({problems[0]})"
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
    short_ids = tuple(s for s in settings.get("shortIds") or [] if isinstance(s, str))
    return pair, short_ids


def _template(inbound: Mapping[str, Any], client: Mapping[str, Any]) -> Config:
    """The inbound a moved client's key gets: the shared one with `client` as its only client."""
    template: Config = copy.deepcopy(dict(inbound))
    template["settings"] = {**template["settings"], "clients": [copy.deepcopy(dict(client))]}
    return template


def _unique_name(wanted: str, taken: set[str]) -> str:
    """`wanted`, or `wanted-N`, so that no two names are the same name (`taken` is folded)."""
    name, n = wanted, 2
    while fold(name) in taken:
        name, n = f"{wanted}-{n}", n + 1
    taken.add(fold(name))
    return name
