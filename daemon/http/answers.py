"""The JSON shapes of keys and their traffic, shared by the routes that answer them.

Field names and their order are the API the bots call (`rx_bytes`, `total_formatted`, ...): bots
and the page read them, so a field is added at the end and never renamed.
"""

from __future__ import annotations

from typing import Any, Protocol

from daemon.limits import Status
from daemon.service.kernel_side import Established
from daemon.store.state import KeyRecord
from daemon.units import human_bytes, iso
from daemon.xray.model import XrayError


class KeyFacts(Protocol):
    """What a key's answer needs besides the record (the Service front offers both)."""

    def link(self, key: KeyRecord) -> str | None: ...

    def key_error(self, key_id: str) -> str | None: ...


def key_object(key: KeyRecord, facts: KeyFacts) -> dict[str, Any]:
    """A key as GET /api/keys/{key_id} answers it."""
    return {
        **key_fields(key),
        "link": _link(key, facts),
        "subscription_url": f"/sub/{key.sub_token}" if key.sub_token else None,
        "error": facts.key_error(key.id),  # this key's failed kernel step, if any
    }


def _link(key: KeyRecord, facts: KeyFacts) -> str | None:
    """The key's link, or null when Xray is off or the link cannot be built."""
    try:
        return facts.link(key)
    except XrayError:
        return None


def key_fields(key: KeyRecord) -> dict[str, Any]:
    """The record's own fields: what a deleted key's answer still shows."""
    return {
        "id": key.id,
        "name": key.name,
        "uuid": str(key.uuid),
        "port": key.port,
        "created_at": key.created_at.isoformat(),
        "is_active": key.status is Status.ACTIVE,
        "status": key.status.value,
        "enabled": key.enabled,
        "note": key.note,
        "data_limit_bytes": key.data_limit_bytes,
        "used_bytes": key.used_bytes,
        "dropped_bytes": key.dropped.bytes,
        "expire_at": iso(key.expire_at),
        "reset_strategy": key.reset_strategy.value,
        "next_reset_at": iso(key.next_reset_at),
        "last_reset_at": iso(key.last_reset_at),
        "used_before_reset": key.used_before_reset,
        "rx_bytes": key.rx.bytes,
        "tx_bytes": key.tx.bytes,
        "total_bytes": key.used_bytes,
        "groups": key.groups,  # README "Keys created once"
        "fleet": key.fleet,
        "speed_limit_bps": key.speed_limit_bps,
        "max_connections": key.max_connections,
        "max_ips": key.max_ips,
        "refused_connections": key.refused.packets + key.ip_refused.packets,
    }


def traffic_object(
    key: KeyRecord, connections: Established, timestamp: int, uuid: str | None = None
) -> dict[str, Any]:
    """A key's traffic as `/api/keys/{key}/traffic/port/exact` answers it: the counters read
    now, the connections as the last poll counted them (at `connections_at`). `uuid`: the
    key's uuid as text, when the caller has it already (a UUID's text costs a microsecond)."""
    total = key.rx.bytes + key.tx.bytes
    return {
        "key_id": key.id,
        "name": key.name,
        "port": key.port,
        "uuid": str(key.uuid) if uuid is None else uuid,
        "connections": connections.count(key.port),
        "connections_at": connections.stamp(),
        "rx_bytes": key.rx.bytes,
        "tx_bytes": key.tx.bytes,
        "total_bytes": total,
        "rx_packets": key.rx.packets,
        "tx_packets": key.tx.packets,
        "rx_formatted": human_bytes(key.rx.bytes),
        "tx_formatted": human_bytes(key.tx.bytes),
        "total_formatted": human_bytes(total),
        "dropped_bytes": key.dropped.bytes,
        "used_bytes": key.used_bytes,
        "data_limit_bytes": key.data_limit_bytes,
        "status": key.status.value,
        "last_reset_at": iso(key.last_reset_at),
        "timestamp": timestamp,
    }
