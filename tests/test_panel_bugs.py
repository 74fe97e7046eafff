"""The bugs panels' users report, each as a test through a real proxy (Debian's v2ray serving the
config the daemon wrote, as in tests/test_xray_daemon.py), each able to fail.

v2ray runs as systemd runs Xray (`v2ray_service`): a supervisor starts it again whenever it
exits, and a restart command, the stand-in for `systemctl restart xray`, stops it and returns once
the new one has started. The operator runs that command by hand, or the daemon runs it itself in
apply mode restart (PORTMETER_XRAY_RESTART_COMMAND).

Counts are checked against counters of our own in a table of our own, beside the daemon's in the
server's namespace (`reference_counters`): by README "What is counted" the key's rx and tx must
equal them byte for byte, and at least the bytes the test's own sockets moved.

Covered elsewhere, not repeated here:
- usage counted across a daemon crash without a proxy, with UDP datagrams of known size:
  tests/test_durability.py (test_kill9_loses_nothing_and_doubles_nothing);
- a key's server socket closed within a poll interval on disable, limit, expiry and delete,
  both ends: tests/test_live_connections.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.netlab import SERVER_V4, Lab, sh, wait_for
from tests.test_live_connections import established
from tests.test_xray_daemon import listening, write_json
from tests.test_xray_v2ray import Counts, reference_counters
from tests.xray_harness import (
    V2RAY,
    ClientRoute,
    SocksFetchError,
    client_config,
    http_get_via_socks,
    http_post_via_socks,
    http_server,
    proxy_process,
    socks_connect,
    stop_process,
    wait_port,
)

pytestmark = pytest.mark.skipif(
    not V2RAY.exists(), reason="needs Debian's v2ray (apt-get install v2ray)"
)

SOCKS = 11071
PAYLOAD = 2 * 1024 * 1024
LONG_PAYLOAD = 64 * 1024 * 1024  # more than every buffer on the way holds: a restart cuts it
MB = 1_000_000

# The operator's config before the first key: no inbounds, one way out.
BASE_CONFIG: dict[str, Any] = {
    "log": {"loglevel": "warning"},
    "inbounds": [],
    "outbounds": [{"protocol": "freedom", "tag": "direct"}],
}

SUPERVISOR = """#!/bin/sh
# Stands in for systemd's xray.service: runs v2ray, starts it again whenever it exits, stops it
# on SIGTERM.
trap 'kill "$pid"; wait "$pid"; exit 0' TERM
while :; do
    {v2ray} -config {config} >>{log} 2>&1 </dev/null &
    pid=$!
    echo "$pid" >{pidfile}
    wait "$pid"
    sleep 0.1
done
"""

RESTART = """#!/bin/sh
# Stands in for `systemctl restart xray`: stops v2ray (the supervisor starts it again) and
# returns once the new one reports it started, which it does once its inbounds listen.
echo restart >>{restarts}
old=$(cat {pidfile})
before=$(grep -c ' started$' {log})
kill "$old"
until [ "$(grep -c ' started$' {log})" -gt "$before" ] && [ "$(cat {pidfile})" != "$old" ]; do
    sleep 0.05
