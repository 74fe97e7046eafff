"""The words every Xray module shares: errors, options, keys, and which inbounds are portmeter's.

Which inbounds are portmeter's is decided by one strict rule, so nothing the operator wrote is
ever rewritten or deleted: protocol "vless", tag "inbound-<uuid>" with the uuid in canonical
lowercase form, and exactly one client whose id is that uuid. Everything else in the config
(other inbounds, outbounds, routing, log, api, stats, policy ...) belongs to the operator and is
carried over unchanged. An inbound that only looks like ours (right tag, other client) is the
operator's too; if it collides with a key, validation refuses the config instead of deleting it.
The accessors at the end read the optional parts of a config without trusting their types.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from uuid import UUID, uuid5

ApplyMode = Literal["none", "restart", "api"]
Security = Literal["reality", "none"]
Config = dict[str, Any]

TAG_PREFIX = "inbound-"
KEY_FILE_PREFIX = "pm-"  # key files in PORTMETER_XRAY_CONFDIR
SHORT_ID = re.compile(r"^(?:[0-9a-f]{2}){0,8}\Z")  # \Z: no trailing newline
PORT_SPAN = re.compile(r"(\d{1,5})(?:\s*-\s*(\d{1,5}))?\Z")
HEX_GROUP = re.compile(rb"[0-9a-fA-F]+")


class XrayError(Exception):
    """Base of the Xray errors; every message is one line an operator can act on."""


class XrayConfigError(XrayError):
    """A config cannot be read, rendered or validated; the live file was left untouched."""


class XrayStorageError(XrayError):
    """Writing the config or a backup failed (disk full, permissions); the live file is intact."""


class XrayApplyError(XrayError):
    """Xray did not take the change (restart or API call failed); the message says why."""


# --- options and keys ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class XrayOptions:
    """Everything the Xray code needs from the settings; built by the service, passed explicitly."""

    config_path: Path
    xray_bin: Path
    apply: ApplyMode = "none"
    restart_command: tuple[str, ...] = ("systemctl", "restart", "xray")
    # Outside the default key range 10001-10100, so the API inbound never competes with keys.
    api_address: str = "127.0.0.1:62789"
    backups: int = 10
    reality_dest: str = ""
    reality_server_names: tuple[str, ...] = ()
    flow: str = "xtls-rprx-vision"
    # "none" is for tests only: Debian's v2ray has VLESS but no REALITY.
    security: Security = "reality"
    public_host: str = ""
    fingerprint: str = "chrome"
    listen: str | None = None
    # Milliseconds in Xray; 0 switches the clock check off (Xray's default).
    max_time_diff: int = 0
    command_timeout: float = 30.0
    # The group Xray runs as (PORTMETER_XRAY_GROUP): the config is then 0640 root:group and a
    # directory portmeter creates for it 0750 root:group. None: see
    # xray_io.files.XrayFiles._mode_and_owner.
    file_group: int | None = None

    @property
    def server_names(self) -> tuple[str, ...]:
        """SNI values clients may use; the dest's host name when none are configured."""
        if self.reality_server_names:
            return self.reality_server_names
        host = split_host_port(self.reality_dest)[0] if self.reality_dest else ""
        return (host,) if host else ()


@dataclass(frozen=True, slots=True)
class Reality:
    """An X25519 key pair, both halves base64url without padding, as `xray x25519` prints them."""

    private_key: str
    public_key: str


@dataclass(frozen=True, slots=True)
class XrayKey:
    """What rendering needs of one key. `uuid` is normalised to the canonical lowercase form.

    `reality` overrides the server's key pair for this key; `flow` overrides the configured
    flow; `extra_short_ids` are accepted by the server but never put in links (kept for
    clients migrated from a shared inbound that used several short ids).

    `template` (JSON text) is set for a key migrated from an operator's inbound: that inbound
    with this client alone, which the key's inbound repeats except for port and tag (README,
    section Xray). Its client's id is the one the client had, which Xray maps to `uuid`.
    """

    id: str
    name: str
    uuid: str
    port: int
    short_id: str = ""
    reality: Reality | None = None
    flow: str | None = None
    extra_short_ids: tuple[str, ...] = ()
    template: str = ""
    # Tags of shared inbounds a migration replaced: routing rules naming one name the key's
    # inbound too (render.route_keys). A migrated key has its own source's; a key created after
    # a migration has those of every source whose rules it rewrote.
    route_sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "uuid", str(UUID(str(self.uuid))))
        if self.template:
            _check_template(self.template, self.uuid, self.id)
        if not 1 <= self.port <= 65535:
            raise ValueError(f"key {self.id}: port {self.port} is not in 1-65535")
        for short_id in (self.short_id, *self.extra_short_ids):
            try:
                check_short_id(short_id)
            except ValueError as exc:
                raise ValueError(f"key {self.id}: {exc}") from None

    @property
    def tag(self) -> str:
        return inbound_tag(self.uuid)

    @property
    def short_ids(self) -> list[str]:
        return [self.short_id, *self.extra_short_ids]


