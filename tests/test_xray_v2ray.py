"""A real proxy serves the rendered per-key inbounds: Debian's v2ray 4.34 in a network namespace.

v2ray has VLESS but no REALITY, so the inbounds are rendered with security "none" (test only).
A client v2ray turns socks ports into VLESS connections built from each key's share link; a
local HTTP server provides a known payload. Only the namespace's loopback carries traffic.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import secrets
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.xray.links import vless_link
from daemon.xray.model import XrayConfigError, XrayKey, XrayOptions
from daemon.xray.render import render_config
from daemon.xray_sync import XrayFiles
from tests.netlab import SERVER_V4, Lab, wait_for
from tests.test_xray_corpus import (
    CORPUS,
    as_xray_reads,
    is_reality_vless,
    mapped_uuid,
    without_own_parts,
)
from tests.test_xray_daemon import wait_listening
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


# --- the corpus's inbounds, migrated and served ------------------------------------------

NFT_V2RAY_TEST_PORTS = range(31001, 31100)  # the converted shared inbounds' own ports
Counts = dict[int, tuple[int, int]]  # port -> (bytes to it, bytes from it)


def v2ray_inbound(inbound: dict[str, Any], port: int) -> dict[str, Any]:
    """A corpus REALITY inbound as v2ray 4.34 can serve it: no REALITY (so no Vision flow), the
    transport's old name "tcp", no QUIC sniffing, ids as the uuids Xray maps them to. Every
    other field (listen, sniffing, allocate, fallbacks, sockopt ...) stays."""
    served = copy.deepcopy(inbound)
    stream = served["streamSettings"]
    stream.pop("realitySettings")
    stream["security"] = "none"
    stream["network"] = "tcp"
    if "rawSettings" in stream:
        stream["tcpSettings"] = stream.pop("rawSettings")
    sniffing = served.get("sniffing")
    if sniffing:
        sniffing["destOverride"] = [p for p in sniffing["destOverride"] if p in ("http", "tls")]
    for client in served["settings"]["clients"]:
        client.pop("flow", None)
        client["id"] = mapped_uuid(client["id"])
    served.update(port=port, tag=f"shared-{port}")
    return served


def corpus_source() -> dict[str, Any]:
    """One config holding every raw/tcp REALITY inbound of the corpus, made servable by v2ray."""
    inbounds: list[dict[str, Any]] = []
    for path in sorted(CORPUS.glob("*.jsonc")):
        for inbound in as_xray_reads(path.read_text())["inbounds"]:
            network = (inbound.get("streamSettings") or {}).get("network", "tcp")
            if is_reality_vless(inbound) and network in ("raw", "tcp"):
                inbounds.append(v2ray_inbound(inbound, NFT_V2RAY_TEST_PORTS[len(inbounds)]))
    return {
        "log": {"loglevel": "warning"},
        "inbounds": inbounds,
        "outbounds": [{"protocol": "freedom", "tag": "direct"}],
    }


@contextlib.contextmanager
def reference_counters(
    ns: str, ports: list[int], server_side: bool = False
) -> Iterator[Callable[[], Counts]]:
    """Counters of our own in the client's namespace (or, server_side, the server's): per port,
    bytes sent to it (the server's rx) and received from it (its tx), layer 3, as the daemon
    counts on the server."""
    table = f"pmref{os.getpid() % 10000}{secrets.token_hex(2)}"
    to_hook, from_hook = ("input", "output") if server_side else ("output", "input")
    rules = [f"table inet {table} {{"]
    rules += [f"counter to_{p} {{}}\ncounter from_{p} {{}}" for p in ports]
    rules.append(f"chain {to_hook} {{ type filter hook {to_hook} priority mangle;")
    rules += [f"tcp dport {p} counter name to_{p}" for p in ports]
    rules.append(f"}}\nchain {from_hook} {{ type filter hook {from_hook} priority mangle;")
    rules += [f"tcp sport {p} counter name from_{p}" for p in ports]
    rules.append("}\n}")
    nft = ["ip", "netns", "exec", ns, "nft"]
    subprocess.run([*nft, "-f", "-"], input="\n".join(rules), text=True, check=True)

    def read() -> Counts:
        listed = subprocess.run(
            [*nft, "-j", "list", "counters", "table", "inet", table],
            capture_output=True, text=True, check=True,
        )
        found = {
            item["counter"]["name"]: item["counter"]["bytes"]
            for item in json.loads(listed.stdout)["nftables"] if "counter" in item
        }
        return {p: (found[f"to_{p}"], found[f"from_{p}"]) for p in ports}

    try:
        yield read
    finally:
        subprocess.run([*nft, "delete", "table", "inet", table], check=False, capture_output=True)


@needs_v2ray
@needs_netns
@pytest.mark.kernel
def test_corpus_inbounds_migrate_and_count_exactly_through_v2ray(
    make_daemon: Any, net: Lab
) -> None:
    d = make_daemon(
        start=False, PORTMETER_XRAY_SECURITY="none", PORTMETER_XRAY_APPLY="none",
        PORTMETER_XRAY_BIN=str(V2RAY), PORTMETER_PUBLIC_HOST=SERVER_V4,
    )
    source = corpus_source()
    assert len(source["inbounds"]) == 6
    d.xray_config.parent.mkdir(parents=True)
    d.xray_config.write_text(json.dumps(source, indent=4))
    d.start()
    done = d.cli("--json", "migrate", str(d.xray_config))  # each write passed `v2ray -test`
    assert done.returncode == 0, done.stderr
    keys = json.loads(done.stdout)["created"]
    assert len(keys) == sum(len(i["settings"]["clients"]) for i in source["inbounds"]) == 14
    config = json.loads(d.xray_config.read_text())
    by_tag = {i["tag"]: i for i in config["inbounds"]}
    for shared in source["inbounds"]:
        for client in shared["settings"]["clients"]:
            inbound = by_tag[f"inbound-{client['id']}"]
            assert without_own_parts(inbound) == without_own_parts(shared)
            assert inbound["settings"]["clients"] == [client]
    assert d.cli("xray", "validate").stdout.strip() == "in sync: 14 inbounds as expected"

    used, idle = keys[:-1], keys[-1]
    routes = [ClientRoute.from_link(k["link"], socks_port=12001 + n) for n, k in enumerate(used)]
    assert [(r.server_port, r.uuid) for r in routes] == [(k["port"], k["uuid"]) for k in used]
    ports = [k["port"] for k in keys]
    proxy_dir = d.workdir / "proxies"
    proxy_dir.mkdir()
    with (
        reference_counters(net.client, ports) as reference,
        http_server(net.server, os.urandom(PAYLOAD_SIZE // 8)) as http_port,
        proxy_process(net.server, d.xray_config, proxy_dir, "server") as server,
    ):
        for port in ports:
            wait_listening(net.server, port, server)
        with proxy_process(net.client, client_config(routes), proxy_dir, "client") as client:
            for route in routes:
                wait_port(net.client, route.socks_port, proc=client)
            for n, route in enumerate(routes):  # a different amount for each key
                upload = os.urandom(1000 * (n + 1))
                via = (net.client, route.socks_port, "127.0.0.1", http_port)
                answer = http_post_via_socks(*via, upload)
                assert answer == hashlib.sha256(upload).hexdigest().encode()
                assert len(http_get_via_socks(*via)) == PAYLOAD_SIZE // 8
        assert server.poll() is None, "the server proxy died during the test"

        def counted() -> Counts:
            exact = d.api("GET", "/api/traffic/ports/exact")["ports_traffic"]["ports_traffic"]
            each = [e["traffic"] for e in exact.values()]
            return {t["port"]: (t["rx_bytes"], t["tx_bytes"]) for t in each}

        # Equal, and the reference still: every packet of the closed connections is counted.
        wait_for(lambda: counted() == reference() == reference(), 20, "daemon = reference")
        totals = counted()
    assert totals[idle["port"]] == (0, 0)
    for key in used:
        rx, tx = totals[key["port"]]
        assert rx > 1000 and tx > PAYLOAD_SIZE // 8, (key["name"], rx, tx)