done
"""


@dataclass
class Service:
    """v2ray running under its supervisor in a namespace."""

    ns: str
    directory: Path
    supervisor: subprocess.Popen[bytes]

    def pid(self) -> int:
        return int((self.directory / "v2ray.pid").read_text())

    def starts(self) -> int:
        """How often v2ray has started (its log says so once its inbounds listen)."""
        lines = (self.directory / "v2ray.log").read_text(errors="replace").splitlines()
        return sum(line.endswith(" started") for line in lines)

    def restarts(self) -> int:
        """How often the restart command ran, by the test or by the daemon."""
        done = self.directory / "restarts"
        return len(done.read_text().splitlines()) if done.exists() else 0

    def restart(self) -> None:
        """What an operator runs after a change the daemon did not apply."""
        sh("ip", "netns", "exec", self.ns, str(restart_command(self.directory)))


def restart_command(directory: Path) -> Path:
    return directory / "restart-v2ray.sh"


@contextlib.contextmanager
def v2ray_service(ns: str, config: Path, directory: Path) -> Iterator[Service]:
    """v2ray on `config` in `ns` as a service, its files in `directory`; stopped afterwards."""
    names = {"v2ray": V2RAY, "config": config, "log": directory / "v2ray.log"}
    names |= {"pidfile": directory / "v2ray.pid", "restarts": directory / "restarts"}
    quoted = {name: shlex.quote(str(path)) for name, path in names.items()}
    supervise = directory / "supervise.sh"
    for script, text in ((supervise, SUPERVISOR), (restart_command(directory), RESTART)):
        script.write_text(text.format(**quoted))
        script.chmod(0o755)
    supervisor = subprocess.Popen(
        ["ip", "netns", "exec", ns, str(supervise)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        service = Service(ns, directory, supervisor)
        wait_for(lambda: names["log"].exists() and service.starts() == 1, 10, "v2ray to start")
        yield service
    finally:
        stop_process(supervisor)


@dataclass
class Served:
    """A daemon and v2ray serving the config it writes, with an HTTP server behind the proxy."""

    net: Lab
    daemon: Daemon
    service: Service
    http_port: int


@contextlib.contextmanager
def served(
    make_daemon: Any, net: Lab, workdir: Path, payload: bytes, apply: str = "none"
) -> Iterator[Served]:
    """The daemon, started on an operator config without keys that v2ray already serves, and
    applying its changes to v2ray the `apply` way (none: the operator restarts it)."""
    directory = workdir / "v2ray"
    directory.mkdir()
    d = make_daemon(
        start=False,
        PORTMETER_XRAY_SECURITY="none",
        PORTMETER_XRAY_APPLY=apply,
        PORTMETER_XRAY_RESTART_COMMAND=str(restart_command(directory)),
        PORTMETER_XRAY_BIN=str(V2RAY),
        PORTMETER_PUBLIC_HOST=SERVER_V4,
    )
    write_json(d.xray_config, BASE_CONFIG)
    with (
        http_server(net.server, payload) as http_port,
        v2ray_service(net.server, d.xray_config, directory) as service,
    ):
        d.start()
        yield Served(net, d, service, http_port)
        assert service.starts() == 1 + service.restarts(), "v2ray started only when restarted"


class Download:
    """A GET through the client proxy read a piece at a time, so that things can restart in the
    middle of it."""

    def __init__(self, stream: socket.socket) -> None:
        self.stream = stream
        self.data = bytearray()
        stream.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")

    def take(self, size: int) -> None:
        """Read `size` more bytes; the download must not end before."""
        goal = len(self.data) + size
        while len(self.data) < goal:
            chunk = self.stream.recv(min(262144, goal - len(self.data)))
            assert chunk, f"the download ended after {len(self.data)} bytes"
            self.data += chunk

    def rest(self) -> bytes:
        """Read until the connection ends; the body received."""
        while chunk := self.stream.recv(262144):
            self.data += chunk
        return bytes(self.data.partition(b"\r\n\r\n")[2])


@dataclass
class Proxied:
    """One key served by v2ray, and a client v2ray with a socks port for it."""

    net: Lab
    daemon: Daemon
    service: Service
    key: dict[str, Any]
    http_port: int

    def fetch(self, timeout: float = 30) -> bytes:
        return http_get_via_socks(
            self.net.client, SOCKS, "127.0.0.1", self.http_port, timeout=timeout
        )

    def post(self, body: bytes) -> bytes:
        return http_post_via_socks(self.net.client, SOCKS, "127.0.0.1", self.http_port, body)

    @contextlib.contextmanager
    def download(self) -> Iterator[Download]:
        with socks_connect(self.net.client, SOCKS, "127.0.0.1", self.http_port) as stream:
            yield Download(stream)


@contextlib.contextmanager
def client_for(s: Served, key: dict[str, Any]) -> Iterator[Proxied]:
    """A client v2ray in the client namespace with socks port SOCKS for `key`'s share link."""
    route = ClientRoute.from_link(key["link"], socks_port=SOCKS)
    config = client_config([route])
    with proxy_process(s.net.client, config, s.service.directory, "client") as client:
        wait_port(s.net.client, SOCKS, proc=client)
        yield Proxied(s.net, s.daemon, s.service, key, s.http_port)


