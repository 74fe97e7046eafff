"""30,000 keys (issue 18): one daemon with every port of the range 20001-50000 taken, measured
end to end: start-up to READY=1 (table missing), create / delete / reset / limit change through
the API, a poll, the API's pages, all keys' traffic, /metrics, the page's first page in headless
Chromium, and VmRSS.

The range is full, so each create takes the port a delete just freed. Latencies are single
requests one after another (p50 / p99 over the samples); the poll's duration comes from the
daemon's `event=poll` debug lines. `--quick`: 2,000 keys on 20001-22000, few samples.
Usage: .venv/bin/python -m bench.scale [--quick]
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    READY_TIMEOUT,
    SCALE_RANGE,
    ReadyListener,
    append_results,
    generate_state,
    interruptible,
    make_daemon,
    median,
    parse_quick,
    percentile,
    print_table,
    python_pid,
    rss_mib,
    scratch,
    wait_polls,
)
from tests.conftest import Daemon
from tests.netlab import SERVER_V4, Lab, lab
from tests.test_web import API_KEY, PAGE, PORT, chromium, wait_for

POLL_INTERVAL = 5  # seconds: a few polls within the run
PAGE_SIZE = 100  # daemon/web/app.js PAGE_SIZE


@dataclass(frozen=True)
class Plan:
    keys: int
    samples: int  # of each operation and page
    scrapes: int  # of /metrics and of all keys' traffic
    polls: int

    @property
    def port_range(self) -> tuple[int, int]:
        """The first `keys` ports of SCALE_RANGE: every port of it taken."""
        return SCALE_RANGE[0], SCALE_RANGE[0] + self.keys - 1


FULL = Plan(SCALE_RANGE[1] - SCALE_RANGE[0] + 1, 100, 5, 3)
QUICK = Plan(2_000, 10, 2, 2)


@dataclass
class Figures:
    """Measured values by name: latencies in ms, sizes in bytes, times in s."""

    samples: dict[str, list[float]]
    single: dict[str, float]

    def add(self, name: str, value: float) -> None:
        self.samples.setdefault(name, []).append(value)


def ok(daemon: Daemon, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
    """One API request that must answer `expect`; its response."""
    response = daemon.http.request(method, path, **kwargs)
    if response.status_code != expect:
        raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:300]}")
    return response


def timed(
    daemon: Daemon, method: str, path: str, expect: int = 200, **kwargs: Any
) -> tuple[float, Any]:
    """`ok(...)` timed: milliseconds it took, and the response."""
    started = time.perf_counter()
    response = ok(daemon, method, path, expect, **kwargs)
    return (time.perf_counter() - started) * 1000, response


def operations(daemon: Daemon, ids: list[str], plan: Plan, figures: Figures) -> None:
    """Reset and limit change of random keys; delete of one and create of another on its port."""
    chosen = random.sample(ids, 2 * plan.samples)
    for key_id in chosen[: plan.samples]:
        ms, _ = timed(daemon, "POST", f"/api/keys/{key_id}/traffic/port/reset")
        figures.add("reset", ms)
        limit = {"data_limit_bytes": random.randrange(10**9, 10**12)}
        ms, _ = timed(daemon, "PATCH", f"/api/keys/{key_id}", json=limit)
        figures.add("limit change", ms)
    for n, key_id in enumerate(chosen[plan.samples :]):
        ms, _ = timed(daemon, "DELETE", f"/api/keys/{key_id}")
        figures.add("delete", ms)
        ms, _ = timed(daemon, "POST", "/api/keys", 201, json={"name": f"new{n}"})
        figures.add("create", ms)


def reads(daemon: Daemon, plan: Plan, figures: Figures) -> None:
    """Pages of keys and of users, all keys' traffic, /metrics."""
    last = plan.keys - PAGE_SIZE
    for _ in range(plan.samples):
        offset = random.randrange(0, last + 1)
        ms, _ = timed(daemon, "GET", f"/api/keys?limit={PAGE_SIZE}&offset={offset}")
        figures.add("GET /api/keys page", ms)
        page = f"/api/admin/usage?limit={PAGE_SIZE}&offset={offset}"
        ms, _ = timed(daemon, "GET", page)
        figures.add("GET /api/admin/usage page", ms)
        traffic = f"/api/traffic/ports/exact?limit={PAGE_SIZE}&offset={offset}"
        ms, _ = timed(daemon, "GET", traffic)
        figures.add("GET /api/traffic/ports/exact page", ms)
    for _ in range(plan.scrapes):
        ms, answer = timed(daemon, "GET", "/api/traffic/ports/exact")
        figures.add("GET /api/traffic/ports/exact (all)", ms)
        figures.single["all keys' traffic bytes"] = len(answer.content)
        ms, answer = timed(daemon, "GET", "/metrics")
        figures.add("GET /metrics", ms)
        figures.single["/metrics bytes"] = len(answer.content)


