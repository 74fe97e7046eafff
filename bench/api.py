"""API latency under a bounded concurrent load: 4 client threads (httpx over the Unix socket).

At 1,000 keys, one kind of request at a time: GET /api/traffic/ports/exact (all keys),
GET /api/keys/{id}/traffic/port/exact (one key, ids in random order), and the all-keys call
paginated (`?limit=100&offset=0`) when the daemon supports it: a 4xx answer, or an answer that
ignores the parameters, is reported as "not supported".
Usage: .venv/bin/python -m bench.api [--quick]
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from bench.common import (
    API_TIMEOUT,
    append_results,
    interruptible,
    median,
    parse_quick,
    percentile,
    print_table,
    running,
)
from tests.conftest import Daemon

THREADS = 4
ALL, PAGED = "/api/traffic/ports/exact", "/api/traffic/ports/exact?limit=100&offset=0"
PAGE = 100
TARGETS_P99_MS = {"per key": 10.0, "all keys": 50.0}
WARM_UP = 20  # requests of each kind first, unmeasured: the start's own work after READY


@dataclass(frozen=True)
class Plan:
    keys: int
    requests: int  # of each kind


FULL, QUICK = Plan(1000, 500), Plan(300, 40)


def load(daemon: Daemon, paths: list[str]) -> list[float]:
    """GET every path, spread over THREADS threads with a client each; latencies in ms."""

    def worker(share: list[str]) -> list[float]:
        transport = httpx.HTTPTransport(uds=str(daemon.socket))
        with httpx.Client(
            transport=transport, base_url="http://portmeter", timeout=API_TIMEOUT
        ) as client:
            latencies = []
            for path in share:
                started = time.perf_counter()
                response = client.get(path)
                latencies.append((time.perf_counter() - started) * 1000)
                if response.status_code != 200:
                    raise RuntimeError(f"GET {path}: {response.status_code} {response.text[:200]}")
            return latencies

    with ThreadPoolExecutor(THREADS) as pool:
        shares = pool.map(worker, [paths[i::THREADS] for i in range(THREADS)])
        return [ms for share in shares for ms in share]


def page_length(body: Any) -> int | None:
    """How many keys an all-keys answer holds, if its shape says."""
    try:
        return len(body["ports_traffic"]["ports_traffic"])
    except (KeyError, TypeError):
        return None


def pagination_support(daemon: Daemon) -> str | None:
    """None if `?limit=&offset=` works; otherwise why it counts as not supported."""
    response = daemon.http.get(PAGED)
    if 400 <= response.status_code < 500:
        return f"not supported ({response.status_code})"
    if response.status_code != 200:
        raise RuntimeError(f"GET {PAGED}: {response.status_code} {response.text[:200]}")
    length = page_length(response.json())
    if length is not None and length > PAGE:
        return f"not supported (parameters ignored: {length} keys answered)"
    return None


def main(quick: bool = False) -> None:
    plan = QUICK if quick else FULL
    with running(plan.keys) as run:
        ids = [key.id for key in run.keys]
        load(
            run.daemon,
            [ALL] * WARM_UP + [f"/api/keys/{i}/traffic/port/exact" for i in ids[:WARM_UP]],
        )
        results: dict[str, list[float] | str] = {
            "all keys": load(run.daemon, [ALL] * plan.requests),
            "per key": load(
                run.daemon,
                [
                    f"/api/keys/{random.choice(ids)}/traffic/port/exact"
                    for _ in range(plan.requests)
                ],
            ),
        }
        unsupported = pagination_support(run.daemon)
        results[f"all keys, limit={PAGE}"] = unsupported or load(
            run.daemon, [PAGED] * plan.requests
        )
    rows = []
    for kind, ms in results.items():
        if isinstance(ms, str):
            rows.append([kind, "-", ms, "-", "-"])
        else:
            rows.append(
                [
                    kind,
                    len(ms),
                    f"{median(ms):.1f}",
                    f"{percentile(ms, 0.99):.1f}",
                    f"{max(ms):.1f}",
                ]
            )
    print_table(
        f"API latency at {plan.keys} keys, {THREADS} client threads "
        f"(target p99: {', '.join(f'{k} <= {ms:.0f} ms' for k, ms in TARGETS_P99_MS.items())})",
        ["request", "n", "p50 ms", "p99 ms", "max ms"],
        rows,
    )
    append_results(
        "API latency, 4 threads",
        [
            (
                f"{plan.keys} keys",
                "; ".join(
                    f"{r[0]}: {r[2]}" if r[1] == "-" else f"{r[0]}: p50 {r[2]} / p99 {r[3]} ms"
                    for r in rows
                ),
            ),
        ],
        quick,
    )


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
