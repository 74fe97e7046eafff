"""A real proxy serves the rendered per-key inbounds: Debian's v2ray 4.34 in a network namespace.

v2ray has VLESS but no REALITY, so the inbounds are rendered with security "none" (test only).
A client v2ray turns socks ports into VLESS connections built from each key's share link; a
local HTTP server provides a known payload. Only the namespace's loopback carries traffic.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest

from daemon.xray_sync import (
    XrayConfigError,
    XrayFiles,
    XrayKey,
    XrayOptions,
    render_config,
    vless_link,
)
from tests.xray_harness import (
    V2RAY,
    ClientRoute,
    SocksFetchError,
    client_config,
    have_netns_tools,
    http_get_via_socks,
    http_post_via_socks,
    http_server,
    netns,
    proxy_process,
    wait_port,
)

needs_v2ray = pytest.mark.skipif(
    not V2RAY.exists(), reason="needs Debian's v2ray (apt-get install v2ray)"
)
needs_netns = pytest.mark.skipif(not have_netns_tools(), reason="needs root and iproute2")

PAYLOAD_SIZE = 2 * 1024 * 1024
PORT_A, PORT_B = 21001, 21002


def _setup(tmp_path: Path) -> tuple[XrayOptions, list[XrayKey]]:
    opts = XrayOptions(
        config_path=tmp_path / "xray" / "config.json",
        xray_bin=V2RAY,
        security="none",
        public_host="127.0.0.1",
    )
    keys = [
        XrayKey("ka", "alice", str(uuid.uuid4()), PORT_A),
        XrayKey("kb", "bob smith", str(uuid.uuid4()), PORT_B),
    ]
    return opts, keys


@needs_v2ray
def test_v2ray_validation_accepts_rendered_and_rejects_broken(tmp_path: Path) -> None:
    opts, keys = _setup(tmp_path)
    files = XrayFiles(opts)
    assert files.write(render_config(files.read(), keys, opts), expected=keys) is None
    live = opts.config_path.read_bytes()

    broken = render_config(files.read(), keys, opts)
    broken["inbounds"][0]["settings"]["clients"][0]["id"] = "not-a-uuid-but-still-a-string"
    broken["inbounds"].append({"port": "99999", "protocol": "socks", "tag": "operator-socks"})
    with pytest.raises(XrayConfigError, match="rejected the new config") as caught:
        files.write(broken)
    assert "\n" not in str(caught.value)
    assert opts.config_path.read_bytes() == live
    assert files.backups() == []


@needs_v2ray
@needs_netns
@pytest.mark.kernel
def test_v2ray_serves_each_key_on_its_own_port(tmp_path: Path) -> None:
    opts, keys = _setup(tmp_path)
    alice, bob = keys
    files = XrayFiles(opts)
    files.write(render_config(files.read(), keys, opts), expected=keys)  # `v2ray -test` passed
    payload = os.urandom(PAYLOAD_SIZE)
    upload = os.urandom(PAYLOAD_SIZE // 2)

    routes = [
        ClientRoute.from_link(vless_link(alice, opts), socks_port=11001),
        ClientRoute.from_link(vless_link(bob, opts), socks_port=11002),
        # bob's uuid on alice's port: each inbound accepts exactly its own key
        ClientRoute(socks_port=11003, server_port=PORT_A, uuid=bob.uuid),
    ]
    assert [(r.server_port, r.uuid) for r in routes[:2]] == [
        (PORT_A, alice.uuid),
        (PORT_B, bob.uuid),
    ]

    with (
        netns() as ns,
        http_server(ns, payload) as http_port,
        proxy_process(ns, opts.config_path, tmp_path, "server") as server,
    ):
        for port in (PORT_A, PORT_B):
            wait_port(ns, port, proc=server)
        with proxy_process(ns, client_config(routes), tmp_path, "client") as client:
            for route in routes:
                wait_port(ns, route.socks_port, proc=client)

            got = http_get_via_socks(ns, 11001, "127.0.0.1", http_port)
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            assert http_get_via_socks(ns, 11002, "127.0.0.1", http_port) == payload
            answer = http_post_via_socks(ns, 11001, "127.0.0.1", http_port, upload)
            assert answer == hashlib.sha256(upload).hexdigest().encode()
            with pytest.raises(SocksFetchError):
                http_get_via_socks(ns, 11003, "127.0.0.1", http_port, timeout=10)
        assert server.poll() is None, "the server proxy died during the test"
    server_log = (tmp_path / "server.log").read_text(errors="replace")
    assert "panic" not in server_log


@needs_v2ray
@needs_netns
@pytest.mark.kernel
def test_namespace_is_removed_even_when_the_test_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), netns() as ns:
        assert (Path("/var/run/netns") / ns).exists()
        with proxy_process(ns, {"inbounds": "not a list"}, tmp_path, "bad") as proc:
            wait_port(ns, 21999, proc=proc, timeout=10)
    assert not (Path("/var/run/netns") / ns).exists()
    assert json.loads((tmp_path / "bad.json").read_text()) == {"inbounds": "not a list"}
