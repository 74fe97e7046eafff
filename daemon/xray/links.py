"""Share links: a key's vless:// link and the subscription body that carries links.

A link describes the key's inbound exactly as `render` writes it (or as a migrated key's
template has it), named the way v2rayN, Hiddify, Streisand and NekoBox read links; strings out,
nothing stored.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, urlencode

from daemon.names import host_problem
from daemon.xray.model import (
    Reality,
    XrayConfigError,
    XrayKey,
    XrayOptions,
    clients,
    mapping,
)
from daemon.xray.reality import reality_from_private
from daemon.xray.render import client_flow, reality_for, render_inbound
from daemon.xray.vlessenc import client_encryption


def vless_link(key: XrayKey, opts: XrayOptions, reality: Reality | None = None) -> str:
    """The standard vless:// share link of a key (v2rayN, Hiddify, Streisand, NekoBox ...).

    It describes the key's inbound as those clients read a link: the transport (`type` with
    its fields), REALITY (`pbk`, `sid` from the inbound's shortIds, `sni` from its serverNames,
    `fp`, `spx` when set), `encryption` (the client half of the inbound's VLESS decryption)
    and `flow` only where the inbound's client has one.
    """
    if not opts.public_host:
        raise XrayConfigError("the public host is not set (PORTMETER_PUBLIC_HOST); links need it")
    if problem := host_problem(opts.public_host):
        raise XrayConfigError(f"the public host: {problem}")
    encryption = "none"
    if key.template:
        inbound = render_inbound(key, opts, reality)
        stream = mapping(inbound.get("streamSettings"))
        client, settings = clients(inbound)[0], mapping(inbound.get("settings"))
        client_id, flow = str(client["id"]), str(client.get("flow") or settings.get("flow") or "")
        try:
            encryption = client_encryption(settings.get("decryption"))
        except ValueError as exc:
            raise XrayConfigError(f"key {key.id}: {exc}") from None
    else:
        reality_settings = {"serverNames": list(opts.server_names), "shortIds": key.short_ids}
        stream = {"security": opts.security, "realitySettings": reality_settings}
        client_id, flow = key.uuid, client_flow(key, opts)
    security = str(stream.get("security") or "none").lower()  # Xray reads any case
    params = {**_transport_params(stream), "encryption": encryption, "security": security}
    if security == "reality":
        params.update(_reality_params(key, mapping(stream.get("realitySettings")), opts, reality))
    if flow:
        params["flow"] = flow
    query = urlencode(params, quote_via=quote)
    where = f"{url_host(opts.public_host)}:{key.port}"
    return f"vless://{quote(client_id, safe='')}@{where}?{query}#{quote(key.name, safe='')}"


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


def _transport_params(stream: Mapping[str, Any]) -> dict[str, str]:
    """`type` and the fields of the inbound's transport, named as share links name them."""
    network = str(stream.get("network") or "tcp").lower()
    if network in ("tcp", "raw"):
        header = mapping(_transport(stream, "rawSettings", "tcpSettings").get("header"))
        params = {"type": "tcp", "headerType": str(header.get("type") or "none")}
        if params["headerType"] == "http":
            request = mapping(header.get("request"))
            host = mapping(request.get("headers")).get("Host")
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
    host = settings.get("host") or mapping(settings.get("headers")).get("Host")
    return {"type": network, **_host_path(host, settings.get("path"))}


def _transport(stream: Mapping[str, Any], *names: str) -> Mapping[str, Any]:
    """The first of the transport's settings objects present (Xray's current name first)."""
    return next((mapping(stream[n]) for n in names if n in stream), {})


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
    pair = pair or reality_for(key, None)  # raises: neither the key nor the server has a pair
    client_side = {**mapping(settings.get("settings")), **settings}
    # The first name a client can send: "" stands for a ClientHello without SNI.
    names = [str(n) for n in settings.get("serverNames") or [] if n]
    short_ids = [str(s) for s in settings.get("shortIds") or []]
    # The key's own short id where the inbound takes it, else the inbound's first non-empty one.
    if key.short_id and (key.short_id in map(str.lower, short_ids) or not short_ids):
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
