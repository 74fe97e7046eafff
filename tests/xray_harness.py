"""Helpers for tests that run v2ray/Xray inside a network namespace and send traffic through it.

Every helper takes the namespace's name, so other test modules (per-key counting with nftables,
apply-mode tests) can reuse them with their own namespaces and fixtures:

    with netns() as ns, http_server(ns, payload) as http_port:
        with proxy_process(ns, server_config, tmp_path, "server") as server:
            wait_port(ns, 21001, proc=server)
            ...
            body = http_get_via_socks(ns, socks_port, "127.0.0.1", http_port)

Sockets of the test process are made inside the namespace with `tests.netlab.make_socket` (a
socket keeps the namespace it was created in), so the test's own connections need no
`ip netns exec`. Traffic only ever goes over the namespace's loopback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from daemon.xray_sync import is_v2ray
from tests.netlab import make_socket

V2RAY = Path("/usr/bin/v2ray")
NETNS_DIR = Path("/var/run/netns")


class SocksFetchError(Exception):
    """The proxy refused or closed the connection before a complete HTTP answer arrived."""


def have_netns_tools() -> bool:
    """Root, `ip` and setns(2): what every namespace test needs."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


def unique_netns_name(prefix: str = "pmx") -> str:
    return f"{prefix}{os.getpid() % 10000}{secrets.token_hex(2)}"


