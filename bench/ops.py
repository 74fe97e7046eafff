"""Create/delete latency through the socket API with 100, 1,000 and 10,000 existing keys.

Apply mode `none`, the Xray config written (PORTMETER_XRAY_CONFIG), state durable. The existing
keys come from a generated state file; the daemon installs their ports at start. Each sample is a
create followed by the delete of that key; at large sizes sampling stops early at a time budget.
At 1,000 and 10,000 keys the same run also measures one file per key (PORTMETER_XRAY_CONFDIR,
README "One file per key") against the single file.
Usage: .venv/bin/python -m bench.ops [--quick]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.common import (
    append_results,
    interruptible,
    median,
    parse_quick,
    percentile,
    print_table,
    running,
)

# (existing keys, create+delete pairs, seconds after which to stop sampling, Xray files)
FULL = [
    (100, 100, 300.0, "single"),
    (1000, 100, 300.0, "single"),
    (1000, 100, 300.0, "confdir"),
    (10000, 50, 150.0, "single"),
    (10000, 50, 150.0, "confdir"),
]
QUICK = [(100, 10, 60.0, "single"), (1000, 5, 60.0, "single"), (1000, 5, 60.0, "confdir")]
MIN_PAIRS = 5


def measure(keys: int, pairs: int, budget: float, files: str) -> dict[str, float]:
    """Time `pairs` create+delete pairs (at least MIN_PAIRS, at most `budget` seconds), the
    Xray config in one file or (`files` "confdir") one file per key."""
    with tempfile.TemporaryDirectory(prefix="pm-bench-confdir-") as tmp:
        env = {"PORTMETER_XRAY_CONFDIR": str(Path(tmp) / "conf.d")} if files == "confdir" else {}
        return _measure(keys, pairs, budget, env)


def _measure(keys: int, pairs: int, budget: float, env: dict[str, str]) -> dict[str, float]:
    creates: list[float] = []
    deletes: list[float] = []
    with running(keys, **env) as run:
        daemon = run.daemon
        started = time.monotonic()
        for i in range(pairs):
            if i >= MIN_PAIRS and time.monotonic() - started > budget:
                break
            t0 = time.perf_counter()
            key = daemon.create(f"bench{i}")
            t1 = time.perf_counter()
            daemon.api("DELETE", f"/api/keys/{key['id']}")
            t2 = time.perf_counter()
            creates.append((t1 - t0) * 1000)
            deletes.append((t2 - t1) * 1000)
    return {
        "n": len(creates),
        "create_p50": median(creates),
        "create_p99": percentile(creates, 0.99),
        "delete_p50": median(deletes),
        "delete_p99": percentile(deletes, 0.99),
    }


def main(quick: bool = False) -> None:
    results = [
        (keys, files, measure(keys, pairs, budget, files))
        for keys, pairs, budget, files in (QUICK if quick else FULL)
    ]
    print_table(
        "create/delete through the API (apply none, Xray config written, durable state)",
        [
            "keys",
            "xray files",
            "pairs",
            "create p50 ms",
            "create p99 ms",
            "delete p50 ms",
            "delete p99 ms",
        ],
        [
            [
                k,
                files,
                r["n"],
                f"{r['create_p50']:.1f}",
                f"{r['create_p99']:.1f}",
                f"{r['delete_p50']:.1f}",
                f"{r['delete_p99']:.1f}",
            ]
            for k, files, r in results
        ],
    )
    append_results(
        "ops, apply none",
        [
            (
                f"{k} keys, {'one file per key' if files == 'confdir' else 'one file'}",
                (
                    f"create p50 {r['create_p50']:.1f} / p99 {r['create_p99']:.1f} ms; delete p50 "
                    f"{r['delete_p50']:.1f} / p99 {r['delete_p99']:.1f} ms; {r['n']} pairs"
                ),
            )
            for k, files, r in results
        ],
        quick,
    )


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
