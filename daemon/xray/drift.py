"""Checks: what would make Xray refuse a config or lose a key, and how a config drifted from the
keys it should serve.

Config dicts and keys in, problems out (one line each an operator can act on); nothing is
fixed here. `check_config` guards every write, `drift_report` answers the drift endpoint and
`security_problems` / `listens_overlap` are the pieces a one-key change re-checks alone.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from daemon.allocator import PortRange
from daemon.xray.model import (
    Reality,
    XrayConfigError,
    XrayKey,
    XrayOptions,
    clients,
    inbound_port,
    inbounds_of,
    is_portmeter_inbound,
    port_spans,
    portmeter_inbounds,
    ports_among,
    reality_settings,
    tag_uuid,
    unix_listen,
)
from daemon.xray.reality import decode_key

HEX_ID = re.compile(r"(?:[0-9a-fA-F]{2})*\Z")  # a short id: hex, either case, even length
from daemon.xray.render import api_problems, render_inbound


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
        found += [f"inbound {inbound['tag']}: {p}" for p in security_problems(inbound, opts)]
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
    inbounds = [i for i in inbounds_of(config) if isinstance(i, Mapping)]
    by_tag = {i.get("tag"): i for i in inbounds if i.get("tag")}
    found: list[DriftProblem] = []
    for key in keys:
        found += _key_drift(key, by_tag.get(key.tag), inbounds, opts, reality)
    wanted = {key.uuid for key in keys}
    key_ports = {key.port for key in keys}
    for inbound in inbounds:
        if is_portmeter_inbound(inbound):
            if tag_uuid(inbound["tag"]) not in wanted:
                port = inbound_port(inbound)
                found.append(
                    DriftProblem(
                        "stale",
                        f"inbound {inbound['tag']} on port {port} has no key (stale)",
                        port=port,
                    )
                )
        elif port_range is not None:
            held = ports_among(port_spans(inbound), port_range.first, port_range.last)
            for port in sorted(held - key_ports):
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


def security_problems(inbound: Mapping[str, Any], opts: XrayOptions) -> list[str]:
    """Why the inbound's security is not what the options ask for, or Xray would refuse its
    REALITY settings."""
    stream = inbound.get("streamSettings")
    found = stream.get("security", "none") if isinstance(stream, Mapping) else "none"
    security = found.lower() if isinstance(found, str) else found  # Xray reads any case
    if opts.security == "reality" and security != "reality":
        return [f"security is {found!r}, REALITY is configured"]
    if security != "reality":
        return []
    return reality_problems(reality_settings(inbound))


def reality_problems(settings: Mapping[str, Any]) -> list[str]:
    """What Xray's REALITY config builder refuses in a server's realitySettings, in its words
    (REALITYConfig.Build, infra/conf/transport_security.go); empty when it accepts them.

    It accepts what looks odd: `""` among serverNames (a ClientHello without SNI), short ids in
    upper case (hex) and `""` among them, `target` for `dest`, a port number as the dest. A
    settings object without dest or target is read as a client's, and refused."""
    if not settings:
        return ['empty "realitySettings"']
    found = []
    target = settings.get("target")
    target = settings.get("dest") if target is None else target
    if target is None:
        found.append('no "dest" (or "target"): Xray reads these settings as a client\'s')
    elif not _target_valid(target, settings.get("type")):
        found.append('please fill in a valid value for "target"')
    xver = settings.get("xver", 0)
    if isinstance(xver, bool) or xver not in (0, 1, 2):
        found.append('invalid PROXY protocol version, "xver" only accepts 0, 1, 2')
    found += _names_problems(settings.get("serverNames"))
    private = settings.get("privateKey")
    if not private:
        found.append('empty "privateKey"')
    elif not _raw_key(private):
        found.append(f'invalid "privateKey": {private}')
    for name in ("minClientVer", "maxClientVer"):
        version = settings.get(name)
        if version and not _version_valid(version):
            found.append(f'invalid "{name}": {version}')
    found += _short_id_problems(settings.get("shortIds"))
    seed = settings.get("mldsa65Seed")
    if seed and seed == private:
        found.append(f'"mldsa65Seed" and "privateKey" can not be the same value: {seed}')
    elif seed and not _raw_key(seed):
        found.append(f'invalid "mldsa65Seed": {seed}')
    return found


def _target_valid(target: object, kind: object) -> bool:
    """A REALITY dest as Xray takes it: a port number, or a string that is a unix socket
    ("/…", "@…"), a port, or host:port (Go's net.SplitHostPort); anything with a `type`."""
    if kind:
        return True
    if isinstance(target, int) and not isinstance(target, bool):
        return True
    if not isinstance(target, str) or not target:
        return False
    if target.startswith(("/", "@")) or target.isdigit():
        return True
    host, colon, port = target.rpartition(":")
    if not colon or "[" in port or "]" in port:
        return False
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif "[" in host or "]" in host:
        return False
    return ":" not in host or target.startswith("[")