@contextlib.contextmanager
def proxied(
    make_daemon: Any, net: Lab, workdir: Path, payload: bytes, **fields: Any
) -> Iterator[Proxied]:
    """A key made with `fields`, served once the operator restarted v2ray (apply mode none),
    and a client for it."""
    with served(make_daemon, net, workdir, payload) as s:
        key = s.daemon.create("panel-user", **fields)
        s.service.restart()
        with client_for(s, key) as p:
            yield p


def settled(p: Proxied, reference: Callable[[], Counts]) -> tuple[int, int]:
    """The key's (rx, tx) once the daemon's count equals our own counter's and neither moves:
    every packet of the finished connections is counted, once."""
    port = p.key["port"]
    deadline = time.monotonic() + 20
    while True:
        ours = reference()[port]
        traffic = p.daemon.traffic(p.key["id"])
        counted = (traffic["rx_bytes"], traffic["tx_bytes"])
        if counted == ours == reference()[port]:
            return counted
        if time.monotonic() > deadline:
            assert counted == ours, "the daemon's count (rx, tx) differs from the port's counter"
        time.sleep(0.2)


def to_key(net: Lab, port: int) -> list[str]:
    """The client namespace's established connections to the key's port."""
    shown = sh(
        "ip",
        "netns",
        "exec",
        net.client,
        "ss",
        "-tnH",
        "state",
        "established",
        f"( dport = :{port} )",
    )
    return shown.stdout.splitlines()


def test_usage_lost_when_the_proxy_restarts(make_daemon: Any, net: Lab, workdir: Path) -> None:
    """Panels read Xray's own traffic statistics, which start again at zero when Xray restarts:
    what a user moved since the panel's last read was lost (multi-v2ray #616, Xray-core #670). The
    kernel counts the port, whatever the proxy does: a restart in the middle of a download
    loses nothing, and traffic after it adds to the count."""
    payload, upload = os.urandom(LONG_PAYLOAD), os.urandom(3 * MB)
    with (
        proxied(make_daemon, net, workdir, payload) as p,
        reference_counters(net.server, [p.key["port"]], server_side=True) as reference,
    ):
        with p.download() as download:
            download.take(MB)
            pid = p.service.pid()
            p.service.restart()
            cut = len(download.rest())
        assert MB < cut < LONG_PAYLOAD, "the restart cut the download"
        assert p.service.pid() != pid
        assert p.fetch() == payload
        assert p.post(upload) == hashlib.sha256(upload).hexdigest().encode()
        rx, tx = settled(p, reference)
        assert rx > len(upload) and tx > cut + LONG_PAYLOAD


def test_user_keeps_the_live_connection_after_being_disabled(
    make_daemon: Any, net: Lab, workdir: Path
) -> None:
    """3x-ui #4119, Marzban #1631: disabled, the user kept browsing on an open connection."""
    with (
        proxied(make_daemon, net, workdir, os.urandom(LONG_PAYLOAD)) as p,
        p.download() as download,
    ):
        download.take(MB)
        assert established(net, p.key["port"]), "the download runs through the key's port"
        p.daemon.api("POST", f"/api/keys/{p.key['id']}/disable")
        # Both ends of the proxied connection are gone: the server proxy's socket and the
        # client proxy's connection to the key's port (what it does with its own local
        # socks connection is the client program's business).
        assert established(net, p.key["port"]) == []
        wait_for(lambda: not to_key(net, p.key["port"]), 2, "the client side to be reset")


