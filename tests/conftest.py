"""Fixtures: a lab of two network namespaces and the real daemon process running in one of them.

Each daemon gets its own namespace, nft table name, port range, state dir and socket; all of it is
removed afterwards, also when the test fails.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.inprocess import DaemonSurface, InProcessDaemon, inprocess_daemon
from tests.netlab import Lab, lab, unique_name
from tests.pgserver import Cluster, Database, cluster

REPO = Path(__file__).resolve().parent.parent
_port_blocks = itertools.count()


# Fixtures that run the real daemon or make namespaces: a test using one is a kernel test.
KERNEL_FIXTURES = frozenset({"net", "make_daemon", "daemon"})
# Fixtures that run a PostgreSQL cluster (as the postgres user): root, even without a namespace.
FLEET_FIXTURES = frozenset({"pg_cluster", "fleet_db"})
ROOT_MARKERS = ("kernel", "systemd", "root")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Two layers: in-process tests (no root, fast) run first, kernel tests after them."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if KERNEL_FIXTURES & fixtures:
            item.add_marker(pytest.mark.kernel)
        elif FLEET_FIXTURES & fixtures:
            item.add_marker(pytest.mark.root)
    items.sort(key=lambda item: any(item.get_closest_marker(m) for m in ROOT_MARKERS))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if os.geteuid() != 0 and any(item.get_closest_marker(m) for m in ROOT_MARKERS):
        pytest.fail("this test needs root: it uses network namespaces and nftables "
                    "(run `make test-fast` for the in-process layer alone)", pytrace=False)


def fresh_port_range(size: int = 50) -> tuple[int, int]:
    """A port range no other test of this run uses."""
    first = 20001 + (next(_port_blocks) * 500 + os.getpid() * 7) % 10000
    return first, first + size - 1


class Daemon(DaemonSurface):
    """The real `portmeter run` process inside a namespace, and clients of its socket."""

    def __init__(self, netns: str, workdir: Path, port_range: tuple[int, int], **env: str) -> None:
        self.netns = netns
        self.workdir = workdir
        self.port_range = port_range
        self.table = unique_name("pmt")
        self.socket = workdir / "pm.sock"
        self.state_dir = workdir / "state"
        self.log_path = workdir / "daemon.log"
        self.env = {
            **os.environ,
            "PORTMETER_STATE_DIR": str(self.state_dir),
            "PORTMETER_SOCKET": str(self.socket),
            "PORTMETER_NFT_TABLE": self.table,
            "PORTMETER_PORT_RANGE": f"{port_range[0]}-{port_range[1]}",
            "PORTMETER_POLL_INTERVAL": "1",
            "PORTMETER_XRAY_CONFIG": str(workdir / "xray" / "config.json"),
            # Configuration only: nothing ever connects to these names.
            "PORTMETER_REALITY_DEST": "www.example.org:443",
            "PORTMETER_PUBLIC_HOST": "vpn.example.net",
            **env,
        }
        workdir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://portmeter",
            timeout=30,
        )

    @property
    def xray_config(self) -> Path:
        return Path(self.env["PORTMETER_XRAY_CONFIG"])

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    def start(self, wait: bool = True) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, sys.executable, "-m", "daemon", "run"],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.http.get("/api/system/ports").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready after {timeout}s:\n{self.log()}")

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(15)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "daemon", "--socket", str(self.socket), *args],
            check=False, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=60,
        )

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.http.close()


@pytest.fixture
def net() -> Iterator[Lab]:
    with lab() as made:
        yield made


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short path: a Unix socket path must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="pm-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_daemon(net: Lab, workdir: Path) -> Iterator[Any]:
    made: list[Daemon] = []

    def factory(size: int = 50, start: bool = True, **env: str) -> Daemon:
        daemon = Daemon(net.server, workdir / f"d{len(made)}", fresh_port_range(size), **env)
        made.append(daemon)
        if start:
            daemon.start()
        return daemon

    try:
        yield factory
    finally:
        for daemon in made:
            daemon.close()


@pytest.fixture
def daemon(make_daemon: Any) -> Daemon:
    return make_daemon()


@pytest.fixture
def inproc() -> Iterator[InProcessDaemon]:
    """The in-process daemon (tests/inprocess.py): no root, no namespace, no process."""
    with inprocess_daemon() as made:
        yield made


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """One real PostgreSQL 15 for the whole run (tests/pgserver.py); each test its own database."""
    with cluster() as made:
        yield made


@pytest.fixture
def fleet_db(pg_cluster: Cluster) -> Iterator[Database]:
    """A fresh database and role for one test, dropped afterwards."""
    with pg_cluster.database() as made:
        yield made