def _names_problems(names: object) -> list[str]:
    if not names:
        return ['empty "serverNames"']
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return ['"serverNames" must be a list of strings']
    return []


def _short_id_problems(short_ids: object) -> list[str]:
    if not short_ids:
        return ['empty "shortIds"']
    if not isinstance(short_ids, list) or not all(isinstance(s, str) for s in short_ids):
        return ['"shortIds" must be a list of strings']
    found = []
    for at, short_id in enumerate(short_ids):
        if len(short_id) > 16:
            found.append(f'too long "shortIds[{at}]": {short_id}')
        elif not HEX_ID.match(short_id):
            found.append(f'invalid "shortIds[{at}]": {short_id}')
    return found


def _raw_key(text: object) -> bool:
    """32 bytes in base64url without padding, as Xray decodes REALITY's keys."""
    return isinstance(text, str) and "=" not in text and _decodes(text)


def _decodes(text: str) -> bool:
    try:
        decode_key(text)
    except ValueError:
        return False
    return True


def _version_valid(version: object) -> bool:
    """ "a.b.c" with each part below 256 (fewer parts are fine), as Xray reads a client version."""
    if not isinstance(version, str):
        return False
    parts = version.split(".")
    return len(parts) <= 3 and all(p.isdigit() and int(p) < 256 for p in parts)


def listens_overlap(listen: str, other: str) -> bool:
    """Whether two inbounds on one port would clash: same address, or either is a wildcard."""
    return listen == other or _wildcard(listen) or _wildcard(other)


def _key_drift(
    key: XrayKey,
    inbound: Mapping[str, Any] | None,
    inbounds: Sequence[Mapping[str, Any]],
    opts: XrayOptions,
    reality: Reality | None,
) -> list[DriftProblem]:
    who = f"key {key.id} ({key.name}, port {key.port})"
    if inbound is None:
        other = next((i for i in inbounds if _holds(i, key.port)), None)
        if other is None:
            return [DriftProblem("missing", f"{who}: no inbound in the config", key.id, key.port)]
        if is_portmeter_inbound(other):
            message = f"{who}: its port serves uuid {tag_uuid(other['tag'])}, not {key.uuid}"
            return [DriftProblem("uuid_mismatch", message, key.id, key.port)]
        message = f"{who}: no inbound of its own; port {key.port} is taken by {_describe(other)}"
        return [DriftProblem("foreign", message, key.id, key.port)]
    if not is_portmeter_inbound(inbound):
        ids = [c.get("id") for c in clients(inbound)]
        message = f"{who}: inbound {key.tag} has clients {ids}, expected only {key.uuid}"
        return [DriftProblem("uuid_mismatch", message, key.id, key.port)]
    found = []
    port = inbound_port(inbound)
    if port != key.port:
        message = f"{who}: its inbound listens on port {inbound.get('port')}"
        found.append(DriftProblem("port_mismatch", message, key.id, key.port))
    for problem in security_problems(inbound, opts):
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
    if wanted == present:  # the usual case, compared in C: no walk at all
        return []
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


def _duplicate_problems(inbounds: Sequence[Mapping[str, Any]]) -> list[str]:
    """Tags used twice, and ports two inbounds listen on (on overlapping addresses), ranges and
    lists of ports included: Xray would split a port's connections between its listeners."""
    found = []
    tags = Counter(i.get("tag") for i in inbounds if i.get("tag"))
    found += [f"tag {tag!r} is used by {n} inbounds" for tag, n in sorted(tags.items()) if n > 1]
    seen: dict[int, list[str]] = {}  # single ports: every key's, most of the operator's
    wide: list[tuple[int, int, str]] = []  # spans of more than one port
    for inbound in inbounds:
        if unix_listen(inbound) is not None:
            continue  # a unix socket: its port is not listened on
        listen = str(inbound.get("listen") or "")
        for first, last in port_spans(inbound):
            clashes = [
                max(first, a)
                for a, b, other in wide
                if a <= last and first <= b and listens_overlap(listen, other)
            ]
            if first == last:
                clashes += [first] * any(listens_overlap(listen, o) for o in seen.get(first, ()))
                seen.setdefault(first, []).append(listen)
            else:
                clashes += [
                    port
                    for port, listens in seen.items()
                    if first <= port <= last and any(listens_overlap(listen, o) for o in listens)
                ]
                wide.append((first, last, listen))
            found += [f"port {port} is used by more than one inbound" for port in sorted(clashes)]
    return sorted(set(found), key=found.index)


def _holds(inbound: Mapping[str, Any], port: int) -> bool:
    """Whether the inbound listens on `port` (one of its ports, ranges and lists included)."""
    return unix_listen(inbound) is None and any(a <= port <= b for a, b in port_spans(inbound))


def _wildcard(listen: str) -> bool:
    return listen in ("", "0.0.0.0", "::", "[::]")


def _describe(inbound: Mapping[str, Any]) -> str:
    tag = inbound.get("tag")
    name = repr(tag) if tag else "(untagged)"
    return f"{name} ({inbound.get('protocol', '?')})"
