"""Traffic as the kernel counted it: every key's (paged), one key's, a key's reset, and the
server's summary. Counters are read at request time, so each answer is exact to that moment;
established connections are the last poll's count, with its time (`connections_at`).

`summary` is a router of its own because the OpenAPI document lists its path last.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Request, Response

from daemon.errors import OperationError
from daemon.http.answers import traffic_object
from daemon.http.routes import ServiceDep
from daemon.http.schemas import ERROR_RESPONSES, KeyRef, PageLimit, PageOffset
from daemon.http.shared import SharedAnswers, json_answer, json_bytes
from daemon.service import Established, Service
from daemon.store.state import KeyRecord
from daemon.units import human_bytes

T = TypeVar("T")
PAGE_READ_LIMIT = 256  # up to this many keys, reading each key's counters beats one full reading

router = APIRouter(responses=ERROR_RESPONSES)
summary = APIRouter(responses=ERROR_RESPONSES)


async def interface_summary(service: Service) -> tuple[dict[str, dict[str, int]], int]:
    """The host's interface counters and their sum (rx + tx)."""
    interfaces = await service.interface_bytes()
    total = sum(i["rx_bytes"] + i["tx_bytes"] for i in interfaces.values())
    return interfaces, total


@dataclass
class HostFacts:
    """Established connections per port (the last poll's) and interface counters, for the
    traffic answers."""

    connections: Established = field(default_factory=Established)
    interfaces: dict[str, dict[str, int]] = field(default_factory=dict)
    interface_total: int = 0

    async def gather(self, service: Service) -> None:
        self.connections = await service.connections()
        self.interfaces, self.interface_total = await interface_summary(service)


async def read_with_host_facts(service: Service, reading: Awaitable[T]) -> tuple[T, HostFacts]:
    """`reading` (of counters) while the host facts are gathered alongside; its refusal is raised
    as itself, not inside a task group's exception group."""
    facts = HostFacts()
    refused: OperationError | None = None
    async with anyio.create_task_group() as group:
        group.start_soon(facts.gather, service)
        try:
            result = await reading
        except OperationError as exc:
            refused = exc
            group.cancel_scope.cancel()
    if refused is not None:
        raise refused
    return result, facts


async def read_page(service: Service, page: list[KeyRecord]) -> list[KeyRecord]:
    """The page's keys with fresh counters: each key's own reading for a small page, one full
    reading for a large one; keys deleted meanwhile are left out."""
    if len(page) <= PAGE_READ_LIMIT:
        return await service.refresh_keys([k.id for k in page], skip_missing=True)
    await service.refresh()
    return [k for k in page if service.has_key(k.id)]


@router.get("/api/traffic/ports/exact", response_model=dict[str, Any])
async def all_traffic(
    request: Request,
    service: ServiceDep,
    limit: PageLimit = None,
    offset: PageOffset = 0,
) -> Response:
    """Every key's traffic, or one page of it (`limit`, `offset`; ordered by port). A small
    page reads only its own keys' counters; a large one (or the whole list) reads the whole
    table, and its answer is shared with every request that arrived before that reading began
    (daemon/http/shared.py): it is as exact for them as one of their own."""
    arrived, asked = time.monotonic(), (offset, limit)
    shared: SharedAnswers = request.app.state.traffic_answers
    if (body := shared.fresh(asked, arrived)) is not None:
        return json_answer(body)
    if limit is not None and limit <= PAGE_READ_LIMIT:
        page = service.keys_by_port(offset, limit)
        keys, facts = await read_with_host_facts(service, read_page(service, page))
        return json_answer(json_bytes(_traffic_answer(service, keys, facts, asked)))
    reading = await service.refresh()
    if (body := shared.fresh(asked, arrived)) is not None:
        return json_answer(body)  # another request answered from a reading as fresh
    facts = HostFacts()
    await facts.gather(service)
    body = json_bytes(_traffic_answer(service, service.keys_by_port(offset, limit), facts, asked))
    shared.keep(asked, reading.read_at, body)
    return json_answer(body)


def _traffic_answer(
    service: Service, keys: list[KeyRecord], facts: HostFacts, asked: tuple[int, int | None]
) -> dict[str, Any]:
    connections = facts.connections
    moment = int(time.time())
    per_key = {
        uuid: {
            "port": k.port,
            "key_id": k.id,
            "key_name": k.name,
            "traffic": traffic_object(k, connections, moment, uuid),
            "error": service.key_error(k.id),  # this key's failed kernel step, if any
        }
        for k in keys
        for uuid in (str(k.uuid),)
    }
    return {
        "ports_traffic": {
            "total_ports": len(keys),
            "total_keys": service.key_count(),
            "offset": asked[0],
            "limit": asked[1],
            "ports_traffic": per_key,
            "total_traffic": sum(k.rx.bytes + k.tx.bytes for k in keys),
            "total_connections": connections.total(k.port for k in keys),
            "connections_at": connections.stamp(),
        },
        "system_summary": {
            "total_system_traffic": facts.interface_total,
            "active_ports": sum(1 for k in keys if connections.count(k.port)),
            "interface_summary": facts.interfaces,
        },
        "source": "nftables",
        "timestamp": moment,
    }


@router.get("/api/keys/{key_id}/traffic/port/exact")
async def key_traffic(key_id: KeyRef, service: ServiceDep) -> dict[str, Any]:
    (key,), facts = await read_with_host_facts(service, service.refresh_keys([key_id]))
    result = traffic_object(key, facts.connections, int(time.time()))
    result["error"] = service.key_error(key.id)  # this key's failed kernel step, if any
    result["interface_traffic"] = facts.interfaces
    result["total_interface_traffic"] = facts.interface_total
    return result


@router.post("/api/keys/{key_id}/traffic/port/reset")
async def reset_key_traffic(key_id: KeyRef, service: ServiceDep) -> dict[str, Any]:
    key = await service.reset_traffic(key_id)
    return traffic_object(key, await service.connections(), int(time.time()))


@summary.get("/api/system/traffic/summary")
async def traffic_summary(service: ServiceDep) -> dict[str, Any]:
    await service.refresh()
    interfaces, interface_total = await interface_summary(service)
    keys = service.keys_by_port()
    rx = sum(k.rx.bytes for k in keys)
    tx = sum(k.tx.bytes for k in keys)
    polled_at = service.polled_at()
    return {
        "keys": len(keys),
        "rx_bytes": rx,
        "tx_bytes": tx,
        "total_bytes": rx + tx,
        "total_formatted": human_bytes(rx + tx),
        "interface_summary": interfaces,
        "total_interface_traffic": interface_total,
        "last_poll": None if polled_at is None else int(polled_at),
        "timestamp": int(time.time()),
    }
