"""Xray: each key's inbound in Xray's config, REALITY keys, share links, writing and applying.

This is the only module that touches Xray's files and processes. Rendering, parsing, drift and
migration are pure functions over the config dict, so their rules are testable without Xray;
`XrayFiles` does the file I/O (validated, atomic, backed up) and `XrayApplier` makes a running Xray
pick the change up (restart, or Xray's API for zero downtime).

Which inbounds are portmeter's is decided by one strict rule, so nothing the operator wrote is
ever rewritten or deleted: protocol "vless", tag "inbound-<uuid>" with the uuid in canonical
lowercase form, and exactly one client whose id is that uuid. Everything else in the config
(other inbounds, outbounds, routing, log, api, stats, policy ...) belongs to the operator and is
carried over unchanged. An inbound that only looks like ours (right tag, other client) is the
operator's too; if it collides with a key, validation refuses the config instead of deleting it.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import ipaddress
import json
import os
import re
import secrets
import stat
import subprocess
import tempfile
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode
from uuid import UUID, uuid5

import anyio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from daemon import names as names_rule
from daemon.allocator import PortRange, lowest_free
from daemon.atomic import LinkRefused, failure_reason, own_dir, refuse_link, write_atomic
from daemon.bounds import MAX_XRAY_CONFIG_BYTES
from daemon.names import fold

ApplyMode = Literal["none", "restart", "api"]
Security = Literal["reality", "none"]
Config = dict[str, Any]
# What identifies one version of the live file: inode, size, modification time (ns).
Signature = tuple[int, int, int]

TAG_PREFIX = "inbound-"
BACKUP_STAMP = "%Y%m%dT%H%M%S%fZ"
SHORT_ID = re.compile(r"^(?:[0-9a-f]{2}){0,8}$")
HEX_GROUP = re.compile(rb"[0-9a-fA-F]+")
# Xray answers RemoveInbound for an unknown tag with common.ErrNoClue.
ABSENT_INBOUND = "not enough information for making a decision"
FAILURE_LINE = re.compile(r"panic:|fail|error|invalid|denied|not found", re.IGNORECASE)
# How `serialize` separates the inbounds: each sits at depth two of the indented dump.
INBOUND_SEPARATOR = b",\n    "


class XrayError(Exception):
    """Base of this module's errors; every message is one line an operator can act on."""


class XrayConfigError(XrayError):
    """A config cannot be read, rendered or validated; the live file was left untouched."""


class XrayStorageError(XrayError):
    """Writing the config or a backup failed (disk full, permissions); the live file is intact."""


class XrayApplyError(XrayError):
    """Xray did not take the change (restart or API call failed); the message says why."""


# --- options and keys ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class XrayOptions:
    """Everything this module needs from the settings; built by the service, passed explicitly."""

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
    # directory portmeter creates for it 0750 root:group. None: see XrayFiles._mode_and_owner.
    file_group: int | None = None

    @property
    def server_names(self) -> tuple[str, ...]:
        """SNI values clients may use; the dest's host name when none are configured."""
        if self.reality_server_names:
            return self.reality_server_names
        host = _split_host_port(self.reality_dest)[0] if self.reality_dest else ""
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "uuid", str(UUID(str(self.uuid))))
        if self.template:
            _check_template(self.template, self.uuid, self.id)
        if not 1 <= self.port <= 65535:
            raise ValueError(f"key {self.id}: port {self.port} is not in 1-65535")
        for short_id in (self.short_id, *self.extra_short_ids):
            if not SHORT_ID.match(short_id):
                raise ValueError(
                    f"key {self.id}: short id {short_id!r} must be 0-16 lowercase hex digits, even length"
                )

    @property
    def tag(self) -> str:
        return inbound_tag(self.uuid)

    @property
    def short_ids(self) -> list[str]:
        return [self.short_id, *self.extra_short_ids]


# --- recognising portmeter inbounds --------------------------------------------------------


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
    if not isinstance(inbound, Mapping) or inbound.get("protocol") != "vless":
        return False
    uuid = tag_uuid(inbound.get("tag"))
    clients = _clients(inbound)
    return uuid is not None and len(clients) == 1 and _is_client_of(clients[0].get("id"), uuid)


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


def _is_client_of(client_id: object, uuid: str) -> bool:
    """Whether a client id is the key's: its uuid, or a short string Xray maps to it (a migrated
    client keeps the id it had; an id of UUID length must be the canonical form)."""
    if client_id == uuid:
        return True
    if not isinstance(client_id, str) or len(client_id.encode()) > 30:
        return False
    return xray_uuid(client_id) == uuid