def test_user_keeps_the_live_connection_after_the_limit(
    make_daemon: Any, net: Lab, workdir: Path
) -> None:
    """The same with a data limit reached mid-download: both ends of the proxied connection
    are closed at the next poll, not left stalled for the proxy's idle timeout."""
    limit = 3 * PAYLOAD // 2
    with proxied(make_daemon, net, workdir, os.urandom(PAYLOAD), data_limit_bytes=limit) as p:
        assert len(p.fetch()) == PAYLOAD
        with pytest.raises(SocksFetchError):
            p.fetch(timeout=5)
        assert p.daemon.traffic(p.key["id"])["status"] == "limited"
        assert established(net, p.key["port"]) == []
        assert to_key(net, p.key["port"]) == []


def test_user_not_re_enabled_after_a_reset_until_the_core_restarts(
    make_daemon: Any, net: Lab, workdir: Path
) -> None:
    """A limited user, reset: traffic flows again at once through the same running proxy."""
    limit = 3 * PAYLOAD // 2
    with proxied(make_daemon, net, workdir, os.urandom(PAYLOAD), data_limit_bytes=limit) as p:
        assert len(p.fetch()) == PAYLOAD
        with pytest.raises(SocksFetchError):
            p.fetch(timeout=20)
        pid, restarts = p.service.pid(), p.service.restarts()
        reset = p.daemon.api("POST", f"/api/keys/{p.key['id']}/traffic/port/reset")
        assert reset["status"] == "active"
        assert len(p.fetch()) == PAYLOAD
        assert (p.service.pid(), p.service.restarts()) == (pid, restarts)


def test_new_user_works_without_restarting_the_core(
    make_daemon: Any, net: Lab, workdir: Path
) -> None:
    """A user added in the panel could not connect until someone restarted Xray (3x-ui #3343).
    The daemon applies each change to the running proxy itself, so the key is
    served when its create answers. Apply mode restart: Debian's v2ray 4.34 has no `api adi`
    (its `v2ctl api` offers only LoggerService and StatsService, not HandlerService), and the
    daemon refuses apply mode api for v2ray."""
    with served(make_daemon, net, workdir, os.urandom(PAYLOAD), apply="restart") as s:
        before = s.service.pid()
        key = s.daemon.create("new-user")
        # At the answer, without waiting: the daemon's restart returned once v2ray listened.
        assert listening(net.server, key["port"])
        pid = s.service.pid()
        assert (pid != before, s.service.restarts()) == (True, 1)
        with client_for(s, key) as p:
            assert len(p.fetch()) == PAYLOAD
        assert (s.service.pid(), s.service.restarts()) == (pid, 1), "nobody restarted it again"


def test_nothing_counted_twice_across_restarts(make_daemon: Any, net: Lab, workdir: Path) -> None:
    """Panels showed users more usage than they moved (x-ui #545, 3x-ui #5274). A download runs
    while the daemon stops (SIGTERM) and starts, while it is killed (kill -9) and starts, and
    another while the proxy restarts: the key's count is exactly the port's bytes after each."""
    payload, upload = os.urandom(LONG_PAYLOAD), os.urandom(3 * MB)
    with (
        proxied(make_daemon, net, workdir, payload) as p,
        reference_counters(net.server, [p.key["port"]], server_side=True) as reference,
    ):
        with p.download() as download:
            download.take(MB)
            settled(p, reference)
            assert p.daemon.stop() == 0
            download.take(MB)
            p.daemon.start()
            download.take(MB)
            settled(p, reference)
            p.daemon.kill9()
            download.take(MB)
            p.daemon.start()
            assert download.rest() == payload
        settled(p, reference)
        with p.download() as download:
            download.take(MB)
            p.service.restart()
            cut = len(download.rest())
        assert p.post(upload) == hashlib.sha256(upload).hexdigest().encode()
        rx, tx = settled(p, reference)
        assert rx > len(upload) and tx > LONG_PAYLOAD + cut