def check_short_id(short_id: str) -> str:
    """A REALITY short id as Xray takes it; ValueError otherwise."""
    if not SHORT_ID.match(short_id):
        raise ValueError(f"short id {short_id!r} must be 0-16 lowercase hex digits, even length")
    return short_id


def _check_template(template: str, uuid: str, key_id: str) -> None:
    """A key's template is an inbound object with one client, whose id Xray reads as `uuid`."""
    try:
        inbound = json.loads(template)
    except ValueError:
        raise ValueError(f"key {key_id}: its inbound template is not JSON") from None
    check_inbound(inbound, uuid, key_id)


def check_inbound(inbound: object, uuid: str, key_id: str) -> None:
    """A migrated key's inbound (parsed template): one client, whose id Xray reads as `uuid`."""
    found = clients(inbound) if isinstance(inbound, dict) else []
    if len(found) != 1 or not is_client_of(found[0].get("id"), uuid):
        raise ValueError(f"key {key_id}: its inbound template must hold one client, of uuid {uuid}")


# --- recognising portmeter inbounds --------------------------------------------------------


def key_file_name(uuid: str) -> str:
    """The file of a key's inbound in PORTMETER_XRAY_CONFDIR: named after its uuid, like its tag
    (README "One file per key (PORTMETER_XRAY_CONFDIR)")."""
    return f"{KEY_FILE_PREFIX}{uuid}.json"


def is_key_file(name: str) -> bool:
    """Whether a file name in PORTMETER_XRAY_CONFDIR is portmeter's (any pm-*.json)."""
    return name.startswith(KEY_FILE_PREFIX) and name.endswith(".json")


def inbound_tag(uuid: str) -> str:
    return f"{TAG_PREFIX}{uuid}"


def tag_uuid(tag: object) -> str | None:
    """The uuid in a tag "inbound-<uuid>" (canonical lowercase only), else None."""
    if not isinstance(tag, str) or not tag.startswith(TAG_PREFIX):
        return None
    rest = tag[len(TAG_PREFIX) :]
    try:
        canonical = str(UUID(rest))
    except ValueError:
        return None
    return rest if canonical == rest else None


def is_portmeter_inbound(inbound: object) -> bool:
    """The strict rule of the module docstring: vless, tag inbound-<uuid>, one client <uuid>."""
    if not isinstance(inbound, Mapping):
        return False
    protocol = inbound.get("protocol")
    if not isinstance(protocol, str) or protocol.lower() != "vless":  # Xray reads any case
        return False
    uuid = tag_uuid(inbound.get("tag"))
    found = clients(inbound)
    return uuid is not None and len(found) == 1 and is_client_of(found[0].get("id"), uuid)


def xray_uuid(client_id: object) -> str | None:
    """The uuid Xray reads a VLESS client id as (None: Xray refuses the id).

    As Xray's uuid.ParseString: 32 to 36 bytes are hex groups 8-4-4-4-12, each optionally after
    one "-"; any other string of 1 to 30 bytes is mapped to a UUIDv5 (SHA-1 of the zero uuid's
    bytes and the string), which is what `xray uuid -i STRING` prints.
    """
    if not isinstance(client_id, str):
        return None
    raw = client_id.encode()
    if not 32 <= len(raw) <= 36:
        return str(uuid5(UUID(int=0), client_id)) if 1 <= len(raw) <= 30 else None
    digits = []
    for size in (8, 4, 4, 4, 12):
        raw = raw.removeprefix(b"-")
        group, raw = raw[:size], raw[size:]
        if len(group) < size or not HEX_GROUP.fullmatch(group):
            return None
        digits.append(group.decode().lower())
    return "-".join(digits)


def is_client_of(client_id: object, uuid: str) -> bool:
    """Whether a client id is the key's: its uuid in any spelling Xray reads as that uuid
    (upper case, without dashes), or a short string Xray maps to it. A migrated client keeps
    the id as it was written (README "Xray")."""
    return client_id == uuid or xray_uuid(client_id) == uuid


