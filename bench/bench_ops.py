"""Create/delete latency through the socket API and the cost of reading every counter.

Runs the real daemon in a throw-away network namespace, fills it to each size, then times
creates and deletes over the Unix socket (apply mode `none`) and full counter reads.
Usage: .venv/bin/python -m bench.bench_ops [SIZES...]   (default: 100 1000)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx

from tests.conftest import Daemon, fresh_port_range
from tests.netlab import lab

RESULTS = Path(__file__).with_name("RESULTS.md")
SAMPLES = 100


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fill(daemon: Daemon, count: int) -> None:
    def create(i: int) -> None:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)), timeout=120) as c:
            response = c.post("http://pm/api/keys", json={"name": f"fill{i}"})
            assert response.status_code == 201, response.text

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(count)))


def timed(call) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def measure(size: int, workdir: Path, **env: str) -> dict[str, float]:
    with lab() as net:
        daemon = Daemon(net.server, Path(tempfile.mkdtemp(dir=workdir)), fresh_port_range(size + SAMPLES + 10),
                        PORTMETER_POLL_INTERVAL="3600", **env)
        try:
            daemon.start()
            fill(daemon, size)
            creates, deletes, reads = [], [], []
            for i in range(SAMPLES):
                holder: dict[str, str] = {}
                creates.append(timed(lambda: holder.update(id=daemon.create(f"b{i}")["id"])))
                deletes.append(timed(lambda: daemon.api("DELETE", f"/api/keys/{holder['id']}")))
                reads.append(timed(lambda: daemon.api("GET", "/api/system/traffic/summary")))
            return {
                "create_p50": statistics.median(creates), "create_p99": percentile(creates, 0.99),
                "delete_p50": statistics.median(deletes), "delete_p99": percentile(deletes, 0.99),
                "read_all_p50": statistics.median(reads),
            }
        finally:
            daemon.close()


def apply_modes(tmp: Path) -> dict[str, dict[str, str]]:
    """Apply modes with stand-ins for the Xray service: a restart command that succeeds, and a
    fake `xray` whose `api adi/rmi` succeed (no real Xray here)."""
    fake = tmp / "xray"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    return {
        "none": {"PORTMETER_XRAY_APPLY": "none"},
        "restart": {"PORTMETER_XRAY_APPLY": "restart", "PORTMETER_XRAY_RESTART_COMMAND": "/bin/true"},
        "api": {"PORTMETER_XRAY_APPLY": "api", "PORTMETER_XRAY_BIN": str(fake)},
    }


def main() -> None:
    args = sys.argv[1:]
    modes = ["none"]
    if args and args[0] == "--modes":
        modes, args = ["none", "restart", "api"], args[1:]
    sizes = [int(a) for a in args] or [100, 1000]
    rows = []
    with tempfile.TemporaryDirectory(prefix="pmb-") as tmp:
        envs = apply_modes(Path(tmp))
        for mode in modes:
            for size in sizes:
                r = measure(size, Path(tmp), **envs[mode])
                rows.append((mode, size, r))
                print(f"apply {mode:7} {size:>6} keys: create p50 {r['create_p50']:.1f} ms "
                      f"p99 {r['create_p99']:.1f} ms | delete p50 {r['delete_p50']:.1f} ms "
                      f"p99 {r['delete_p99']:.1f} ms | read-all (API, incl. HTTP) p50 "
                      f"{r['read_all_p50']:.1f} ms", flush=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    with RESULTS.open("a") as out:
        for mode, size, r in rows:
            out.write(f"| {stamp} | ops, apply {mode} | {os.cpu_count()} cores | {size} keys | create p50 "
                      f"{r['create_p50']:.1f} / p99 {r['create_p99']:.1f} ms | delete p50 "
                      f"{r['delete_p50']:.1f} / p99 {r['delete_p99']:.1f} ms | read-all p50 "
                      f"{r['read_all_p50']:.1f} ms |\n")


if __name__ == "__main__":
    main()
