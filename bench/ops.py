"""Create/delete latency through the socket API with 1,000, 10,000 and 30,000 existing keys.

Xray apply mode `none` and `api`, the Xray config written (PORTMETER_XRAY_CONFIG, or one file
per key with PORTMETER_XRAY_CONFDIR, README "One file per key"), state durable. No xray binary
runs here, so apply `api` calls a stand-in that exits 0 at once: the figure holds everything
portmeter does and the process start of `xray api adi/rmi`, not Xray's own work. The existing
keys come from a generated state file; the daemon installs their ports at start. Each sample is
a create followed by the delete of that key; at 30,000 keys (range 20001-50000, full) a delete
of an existing key comes first and the create takes its port. At large sizes sampling stops
early at a time budget.
Usage: .venv/bin/python -m bench.ops [--quick]
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    PORT_RANGE,
    SCALE_RANGE,
    Run,
    append_results,
    interruptible,
    median,
    parse_quick,
    percentile,
    print_table,
    running,
)

STAND_IN = "#!/bin/sh\nexit 0\n"  # `xray api ...` as if Xray took the change at once
# What apply `api` needs of the operator's config: the API with its HandlerService.
API_BASE = {"api": {"tag": "api", "listen": "127.0.0.1:62789", "services": ["HandlerService"]}}


@dataclass(frozen=True)
class Case:
    keys: int
    pairs: int
    budget: float  # seconds after which sampling stops (at least MIN_PAIRS are taken)
    files: str  # "single": one config file; "confdir": one file per key
    apply: str  # PORTMETER_XRAY_APPLY

    @property
    def label(self) -> str:
        files = "one file per key" if self.files == "confdir" else "one file"
        return f"{self.keys} keys, apply {self.apply}, {files}"


FULL = [
    Case(1000, 100, 120.0, "single", "none"),
    Case(1000, 100, 120.0, "confdir", "none"),
    Case(1000, 100, 120.0, "confdir", "api"),
    Case(10000, 60, 120.0, "single", "none"),
    Case(10000, 100, 120.0, "confdir", "none"),
    Case(10000, 100, 120.0, "confdir", "api"),
    Case(30000, 100, 150.0, "confdir", "none"),
    Case(30000, 100, 150.0, "confdir", "api"),
]
QUICK = [Case(100, 10, 60.0, "single", "none"), Case(1000, 5, 60.0, "confdir", "api")]
MIN_PAIRS = 5
TARGETS_MS = {1000: 20.0, 10000: 50.0, 30000: 60.0}  # create and delete p99


def measure(case: Case) -> dict[str, float]:
    """Time the case's create+delete pairs in a daemon of its own."""
    with tempfile.TemporaryDirectory(prefix="pm-bench-ops-") as tmp:
        env = {"PORTMETER_XRAY_APPLY": case.apply}
        if case.files == "confdir":
            env["PORTMETER_XRAY_CONFDIR"] = str(Path(tmp) / "conf.d")
        if case.apply == "api":
            stand_in = Path(tmp) / "xray"
            stand_in.write_text(STAND_IN)
            stand_in.chmod(0o755)
            env["PORTMETER_XRAY_BIN"] = str(stand_in)
        port_range = SCALE_RANGE if case.keys > 10000 else PORT_RANGE
        base = API_BASE if case.apply == "api" else None
        with running(case.keys, port_range, base, **env) as run:
            return _pairs(run, case)


def _pairs(run: Run, case: Case) -> dict[str, float]:
    """One unmeasured pair first: it waits for the Xray repair a start may still be making (the
    generated state has no Xray inbounds yet)."""
    creates: list[float] = []
    deletes: list[float] = []
    _pair(run, 0)
    started = time.monotonic()
    for i in range(1, case.pairs + 1):
        if i > MIN_PAIRS and time.monotonic() - started > case.budget:
            break
        create_ms, delete_ms = _pair(run, i)
        creates.append(create_ms)
        deletes.append(delete_ms)
    return {
        "n": len(creates),
        "create_p50": median(creates),
        "create_p99": percentile(creates, 0.99),
        "delete_p50": median(deletes),
        "delete_p99": percentile(deletes, 0.99),
    }


def _pair(run: Run, i: int) -> tuple[float, float]:
    """A create and a delete (ms); in a full range the delete of an existing key comes first."""
    daemon = run.daemon
    first, last = daemon.port_range
    if len(run.keys) >= last - first + 1:
        t0 = time.perf_counter()
        daemon.api("DELETE", f"/api/keys/{run.keys[i].id}")
        t1 = time.perf_counter()
        daemon.create(f"bench{i}")
        return (time.perf_counter() - t1) * 1000, (t1 - t0) * 1000
    t0 = time.perf_counter()
    key = daemon.create(f"bench{i}")
    t1 = time.perf_counter()
    daemon.api("DELETE", f"/api/keys/{key['id']}")
    return (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000


def main(quick: bool = False) -> None:
    results = [(case, measure(case)) for case in (QUICK if quick else FULL)]
    targets = ", ".join(f"{ms:.0f} ms at {k:,}" for k, ms in TARGETS_MS.items())
    print_table(
        f"create/delete through the API (durable state; target p99 <= {targets} keys)",
        ["case", "pairs", "create p50 ms", "create p99 ms", "delete p50 ms", "delete p99 ms"],
        [
            [
                case.label,
                r["n"],
                f"{r['create_p50']:.1f}",
                f"{r['create_p99']:.1f}",
                f"{r['delete_p50']:.1f}",
                f"{r['delete_p99']:.1f}",
            ]
            for case, r in results
        ],
    )
    append_results(
        "ops",
        [
            (
                case.label,
                (
                    f"create p50 {r['create_p50']:.1f} / p99 {r['create_p99']:.1f} ms; delete p50 "
                    f"{r['delete_p50']:.1f} / p99 {r['delete_p99']:.1f} ms; {r['n']} pairs"
                ),
            )
            for case, r in results
        ],
        quick,
    )


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
