"""Batch create (README "Batch create"): `POST /api/keys/batch` of 1,000 keys and `portmeter keys
import` of a 1,000-line CSV file, at 10,000 existing keys. Target: at most 2 s each.

The existing keys come from a generated state file; Xray apply mode `none`, its config written,
the state durable. One single create first waits for what the start does after READY. Each sample
creates 1,000 keys of fresh names, so the daemon holds 1,000 more after each one; the import's
time is the whole command (process start, reading and checking the file, the request, the
answer).
Usage: .venv/bin/python -m bench.batch [--quick]
"""

from __future__ import annotations

import time

from bench.common import (
    SCALE_RANGE,
    append_results,
    interruptible,
    median,
    parse_quick,
    print_table,
    running,
    scratch,
)
from daemon.bounds import MAX_BATCH_KEYS
from tests.conftest import Daemon

TARGET = 2.0  # seconds, issue 18
SAMPLES = 3


def api_batch(daemon: Daemon, names: list[str]) -> float:
    """Seconds for one POST /api/keys/batch of `names`."""
    body = {"keys": [{"name": name} for name in names]}
    started = time.perf_counter()
    made = daemon.api("POST", "/api/keys/batch", expect=201, json=body)
    seconds = time.perf_counter() - started
    assert len(made["keys"]) == len(names)
    return seconds


def cli_import(daemon: Daemon, names: list[str]) -> float:
    """Seconds for one `portmeter keys import` of a CSV file holding `names`."""
    with scratch("pmb-import-") as directory:
        path = directory / "keys.csv"
        path.write_text("name,note\n" + "".join(f"{name},imported\n" for name in names))
        started = time.perf_counter()
        done = daemon.cli("keys", "import", str(path))
        seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    return seconds


WAYS = {"POST /api/keys/batch": api_batch, "portmeter keys import": cli_import}


def main(quick: bool = False) -> None:
    existing, size = (1000, 100) if quick else (10_000, MAX_BATCH_KEYS)
    timings: dict[str, list[float]] = {way: [] for way in WAYS}
    with running(existing, SCALE_RANGE) as run:
        run.daemon.create("warm-up")  # waits for what a start does after READY (Xray's render)
        for sample in range(SAMPLES):
            for number, (way, create) in enumerate(WAYS.items()):
                names = [f"b{sample}-{number}-{i}" for i in range(size)]
                timings[way].append(create(run.daemon, names))
        held = run.daemon.api("GET", "/api/keys?limit=1")["total"]
    assert held == existing + 1 + 2 * SAMPLES * size
    rows = [
        (way, f"{median(times):.2f}", f"{max(times):.2f}", "yes" if max(times) <= TARGET else "NO")
        for way, times in timings.items()
    ]
    title = f"batch create: {size} keys at {existing}+ existing keys (seconds, {SAMPLES} samples)"
    print_table(title, ["way", "median", "max", f"<= {TARGET:.0f} s"], rows)
    append_results(
        "batch create",
        [
            (f"{existing} keys", f"{way}: {size} keys median {median_} s, max {most} s")
            for way, median_, most, _ in rows
        ],
        quick,
    )


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