def portmeter_inbounds(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [inbound for inbound in inbounds_of(config) if is_portmeter_inbound(inbound)]


def parse_keys(config: Mapping[str, Any]) -> dict[str, int | None]:
    """uuid -> port of every portmeter inbound (None when the port is not a single number)."""
    return {tag_uuid(i["tag"]) or "": inbound_port(i) for i in portmeter_inbounds(config)}


def inbound_port(inbound: Mapping[str, Any]) -> int | None:
    """An inbound's port when it is one number (Xray also accepts "N" and ranges "N-M")."""
    port = inbound.get("port")
    if isinstance(port, bool):
        return None
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.strip().isdigit():
        return int(port)
    return None


def port_spans(inbound: Mapping[str, Any]) -> tuple[tuple[int, int], ...]:
    """Every port an inbound listens on, as (first, last) spans, read as Xray's PortList reads
    "port": a number, or a string of comma-separated numbers and ranges ("443", "20001-20005",
    "20001,20002,30000-30010"). What Xray would refuse (and an env: reference) gives no span."""
    port = inbound.get("port")
    if isinstance(port, bool):
        return ()
    if isinstance(port, int):
        return ((port, port),) if 1 <= port <= 65535 else ()
    if not isinstance(port, str):
        return ()
    spans = []
    for part in port.split(","):
        span = PORT_SPAN.match(part.strip())
        if span is None:
            continue
        first = int(span.group(1))
        last = int(span.group(2) or first)
        if 1 <= first <= last <= 65535:
            spans.append((first, last))
    return tuple(spans)


def ports_among(spans: Iterable[tuple[int, int]], first: int, last: int) -> set[int]:
    """The ports of `spans` from `first` to `last`: a range "1-65535" costs only the ports
    asked about."""
    return {p for a, b in spans for p in range(max(a, first), min(b, last) + 1)}


def operator_ports(inbounds: Iterable[object], first: int, last: int) -> set[int]:
    """The ports from `first` to `last` that the operator's inbounds (not portmeter's, not on
    a unix socket) listen on: taken for keys, whatever the form of their "port"."""
    return ports_among(
        (
            span
            for inbound in inbounds
            if isinstance(inbound, Mapping)
            and not is_portmeter_inbound(inbound)
            and unix_listen(inbound) is None
            for span in port_spans(inbound)
        ),
        first,
        last,
    )


def unix_listen(inbound: Mapping[str, Any]) -> str | None:
    """The unix socket an inbound listens on ("/path", or "@name" and "@@name" for abstract
    sockets, as Xray reads `listen`), else None."""
    listen = inbound.get("listen")
    if isinstance(listen, str) and listen.startswith(("/", "@")):
        return listen
    return None


# --- reading the parts of a config ---------------------------------------------------------


def inbounds_of(config: Mapping[str, Any]) -> list[Any]:
    """The config's inbounds list itself (not a copy), empty when absent or null."""
    inbounds = config.get("inbounds", [])
    if inbounds is None:
        return []
    if not isinstance(inbounds, list):
        raise XrayConfigError("the config's 'inbounds' is not a list")
    return inbounds


def mapping(value: object) -> Mapping[str, Any]:
    """`value` when it is an object, else an empty one: for optional parts of an inbound."""
    return value if isinstance(value, Mapping) else {}


def clients(inbound: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The inbound's client objects (anything else in the list is passed over)."""
    settings = inbound.get("settings")
    found = settings.get("clients") if isinstance(settings, Mapping) else None
    if not isinstance(found, list):
        return []
    return [c for c in found if isinstance(c, Mapping)]


def reality_settings(inbound: Mapping[str, Any]) -> Mapping[str, Any]:
    """streamSettings.realitySettings, empty when any part of the way is missing."""
    stream = inbound.get("streamSettings")
    settings = stream.get("realitySettings") if isinstance(stream, Mapping) else None
    return settings if isinstance(settings, Mapping) else {}


def split_host_port(address: str) -> tuple[str, int]:
    """Host and port of "host:port"; an IPv6 host loses its brackets."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise XrayConfigError(f"address {address!r} must look like host:port")
    return host.removeprefix("[").removesuffix("]"), int(port)


def routing_rules(config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The config's routing rules that are objects (the list itself holds anything)."""
    routing = config.get("routing")
    rules = routing.get("rules") if isinstance(routing, Mapping) else None
    return [r for r in rules if isinstance(r, Mapping)] if isinstance(rules, list) else []


def rule_inbound_tags(rule: Mapping[str, Any]) -> list[str]:
    """The inbound tags a routing rule names (Xray takes one string or a list of them)."""
    tags = rule.get("inboundTag")
    if isinstance(tags, str):
        return [tags]
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []
