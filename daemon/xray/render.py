"""Rendering: each key's inbound, the api section Xray's API needs, and whole configs.

Config dicts in, new config dicts out (the input is never changed). A config's portmeter
inbounds (see `model`) are replaced as a whole, after the operator's, by port; nothing else the
operator wrote changes except what apply mode "api" adds. `InboundChanges` says what a running
Xray must be told to get from one config to another.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.xray.model import (
    Config,
    Reality,
    XrayConfigError,
    XrayKey,
    XrayOptions,
    inbounds_of,
    is_portmeter_inbound,
    mapping,
    portmeter_inbounds,
    routing_rules,
    rule_inbound_tags,
    split_host_port,
    tag_uuid,
)


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
    """The inbound of one key: VLESS (with REALITY unless the options say otherwise) on the key's
    port, tagged `inbound-<uuid>` (README, "Xray"); a migrated key's is its template with the
    key's port and tag."""
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


def reality_for(key: XrayKey, reality: Reality | None) -> Reality:
    """The key's own pair, else the server's; XrayConfigError when neither exists."""
    pair = key.reality or reality
    if pair is None:
        raise XrayConfigError(f"key {key.id} has no REALITY key pair and the server has none")
    return pair


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
    check_keys_unique(keys)
    return with_inbounds(base, [render_inbound(key, opts, reality) for key in keys], opts, keys)


def with_inbounds(
    base: Mapping[str, Any], ours: list[Config], opts: XrayOptions, keys: Sequence[XrayKey] = ()
) -> Config:
    """`base` with its portmeter inbounds replaced by `ours` (rendered from `keys`, by port)
    and its routing rules following the keys (`route_keys`); see render_config."""
    config: Config = copy.deepcopy(dict(base))
    kept = [i for i in inbounds_of(config) if not is_portmeter_inbound(i)]
    if kept or ours or "inbounds" in config:
        config["inbounds"] = kept + ours
    route_keys(config, keys, {t for i in kept if isinstance(t := mapping(i).get("tag"), str)})
    if opts.apply == "api":
        config = with_api(config, opts)
    return config


def route_keys(config: Config, keys: Sequence[XrayKey], kept_tags: Collection[str]) -> None:
    """In place: every routing rule that names a shared inbound among a key's `route_sources`
    (the one it was migrated from, or those a migration replaced before it was created) names
    the key's inbound too, and a key inbound's tag leaves the rules with its key (the
    operator's tags, `kept_tags` among them, always stay; a rule is never emptied). Rules that
    need no change are not touched."""
    rules = routing_rules(config)
    if not rules:
        return
    by_source: dict[str, list[str]] = {}
    for key in keys:
        for source in key.route_sources:
            by_source.setdefault(source, []).append(key.tag)
    present = {key.tag for key in keys}
    for rule in rules:
        named = rule_inbound_tags(rule)
        if not named or not isinstance(rule, dict):
            continue
        kept = [t for t in named if tag_uuid(t) is None or t in present or t in kept_tags]
        wanted = list(kept or named)
        seen = set(wanted)
        for source in (t for t in named if t in by_source):
            wanted += [t for t in by_source[source] if t not in seen]
            seen.update(by_source[source])
        if wanted != named:
            rule["inboundTag"] = wanted


def routed_tags(config: Mapping[str, Any]) -> set[str]:
    """Every inbound tag a routing rule names: a key whose tag or source is among them changes
    the rules when it comes or goes."""
    return {tag for rule in routing_rules(config) for tag in rule_inbound_tags(rule)}


def check_keys_unique(keys: Sequence[XrayKey]) -> None:
    """XrayConfigError when two keys share a port or a uuid (their inbounds would collide)."""
    for what, values in (("port", [k.port for k in keys]), ("uuid", [k.uuid for k in keys])):
        twice = sorted(str(v) for v, n in Counter(values).items() if n > 1)
        if twice:
            raise XrayConfigError(f"two keys share the {what} {twice[0]}")


# --- the api section -----------------------------------------------------------------------


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
    inbounds = inbounds_of(result)
    result["inbounds"] = inbounds
    if not any(isinstance(i, Mapping) and i.get("tag") == tag for i in inbounds):
        host, port = split_host_port(opts.api_address)
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
    if not any(isinstance(i, Mapping) and i.get("tag") == tag for i in inbounds_of(config)):
        found.append(f"apply mode is api but no inbound carries the api tag {tag!r}")
    routing = config.get("routing")
    rules = routing.get("rules") if isinstance(routing, Mapping) else None
    if not isinstance(rules, list) or not any(_routes_api(rule, tag) for rule in rules):
        found.append(f"apply mode is api but no routing rule sends inbound {tag!r} to the API")
    return found


# --- from one config to another ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InboundChanges:
    """What a running Xray must be told to get from one config's portmeter inbounds to another's."""

    added: tuple[Config, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)

    @classmethod
    def between(cls, before: Mapping[str, Config], after: Mapping[str, Config]) -> InboundChanges:
        """From inbounds by tag to inbounds by tag: a changed one is removed and re-added."""
        removed = [tag for tag, inbound in before.items() if after.get(tag) != inbound]
        added = [inbound for tag, inbound in after.items() if before.get(tag) != inbound]
        return cls(tuple(added), tuple(removed))


def inbound_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> InboundChanges:
    """Portmeter inbounds to remove (by tag) and add; a changed one is removed and re-added."""
    return InboundChanges.between(
        {i["tag"]: i for i in portmeter_inbounds(old)},
        {i["tag"]: i for i in portmeter_inbounds(new)},
    )


def _routes_api(rule: object, tag: object) -> bool:
    if not isinstance(rule, Mapping) or rule.get("outboundTag") != tag:
        return False
    inbound_tags = rule.get("inboundTag")
    return inbound_tags == tag or (isinstance(inbound_tags, list) and tag in inbound_tags)


def _stream_settings(key: XrayKey, opts: XrayOptions, reality: Reality | None) -> Config:
    if opts.security == "none":
        return {"network": "tcp", "security": "none"}
    if not opts.reality_dest:
        raise XrayConfigError("REALITY dest is not set (PORTMETER_REALITY_DEST, e.g. host:443)")
    pair = reality_for(key, reality)
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
