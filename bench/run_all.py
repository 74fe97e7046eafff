"""The whole benchmark suite (`make bench`), in about 16 minutes on a 2-core machine.

The idle-CPU daemon (30,000 keys, poll interval 10 s) starts first and is read last: its
10-minute window covers the other benchmarks, which run meanwhile in daemons and namespaces of
their own (only the idle daemon's own CPU time is measured). A benchmark that fails is reported
and the others still run; the exit code is 1 if any failed.
Usage: .venv/bin/python -m bench.run_all [--quick]
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
import traceback
from collections.abc import Callable

from bench import (
    api,
    batch,
    connections,
    datapath,
    fleet_ingest,
    fleet_keys,
    fleet_reads,
    idle,
    limits,
    memory,
    migration,
    objects_dump,
    ops,
    polling,
    scale,
    startup,
)
from bench.common import interruptible, parse_quick

BENCHMARKS: list[tuple[str, Callable[[bool], None]]] = [
    ("create/delete", ops.main),
    ("batch create", batch.main),
    ("migration", migration.main),
    ("data path", datapath.main),
    ("kernel limits", limits.main),
    ("polling", polling.main),
    ("objects dump", objects_dump.main),
    ("memory", memory.main),
    ("API latency", api.main),
    ("connections per poll", connections.main),
    ("start-up", startup.main),
    ("30,000 keys", scale.main),
    ("fleet ingest", fleet_ingest.main),
    ("fleet reads", fleet_reads.main),
    ("fleet keys", fleet_keys.main),
]


def run(name: str, bench: Callable[[], None], failed: list[str]) -> None:
    """Run one benchmark; a failure is printed and remembered, Ctrl-C stops everything."""
    started = time.monotonic()
    print(f"\n=== {name}", flush=True)
    try:
        bench()
    except Exception:  # noqa: BLE001 - one failed benchmark must not stop the others
        traceback.print_exc()
        failed.append(name)
    print(f"=== {name}: {time.monotonic() - started:.0f} s", flush=True)


def main(quick: bool = False) -> int:
    started = time.monotonic()
    failed: list[str] = []
    keys, window = (
        (idle.QUICK_KEYS, idle.QUICK_WINDOW) if quick else (idle.FULL_KEYS, idle.FULL_WINDOW)
    )
    print(
        f"idle CPU: a {keys}-key daemon (poll interval {idle.POLL_INTERVAL} s) runs from now on; "
        f"its own CPU time over {window:.0f} s is read after the other benchmarks, "
        "which run meanwhile in their own daemons and namespaces.",
        flush=True,
    )
    with contextlib.ExitStack() as stack:
        meter: idle.IdleMeter | None = None
        try:
            meter = stack.enter_context(idle.idle_daemon(keys))
        except Exception:  # noqa: BLE001 - without the idle daemon the others still run
            traceback.print_exc()
            failed.append("idle CPU (start)")
        for name, bench in BENCHMARKS:
            run(name, functools.partial(bench, quick), failed)
        if meter is not None:
            run("idle CPU", functools.partial(meter.finish, window, quick), failed)
    print(
        f"\nbenchmark suite{' (quick)' if quick else ''}: "
        f"{time.monotonic() - started:.0f} s wall time; "
        + (f"FAILED: {', '.join(failed)}" if failed else "all ran"),
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    interruptible()
    sys.exit(main(parse_quick(__doc__)))
