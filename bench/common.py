"""What every benchmark shares: daemons on generated state inside throw-away namespaces, process
figures from /proc, percentiles, printed tables and rows appended to RESULTS.md.

Everything made here (namespaces, the nft tables inside them, state dirs) is removed on the way
out of its context manager, also on an exception, Ctrl-C or SIGTERM (see `interruptible`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import httpx
import structlog

from daemon.service.xray_side import XraySide
from daemon.settings import Settings
from daemon.store.state import KeyRecord, State, StateStore
from tests.conftest import Daemon
from tests.netlab import Lab, lab

RESULTS = Path(__file__).with_name("RESULTS.md")
# 12,000 ports: room for 10,000 keys and the samples. Each daemon has a namespace of its own, so
# ranges never clash with each other or with the host.
PORT_RANGE = (20000, 31999)
# The range issue 18 names for 30,000 keys (README "30,000 keys"); benches at that size use it.
SCALE_RANGE = (20001, 50000)
READY_TIMEOUT = 900.0  # start-up at 10,000 keys: a full table install and Xray config write
API_TIMEOUT = 300.0
POLL_LINE = re.compile(r"\bevent=poll\b.*?\bseconds=([0-9.]+)")


# --- arguments, signals, output ---------------------------------------------------------


def parse_quick(description: str | None) -> bool:
    """`--quick`: small sizes and few samples, for a smoke run."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes, few samples (smoke run)")
    return bool(parser.parse_args().quick)


def interruptible() -> None:
    """Make SIGINT (even if inherited as ignored) and SIGTERM raise KeyboardInterrupt, so every
    `finally` cleans up as for Ctrl-C."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty sample."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sample."""
    return statistics.median(values)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a titled, column-aligned table."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n## {title}")
    for n, row in enumerate(cells):
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(flush=True)


def append_results(what: str, rows: Sequence[tuple[str, str]], quick: bool) -> None:
    """Append (size, figures) rows under `what` to RESULTS.md, stamped now (UTC); a quick (smoke)
    run's figures are not results and are not recorded."""
    if quick:
        print(f"(quick run: {what} not recorded in {RESULTS.name})")
        return
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    with RESULTS.open("a") as out:
        for size, figures in rows:
            cores, cells = f"{os.cpu_count()} cores", figures.replace("|", "/")
            out.write(f"| {stamp} | {what} | {cores} | {size} | {cells} |\n")


# --- places -----------------------------------------------------------------------------


@contextlib.contextmanager
def scratch(prefix: str = "pmb-") -> Iterator[Path]:
    """A fresh short directory (socket paths must fit in 108 bytes), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- state ------------------------------------------------------------------------------


def generate_state(daemon: Daemon, count: int) -> list[KeyRecord]:
    """Write a state file with `count` keys on the lowest ports of the daemon's range, each with
    what the Xray bridge gives a new key (short id, subscription token); the table is left to the
    daemon (missing: it installs every port at start)."""
    env = daemon.env
    settings = Settings(
        state_dir=daemon.state_dir,
        xray_config=daemon.xray_config,
        reality_dest=env["PORTMETER_REALITY_DEST"],
        public_host=env["PORTMETER_PUBLIC_HOST"],
    )
    bridge = XraySide(settings, structlog.get_logger())
    state = State()
    created = datetime.now(UTC)
    first = daemon.port_range[0]
    for i in range(count):
        key_id = secrets.token_hex(4)
        while key_id in state.keys:
            key_id = secrets.token_hex(4)
        key = KeyRecord(
            id=key_id, name=f"k{i}", uuid=uuid.uuid4(), port=first + i, created_at=created
        )
        bridge.prepare(state, key)
        state.keys[key.id] = key
    daemon.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    StateStore(settings.state_file).save(state)
    return list(state.keys.values())


# --- daemons ----------------------------------------------------------------------------


@dataclass
class Run:
    """A started daemon and the keys its generated state holds."""

    daemon: Daemon
    keys: list[KeyRecord]


def make_daemon(
    net: Lab, workdir: Path, port_range: tuple[int, int] = PORT_RANGE, **env: str
) -> Daemon:
    """A daemon (not started) in the server namespace: apply mode none, no polling unless asked."""
    env.setdefault("PORTMETER_XRAY_APPLY", "none")
    env.setdefault("PORTMETER_POLL_INTERVAL", "3600")
    env.setdefault("NOTIFY_SOCKET", "")  # never notify a systemd the bench itself may run under
    daemon = Daemon(net.server, workdir, port_range, **env)
    daemon.http.timeout = httpx.Timeout(API_TIMEOUT)
    return daemon


@contextlib.contextmanager
def running(
    keys: int,
    port_range: tuple[int, int] = PORT_RANGE,
    xray_base: dict[str, object] | None = None,
    **env: str,
) -> Iterator[Run]:
    """A started daemon with `keys` keys in its own lab and directory (ports from `port_range`;
    `xray_base`: the Xray config it starts from); all removed afterwards."""
    with lab() as net, scratch() as workdir:
        daemon = make_daemon(net, workdir, port_range, **env)
        try:
            made = generate_state(daemon, keys) if keys else []
            if xray_base is not None:
                daemon.xray_config.parent.mkdir(parents=True, exist_ok=True)
                daemon.xray_config.write_text(json.dumps(xray_base))
            daemon.start(wait=False)
            daemon.wait_ready(READY_TIMEOUT)
            yield Run(daemon, made)
        finally:
            daemon.close()


def python_pid(daemon: Daemon) -> int:
    """The daemon's Python pid: `ip netns exec` execs it in place, so wait for that."""
    assert daemon.process is not None
    pid = daemon.process.pid
    deadline = time.monotonic() + 10
    while "python" not in Path(f"/proc/{pid}/exe").resolve().name:
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid} is not the daemon's python process")
        time.sleep(0.05)
    return pid


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` in seconds (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """VmRSS of `pid` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def poll_seconds(daemon: Daemon) -> list[float]:
    """Durations of the daemon's polls so far, from its `poll` debug events."""
    return [float(m.group(1)) for m in POLL_LINE.finditer(daemon.log())]


def wait_polls(daemon: Daemon, count: int, timeout: float) -> list[float]:
    """Wait until the daemon has logged `count` polls (needs PORTMETER_LOG_LEVEL=debug)."""
    deadline = time.monotonic() + timeout
    while len(polls := poll_seconds(daemon)) < count:
        assert daemon.process is not None
        if daemon.process.poll() is not None:
            raise RuntimeError(
                f"daemon exited with {daemon.process.returncode}:\n{daemon.log()[-2000:]}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(polls)} of {count} polls after {timeout:.0f} s")
        time.sleep(0.2)
    return polls


class ReadyListener:
    """An AF_UNIX datagram socket for sd_notify: the daemon gets NOTIFY_SOCKET=its path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def wait_ready(self, timeout: float, alive: Callable[[], bool]) -> None:
        """Return once a datagram with READY=1 arrives; fail on timeout or if `alive()` is false."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not alive():
                raise RuntimeError("daemon exited before READY=1")
            self.sock.settimeout(0.2)
            try:
                message = self.sock.recv(4096).decode(errors="replace")
            except TimeoutError:
                continue
            if "READY=1" in message.split("\n"):
                return
        raise TimeoutError(f"no READY=1 within {timeout:.0f} s")

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)