def portmeter_inbounds(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [inbound for inbound in _inbounds(config) if is_portmeter_inbound(inbound)]


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


def _check_template(template: str, uuid: str, key_id: str) -> None:
    """A key's template is an inbound object with one client, whose id Xray reads as `uuid`."""
    try:
        inbound = json.loads(template)
    except ValueError:
        raise ValueError(f"key {key_id}: its inbound template is not JSON") from None
    clients = _clients(inbound) if isinstance(inbound, dict) else []
    if len(clients) != 1 or not _is_client_of(clients[0].get("id"), uuid):
        raise ValueError(f"key {key_id}: its inbound template must hold one client, of uuid {uuid}")


# --- rendering (pure) ----------------------------------------------------------------------


def minimal_base() -> Config:
    """The config portmeter starts from when Xray has none yet: logging and plain outbounds."""
    return {
        "log": {"loglevel": "warning"},
        "inbounds": [],
        "outbounds": [
            {"protocol": "freedom", "tag": "direct"},
            {"protocol": "blackhole", "tag": "block"},
        ],
    }


def render_inbound(key: XrayKey, opts: XrayOptions, reality: Reality | None = None) -> Config:
    """The inbound of one key, in the shape of seed 000 ("Структура inbound для ключа");
    a migrated key's is its template with the key's port and tag."""
    if key.template:
        inbound: Config = json.loads(key.template)
        inbound["port"] = key.port
        inbound["tag"] = key.tag
        return inbound
    inbound = {}
    if opts.listen:
        inbound["listen"] = opts.listen
    inbound["port"] = key.port
    inbound["protocol"] = "vless"
    inbound["settings"] = {
        "clients": [
            {"id": key.uuid, "flow": client_flow(key, opts), "email": key.name or key.uuid}
        ],
        "decryption": "none",
    }
    inbound["streamSettings"] = _stream_settings(key, opts, reality)
    inbound["tag"] = key.tag
    return inbound


def client_flow(key: XrayKey, opts: XrayOptions) -> str:
    """Vision needs TLS or REALITY underneath, so a plain (test) inbound gets no flow."""
    if opts.security == "none":
        return ""
    return opts.flow if key.flow is None else key.flow


def render_config(
    base: Mapping[str, Any],
    keys: Iterable[XrayKey],
    opts: XrayOptions,
    reality: Reality | None = None,
) -> Config:
    """`base` with its portmeter inbounds replaced by those of `keys` (after the others, by port).

    Nothing else changes, except that in apply mode "api" the pieces Xray's API needs and that
    are missing (api section with HandlerService, its inbound and routing rule) are added.
    """
    keys = sorted(keys, key=lambda k: k.port)
    _check_keys_unique(keys)
    return _with_inbounds(base, [render_inbound(key, opts, reality) for key in keys], opts)


def _with_inbounds(base: Mapping[str, Any], ours: list[Config], opts: XrayOptions) -> Config:
    """`base` with its portmeter inbounds replaced by `ours` (rendered, by port); see render_config."""
    config: Config = copy.deepcopy(dict(base))
    kept = [i for i in _inbounds(config) if not is_portmeter_inbound(i)]
    if kept or ours or "inbounds" in config:
        config["inbounds"] = kept + ours
    if opts.apply == "api":
        config = with_api(config, opts)
    return config


def with_api(config: Mapping[str, Any], opts: XrayOptions) -> Config:
    """`config` plus whatever Xray's HandlerService API still lacks there; nothing is altered."""
    result: Config = copy.deepcopy(dict(config))
    api = result.setdefault("api", {})
    if not isinstance(api, dict):
        raise XrayConfigError("the config's 'api' section is not an object")
    api.setdefault("tag", "api")
    services = api.setdefault("services", [])
    if not isinstance(services, list):
        raise XrayConfigError("the config's 'api.services' is not a list")
    if "HandlerService" not in services:
        services.append("HandlerService")
    if "listen" in api:  # newer Xray serves the API on api.listen, without an inbound
        return result
    tag = api["tag"]
    inbounds = _inbounds(result)
    result["inbounds"] = inbounds
    if not any(isinstance(i, Mapping) and i.get("tag") == tag for i in inbounds):
        host, port = _split_host_port(opts.api_address)
        inbounds.insert(
            0,
            {
                "listen": host,
                "port": port,
                "protocol": "dokodemo-door",
                "settings": {"address": host},
                "tag": tag,
            },
        )
    routing = result.setdefault("routing", {})
    rules = routing.setdefault("rules", []) if isinstance(routing, dict) else None
    if not isinstance(rules, list):
        raise XrayConfigError("the config's 'routing.rules' is not a list")
    if not any(_routes_api(rule, tag) for rule in rules):
        rules.insert(0, {"type": "field", "inboundTag": [tag], "outboundTag": tag})
    return result


def api_problems(config: Mapping[str, Any], opts: XrayOptions) -> list[str]:
    """Why Xray's API would not answer `xray api adi/rmi` with this config (empty: it would)."""
    api = config.get("api")
    if not isinstance(api, Mapping):
        return ["apply mode is api but the config has no 'api' section"]
    found = []
    if "HandlerService" not in (api.get("services") or []):
        found.append("apply mode is api but api.services lacks HandlerService")
    if "listen" in api:
        return found
    tag = api.get("tag")
    if not any(isinstance(i, Mapping) and i.get("tag") == tag for i in _inbounds(config)):
        found.append(f"apply mode is api but no inbound carries the api tag {tag!r}")
    routing = config.get("routing")
    rules = routing.get("rules") if isinstance(routing, Mapping) else None
    if not isinstance(rules, list) or not any(_routes_api(rule, tag) for rule in rules):
        found.append(f"apply mode is api but no routing rule sends inbound {tag!r} to the API")
    return found


@dataclass(frozen=True, slots=True)
class InboundChanges:
    """What a running Xray must be told to get from one config's portmeter inbounds to another's."""

    added: tuple[Config, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


def inbound_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> InboundChanges:
    """Portmeter inbounds to remove (by tag) and add; a changed one is removed and re-added."""
    before = {i["tag"]: i for i in portmeter_inbounds(old)}
    after = {i["tag"]: i for i in portmeter_inbounds(new)}
    removed = [tag for tag, inbound in before.items() if after.get(tag) != inbound]
    added = [inbound for tag, inbound in after.items() if before.get(tag) != inbound]
    return InboundChanges(tuple(added), tuple(removed))


# --- REALITY keys --------------------------------------------------------------------------


def generate_reality() -> Reality:
    """A fresh X25519 pair; the private key clamped as `xray x25519` does (same public key)."""
    return reality_from_private(_b64url(_clamp(secrets.token_bytes(32))))


def reality_from_private(private_key: str) -> Reality:
    return Reality(private_key=private_key, public_key=public_key(private_key))


def public_key(private_key: str) -> str:
    """The public half of a base64url X25519 private key, encoded the same way."""
    raw = decode_key(private_key)
    public = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
    return _b64url(public)


def decode_key(text: str) -> bytes:
    """32 key bytes from base64url (padding optional); ValueError otherwise."""
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]{43}=?", text):
        raise ValueError("an X25519 key must be 32 bytes in base64url (43 characters)")
    return base64.urlsafe_b64decode(text.rstrip("=") + "=")


def new_short_id(length: int = 16) -> str:
    """A random REALITY short id: `length` hex digits (even, 2-16)."""
    if length % 2 or not 2 <= length <= 16:
        raise ValueError("a short id has an even number of hex digits, 2 to 16")
    return secrets.token_hex(length // 2)


def _clamp(raw: bytes) -> bytes:
    key = bytearray(raw)
    key[0] &= 248
    key[31] &= 127
    key[31] |= 64
    return bytes(key)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# --- share links ---------------------------------------------------------------------------


def vless_link(key: XrayKey, opts: XrayOptions, reality: Reality | None = None) -> str:
    """The standard vless:// share link of a key (v2rayN, Hiddify, Streisand, NekoBox ...).

    It describes the key's inbound as those clients read a link: the transport (`type` with
    its fields), REALITY (`pbk`, `sid` from the inbound's shortIds, `sni` from its serverNames,
    `fp`, `spx` when set) and `flow` only where the inbound's client has one.
    """
    if not opts.public_host:
        raise XrayConfigError("the public host is not set (PORTMETER_PUBLIC_HOST); links need it")
    if key.template:
        inbound = render_inbound(key, opts, reality)
        stream = _mapping(inbound.get("streamSettings"))
        client, settings = _clients(inbound)[0], _mapping(inbound.get("settings"))
        client_id, flow = str(client["id"]), str(client.get("flow") or settings.get("flow") or "")
    else:
        reality_settings = {"serverNames": list(opts.server_names), "shortIds": key.short_ids}
        stream = {"security": opts.security, "realitySettings": reality_settings}
        client_id, flow = key.uuid, client_flow(key, opts)
    security = str(stream.get("security") or "none")
    params = {**_transport_params(stream), "encryption": "none", "security": security}
    if security == "reality":
        params.update(_reality_params(key, _mapping(stream.get("realitySettings")), opts, reality))
    if flow:
        params["flow"] = flow
    query = urlencode(params, quote_via=quote)
    where = f"{url_host(opts.public_host)}:{key.port}"
    return f"vless://{quote(client_id, safe='')}@{where}?{query}#{quote(key.name, safe='')}"


def _transport_params(stream: Mapping[str, Any]) -> dict[str, str]:
    """`type` and the fields of the inbound's transport, named as share links name them."""
    network = str(stream.get("network") or "tcp")
    if network in ("tcp", "raw"):
        header = _mapping(_transport(stream, "rawSettings", "tcpSettings").get("header"))
        params = {"type": "tcp", "headerType": str(header.get("type") or "none")}
        if params["headerType"] == "http":
            request = _mapping(header.get("request"))
            host = _mapping(request.get("headers")).get("Host")
            params.update(_host_path(host, request.get("path")))
        return params
    if network == "grpc":
        grpc = _transport(stream, "grpcSettings")
        params = {"type": "grpc", "serviceName": str(grpc.get("serviceName") or "")}
        params["mode"] = "multi" if grpc.get("multiMode") else "gun"
        if grpc.get("authority"):
            params["authority"] = str(grpc["authority"])
        return params
    if network in ("xhttp", "splithttp"):
        xhttp = _transport(stream, "xhttpSettings", "splithttpSettings")
        params = {"type": "xhttp", **_host_path(xhttp.get("host"), xhttp.get("path") or "/")}
        params["mode"] = str(xhttp.get("mode") or "auto")
        if xhttp.get("extra"):
            params["extra"] = json.dumps(xhttp["extra"], separators=(",", ":"), ensure_ascii=False)
        return params
    settings = _transport(stream, f"{network}Settings")
    host = settings.get("host") or _mapping(settings.get("headers")).get("Host")
    return {"type": network, **_host_path(host, settings.get("path"))}


def _transport(stream: Mapping[str, Any], *names: str) -> Mapping[str, Any]:
    """The first of the transport's settings objects present (Xray's current name first)."""
    return next((_mapping(stream[n]) for n in names if n in stream), {})


def _host_path(host: object, path: object) -> dict[str, str]:
    """`host` and `path` of a link; lists (HTTP header obfuscation) as v2rayN writes them."""
    found = {}
    if host:
        found["host"] = ",".join(map(str, host)) if isinstance(host, list) else str(host)
    if isinstance(path, list):
        path = path[0] if path else None
    if path:
        found["path"] = str(path)
    return found


def _reality_params(
    key: XrayKey, settings: Mapping[str, Any], opts: XrayOptions, reality: Reality | None
) -> dict[str, str]:
    """pbk, fp, sni, sid and spx of a link to an inbound with these realitySettings.

    A migrated inbound may carry the client half too (Xray reads one REALITY object for both
    sides; panels keep it under "settings"): its fingerprint and spiderX are used then.
    """
    pair, private = key.reality or reality, settings.get("privateKey")
    if private and (pair is None or private != pair.private_key):
        pair = reality_from_private(str(private))
    pair = pair or _reality_for(key, None)  # raises: neither the key nor the server has a pair
    client_side = {**_mapping(settings.get("settings")), **settings}
    names = [str(n) for n in settings.get("serverNames") or []]
    short_ids = [str(s) for s in settings.get("shortIds") or []]
    # The key's own short id where the inbound takes it, else the inbound's first non-empty one.
    if key.short_id and (key.short_id in short_ids or not short_ids):
        sid = key.short_id
    else:
        sid = next((s for s in short_ids if s), "")
    params = {
        "pbk": pair.public_key,
        "fp": str(client_side.get("fingerprint") or opts.fingerprint),
        "sni": names[0] if names else "",
        "sid": sid,
    }
    if client_side.get("spiderX"):
        params["spx"] = str(client_side["spiderX"])
    return params


def subscription(links: Iterable[str]) -> str:
    """A subscription body: base64 of the newline-joined links (the v2rayN format)."""
    return base64.b64encode("\n".join(links).encode()).decode()


def url_host(host: str) -> str:
    """A host as it goes into a URL: IPv6 literals in brackets."""
    bare = host.strip().removeprefix("[").removesuffix("]")
    try:
        if isinstance(ipaddress.ip_address(bare), ipaddress.IPv6Address):
            return f"[{bare}]"
    except ValueError:
        pass
    return bare


# --- checks and drift (pure) ---------------------------------------------------------------


def check_config(
    config: object, opts: XrayOptions, expected: Collection[XrayKey] | None = None
) -> list[str]:
    """Structural problems that would make Xray refuse the config or lose a key (empty: none)."""
    if not isinstance(config, Mapping):
        return ["the config is not a JSON object"]
    inbounds = config.get("inbounds", [])
    if not isinstance(inbounds, list):
        return ["'inbounds' is not a list"]
    found = [
        f"inbound #{n} is not an object"
        for n, i in enumerate(inbounds)
        if not isinstance(i, Mapping)
    ]
    if found:
        return found
    found += _duplicate_problems(inbounds)
    for inbound in portmeter_inbounds(config):
        found += [f"inbound {inbound['tag']}: {p}" for p in _security_problems(inbound, opts)]
    if expected is not None:
        present = {i["tag"]: inbound_port(i) for i in portmeter_inbounds(config)}
        for key in sorted(expected, key=lambda k: k.port):
            if key.tag not in present:
                found.append(f"key {key.id} ({key.name}) has no inbound {key.tag}")
            elif present[key.tag] != key.port:
                found.append(
                    f"key {key.id} ({key.name}) has port {key.port}, its inbound {present[key.tag]}"
                )
    try:
        json.dumps(config)
    except (TypeError, ValueError) as exc:
        found.append(f"the config cannot be written as JSON ({exc})")
    return found


@dataclass(frozen=True, slots=True)
class DriftProblem:
    """One disagreement between the keys and the config; `key_id` when it concerns a key."""

    kind: Literal[
        "missing",
        "port_mismatch",
        "uuid_mismatch",
        "foreign",
        "stale",
        "security",
        "outdated",
        "duplicate",
        "api",
    ]
    message: str
    key_id: str | None = None
    port: int | None = None


def drift_report(
    config: Mapping[str, Any],
    keys: Iterable[XrayKey],
    opts: XrayOptions,
    port_range: PortRange | None = None,
    reality: Reality | None = None,
) -> list[DriftProblem]:
    """Every way the config differs from what the keys need, key problems first, by port."""
    keys = sorted(keys, key=lambda k: k.port)
    inbounds = [i for i in _inbounds(config) if isinstance(i, Mapping)]
    by_tag = {i.get("tag"): i for i in inbounds if i.get("tag")}
    found: list[DriftProblem] = []
    for key in keys:
        found += _key_drift(key, by_tag.get(key.tag), inbounds, opts, reality)
    wanted = {key.uuid for key in keys}
    key_ports = {key.port for key in keys}
    for inbound in inbounds:
        port = inbound_port(inbound)
        if is_portmeter_inbound(inbound):
            if tag_uuid(inbound["tag"]) not in wanted:
                found.append(
                    DriftProblem(
                        "stale",
                        f"inbound {inbound['tag']} on port {port} has no key (stale)",
                        port=port,
                    )
                )
        elif port_range is not None and port in port_range and port not in key_ports:
            found.append(
                DriftProblem(
                    "foreign",
                    f"inbound {_describe(inbound)} on port {port} is not portmeter's "
                    f"but uses a port of its range {port_range}",
                    port=port,
                )
            )
    found += [DriftProblem("duplicate", p) for p in _duplicate_problems(inbounds)]
    if opts.apply == "api":
        found += [DriftProblem("api", p) for p in api_problems(config, opts)]
    return found


def drift(
    config: Mapping[str, Any],
    keys: Iterable[XrayKey],
    opts: XrayOptions,
    port_range: PortRange | None = None,
    reality: Reality | None = None,
) -> list[str]:
    """The messages of `drift_report`, one line each."""
    return [problem.message for problem in drift_report(config, keys, opts, port_range, reality)]


def _key_drift(
    key: XrayKey,
    inbound: Mapping[str, Any] | None,
    inbounds: Sequence[Mapping[str, Any]],
    opts: XrayOptions,
    reality: Reality | None,
) -> list[DriftProblem]:
    who = f"key {key.id} ({key.name}, port {key.port})"
    if inbound is None:
        other = next((i for i in inbounds if inbound_port(i) == key.port), None)
        if other is None:
            return [DriftProblem("missing", f"{who}: no inbound in the config", key.id, key.port)]
        if is_portmeter_inbound(other):
            message = f"{who}: its port serves uuid {tag_uuid(other['tag'])}, not {key.uuid}"
            return [DriftProblem("uuid_mismatch", message, key.id, key.port)]
        message = f"{who}: no inbound of its own; port {key.port} is taken by {_describe(other)}"
        return [DriftProblem("foreign", message, key.id, key.port)]
    if not is_portmeter_inbound(inbound):
        ids = [c.get("id") for c in _clients(inbound)]
        message = f"{who}: inbound {key.tag} has clients {ids}, expected only {key.uuid}"
        return [DriftProblem("uuid_mismatch", message, key.id, key.port)]
    found = []
    port = inbound_port(inbound)
    if port != key.port:
        message = f"{who}: its inbound listens on port {inbound.get('port')}"
        found.append(DriftProblem("port_mismatch", message, key.id, key.port))
    for problem in _security_problems(inbound, opts):
        found.append(DriftProblem("security", f"{who}: {problem}", key.id, key.port))
    if not found:
        found += _outdated(key, inbound, opts, reality, who)
    return found


def _outdated(
    key: XrayKey, inbound: Mapping[str, Any], opts: XrayOptions, reality: Reality | None, who: str
) -> list[DriftProblem]:
    """A difference from what rendering gives now (changed settings, keys, flow, short id)."""
    if opts.security == "reality" and (key.reality or reality) is None:
        return []  # cannot render without a key pair; nothing to compare with
    try:
        wanted = render_inbound(key, opts, reality)
    except XrayConfigError:
        return []
    fields = _differences(wanted, inbound)
    if not fields:
        return []
    message = f"{who}: inbound differs from the rendered one in {', '.join(fields)}"
    return [DriftProblem("outdated", message, key.id, key.port)]


def _differences(wanted: object, present: object, path: str = "") -> list[str]:
    """Dotted paths where `present` differs from `wanted`."""
    if isinstance(wanted, Mapping) and isinstance(present, Mapping):
        found = []
        for name in [*wanted, *(k for k in present if k not in wanted)]:
            where = f"{path}.{name}" if path else str(name)
            if name not in present or name not in wanted:
                found.append(where)
            else:
                found += _differences(wanted[name], present[name], where)
        return found
    if isinstance(wanted, list) and isinstance(present, list) and len(wanted) == len(present):
        return [
            f
            for n, (w, h) in enumerate(zip(wanted, present, strict=True))
            for f in _differences(w, h, f"{path}[{n}]")
        ]
    return [] if wanted == present else [path]


def _security_problems(inbound: Mapping[str, Any], opts: XrayOptions) -> list[str]:
    stream = inbound.get("streamSettings")
    security = stream.get("security", "none") if isinstance(stream, Mapping) else "none"
    if opts.security == "reality" and security != "reality":
        return [f"security is {security!r}, REALITY is configured"]
    if security != "reality":
        return []
    return _reality_problems(_reality_settings(inbound))


def _reality_problems(settings: Mapping[str, Any]) -> list[str]:
    """What Xray needs of a REALITY server and `settings` lacks (`target` is `dest`'s new name)."""
    if not settings:
        return ["REALITY fields missing (no realitySettings)"]
    found = []
    if not (settings.get("dest") or settings.get("target")):
        found.append("REALITY field dest (or target) missing")
    names = settings.get("serverNames")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        found.append("REALITY field serverNames missing or empty")
    try:
        decode_key(settings.get("privateKey"))  # type: ignore[arg-type]
    except ValueError:
        found.append("REALITY field privateKey missing or not a 32-byte base64url key")
    short_ids = settings.get("shortIds")
    if not isinstance(short_ids, list) or not short_ids:
        found.append("REALITY field shortIds missing or empty")
    elif not all(isinstance(s, str) and SHORT_ID.match(s) for s in short_ids):
        found.append("REALITY shortIds must be even-length hex of at most 16 digits")
    return found


def _duplicate_problems(inbounds: Sequence[Mapping[str, Any]]) -> list[str]:
    found = []
    tags = Counter(i.get("tag") for i in inbounds if i.get("tag"))
    found += [f"tag {tag!r} is used by {n} inbounds" for tag, n in sorted(tags.items()) if n > 1]
    seen: dict[int, list[str]] = {}
    for inbound in inbounds:
        port = inbound_port(inbound)
        if port is None:
            continue
        listen = str(inbound.get("listen") or "")
        for other in seen.get(port, []):
            if listen == other or _wildcard(listen) or _wildcard(other):
                found.append(f"port {port} is used by more than one inbound")
                break
        seen.setdefault(port, []).append(listen)
    return sorted(set(found), key=found.index)


def _wildcard(listen: str) -> bool:
    return listen in ("", "0.0.0.0", "::", "[::]")


# --- migration from a shared inbound (pure) ------------------------------------------------


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
    is not moved but dropped from the shared inbound. Ports come from `port_range`, lowest
    first, skipping `taken_ports` and every port an inbound of the config uses. `commented`:
    the files with comments that carrying out the plan rewrites. Running the plan's result
    through `plan_migration` again gives an empty plan.
    """
    inbounds = _inbounds(config)
    have = {xray_uuid(u) or u for u in known_uuids} | set(parse_keys(config))
    used = set(taken_ports) | {
        p for i in inbounds if isinstance(i, Mapping) if (p := inbound_port(i))
    }
    names = {fold(name) for name in taken_names}
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
        clients = _clients(inbound)
        for client in clients:
            client_id = client.get("id")
            uuid = xray_uuid(client_id)
            if uuid is None:
                warnings.append(
                    f"inbound #{index}: client id {client_id!r} is neither a uuid nor a string "
                    "of 1-30 bytes; left in place"
                )
                continue
            if uuid in have:
                dropped.append((index, uuid))
                leaving += 1
                continue
            port = lowest_free(port_range, used, set())
            if port is None:
                unplaced.append(uuid)
                continue
            used.add(port)
            have.add(uuid)
            own_id = str(client_id) if _is_client_of(client_id, uuid) else uuid
            email = str(client.get("email") or "")
            wanted = email or (own_id if own_id != uuid else f"client-{uuid[:8]}")
            usable = names_rule.usable(wanted, f"client-{uuid[:8]}")
            name = _unique_name(usable, names)
            if name != wanted:
                why = "is taken (another key or client)" if usable == wanted else (
                    f"breaks the name rule ({names_rule.RULE})"
                )
                notes.append(
                    f"client {own_id} of inbound {_where(inbound, index)}: the name {wanted!r} "
                    f"{why}, so its key is named {name!r}"
                )
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
        if clients and leaving == len(clients):
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
    inbounds = _inbounds(result)
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
    stream = _mapping(inbound.get("streamSettings"))
    found = str(stream.get("security") or "none")
    if found != security:
        certificates = " with certificates" if found == "tls" else ""
        wanted = "REALITY" if security == "reality" else f"security {security!r}"
        return f"VLESS with security {found!r}{certificates}; portmeter's keys use {wanted}"
    if security == "reality" and (problems := _reality_problems(_reality_settings(inbound))):
        return f"its REALITY settings are incomplete ({problems[0]})"
    if not _clients(inbound):
        return "no clients"
    return None


def _where(inbound: object, index: int) -> str:
    """An inbound as the plan names it: tag (or position), protocol and port."""
    if not isinstance(inbound, Mapping):
        return f"#{index}"
    tag = inbound.get("tag")
    name = repr(tag) if tag else f"#{index}"
    return f"{name} ({inbound.get('protocol', '?')}, port {inbound.get('port')})"


def _source_reality(inbound: Mapping[str, Any]) -> tuple[Reality | None, tuple[str, ...]]:
    """The REALITY pair and short ids the clients of a shared inbound use (None, (): none)."""
    settings = _reality_settings(inbound)
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


# --- reading a config's text (pure) ---------------------------------------------------------

# What Xray's config reader (infra/conf/json/reader.go in Xray-core) does outside JSON strings:
# `//` and `#` comments run to the end of the line, `/* ... */` comments keep their newlines,
# strings (double or single quotes) and backslash escapes pass unchanged, and a `/` followed by
# anything else passes with that character. A block comment ends at the first `/` that follows
# a `*` with only `*` and newlines between (the reader stays "after a star" across newlines).
_CONFIG_TOKEN = re.compile(
    r"""(?P<keep>"(?:[^"\\]|\\[\s\S])*"?|'(?:[^'\\]|\\[\s\S])*'?|\\[\s\S]|/[^/*])"""
    r"""|(?P<line>(?:\#|//)[^\n]*)"""
    r"""|(?P<block>/\*[\s\S]*?\*[*\n]*/)"""
    r"""|(?P<open>/\*)"""
    r"""|(?P<drop>[/\\]\Z)"""
)


