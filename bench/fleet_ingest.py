"""Fleet ingest (README "A fleet in PostgreSQL"): how fast nodes' outboxes go into PostgreSQL, and
how long a kernel count takes to become a row there.

1. 20 simulated nodes x 5,000 keys, each a process running the real delivery code
   (daemon.fleet.delivery) on generated outbox files, all pushing into one local PostgreSQL 15
   (tests/pgserver.py) at once: deltas per second (target >= 50,000) from the first node's start
   to the last node's end, parsing the files included.
2. A real daemon (poll interval 1 s) delivering to the same database: the time from a burst of
   datagrams the kernel counts to their bytes in `portmeter.usage_hourly` (target <= 2 s).
Usage: .venv/bin/python -m bench.fleet_ingest [--quick]
"""

from __future__ import annotations

import json
import multiprocessing
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import anyio
import psycopg
import structlog

from bench.common import (
    append_results,
    interruptible,
    make_daemon,
    median,
    parse_quick,
    print_table,
    scratch,
)
from daemon.fleet.db import FleetDB
from daemon.fleet.delivery import Delivery
from daemon.store.outbox import Outbox
from tests.netlab import SERVER_V4, lab
from tests.pgserver import Database, cluster

FULL = (20, 5000, 4)  # nodes, keys per node, outbox files (generations) per node
QUICK = (4, 500, 2)
RATE_TARGET = 50_000
LATENCY_SAMPLES, QUICK_LATENCY_SAMPLES = 10, 3
PAYLOAD = 400


def write_outbox(directory: Path, server: str, keys: int, generations: int) -> None:
    """The files a node of `keys` busy keys stages in `generations` saves (every key moved)."""
    directory.mkdir(parents=True)
    at = int(time.time())
    for generation in range(1, generations + 1):
        reports = [
            {
                "report_id": f"{server}:inst:{generation}:k{i}:0",
                "user_token": f"user{i}",
                "server": server,
                "port": 10001 + i,
                "protocol": "vless",
                "bytes_uploaded": 1000 + i,
                "bytes_downloaded": 5000 + generation,
                "timestamp": at + generation,
                "key_id": f"k{i}",
                "uuid": f"00000000-0000-4000-8000-{i:012d}",
                "epoch": 0,
                "rx_packets": 2,
                "tx_packets": 5,
            }
            for i in range(keys)
        ]
        body = json.dumps({"reports": reports}, sort_keys=True)
        (directory / f"{generation:012d}.json").write_text(body, encoding="utf-8")


def push(dsn: str, directory: str, server: str, start: Barrier, out: Queue[Any]) -> None:
    """One node: connect, wait for the others, then scan and drain its outbox; its wall times
    (start, end) go to `out`."""

    async def main() -> tuple[float, float]:
        log = structlog.get_logger()
        db = FleetDB(dsn, log)
        delivery = Delivery(db, Outbox(Path(directory)), server, "inst", 1.0, log)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(db.run)
            await db.wait_ready()
            await anyio.to_thread.run_sync(start.wait)
            began = time.time()
            await delivery.scan()
            await delivery.drain()
            ended = time.time()
            tasks.cancel_scope.cancel()
        await db.close()
        if delivery.backlog.sizes:
            raise RuntimeError(f"{server}: {len(delivery.backlog.sizes)} messages not delivered")
        return began, ended

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    out.put(anyio.run(main))


def ingest(db: Database, root: Path, nodes: int, keys: int, generations: int) -> float:
    """Deltas per second of `nodes` processes pushing their outboxes at once."""
    for node in range(nodes):
        write_outbox(root / f"n{node}", f"node{node}", keys, generations)
    context = multiprocessing.get_context("fork")
    start, out = context.Barrier(nodes), context.Queue()
    workers = [
        context.Process(target=push, args=(db.dsn, str(root / f"n{n}"), f"node{n}", start, out))
        for n in range(nodes)
    ]
    for worker in workers:
        worker.start()
    times: list[tuple[float, float]] = [out.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    elapsed = max(end for _, end in times) - min(began for began, _ in times)
    total = int(db.sql("SELECT sum(reports) FROM portmeter.usage_hourly"))
    if total != nodes * keys * generations:
        raise RuntimeError(f"{total} deltas in PostgreSQL, expected {nodes * keys * generations}")
    return total / elapsed


def latency(db: Database, samples: int) -> list[float]:
    """Seconds from a burst the kernel counts to its bytes in PostgreSQL (poll interval 1 s)."""
    with lab() as net, scratch() as workdir:
        daemon = make_daemon(
            net, workdir, PORTMETER_FLEET_DSN=db.dsn, PORTMETER_SERVER_NAME="live",
            PORTMETER_POLL_INTERVAL="1", PORTMETER_XRAY_CONFIG="",
        )
        try:
            daemon.start()
            port = daemon.api(
                "POST", "/api/keys", expect=201, params={"local": "true"}, json={"name": "lat"}
            )["port"]
            sender = net.udp(net.client)
            seen: list[float] = []
            with psycopg.connect(db.admin_dsn, autocommit=True) as conn:
                for sample in range(1, samples + 1):
                    time.sleep(0.37 * sample % 1)  # bursts at different points of the poll cycle
                    sent = time.monotonic()
                    sender.sendto(b"b" * PAYLOAD, (SERVER_V4, port))
                    while _ledger(conn) < sample * (PAYLOAD + 28):
                        time.sleep(0.005)
                    seen.append(time.monotonic() - sent)
            sender.close()
        finally:
            daemon.close()
    return seen


def _ledger(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT coalesce(sum(rx_bytes), 0) FROM portmeter.usage_hourly WHERE server = 'live'"
    ).fetchone()
    return int(row[0]) if row else 0


def main(quick: bool = False) -> None:
    nodes, keys, generations = QUICK if quick else FULL
    with cluster() as pg, pg.database() as db, scratch() as root:
        rate = ingest(db, root, nodes, keys, generations)
        seen = latency(db, QUICK_LATENCY_SAMPLES if quick else LATENCY_SAMPLES)
    deltas = nodes * keys * generations
    print_table(
        f"fleet ingest into PostgreSQL 15 (targets: >= {RATE_TARGET:,} deltas/s; "
        "count -> row <= 2 poll intervals)",
        ["case", "figure"],
        [
            [f"{nodes} nodes x {keys} keys x {generations} files ({deltas:,} deltas)",
             f"{rate:,.0f} deltas/s"],
            [f"kernel count -> row, poll 1 s ({len(seen)} bursts)",
             f"median {median(seen):.2f} s, max {max(seen):.2f} s"],
        ],
    )
    append_results(
        "fleet ingest",
        [
            (f"{nodes} nodes x {keys} keys", f"{rate:,.0f} deltas/s"),
            ("count -> row, poll 1 s", f"median {median(seen):.2f} s, max {max(seen):.2f} s"),
        ],
        quick,
    )


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
