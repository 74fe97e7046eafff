"""Prometheus metrics: `GET /metrics` on the API, and a file for node_exporter's textfile collector.

Nothing is kept in prometheus-client's global registry: each scrape builds its own
CollectorRegistry holding one collector that reads the source (the service, through the small
`MetricsSource` protocol, so this module never imports daemon.service) after `refresh()` read the
kernel, so the numbers are exactly what the JSON API answers at that moment.

Metrics (`key` is the key's name, unique on a server; `port` its port):

    portmeter_key_rx_bytes_total{key,port}       counter  client -> server bytes since the reset
    portmeter_key_tx_bytes_total{key,port}       counter  server -> client bytes since the reset
    portmeter_key_dropped_bytes_total{key,port}  counter  bytes the kernel dropped (over limit,
                                                          expired, disabled); not part of rx/tx
    portmeter_key_limit_bytes{key,port}          gauge    data limit; only keys that have one
    portmeter_key_status{key,port,status}        gauge    see below
    portmeter_keys                               gauge    number of keys
    portmeter_poll_duration_seconds              gauge    how long the last reading took
    portmeter_last_poll_timestamp_seconds        gauge    when it finished (Unix time)
    portmeter_xray_in_sync                       gauge    1 when Xray's config matches the keys,
                                                          0 when it drifted or cannot be read;
                                                          absent when the Xray integration is off

Counting follows the API: layer-3 bytes at the nftables hook. rx and tx drop to zero when a key's
traffic is reset (by hand or by its reset strategy); Prometheus' rate() and increase() treat that
as a counter reset. used bytes, which limits count, are rx + tx, so
`(portmeter_key_rx_bytes_total + portmeter_key_tx_bytes_total) / portmeter_key_limit_bytes`
is the share of the allowance used.

`portmeter_key_status` is a state set in the classic text format: every key has one series per
possible status (active, limited, expired, disabled), 1 for its current status and 0 for the
others, so `portmeter_key_status{status="limited"} == 1` selects the limited keys and a status
change never leaves a stale series behind.

On /metrics the kernel is read for every scrape, so the last poll is that reading; the textfile
is written after each poll of the daemon's loop, so its timestamp shows that the loop is alive.
Byte values are exact below 2**53 (8 PiB), the precision of the format's floats.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Protocol

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from daemon.atomic import write_atomic
from daemon.http.schemas import ERROR_RESPONSES
from daemon.limits import Status
from daemon.store.state import KeyRecord
from daemon.xray.model import XrayError

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes: text format 0.0.4
KEY_LABELS = ("key", "port")


class MetricsSource(Protocol):
    """What the metrics read; the Service front offers each of these."""

    def keys_by_port(self) -> Sequence[KeyRecord]: ...

    def polled_at(self) -> float | None: ...

    def poll_seconds(self) -> float | None: ...

    def xray_enabled(self) -> bool: ...

    async def xray_drift(self) -> Sequence[object]: ...

    async def refresh(self) -> object: ...


class SourceCollector:
    """Reads the source's keys when collected; Xray's sync status is measured by `update()`.

    `collect()` does no I/O and does not await, so on the event loop it sees one consistent
    state. Whether Xray is in sync needs its config file, read in a worker thread by
    `await update()` just before collecting.
    """

    def __init__(self, source: MetricsSource) -> None:
        self.source = source
        self.xray_in_sync: bool | None = None

    async def update(self) -> None:
        self.xray_in_sync = await xray_in_sync(self.source)

    def collect(self) -> Iterator[Metric]:
        source = self.source
        keys = source.keys_by_port()
        yield from _key_families(keys)
        yield GaugeMetricFamily("portmeter_keys", "Number of keys.", value=len(keys))
        seconds = source.poll_seconds()
        if seconds is not None:
            yield GaugeMetricFamily(
                "portmeter_poll_duration_seconds",
                "How long the last reading of the kernel's counters took"
                " (poll or on-demand refresh).",
                value=seconds,
            )
        polled_at = source.polled_at()
        if polled_at is not None:
            yield GaugeMetricFamily(
                "portmeter_last_poll_timestamp_seconds",
                "When the last reading of the kernel's counters finished,"
                " in seconds since the epoch.",
                value=polled_at,
            )
        if self.xray_in_sync is not None:
            yield GaugeMetricFamily(
                "portmeter_xray_in_sync",
                "1 when Xray's config serves exactly the keys it should,"
                " 0 when it drifted or is unreadable.",
                value=1 if self.xray_in_sync else 0,
            )


def _key_families(keys: Sequence[KeyRecord]) -> tuple[Metric, ...]:
    """The per-key families, one series per key (and per status for the state set)."""
    rx = CounterMetricFamily(
        "portmeter_key_rx_bytes",
        "Bytes from clients to the key's port (layer 3, as nftables counts them)"
        " since the key's last reset.",
        labels=KEY_LABELS,
    )
    tx = CounterMetricFamily(
        "portmeter_key_tx_bytes",
        "Bytes from the key's port to clients (layer 3, as nftables counts them)"
        " since the key's last reset.",
        labels=KEY_LABELS,
    )
    dropped = CounterMetricFamily(
        "portmeter_key_dropped_bytes",
        "Bytes the kernel dropped for the key (over its limit, expired or disabled)"
        " since its last reset.",
        labels=KEY_LABELS,
    )
    limit = GaugeMetricFamily(
        "portmeter_key_limit_bytes",
        "The key's data limit in bytes (rx + tx since the last reset);"
        " only keys that have a limit.",
        labels=KEY_LABELS,
    )
    status = GaugeMetricFamily(
        "portmeter_key_status",
        "The key's status as a state set: 1 for the current status "
        "(active, limited, expired, disabled), 0 for the others.",
        labels=(*KEY_LABELS, "status"),
    )
    for key in keys:
        labels = [key.name, str(key.port)]
        rx.add_metric(labels, key.rx.bytes)
        tx.add_metric(labels, key.tx.bytes)
        dropped.add_metric(labels, key.dropped.bytes)
        if key.data_limit_bytes is not None:
            limit.add_metric(labels, key.data_limit_bytes)
        for state in Status:
            status.add_metric([*labels, state.value], 1 if key.status is state else 0)
    return rx, tx, dropped, limit, status


async def xray_in_sync(source: MetricsSource) -> bool | None:
    """None when the Xray integration is off; False also when its config cannot be read."""
    if not source.xray_enabled():
        return None
    try:
        return not await source.xray_drift()
    except XrayError:
        return False


async def exposition(source: MetricsSource) -> bytes:
    """The metrics in the text format, collected on the event loop (one consistent state)."""
    collector = SourceCollector(source)
    await collector.update()
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry)


async def source_of(request: Request) -> MetricsSource:
    """The app's service, seen as a metrics source."""
    source: MetricsSource = request.app.state.service
    return source


router = APIRouter(responses=ERROR_RESPONSES)


@router.get("/metrics", response_class=Response, summary="Prometheus metrics (text format 0.0.4)")
async def metrics(source: Annotated[MetricsSource, Depends(source_of)]) -> Response:
    await source.refresh()  # exact to this moment, like the JSON endpoints
    return Response(await exposition(source), media_type=CONTENT_TYPE)


async def write_textfile(source: MetricsSource, path: Path) -> None:
    """Write the metrics to `path`, a `*.prom` file in node_exporter's textfile directory.

    Collected on the event loop (one consistent state), written in a worker thread. Raises
    OSError when the file cannot be written.
    """
    await anyio.to_thread.run_sync(_replace, path, await exposition(source))


def _replace(path: Path, data: bytes) -> None:
    """Atomically, readable by node_exporter (user prometheus): mode 0644 whatever the umask.

    Not prometheus_client.write_to_textfile: that creates the file with the process umask, and
    the shipped unit's UMask=0077 would leave it unreadable; nor does it refuse a planted link.
    The temporary name ends in `.tmp`, which node_exporter ignores.
    """
    write_atomic(path, data, mode=0o644, dir_mode=0o755)