@dataclass(frozen=True, slots=True)
class ConfigText:
    """A config read from its text, and whether that text had comments (a rewrite drops them)."""

    config: Config
    comments: bool
    where: str = ""  # the file it was read from


def read_config_text(data: bytes, where: str) -> ConfigText:
    """Parse a config's bytes as Xray does, comments included; XrayConfigError names line and
    column (in the original text) of what is wrong. `where` names the file in messages."""
    if len(data) > MAX_XRAY_CONFIG_BYTES:
        raise XrayConfigError(_too_large(where, len(data)))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode("utf-8")
        line, column = _line_column(before, len(before))
        raise XrayConfigError(
            f"Xray config {where} is not UTF-8 text (line {line}, column {column})"
        ) from None
    try:
        return ConfigText(_json_object(text, where), False, where)
    except _JsonError as plain:
        stripped, shifts, comments = _strip_comments(text, where)
        if not comments and stripped == text:
            raise XrayConfigError(plain.message(text, [])) from None
    try:
        return ConfigText(_json_object(stripped, where), comments, where)
    except _JsonError as error:
        raise XrayConfigError(error.message(text, shifts)) from None


class _JsonError(Exception):
    """json.loads failed at a position of the text it was given."""

    def __init__(self, where: str, reason: str, position: int | None) -> None:
        super().__init__(reason)
        self.where, self.reason, self.position = where, reason, position

    def message(self, original: str, shifts: Sequence[tuple[int, int]]) -> str:
        """One line naming the position in `original`, the text before comments were removed."""
        if self.position is None:
            return f"Xray config {self.where} is not valid JSON: {self.reason}"
        at = bisect_left(shifts, (self.position + 1,)) - 1
        offset = self.position + (shifts[at][1] if at >= 0 else 0)
        line, column = _line_column(original, offset)
        return (
            f"Xray config {self.where} is not valid JSON at line {line}, column {column}: "
            f"{self.reason}"
        )