@contextlib.contextmanager
def netns(name: str | None = None) -> Iterator[str]:
    """A fresh network namespace with loopback up, deleted afterwards even if the test fails."""
    name = name or unique_netns_name()
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(
            ["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def ns_socket(
    ns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    """A socket that lives in namespace `ns`; usable from ordinary test code afterwards."""
    return make_socket(ns, family, kind)


def wait_port(
    ns: str,
    port: int,
    host: str = "127.0.0.1",
    timeout: float = 10.0,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Return once something accepts TCP connections on host:port inside `ns` (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process {proc.args} exited with {proc.returncode} before port {port} opened"
            )
        sock = ns_socket(ns)
        try:
            sock.settimeout(0.5)
            sock.connect((host, port))
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listens on {host}:{port} in {ns} after {timeout}s"
                ) from None
            time.sleep(0.05)
        finally:
            sock.close()


# --- proxy processes -----------------------------------------------------------------------


def proxy_command(binary: Path, config_file: Path) -> list[str]:
    if is_v2ray(binary):
        return [str(binary), "-config", str(config_file)]
    return [str(binary), "run", "-c", str(config_file)]


@contextlib.contextmanager
def proxy_process(
    ns: str,
    config: dict[str, Any] | Path,
    workdir: Path,
    name: str,
    binary: Path = V2RAY,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run v2ray (or Xray) in `ns` on a config dict or file; output goes to workdir/<name>.log."""
    if isinstance(config, Path):
        config_file = config
    else:
        config_file = workdir / f"{name}.json"
        config_file.write_text(json.dumps(config, indent=2))
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *proxy_command(binary, config_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; always reaps the process."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True, slots=True)
class ClientRoute:
    """One socks port of the client proxy, forwarded to one VLESS server port as one uuid."""

    socks_port: int
    server_port: int
    uuid: str
    server: str = "127.0.0.1"
    flow: str = ""

    @classmethod
    def from_link(cls, link: str, socks_port: int) -> ClientRoute:
        """A route from a vless:// share link (security none only: the test proxy lacks REALITY)."""
        parts = urlsplit(link)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.scheme != "vless" or query.get("security", "none") != "none":
            raise ValueError(f"not a plain vless link: {link}")
        return cls(socks_port, parts.port or 0, unquote(parts.username or ""), parts.hostname or "")


def link_fields(link: str) -> dict[str, str]:
    """A vless:// link read back as v2rayN and Hiddify read it: id, host, port and name, and
    each query parameter (each must appear once)."""
    parts = urlsplit(link)
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=True)
    if parts.scheme != "vless" or any(len(v) != 1 for v in query.values()):
        raise ValueError(f"not a vless link with single parameters: {link}")
    return {
        "id": unquote(parts.username or ""),
        "host": parts.hostname or "",
        "port": str(parts.port),
        "name": unquote(parts.fragment),
        **{name: values[0] for name, values in query.items()},
    }


def client_config(routes: Sequence[ClientRoute]) -> dict[str, Any]:
    """A client proxy config: socks inbound N on 127.0.0.1 -> VLESS outbound N, one per route."""
    inbounds, outbounds, rules = [], [], []
    for route in routes:
        inbounds.append(
            {
                "tag": f"socks-{route.socks_port}",
                "listen": "127.0.0.1",
                "port": route.socks_port,
                "protocol": "socks",
                "settings": {"auth": "noauth", "udp": False},
            }
        )
        user: dict[str, Any] = {"id": route.uuid, "encryption": "none"}
        if route.flow:
            user["flow"] = route.flow
        outbounds.append(
            {
                "tag": f"vless-{route.socks_port}",
                "protocol": "vless",
                "settings": {
                    "vnext": [{"address": route.server, "port": route.server_port, "users": [user]}]
                },
                "streamSettings": {"network": "tcp", "security": "none"},
            }
        )
        rules.append(
            {
                "type": "field",
                "inboundTag": [f"socks-{route.socks_port}"],
                "outboundTag": f"vless-{route.socks_port}",
            }
        )
    return {
        "log": {"loglevel": "warning"},
        "inbounds": inbounds,
        "outbounds": outbounds,
        "routing": {"domainStrategy": "AsIs", "rules": rules},
    }


# --- a local HTTP server -------------------------------------------------------------------


@contextlib.contextmanager
def http_server(ns: str, payload: bytes, port: int = 0) -> Iterator[int]:
    """Serve `payload` to any GET on 127.0.0.1 in `ns`; a POST answers the sha256 of its body.

    Yields the port. Runs in a thread of the test process, on a socket created in `ns`.
    """
    sock = ns_socket(ns)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            self._answer(payload)

        def do_POST(self) -> None:
            remaining = int(self.headers.get("Content-Length", "0"))
            digest = hashlib.sha256()
            while remaining:
                chunk = self.rfile.read(min(remaining, 65536))
                if not chunk:
                    break
                digest.update(chunk)
                remaining -= len(chunk)
            self._answer(digest.hexdigest().encode())

        def _answer(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_address = sock.getsockname()
    thread = threading.Thread(target=server.serve_forever, name=f"http-{ns}", daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- a SOCKS5 client -----------------------------------------------------------------------


def socks_connect(
    ns: str, socks_port: int, host: str, port: int, timeout: float = 10.0
) -> socket.socket:
    """A TCP stream to host:port through the SOCKS5 proxy on 127.0.0.1:socks_port in `ns`."""
    sock = ns_socket(ns)
    try:
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", socks_port))
        sock.sendall(b"\x05\x01\x00")  # version 5, one method: no authentication
        if _recv_exact(sock, 2) != b"\x05\x00":
            raise SocksFetchError("the proxy refused SOCKS5 without authentication")
        request = b"\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big")
        sock.sendall(request)
        reply = _recv_exact(sock, 4)
        if reply[1] != 0:
            raise SocksFetchError(f"the proxy answered CONNECT with code {reply[1]}")
        bound = {1: 4, 4: 16}.get(reply[3])
        if bound is None:
            bound = _recv_exact(sock, 1)[0]
        _recv_exact(sock, bound + 2)
        return sock
    except BaseException:
        sock.close()
        raise


def http_get_via_socks(
    ns: str, socks_port: int, host: str, port: int, path: str = "/", timeout: float = 30.0
) -> bytes:
    """GET http://host:port/path through the proxy; the body, checked against Content-Length."""
    request = f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode()
    return _http_via_socks(ns, socks_port, host, port, request, b"", timeout)


def http_post_via_socks(
    ns: str, socks_port: int, host: str, port: int, body: bytes, timeout: float = 30.0
) -> bytes:
    """POST `body` through the proxy (client -> server bytes); the answer's body."""
    head = (
        f"POST / HTTP/1.0\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return _http_via_socks(ns, socks_port, host, port, head, body, timeout)


def _http_via_socks(
    ns: str, socks_port: int, host: str, port: int, head: bytes, body: bytes, timeout: float
) -> bytes:
    """Send a request and read the answer up to its Content-Length (no wait for the close:
    a proxy may hold a finished connection open for its idle timeouts)."""
    try:
        with socks_connect(ns, socks_port, host, port, timeout) as sock:
            sock.sendall(head + body)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    raise SocksFetchError(
                        f"no HTTP answer through socks port {socks_port} ({len(data)} bytes)"
                    )
                data += chunk
            header, _, content = data.partition(b"\r\n\r\n")
            lines = header.decode("latin-1").split("\r\n")
            if " 200 " not in f"{lines[0]} ":
                raise SocksFetchError(f"HTTP status line {lines[0]!r}")
            length = _content_length(lines[1:])
            chunks = [content]
            received = len(content)
            while received < length:
                chunk = sock.recv(min(262144, length - received))
                if not chunk:
                    raise SocksFetchError(f"got {received} of {length} body bytes")
                chunks.append(chunk)
                received += len(chunk)
    except (ConnectionError, TimeoutError) as exc:
        raise SocksFetchError(f"connection through socks port {socks_port} failed: {exc}") from None
    return b"".join(chunks)


def _content_length(header_lines: Sequence[str]) -> int:
    for line in header_lines:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return int(value)
    raise SocksFetchError("the answer has no Content-Length")


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise SocksFetchError(f"the proxy closed the connection ({len(data)}/{size} bytes)")
        data += chunk
    return data