def first_page(net: Lab, workdir: Path, keys: int) -> float:
    """Seconds from opening the page (API key already stored) to its first page drawn."""
    pages = -(-keys // PAGE_SIZE)
    shown = f"Page 1 of {pages}: users 1–{min(PAGE_SIZE, keys)} of {keys}"
    with chromium(net, workdir) as driver:
        driver.get(PAGE)
        driver.execute_script("localStorage.setItem('portmeter.apiKey', arguments[0])", API_KEY)
        started = time.perf_counter()
        driver.get(PAGE)
        wait_for(
            lambda: (
                driver.execute_script("return document.getElementById('page-info').textContent")
                == shown
                and len(driver.find_elements("css selector", "tr.user")) == min(PAGE_SIZE, keys)
            ),
            "the first page",
            timeout=120,
        )
        return time.perf_counter() - started


@contextlib.contextmanager
def started(net: Lab, workdir: Path, plan: Plan, figures: Figures) -> Iterator[Daemon]:
    """The daemon on generated state with every key, started on a missing table; start-up to
    READY=1 measured."""
    ready = ReadyListener(workdir / "notify.sock")
    daemon = make_daemon(
        net,
        workdir,
        plan.port_range,
        NOTIFY_SOCKET=str(ready.path),
        PORTMETER_LOG_LEVEL="debug",
        PORTMETER_POLL_INTERVAL=str(POLL_INTERVAL),
        PORTMETER_HTTP_LISTEN=f"{SERVER_V4}:{PORT}",
        PORTMETER_API_KEY=API_KEY,
    )
    try:
        generate_state(daemon, plan.keys)
        begun = time.perf_counter()
        daemon.start(wait=False)
        ready.wait_ready(
            READY_TIMEOUT,
            alive=lambda: daemon.process is not None and daemon.process.poll() is None,
        )
        figures.single["start-up to READY s"] = time.perf_counter() - begun
        daemon.wait_ready(READY_TIMEOUT)
        yield daemon
    finally:
        daemon.close()
        ready.close()


def measure(plan: Plan) -> Figures:
    figures = Figures({}, {})
    with lab() as net, scratch() as workdir, started(net, workdir, plan, figures) as daemon:
        pid = python_pid(daemon)
        figures.single["VmRSS after start MiB"] = rss_mib(pid)
        polls = wait_polls(daemon, plan.polls, POLL_INTERVAL * (plan.polls + 4) + 120)
        figures.samples["poll"] = [s * 1000 for s in polls]
        ids = [k["id"] for k in ok(daemon, "GET", "/api/keys").json()["keys"]]
        figures.single["page first drawn s"] = first_page(net, workdir, plan.keys)
        reads(daemon, plan, figures)
        operations(daemon, ids, plan, figures)
        figures.single["VmRSS at the end MiB"] = rss_mib(pid)
    return figures


def main(quick: bool = False) -> None:
    plan = QUICK if quick else FULL
    figures = measure(plan)
    rows = [
        [name, len(ms), f"{median(ms):.1f}", f"{percentile(ms, 0.99):.1f}", f"{max(ms):.1f}"]
        for name, ms in figures.samples.items()
    ]
    print_table(
        f"{plan.keys} keys, ports {plan.port_range[0]}-{plan.port_range[1]}",
        ["what", "n", "p50 ms", "p99 ms", "max ms"],
        rows,
    )
    print_table("once", ["what", "value"], [[k, f"{v:.2f}"] for k, v in figures.single.items()])
    summary = "; ".join(
        [f"{r[0]}: p50 {r[2]} / p99 {r[3]} ms" for r in rows]
        + [f"{k}: {v:.2f}" for k, v in figures.single.items()]
    )
    append_results(f"{plan.keys} keys end to end", [(f"{plan.keys} keys", summary)], quick)


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