def _json_object(text: str, where: str) -> Config:
    try:
        config = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise _JsonError(where, exc.msg, exc.pos) from None
    except ValueError as exc:  # NaN or Infinity, which JSON (and Xray) do not have
        raise _JsonError(where, str(exc), None) from None
    except RecursionError:
        raise _JsonError(where, "nested too deeply", None) from None
    if not isinstance(config, dict):
        raise XrayConfigError(f"Xray config {where} is not a JSON object")
    return config


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _strip_comments(text: str, where: str) -> tuple[str, list[tuple[int, int]], bool]:
    """The text without comments (newlines kept, as Xray's reader does), the offsets needed to
    map a position back to `text`, and whether there were comments.

    Each shift is (offset in the result where a removal ends, characters removed up to there).
    """
    pieces: list[str] = []
    shifts: list[tuple[int, int]] = []
    last = removed = 0
    comments = False
    for match in _CONFIG_TOKEN.finditer(text):
        kind = match.lastgroup
        if kind == "keep":
            continue
        if kind == "open":
            line, column = _line_column(text, match.start())
            raise XrayConfigError(
                f"Xray config {where}: the comment opened at line {line}, column {column} "
                "never closes"
            )
        kept = "\n" * match.group().count("\n") if kind == "block" else ""
        pieces += [text[last : match.start()], kept]
        removed += match.end() - match.start() - len(kept)
        shifts.append((match.end() - removed, removed))
        last = match.end()
        comments = comments or kind != "drop"
    pieces.append(text[last:])
    return "".join(pieces), shifts, comments


