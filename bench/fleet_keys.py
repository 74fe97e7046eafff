"""Keys created once (README "Keys created once"): how fast a key operation on one node is
applied by another, and how long a node that was down takes to converge before it is READY.

Two real daemons, each in its own namespace, on one real PostgreSQL 15 in a temp dir; the poll
interval is the default (10 s), so what is measured is the LISTEN/NOTIFY path, not the periodic
comparison. Propagation: from sending the request to node A until node B answers with the
change, over creates, changes and deletes in turn. Convergence: B stopped, 1,000 changes made on
A (creates, changes, deletes), B started: the seconds to READY and those of its comparison.
Usage: .venv/bin/python -m bench.fleet_keys [--quick]
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from functools import partial

from bench.common import (
    READY_TIMEOUT,
    append_results,
    interruptible,
    make_daemon,
    median,
    parse_quick,
    percentile,
    print_table,
    scratch,
)
from tests.conftest import Daemon
from tests.netlab import lab
from tests.pgserver import Database, cluster

CONVERGED = re.compile(r"\bevent=fleet_keys_converged\b.*?\bseconds=([0-9.]+)")


@contextlib.contextmanager
def two_nodes(db: Database) -> Iterator[tuple[Daemon, Daemon]]:
    with lab() as net_a, lab() as net_b, scratch() as workdir:
        nodes = []
        try:
            for name, net in (("a", net_a), ("b", net_b)):
                daemon = make_daemon(
                    net,
                    workdir / name,
                    PORTMETER_FLEET_DSN=db.dsn,
                    PORTMETER_SERVER_NAME=name,
                    PORTMETER_POLL_INTERVAL="10",
                )
                nodes.append(daemon)
                daemon.start()
            yield nodes[0], nodes[1]
        finally:
            for daemon in nodes:
                daemon.close()


def call(daemon: Daemon, method: str, path: str, **body: object) -> None:
    answer = daemon.http.request(method, path, json=body or None)
    if answer.status_code not in (200, 201):
        raise RuntimeError(f"{method} {path}: {answer.status_code} {answer.text}")


def until(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError("the other node never applied the change")
        time.sleep(0.001)


def shows(daemon: Daemon, name: str, status: int, note: str = "") -> bool:
    """Whether the daemon answers `name` with `status` (and, found, with `note`)."""
    answer = daemon.http.request("GET", f"/api/keys/{name}")
    return answer.status_code == status and (status != 200 or answer.json()["note"] == note)


def propagation(a: Daemon, b: Daemon, operations: int) -> list[float]:
    """Milliseconds from each request to A until B shows it: create, change, delete in turn."""
    took = []
    for n in range(operations):
        name, step = f"p{n // 3}", n % 3
        started = time.perf_counter()
        if step == 0:
            call(a, "POST", "/api/keys", name=name)
            until(partial(shows, b, name, 200))
        elif step == 1:
            call(a, "PATCH", f"/api/keys/{name}", note=f"change {n}")
            until(partial(shows, b, name, 200, f"change {n}"))
        else:
            call(a, "DELETE", f"/api/keys/{name}")
            until(partial(shows, b, name, 404))
        took.append((time.perf_counter() - started) * 1000)
    return took


def changes_while_down(a: Daemon, count: int) -> None:
    """`count` changes on A: 2/5 creates, 2/5 changes of them, 1/5 deletes."""
    made = count * 2 // 5
    for n in range(made):
        call(a, "POST", "/api/keys", name=f"c{n}")
    for n in range(made):
        call(a, "PATCH", f"/api/keys/c{n}", note="changed while B was down")
    deleted = count - 2 * made
    for n in range(deleted):
        call(a, "DELETE", f"/api/keys/c{n}")


def convergence(a: Daemon, b: Daemon, changes: int) -> tuple[float, float, int]:
    """B stopped, `changes` made on A, B started: seconds to READY, of the comparison, keys."""
    if b.stop() != 0:
        raise RuntimeError(f"node B did not stop cleanly:\n{b.log()}")
    changes_while_down(a, changes)
    started = time.perf_counter()
    b.start(wait=False)
    b.wait_ready(READY_TIMEOUT)
    ready = time.perf_counter() - started
    held = sorted((k["name"], k["note"]) for k in b.api("GET", "/api/keys")["keys"])
    wanted = sorted((k["name"], k["note"]) for k in a.api("GET", "/api/keys")["keys"])
    if held != wanted:
        raise RuntimeError(f"node B did not converge before READY: {len(held)}, {len(wanted)}")
    compared = [float(m) for m in CONVERGED.findall(b.log())]
    return ready, compared[-1], len(held)


def main(quick: bool = False) -> None:
    operations, changes = (30, 100) if quick else (200, 1000)
    with cluster() as pg, pg.database() as db, two_nodes(db) as (a, b):
        took = propagation(a, b, operations)
        ready, compared, left = convergence(a, b, changes)
    p50, p99 = median(took), percentile(took, 99)
    print_table(
        "Keys created once: propagation A -> B, convergence of a restarted node",
        ("figure", "value"),
        [
            (f"propagation p50 ({operations} operations)", f"{p50:.1f} ms"),
            (f"propagation p99 ({operations} operations)", f"{p99:.1f} ms"),
            (f"restart after {changes} changes: to READY", f"{ready:.2f} s"),
            (f"restart after {changes} changes: comparison", f"{compared:.2f} s ({left} keys)"),
        ],
    )
    append_results(
        "fleet keys",
        [
            (f"{operations} operations", f"propagation p50 {p50:.1f} ms, p99 {p99:.1f} ms"),
            (f"{changes} changes", f"READY after {ready:.2f} s, comparison {compared:.2f} s"),
        ],
        quick,
    )


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
