"""Prometheus metrics: `GET /metrics` on the API, and a file for node_exporter's textfile collector.

Each scrape copies what it shows from the source (the service, through the small
`MetricsSource` protocol, so this module never imports daemon.service) after `refresh()` read the
kernel, so the numbers are exactly what the JSON API answers at that moment; the text is written
from that copy in a worker thread.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Protocol

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from daemon.atomic import write_atomic
from daemon.http.schemas import ERROR_RESPONSES
from daemon.limits import Status
from daemon.store.state import KeyRecord
from daemon.xray.model import XrayError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the classic text format
STATUSES = tuple(Status)


class MetricsSource(Protocol):
    """What the metrics read; the Service front offers each of these."""

    def keys_by_port(self) -> Sequence[KeyRecord]: ...

    def polled_at(self) -> float | None: ...

    def poll_seconds(self) -> float | None: ...

    def xray_enabled(self) -> bool: ...

    async def xray_drift(self, reuse: bool = False) -> Sequence[object]: ...

    async def refresh(self) -> object: ...


@dataclass(frozen=True)
class Family:
    """A metric family's name as written (counters with `_total`), type and help line."""

    name: str
    kind: str
    help: str

    def head(self) -> str:
        return f"# HELP {self.name} {self.help}\n# TYPE {self.name} {self.kind}\n"


RX = Family(
    "portmeter_key_rx_bytes_total",
    "counter",
    "Bytes from clients to the key's port (layer 3, as nftables counts them)"
    " since the key's last reset.",
)
TX = Family(
    "portmeter_key_tx_bytes_total",
    "counter",
    "Bytes from the key's port to clients (layer 3, as nftables counts them)"
    " since the key's last reset.",
)
DROPPED = Family(
    "portmeter_key_dropped_bytes_total",
    "counter",
    "Bytes the kernel dropped for the key (over its limit, expired or disabled)"
    " since its last reset.",
)
LIMIT = Family(
    "portmeter_key_limit_bytes",
    "gauge",
    "The key's data limit in bytes (rx + tx since the last reset); only keys that have a limit.",
)
STATUS = Family(
    "portmeter_key_status",
    "gauge",
    "The key's status as a state set: 1 for the current status "
    "(active, limited, expired, disabled), 0 for the others.",
)
KEYS = Family("portmeter_keys", "gauge", "Number of keys.")
POLL_SECONDS = Family(
    "portmeter_poll_duration_seconds",
    "gauge",
    "How long the last reading of the kernel's counters took (poll or on-demand refresh).",
)
POLLED_AT = Family(
    "portmeter_last_poll_timestamp_seconds",
    "gauge",
    "When the last reading of the kernel's counters finished, in seconds since the epoch.",
)
IN_SYNC = Family(
    "portmeter_xray_in_sync",
    "gauge",
    "1 when Xray's config serves exactly the keys it should, 0 when it drifted or is unreadable.",
)


# What the metrics show of one key: name, port, rx, tx and dropped bytes, limit, status. A plain
# tuple: copying 30,000 keys on the event loop costs half of what objects would.
KeyRow = tuple[str, int, int, int, int, int | None, Status]


def key_row(key: KeyRecord) -> KeyRow:
    return (
        key.name,
        key.port,
        key.rx.bytes,
        key.tx.bytes,
        key.dropped.bytes,
        key.data_limit_bytes,
        key.status,
    )


@dataclass(frozen=True)
class Snapshot:
    """Everything a scrape shows, taken at one moment; `render` writes it as text."""

    keys: list[KeyRow]
    poll_seconds: float | None
    polled_at: float | None
    xray_in_sync: bool | None

    @classmethod
    async def take(cls, source: MetricsSource) -> Snapshot:
        """Xray's sync status (its config is read in a worker thread), then the keys, without
        awaiting in between."""
        in_sync = await xray_in_sync(source)
        keys = [key_row(k) for k in source.keys_by_port()]
        return cls(keys, source.poll_seconds(), source.polled_at(), in_sync)

    def render(self) -> bytes:
        """The text format, written directly: at 30,000 keys prometheus-client's generic
        writer took seconds (README "30,000 keys"), this takes a fraction of one."""
        return "".join(self._parts()).encode()

    def _parts(self) -> Iterator[str]:
        labels = [f'key="{_escape(name)}",port="{port}"' for name, port, *_ in self.keys]
        rows = list(zip(labels, self.keys, strict=True))
        yield RX.head()
        yield "".join(f"{RX.name}{{{at}}} {k[2]}\n" for at, k in rows)
        yield TX.head()
        yield "".join(f"{TX.name}{{{at}}} {k[3]}\n" for at, k in rows)
        yield DROPPED.head()
        yield "".join(f"{DROPPED.name}{{{at}}} {k[4]}\n" for at, k in rows)
        yield LIMIT.head()
        yield "".join(f"{LIMIT.name}{{{at}}} {k[5]}\n" for at, k in rows if k[5] is not None)
        yield STATUS.head()
        yield "".join(
            f'{STATUS.name}{{{at},status="{s.value}"}} {int(k[6] is s)}\n'
            for at, k in rows
            for s in STATUSES
        )
        yield from _gauge(KEYS, len(self.keys))
        yield from _gauge(POLL_SECONDS, self.poll_seconds)
        yield from _gauge(POLLED_AT, self.polled_at)
        yield from _gauge(IN_SYNC, None if self.xray_in_sync is None else int(self.xray_in_sync))


def _gauge(family: Family, value: float | None) -> Iterator[str]:
    """A family of one unlabelled sample; nothing when the value is unknown."""
    if value is not None:
        yield family.head()
        yield f"{family.name} {value!r}\n"


def _escape(label: str) -> str:
    """A label value as the text format writes it: backslash, quote and newline escaped."""
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def xray_in_sync(source: MetricsSource) -> bool | None:
    """None when the Xray integration is off; False also when its config cannot be read."""
    if not source.xray_enabled():
        return None
    try:
        return not await source.xray_drift(reuse=True)
    except XrayError:
        return False


async def exposition(source: MetricsSource) -> bytes:
    """The metrics in the text format: taken on the event loop (one consistent state), written
    out in a worker thread, so a large scrape does not hold up the daemon's other work."""
    snapshot = await Snapshot.take(source)
    return await anyio.to_thread.run_sync(snapshot.render)


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