def _line_column(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column (in characters) of `offset` in `text`."""
    line_start = text.rfind("\n", 0, offset) + 1
    return text.count("\n", 0, offset) + 1, offset - line_start + 1


def _too_large(where: str, size: int) -> str:
    return (
        f"Xray config {where} has {size} bytes; portmeter reads at most "
        f"{MAX_XRAY_CONFIG_BYTES}"
    )


# --- files ---------------------------------------------------------------------------------


class XrayFiles:
    """Xray's config file: read, validate, write atomically with rotated timestamped backups.

    The live file is only ever replaced by renaming a new file over it, never rewritten in
    place; that is what lets a backup be a hard link to the previous file instead of a copy.
    """

    def __init__(self, opts: XrayOptions) -> None:
        self.opts = opts

    @property
    def path(self) -> Path:
        return self.opts.config_path

    @property
    def backup_dir(self) -> Path:
        return self.path.parent / "backups"

    def read(self) -> Config:
        """The config as a dict; the minimal base when the file does not exist yet."""
        return self.parse(self.read_bytes())

    def parse(self, data: bytes | None) -> Config:
        """The live file's bytes (None: no file) as a config; the minimal base without a file."""
        return self.parse_text(data).config

    def parse_text(self, data: bytes | None) -> ConfigText:
        """`parse`, also telling whether the file has comments (Xray's `//`, `/* */`, `#`)."""
        if data is None:
            return ConfigText(minimal_base(), False, str(self.path))
        return read_config_text(data, str(self.path))

    def read_bytes(self) -> bytes | None:
        """The live file's exact bytes (None when it does not exist); keep it to `restore` later."""
        return self.read_signed()[0]

    def read_signed(self) -> tuple[bytes | None, Signature | None]:
        """The live file's bytes and the signature of that very file (None, None: no file)."""
        try:
            with self.path.open("rb") as handle:
                info = os.fstat(handle.fileno())
                if info.st_size > MAX_XRAY_CONFIG_BYTES:
                    raise XrayConfigError(_too_large(str(self.path), info.st_size))
                data = handle.read(MAX_XRAY_CONFIG_BYTES + 1)
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            raise XrayConfigError(f"cannot read Xray config {self.path}: {failure_reason(exc)}") from None
        if len(data) > MAX_XRAY_CONFIG_BYTES:
            raise XrayConfigError(_too_large(str(self.path), len(data)))
        return data, (info.st_ino, info.st_size, info.st_mtime_ns)

    def signature(self) -> Signature | None:
        """Inode, size and mtime of the live file: any write by anyone else changes one of them."""
        try:
            info = self.path.stat()
        except OSError:
            return None
        return info.st_ino, info.st_size, info.st_mtime_ns

    def validate(
        self,
        config: object,
        expected: Collection[XrayKey] | None = None,
        data: bytes | None = None,
    ) -> None:
        """Raise XrayConfigError unless the structure is sound and Xray (if installed) accepts it.

        `data` is the config's serialization when the caller has it already.
        """
        problems = check_config(config, self.opts, expected)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise XrayConfigError(f"refusing to write {self.path}: {problems[0]}{more}")
        self.binary_test(serialize(config) if data is None else data)  # type: ignore[arg-type]

    def binary_test(self, data: bytes) -> None:
        """Have the installed Xray (`xray run -test`) accept `data`; nothing when none is installed.

        This costs time in proportion to the whole config, even after a one-key change: Xray
        has no way to test part of a config.
        """
        if _executable(self.opts.xray_bin):
            self._run_binary_test(data)

    def write(
        self, config: Mapping[str, Any], expected: Collection[XrayKey] | None = None
    ) -> Path | None:
        """Validate, back up the current file, then atomically replace it; return the backup path.

        A config equal to the live file is not written (None). A config that fails validation
        never replaces the live file.
        """
        data = serialize(config)
        previous = self.read_bytes()
        if previous == data:
            return None
        self.validate(config, expected, data)
        return self.replace(data, previous)

    def replace(self, data: bytes, previous: bytes | None) -> Path | None:
        """Back up the live file (its bytes: `previous`), then atomically replace it by `data`."""
        self._refuse_link()
        backup = self._backup(previous) if previous is not None else None
        self._replace(data)
        _seal(backup)
        return backup

    def restore(self, previous: bytes | None) -> None:
        """Put back what `read_bytes` returned earlier (None: the file did not exist)."""
        if previous is None:
            self.path.unlink(missing_ok=True)
            return
        self._replace(previous)

    def discard_backup(self, backup: Path | None) -> None:
        """Forget the backup a write made, when that write is being undone."""
        if backup is not None and backup.parent == self.backup_dir:
            backup.unlink(missing_ok=True)

    def keep_copy(self, label: str) -> Path:
        """A labelled copy of the live file (e.g. before a migration) that rotation never deletes."""
        data = self.read_bytes()
        if data is None:
            raise XrayConfigError(f"Xray config {self.path} does not exist; nothing to keep")
        target = self.backup_dir / f"{self.path.stem}.{label}-{_stamp()}{self.path.suffix}"
        self._write_backup(target, data)
        return target

    def latest_copy(self, label: str) -> Path | None:
        copies = sorted(self.backup_dir.glob(f"{self.path.stem}.{label}-*{self.path.suffix}"))
        return copies[-1] if copies else None

    def restore_from(self, backup: Path) -> Path | None:
        """Make a backup the live file again, byte for byte; the current file is backed up first."""
        try:
            data = backup.read_bytes()
        except OSError as exc:
            raise XrayConfigError(f"cannot read backup {backup}: {failure_reason(exc)}") from None
        previous = self.read_bytes()
        self._refuse_link()
        saved = self._backup(previous) if previous is not None and previous != data else None
        self._replace(data)
        _seal(saved)
        return saved

    def backups(self) -> list[Path]:
        """The rotated backups, oldest first."""
        return sorted(self.backup_dir.glob(f"{self.path.stem}-[0-9]*{self.path.suffix}"))

    def _backup(self, data: bytes) -> Path | None:
        """Keep the live file, whose bytes are `data`, as the newest rotated backup.

        A hard link, so backing up costs no copy of a config of many megabytes: the file is
        about to be replaced by a rename, which leaves the linked inode with the old bytes, made
        0600 root by `_seal` once it is no longer the live file. The link is made to whatever
        is at the path, never to what a symbolic link points to; anything but a regular file,
        or a failed link (another file system, hard links not allowed), gets a copy of `data`.
        """
        if self.opts.backups <= 0:
            return None
        target = self.backup_dir / f"{self.path.stem}-{_stamp()}{self.path.suffix}"
        try:
            own_dir(self.backup_dir)
            os.link(self.path, target, follow_symlinks=False)
            if not stat.S_ISREG(os.lstat(target).st_mode):
                target.unlink()
                raise LinkRefused(self.path)
        except OSError:
            self._write_backup(target, data)
        for old in self.backups()[: -self.opts.backups]:
            old.unlink(missing_ok=True)
        return target

    def _write_backup(self, target: Path, data: bytes) -> None:
        try:
            own_dir(self.backup_dir)
            write_atomic(target, data, mode=0o600)
        except OSError as exc:
            raise XrayStorageError(f"cannot write backup {target}: {failure_reason(exc)}") from None

    def _refuse_link(self) -> None:
        try:
            refuse_link(self.path)
        except LinkRefused as exc:
            raise XrayStorageError(f"cannot write Xray config: {failure_reason(exc)}") from None

    def _mode_and_owner(self) -> tuple[int, tuple[int, int]]:
        """0640 root:PORTMETER_XRAY_GROUP. Without that setting an existing file keeps its
        owner, group and read bits (Xray reads it that way today), a new one is 0640 root:root."""
        if self.opts.file_group is not None:
            return 0o640, (0, self.opts.file_group)
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return 0o640, (0, 0)
        return stat.S_IMODE(info.st_mode) & 0o644, (info.st_uid, info.st_gid)

    def _replace(self, data: bytes) -> None:
        mode, owner = self._mode_and_owner()
        try:
            write_atomic(self.path, data, mode=mode, owner=owner, dir_mode=0o750)
        except OSError as exc:
            raise XrayStorageError(
                f"cannot write Xray config {self.path}: {failure_reason(exc)}"
            ) from None

    def _run_binary_test(self, data: bytes) -> None:
        binary = self.opts.xray_bin
        name = self.path.name if self.path.suffix == ".json" else "config.json"
        with tempfile.TemporaryDirectory(prefix="portmeter-xray-") as tmp:
            candidate = Path(tmp) / name
            candidate.write_bytes(data)
            cwd = self.path.parent if self.path.parent.is_dir() else Path(tmp)
            try:
                done = subprocess.run(
                    validate_command(binary, candidate),
                    capture_output=True,
                    cwd=cwd,
                    timeout=self.opts.command_timeout,
                    stdin=subprocess.DEVNULL,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise XrayConfigError(
                    f"{binary} did not finish testing the new config within {self.opts.command_timeout:g}s"
                ) from None
            except OSError as exc:
                raise XrayConfigError(
                    f"cannot run {binary} to test the config: {failure_reason(exc)}"
                ) from None
        if done.returncode != 0:
            reason = failure_line(done.stdout, done.stderr, done.returncode)
            raise XrayConfigError(f"{binary} rejected the new config for {self.path}: {reason}")


def _seal(backup: Path | None) -> None:
    """Make a hard-linked backup 0600 root, now that the live file is another inode. Left alone
    when the inode has other names (the live file after all, or a link the operator made)."""
    if backup is None:
        return
    try:
        fd = os.open(backup, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # it stays in the private backup directory anyway
            if os.fstat(fd).st_nlink == 1:
                if os.geteuid() == 0:
                    os.fchown(fd, 0, 0)
                os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def serialize(config: Mapping[str, Any]) -> bytes:
    """The bytes written for a config: stable, indented, UTF-8, ending in a newline."""
    try:
        return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
    except (TypeError, ValueError) as exc:
        raise XrayConfigError(f"the config cannot be written as JSON ({exc})") from None


def config_status(files: XrayFiles, keys: Collection[XrayKey]) -> dict[str, Any]:
    """What `GET /api/system/xray/config-status` shows, except reachability (see XrayApplier)."""
    opts = files.opts
    status: dict[str, Any] = {
        "path": str(files.path),
        "exists": files.path.exists(),
        "last_write": None,
        "backup_dir": str(files.backup_dir),
        "backup_count": len(files.backups()),
        "inbound_count": 0,
        "portmeter_inbound_count": 0,
        "key_count": len(keys),
        "in_sync": False,
        "apply_mode": opts.apply,
        "security": opts.security,
        "xray_bin": str(opts.xray_bin),
        "xray_bin_found": _executable(opts.xray_bin),
        "error": None,
    }
    if status["exists"]:
        mtime = files.path.stat().st_mtime
        status["last_write"] = datetime.fromtimestamp(mtime, UTC).isoformat()
    try:
        config = files.read()
    except XrayConfigError as exc:
        status["error"] = str(exc)
        return status
    status["inbound_count"] = len(_inbounds(config))
    present = parse_keys(config)
    status["portmeter_inbound_count"] = len(present)
    status["in_sync"] = present == {key.uuid: key.port for key in keys}
    return status


def _stamp() -> str:
    return datetime.now(UTC).strftime(BACKUP_STAMP)


# --- the live file, kept in memory ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rendered:
    """One key's inbound as written: the key, the inbound, and its exact bytes in the file."""

    key: XrayKey
    inbound: Config
    text: bytes


def _rendered(key: XrayKey, opts: XrayOptions, reality: Reality | None) -> _Rendered:
    inbound = render_inbound(key, opts, reality)
    return _Rendered(key, inbound, _fragment(inbound))


def _by_port(rendered: Iterable[_Rendered]) -> list[_Rendered]:
    """In the order the files list key inbounds."""
    return sorted(rendered, key=lambda r: r.key.port)


def _fragment(inbound: Mapping[str, Any]) -> bytes:
    """An inbound's bytes inside the written file.

    `serialize` nests every inbound at depth two and JSON strings hold no raw newline, so the
    inbound's own indented dump with four more spaces after each newline is exactly its text
    there, whatever else the file holds.
    """
    try:
        return json.dumps(inbound, indent=2, ensure_ascii=False).replace("\n", "\n    ").encode()
    except (TypeError, ValueError) as exc:
        raise XrayConfigError(f"the config cannot be written as JSON ({exc})") from None


@dataclass(frozen=True, slots=True)
class _Delta:
    """The key inbounds one push takes out of the live file and puts into it."""

    leaving: tuple[_Rendered, ...] = ()
    arriving: tuple[_Rendered, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.leaving or self.arriving)

    def changes(self) -> InboundChanges:
        """What `inbound_changes(old, new)` gives for the whole files, from the changed keys only."""
        before = {r.key.uuid: r.inbound for r in self.leaving}
        after = {r.key.uuid: r.inbound for r in self.arriving}
        removed = [r.key.tag for r in _by_port(self.leaving) if after.get(r.key.uuid) != r.inbound]
        added = [r.inbound for r in _by_port(self.arriving) if before.get(r.key.uuid) != r.inbound]
        return InboundChanges(tuple(added), tuple(removed))

    def reversed(self) -> _Delta:
        return _Delta(self.arriving, self.leaving)


class _Model:
    """The live file as portmeter last wrote it, in pieces a one-key change can splice.

    The operator's part is fixed text around the list of key inbounds (`head`, `tail`); the key
    inbounds are one fragment each, kept in port order. Invariants while a model is in use: the
    file whose signature is `signature` holds exactly `data`, and `check_config` finds nothing
    wrong with it, so a change needs checking only where it can break something.
    """

    def __init__(
        self,
        head: bytes,
        tail: bytes,
        kept: Sequence[Any],
        rendered: Sequence[_Rendered],
        reality: Reality | None,
    ) -> None:
        self.head, self.tail, self.reality = head, tail, reality
        self.kept_tags = {
            tag for i in kept if isinstance(i, Mapping) and isinstance(tag := i.get("tag"), str)
        }
        self.kept_ports: dict[int, list[str]] = {}
        for inbound in kept:
            if isinstance(inbound, Mapping) and (port := inbound_port(inbound)) is not None:
                self.kept_ports.setdefault(port, []).append(str(inbound.get("listen") or ""))
        self.by_uuid = {r.key.uuid: r for r in rendered}
        # By id() of the XrayKey: the model holds each key, so no other object has its id.
        self.by_object = {id(r.key): r for r in rendered}
        self.ports = [r.key.port for r in rendered]
        self.texts = [r.text for r in rendered]
        self.data = self.assemble()
        self.signature: Signature | None = None

    @classmethod
    def build(
        cls,
        config: Config,
        rendered: Sequence[_Rendered],
        opts: XrayOptions,
        reality: Reality | None,
    ) -> _Model | None:
        """The model of `config`, rendered from `rendered` (by port), or None where splicing
        would not give what `render_config` gives.

        That is without key inbounds (whether "inbounds" is written at all then depends on the
        file's history), and in api mode with an api tag shaped like a key's (a key inbound
        could then stand in for the API inbound).
        """
        if not rendered:
            return None
        if opts.apply == "api" and tag_uuid(config["api"].get("tag")) is not None:
            return None
        inbounds = config["inbounds"]
        kept = inbounds[: len(inbounds) - len(rendered)]
        marker = f"portmeter-key-inbounds-{secrets.token_hex(16)}"
        around = serialize({**config, "inbounds": [*kept, marker]}).split(json.dumps(marker).encode())
        if len(around) != 2:
            return None
        return cls(around[0], around[1], kept, rendered, reality)

    def assemble(self) -> bytes:
        return b"".join((self.head, INBOUND_SEPARATOR.join(self.texts), self.tail))

    def delta(
        self, keys: Sequence[XrayKey], opts: XrayOptions, reality: Reality | None
    ) -> _Delta | None:
        """The change from the file's keys to `keys`, its new inbounds rendered and checked.

        None when only a full render can tell: another server key pair, no keys, keys sharing a
        uuid or port, an inbound that cannot be rendered or would be refused. The full path then
        raises the very error it always raised.

        Unchanged keys are the very XrayKey objects of the last push (the bridge caches them),
        so the changed ones are found by comparing sets of object ids, which never touches the
        keys themselves: set operations over a list, not a walk through 10,000 objects.
        """
        if reality != self.reality or not keys:
            return None
        objects = set(map(id, keys))
        if len(objects) != len(keys):
            return None
        arriving = [key for key in keys if id(key) not in self.by_object]
        leaving = []
        if len(self.by_object) != len(keys) - len(arriving):  # some keys of the file are gone
            leaving = [r for i, r in self.by_object.items() if i not in objects]
        freed = {r.key.uuid: r.key.port for r in leaving}
        uuids: set[str] = set()
        ports: set[int] = set()
        for key in arriving:
            if key.uuid in uuids or (key.uuid in self.by_uuid and key.uuid not in freed):
                return None
            if key.port in ports or (self._has_port(key.port) and key.port not in freed.values()):
                return None
            uuids.add(key.uuid)
            ports.add(key.port)
        try:
            rendered = [_rendered(key, opts, reality) for key in arriving]
        except XrayConfigError:
            return None
        if any(self._refused(r, opts) for r in rendered):
            return None
        return _Delta(tuple(leaving), tuple(rendered))

    def swap(self, delta: _Delta) -> None:
        """Take the delta's leaving inbounds out and put its arriving ones in, by port."""
        for r in delta.leaving:
            at = bisect_left(self.ports, r.key.port)
            del self.ports[at], self.texts[at], self.by_uuid[r.key.uuid], self.by_object[id(r.key)]
        for r in delta.arriving:
            at = bisect_left(self.ports, r.key.port)
            self.ports.insert(at, r.key.port)
            self.texts.insert(at, r.text)
            self.by_uuid[r.key.uuid] = r
            self.by_object[id(r.key)] = r

    def _has_port(self, port: int) -> bool:
        at = bisect_left(self.ports, port)
        return at < len(self.ports) and self.ports[at] == port

    def _refused(self, rendered: _Rendered, opts: XrayOptions) -> bool:
        """Whether `check_config` would object to this new inbound: its REALITY fields, or a tag
        or port (on an overlapping listen address) that one of the operator's inbounds has."""
        inbound = rendered.inbound
        if inbound["tag"] in self.kept_tags or _security_problems(inbound, opts):
            return True
        listen = str(inbound.get("listen") or "")
        return any(
            listen == other or _wildcard(listen) or _wildcard(other)
            for other in self.kept_ports.get(rendered.key.port, ())
        )


@dataclass(frozen=True, slots=True)
class Written:
    """What one `LiveConfig.push` did: the changes for Xray, and what `LiveConfig.undo` needs."""

    previous: bytes | None  # the file's bytes before (None: there was no file)
    backup: Path | None
    changes: InboundChanges
    # The changes that take a running Xray back; computed only when undoing.
    reverse: Callable[[], InboundChanges]
    wrote: bool
    delta: _Delta | None = None  # set when the push spliced the model
    comments_dropped: bool = False  # the replaced file had comments (its backup keeps them)


class LiveConfig:
    """Xray's config for a set of keys, written at the cost of what changed, not of all keys.

    Keeps a model of the live file (see `_Model`). A push re-renders only keys whose XrayKey
    changed, checks only what they can break, splices their fragments into the file's bytes and
    replaces the file (with a hard-linked backup). The bytes are always exactly
    `serialize(render_config(live config, keys, ...))`. Whenever the model cannot vouch for
    that (no model yet, the file changed behind our back, a new `base`, anything unusual) the
    push takes the full path: read, render, validate and write everything, as before.
    """

    def __init__(self, files: XrayFiles) -> None:
        self.files = files
        self._model: _Model | None = None
        self._last: Written | None = None

    @property
    def opts(self) -> XrayOptions:
        return self.files.opts

    def push(
        self,
        keys: Sequence[XrayKey],
        reality: Reality | None,
        base: Mapping[str, Any] | None = None,
    ) -> Written:
        """Write the config for `keys` (on `base`, default: the live file); raise XrayError
        having left the live file as it was."""
        model, self._model = self._model, None  # until the file is known to match it again
        if model is not None and base is None and model.signature == self.files.signature():
            delta = model.delta(keys, self.opts, reality)
            if delta is not None:
                self._last = self._splice(model, delta)
                return self._last
        self._last = self._full(keys, reality, base)
        return self._last

    def undo(self, written: Written) -> None:
        """Put back the bytes `written` replaced and drop its backup; Xray is the caller's part.

        After the latest push the model is rolled back too; otherwise it is dropped and the
        next push takes the full path.
        """
        if not written.wrote:
            return
        model, self._model = self._model, None
        self.files.restore(written.previous)
        self.files.discard_backup(written.backup)
        if model is not None and written is self._last and written.delta is not None:
            model.swap(written.delta.reversed())
            model.data = model.assemble()
            model.signature = self.files.signature()
            self._model = model
        self._last = None

    def _splice(self, model: _Model, delta: _Delta) -> Written:
        previous = model.data
        model.swap(delta)
        data = model.assemble() if delta else previous
        if data == previous:  # no key changed, or none in a way its inbound shows (e.g. its id)
            self._model = model
            return Written(previous, None, InboundChanges(), InboundChanges, False)
        try:
            self.files.binary_test(data)
            backup = self.files.replace(data, previous)
        except XrayError:
            model.swap(delta.reversed())  # the live file was not replaced
            self._model = model
            raise
        model.data, model.signature = data, self.files.signature()
        self._model = model
        return Written(previous, backup, delta.changes(), delta.reversed().changes, True, delta)

    def _full(
        self, keys: Sequence[XrayKey], reality: Reality | None, base: Mapping[str, Any] | None
    ) -> Written:
        previous, signature = self.files.read_signed()
        read = self.files.parse_text(previous)
        old = read.config
        by_port = sorted(keys, key=lambda k: k.port)
        _check_keys_unique(by_port)
        ours = [render_inbound(key, self.opts, reality) for key in by_port]
        new = _with_inbounds(old if base is None else base, ours, self.opts)
        try:
            rendered = [_Rendered(k, i, _fragment(i)) for k, i in zip(by_port, ours, strict=True)]
            model = _Model.build(new, rendered, self.opts, reality)
        except XrayConfigError:
            model = None  # serialize raises the error for the whole config below
        data = serialize(new) if model is None else model.data
        if data == previous:
            if model is not None and not check_config(new, self.opts, keys):
                model.signature = signature
                self._model = model
            return Written(previous, None, InboundChanges(), InboundChanges, False)
        self.files.validate(new, keys, data)
        backup = self.files.replace(data, previous)
        if model is not None:
            model.signature = self.files.signature()
            self._model = model
        return Written(
            previous,
            backup,
            inbound_changes(old, new),
            lambda: inbound_changes(new, old),
            True,
            comments_dropped=read.comments,
        )


# --- applying ------------------------------------------------------------------------------


def is_v2ray(binary: Path) -> bool:
    """Debian's v2ray 4.x takes `-test -config FILE`; Xray takes `run -test -c FILE`."""
    return binary.name.startswith(("v2ray", "v2ctl"))


def validate_command(binary: Path, config_file: Path) -> list[str]:
    if is_v2ray(binary):
        return [str(binary), "-test", "-config", str(config_file)]
    return [str(binary), "run", "-test", "-c", str(config_file)]


def api_add_command(opts: XrayOptions, inbound_files: Sequence[Path]) -> list[str]:
    """`xray api adi --server=ADDR FILE...`; each file is a config holding "inbounds": [...]."""
    return [
        str(opts.xray_bin),
        "api",
        "adi",
        f"--server={opts.api_address}",
        *map(str, inbound_files),
    ]


def api_remove_command(opts: XrayOptions, tags: Sequence[str]) -> list[str]:
    """`xray api rmi --server=ADDR TAG...` (an argument naming an existing file is read as JSON)."""
    return [str(opts.xray_bin), "api", "rmi", f"--server={opts.api_address}", *tags]


def failure_line(stdout: bytes | None, stderr: bytes | None, returncode: int) -> str:
    """The most telling line of a failed command: the first that names a failure, else the last."""
    texts = [(stream or b"").decode(errors="replace") for stream in (stderr, stdout)]
    for text in texts:
        for line in text.splitlines():
            if FAILURE_LINE.search(line):
                return line.strip()
    for text in texts:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return f"exit status {returncode}"


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """How a change reached Xray: the mode, how long it took, the commands that ran."""

    mode: ApplyMode
    seconds: float = 0.0
    commands: tuple[tuple[str, ...], ...] = ()


class XrayApplier:
    """Makes the running Xray serve what was written: nothing, a restart, or API calls."""

    def __init__(self, opts: XrayOptions) -> None:
        self.opts = opts

    async def apply(self, changes: InboundChanges, *, force_restart: bool = False) -> ApplyResult:
        """Apply `changes` the configured way; in restart mode only if there are any (or forced).

        Write the file first: a restart reads it, and in api mode it keeps a later restart
        equal to what the API calls did. To undo after a failure, restore the file and apply
        `inbound_changes(new, old)`.
        """
        started = time.perf_counter()
        mode = self.opts.apply
        if mode == "none" or (mode == "restart" and not changes and not force_restart):
            return ApplyResult(mode)
        if mode == "restart":
            await self.restart()
            return ApplyResult(mode, time.perf_counter() - started, (self.opts.restart_command,))
        commands = [
            *await self.remove_inbounds(changes.removed),
            *await self.add_inbounds(changes.added),
        ]
        return ApplyResult(mode, time.perf_counter() - started, tuple(commands))

    async def restart(self) -> float:
        """Run the restart command; return how long it took."""
        if not self.opts.restart_command:
            raise XrayApplyError("no restart command is configured")
        started = time.perf_counter()
        await self._run(list(self.opts.restart_command), "restart command", cwd=Path("/"))
        return time.perf_counter() - started

    async def add_inbounds(self, inbounds: Sequence[Mapping[str, Any]]) -> list[tuple[str, ...]]:
        """Add each inbound to the running Xray through its API (`xray api adi`)."""
        self._require_xray_api()
        commands = []
        with tempfile.TemporaryDirectory(prefix="portmeter-adi-") as tmp:
            for n, inbound in enumerate(inbounds):
                path = Path(tmp) / f"inbound-{n}.json"
                write_atomic(path, serialize({"inbounds": [inbound]}), mode=0o600)
                command = api_add_command(self.opts, [path])
                await self._run(command, f"adding inbound {inbound.get('tag')}", cwd=Path(tmp))
                commands.append(tuple(command))
        return commands

    async def remove_inbounds(self, tags: Sequence[str]) -> list[tuple[str, ...]]:
        """Remove inbounds from the running Xray by tag; one Xray does not have is no error."""
        self._require_xray_api()
        commands = []
        with tempfile.TemporaryDirectory(prefix="portmeter-rmi-") as tmp:
            for tag in tags:
                command = api_remove_command(self.opts, [tag])
                # An empty working directory: rmi reads an argument naming a file as JSON.
                await self._run(command, f"removing inbound {tag}", cwd=Path(tmp), absent_ok=True)
                commands.append(tuple(command))
        return commands

    async def reachable(self, timeout: float = 1.0) -> bool | None:
        """Whether Xray's API port accepts connections (None when apply mode is not api)."""
        if self.opts.apply != "api":
            return None
        host, port = _split_host_port(self.opts.api_address)
        try:
            with anyio.fail_after(timeout):
                stream = await anyio.connect_tcp(host, port)
        except (OSError, TimeoutError):
            return False
        await stream.aclose()
        return True

    def _require_xray_api(self) -> None:
        if is_v2ray(self.opts.xray_bin):
            raise XrayApplyError(
                f"apply mode api needs Xray's `xray api adi/rmi`; {self.opts.xray_bin} is v2ray "
                "(use apply mode restart)"
            )

    async def _run(self, command: list[str], what: str, cwd: Path, absent_ok: bool = False) -> None:
        try:
            with anyio.fail_after(self.opts.command_timeout):
                done = await anyio.run_process(
                    command, check=False, cwd=cwd, stdin=subprocess.DEVNULL
                )
        except TimeoutError:
            raise XrayApplyError(
                f"{what}: {command[0]} did not finish within {self.opts.command_timeout:g}s"
            ) from None
        except OSError as exc:
            raise XrayApplyError(f"{what}: cannot run {command[0]}: {failure_reason(exc)}") from None
        if done.returncode == 0:
            return
        output = (done.stdout or b"") + (done.stderr or b"")
        if absent_ok and ABSENT_INBOUND.encode() in output:
            return
        reason = failure_line(done.stdout, done.stderr, done.returncode)
        if "failed to dial" in reason:
            reason += " (is Xray running with its API enabled? restart it once after enabling)"
        raise XrayApplyError(f"{what} failed (exit {done.returncode}): {reason}")


# --- helpers -------------------------------------------------------------------------------


def _inbounds(config: Mapping[str, Any]) -> list[Any]:
    inbounds = config.get("inbounds", [])
    if inbounds is None:
        return []
    if not isinstance(inbounds, list):
        raise XrayConfigError("the config's 'inbounds' is not a list")
    return inbounds


def _mapping(value: object) -> Mapping[str, Any]:
    """`value` when it is an object, else an empty one: for optional parts of an inbound."""
    return value if isinstance(value, Mapping) else {}


def _clients(inbound: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    settings = inbound.get("settings")
    clients = settings.get("clients") if isinstance(settings, Mapping) else None
    if not isinstance(clients, list):
        return []
    return [c for c in clients if isinstance(c, Mapping)]


def _reality_settings(inbound: Mapping[str, Any]) -> Mapping[str, Any]:
    stream = inbound.get("streamSettings")
    settings = stream.get("realitySettings") if isinstance(stream, Mapping) else None
    return settings if isinstance(settings, Mapping) else {}


def _describe(inbound: Mapping[str, Any]) -> str:
    tag = inbound.get("tag")
    name = repr(tag) if tag else "(untagged)"
    return f"{name} ({inbound.get('protocol', '?')})"


def _routes_api(rule: object, tag: object) -> bool:
    if not isinstance(rule, Mapping) or rule.get("outboundTag") != tag:
        return False
    inbound_tags = rule.get("inboundTag")
    return inbound_tags == tag or (isinstance(inbound_tags, list) and tag in inbound_tags)


def _reality_for(key: XrayKey, reality: Reality | None) -> Reality:
    pair = key.reality or reality
    if pair is None:
        raise XrayConfigError(f"key {key.id} has no REALITY key pair and the server has none")
    return pair


def _stream_settings(key: XrayKey, opts: XrayOptions, reality: Reality | None) -> Config:
    if opts.security == "none":
        return {"network": "tcp", "security": "none"}
    if not opts.reality_dest:
        raise XrayConfigError("REALITY dest is not set (PORTMETER_REALITY_DEST, e.g. host:443)")
    pair = _reality_for(key, reality)
    return {
        "network": "tcp",
        "security": "reality",
        "realitySettings": {
            "show": False,
            "dest": opts.reality_dest,
            "xver": 0,
            "serverNames": list(opts.server_names),
            "privateKey": pair.private_key,
            "shortIds": key.short_ids,
            "maxTimeDiff": opts.max_time_diff,
        },
    }


def _check_keys_unique(keys: Sequence[XrayKey]) -> None:
    for what, values in (("port", [k.port for k in keys]), ("uuid", [k.uuid for k in keys])):
        twice = sorted(str(v) for v, n in Counter(values).items() if n > 1)
        if twice:
            raise XrayConfigError(f"two keys share the {what} {twice[0]}")


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise XrayConfigError(f"address {address!r} must look like host:port")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


__all__ = [
    "ApplyResult",
    "ConfigText",
    "DriftProblem",
    "InboundChanges",
    "LiveConfig",
    "MigrationMove",
    "MigrationPlan",
    "Reality",
    "Written",
    "XrayApplier",
    "XrayApplyError",
    "XrayConfigError",
    "XrayError",
    "XrayFiles",
    "XrayKey",
    "XrayOptions",
    "XrayStorageError",
    "api_add_command",
    "api_problems",
    "api_remove_command",
    "apply_migration",
    "check_config",
    "client_flow",
    "config_status",
    "decode_key",
    "drift",
    "drift_report",
    "failure_line",
    "generate_reality",
    "inbound_changes",
    "inbound_port",
    "inbound_tag",
    "is_portmeter_inbound",
    "is_v2ray",
    "minimal_base",
    "new_short_id",
    "parse_keys",
    "plan_migration",
    "portmeter_inbounds",
    "public_key",
    "read_config_text",
    "reality_from_private",
    "render_config",
    "render_inbound",
    "serialize",
    "subscription",
    "tag_uuid",
    "url_host",
    "validate_command",
    "vless_link",
    "with_api",
    "write_atomic",
    "xray_uuid",
]
