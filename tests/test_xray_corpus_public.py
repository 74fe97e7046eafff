"""Public Xray server configs through the real daemon (issue 24).

tests/xray_corpus_public holds 40 configs verbatim from public repositories (XTLS's and
chika0801's examples, Marzban, 3x-ui, Hiddify, lxhao61, install scripts: templates with their
placeholders, Jinja2 sources that are no JSON at all), filled-in copies of the templates, and one
edge case per item of the issue. MANIFEST.tsv names each file's repository, path and commit, and
its outcome; EXPECTED below is that outcome as the test checks it.

Each file goes through one daemon in turn: the dry run, the migration (through the API, as the
CLI sends them), `portmeter xray validate`, every key's inbound and link read back against the
source as Xray reads it, and the rollback (byte for byte). Then the raw/TCP REALITY inbounds
that migrated, made servable by Debian's v2ray 4.34 (no REALITY there), are migrated again and
served: every listener distinct, each key's traffic counted on its own port alone, exactly.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.xray.model import is_portmeter_inbound, unix_listen, xray_uuid
from tests.conftest import Daemon
from tests.netlab import SERVER_V4, Lab, lab, wait_for
from tests.test_xray_corpus import expected_link, without_own_parts
from tests.test_xray_daemon import wait_listening
from tests.test_xray_text import xray_reader
from tests.test_xray_v2ray import (
    PAYLOAD_SIZE,
    Counts,
    needs_netns,
    needs_v2ray,
    reference_counters,
    v2ray_inbound,
)
from tests.xray_harness import (
    V2RAY,
    ClientRoute,
    client_config,
    http_get_via_socks,
    http_post_via_socks,
    http_server,
    link_fields,
    proxy_process,
    wait_port,
)

pytestmark = pytest.mark.kernel

PUBLIC = Path(__file__).parent / "xray_corpus_public"
PORTS = (41001, 41060)  # the corpus daemon's key range: e01 puts a range and a list inside it
NO_XRAY = "/nonexistent/portmeter-test/xray"  # validation is the structural check here
TEMPLATE = 'Xray refuses its REALITY settings (empty "privateKey")'
SECURITY_NONE = "VLESS with security 'none'; portmeter's keys use REALITY"
TLS = "VLESS with security 'tls' with certificates; portmeter's keys use REALITY"
FRONT = (
    "a front proxy (nginx, HAProxy) forwards its clients to that port and would not reach keys "
    "on ports of their own"
)
NOT_JSON = "is not valid JSON at line"


@dataclass(frozen=True)
class Outcome:
    """What migrating a file gives: `keys` made, text each of `why` the plan holds (the reasons
    of what is left alone), or the one line a file that cannot be read is `refused` with."""

    keys: int = 0
    why: tuple[str, ...] = ()
    refused: str = ""


EXPECTED: dict[str, Outcome] = {
    "01-xtls-vision-reality.jsonc": Outcome(0, (TEMPLATE,)),
    "02-xtls-grpc-reality.json": Outcome(1, ("move drEwvgYhS15C (drEwvgYhS15C)",)),
    "03-xtls-xhttp-reality-template.jsonc": Outcome(
        0, ('Xray refuses its REALITY settings (empty "serverNames"; empty "privateKey")',)
    ),
    "04-xtls-all-in-one-fallbacks.jsonc": Outcome(
        0, ("Xray's API inbound", TLS, SECURITY_NONE, "protocol 'vmess'", "protocol 'trojan'")
    ),
    "05-xtls-tcp-tls-proxyprotocol.json": Outcome(0, (TLS,)),
    "06-xtls-xhttp3-unix-socket.jsonc": Outcome(0, (SECURITY_NONE,)),
    "07-xtls-reality-behind-dokodemo.jsonc": Outcome(0, (TEMPLATE, "protocol 'dokodemo-door'")),
    "08-xtls-reverse-portal.jsonc": Outcome(0, ("VLESS with security 'xtls'", SECURITY_NONE)),
    "09-chika-reality-nginx-sni-shunting.jsonc": Outcome(0, (TEMPLATE,)),
    "10-chika-reality-grpc-shared-port.jsonc": Outcome(1, ("move chika (chika)", SECURITY_NONE)),
    "11-chika-self-use-primary.json": Outcome(0, (TEMPLATE,)),
    "12-chika-xhttp-reality-steal-oneself.jsonc": Outcome(0, (TEMPLATE, SECURITY_NONE)),
    "13-marzban-default.json": Outcome(0, ("protocol 'shadowsocks'",)),
    "14-marzban-fallback.jsonc": Outcome(0, ("protocol 'trojan'", SECURITY_NONE)),
    "15-3xui-base-template.json": Outcome(0, ("'api' (tunnel, port 62789): Xray's API inbound",)),
    "16-hiddify-reality-main-j2-INVALID.jsonc": Outcome(refused=NOT_JSON + " 3, column 4"),
    "17-hiddify-reality-main-template-INVALID.jsonc": Outcome(refused=NOT_JSON + " 46, column 25"),
    "18-zxcvos-vision-reality-placeholders.json": Outcome(
        0,
        (
            ('Xray refuses its REALITY settings (please fill in a valid value for "target"; '
            'empty "serverNames"; invalid "privateKey": xray x25519 Private key)'),
        ),
    ),
    "19-autoscript-hash-markers.jsonc": Outcome(0, ("protocol 'socks'", SECURITY_NONE)),
    "20-xtls-vless-tcp-plain.json": Outcome(0, (SECURITY_NONE,)),
    "21-xtls-tcp-tls-ws-fallback.jsonc": Outcome(0, (TLS, SECURITY_NONE)),
    "22-xtls-mkcp-finalmask.jsonc": Outcome(0, (SECURITY_NONE,)),
    "23-xtls-ss2022-reverse-portal.jsonc": Outcome(0, ("protocol 'shadowsocks'",)),
    "24-chika-testseed-empty-decryption.json": Outcome(0, (TEMPLATE, SECURITY_NONE)),
    "25-chika-vps1-multi-client.json": Outcome(0, (TEMPLATE,)),
    "26-chika-h2-reality-shared-port.jsonc": Outcome(1, ("move chika (chika)", SECURITY_NONE)),
    "27-lxhao61-fusion-two-objects-INVALID.jsonc": Outcome(
        refused=NOT_JSON + " 40, column 1: Extra data"
    ),
    "28-lxhao61-reality-uds-multi.jsonc": Outcome(
        1, ("move edfd12f5-acc9-49dc-9d67-efec7a2f8ff4 (443@gmail.com)", SECURITY_NONE)
    ),
    "29-lxhao61-vision-tls-trailing-comments.jsonc": Outcome(0, (TLS, "protocol 'vmess'")),
    "30-marzban-old-four-protocols.json": Outcome(0, ("'VLESS_INBOUND' (vless, port 80)",)),
    "31-marznode-vmess-no-clients.json": Outcome(0, ("'vmess HTTP' (vmess, port 2086)",)),
    "32-hiddify-dispatcher-j2-INVALID.jsonc": Outcome(refused=NOT_JSON + " 9, column 18"),
    "33-hiddify-vless-tcp-new-j2-INVALID.jsonc": Outcome(refused=NOT_JSON + " 2, column 2"),
    "34-xtls-vless-wss-nginx.jsonc": Outcome(0, (SECURITY_NONE,)),
    "35-xtls-splithttp-legacy-name.json": Outcome(0, (SECURITY_NONE,)),
    "36-xtls-trojan-tls-only.jsonc": Outcome(0, ("protocol 'trojan'",)),
    "37-xtls-shadowsocks-only.json": Outcome(0, ("protocol 'shadowsocks'",)),
    "38-chika-vision-tls-string-fallback.jsonc": Outcome(0, (TLS,)),
    "39-xtls-vision-tls-policy.jsonc": Outcome(0, (TLS,)),
    "40-chika-ws-behind-proxy.jsonc": Outcome(0, (SECURITY_NONE,)),
    "f01-xtls-vision-reality-filled.jsonc": Outcome(1),
    "f03-xtls-xhttp-reality-filled.jsonc": Outcome(1),
    "f07-xtls-reality-behind-dokodemo-filled.jsonc": Outcome(
        0, (f"it listens on ::1 port 4431 only: {FRONT}",)
    ),
    "f09-chika-reality-nginx-sni-shunting-filled.jsonc": Outcome(
        0, (f"it listens on 127.0.0.1 port 8003 only and accepts the PROXY protocol: {FRONT}",)
    ),
    "f11-chika-self-use-primary-filled.json": Outcome(1),
    "f12-chika-xhttp-reality-steal-oneself-filled.jsonc": Outcome(
        0, ("(vless, port 443): no clients; left as it is",)
    ),
    "f18-zxcvos-vision-reality-filled.json": Outcome(1, ("Xray's API inbound",)),
    "f24-chika-testseed-empty-decryption-filled.json": Outcome(
        0,
        (
            "(vless, port 443): no clients",
            ('Xray refuses its VLESS settings (VLESS settings: please add/set "decryption":"none" '
            "to every settings)"),
        ),
    ),
    "f25-chika-vps1-multi-client-filled.json": Outcome(
        3, ("move honoka (honoka)", "move umi (umi)", "move chika (chika)")
    ),
    "e01-port-range-and-list.jsonc": Outcome(
        3, ("to port 41004", "to port 41006", "to port 41008", "(socks, port 41001-41003)")
    ),
    "e02-hiddify-abstract-socket.jsonc": Outcome(
        0,
        (
            "it listens on the unix socket '@@realityin_2443', not on a port",
            "it listens on the unix socket '/dev/shm/reality.sock,0666', not on a port",
        ),
    ),
    "e03-front-proxy-haproxy.jsonc": Outcome(
        0, (f"it listens on 127.0.0.1 port 12000 only and accepts the PROXY protocol: {FRONT}",)
    ),
    "e04-routing-inbound-tag.jsonc": Outcome(
        3,
        (
            ("routing rule #0 (inboundTag 'VLESS_TCP_REALITY' -> 'warp') will also name the "
            "inbounds of the 3 keys moved from there"),
            "routing rule #1 (inboundTag 'VLESS_TCP_REALITY' -> 'block') will also name",
        ),
    ),
    "e05-vless-encryption.jsonc": Outcome(1),
    "e06-reality-accepted-oddities.jsonc": Outcome(1),
    "e07-ids-as-written.jsonc": Outcome(2, ("move 537C3205-6AB4-4046-8108-434202B99C62",)),
    "e08-duplicate-uuid.jsonc": Outcome(
        2, ("is listed 2 times in inbound 'vless-dup' (vless, port 443): Xray serves the last",)
    ),
    "e09-3xui-reality-inbound.jsonc": Outcome(1, ("Xray's API inbound",)),
}


def as_xray_reads(data: bytes) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(xray_reader(data.decode())[0])
    return config


def client_encryption_of(decryption: str) -> str:
    """The client half of a VLESS decryption, derived here with `cryptography` alone."""
    from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    if decryption == "none":
        return "none"
    kind, mode, _, *keys = decryption.split(".")
    public = []
    for key in (k for k in keys if len(k) >= 20):
        raw = _b64(key)
        if len(raw) == 32:
            found = x25519.X25519PrivateKey.from_private_bytes(raw).public_key()
        else:
            found = mlkem.MLKEM768PrivateKey.from_seed_bytes(raw).public_key()  # type: ignore[assignment]
        public.append(_unb64(found.public_bytes(Encoding.Raw, PublicFormat.Raw)))
    return ".".join([kind, mode, "0rtt", *public])


def _b64(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _unb64(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def link_of(inbound: dict[str, Any], name: str) -> dict[str, str]:
    """The link fields a key's inbound calls for (tests.test_xray_corpus.expected_link), with
    what Xray reads in any case lowered, the first server name a client can send, the key's
    short id in lower case and the client half of the VLESS decryption."""
    served = copy.deepcopy(inbound)
    stream = served.setdefault("streamSettings", {})
    stream["network"] = str(stream.get("network", "tcp")).lower()
    stream["security"] = str(stream.get("security", "none")).lower()
    reality = stream.get("realitySettings", {})
    names = [n for n in reality.get("serverNames", []) if n]
    reality["serverNames"] = names or [""]
    reality["shortIds"] = [s.lower() for s in reality.get("shortIds", [])]
    if "maxTimediff" in reality:  # 3x-ui's spelling
        reality.pop("maxTimediff")
    fields = expected_link(served, name)
    fields["encryption"] = client_encryption_of(served["settings"]["decryption"])
    return fields


def moved_from(
    source: dict[str, Any], created: dict[str, dict[str, Any]]
) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(shared inbound, the client entry Xray serves, its key) for every key made."""
    found = []
    for inbound in source.get("inbounds") or []:
        stream = inbound.get("streamSettings") or {}
        if str(stream.get("security")).lower() != "reality":
            continue  # the same id in a VLESS inbound that is not REALITY stays there
        served = {}
        for client in (inbound.get("settings") or {}).get("clients") or []:
            uuid = xray_uuid(client.get("id"))
            if uuid in created:
                served[uuid] = client  # the last entry of a uuid is the one Xray serves
        found += [(inbound, client, created[uuid]) for uuid, client in served.items()]
    return found


def routed(source: dict[str, Any], moves: list[Any], ports: dict[str, int]) -> dict[str, Any]:
    """`source` less its inbounds, as migration leaves it: rules naming a shared inbound name
    its keys' inbounds too, by port."""
    result = {k: copy.deepcopy(v) for k, v in source.items() if k != "inbounds"}
    by_source: dict[str, list[str]] = {}
    for inbound, _, key in moves:
        by_source.setdefault(inbound.get("tag"), []).append(f"inbound-{key['uuid']}")
    for rule in (result.get("routing") or {}).get("rules", []):
        named = rule.get("inboundTag")
        named = [named] if isinstance(named, str) else named or []
        tags = sorted((t for n in named for t in by_source.get(n, [])), key=ports.__getitem__)
        if tags:
            rule["inboundTag"] = [*named, *tags]
    return result


@pytest.fixture(scope="module")
def corpus_daemon() -> Iterator[Daemon]:
    """One daemon for every file (each test rolls its migration back): a start per file would
    take most of the time."""
    with lab() as net, _workdir() as workdir:
        daemon = Daemon(net.server, workdir, PORTS, PORTMETER_XRAY_BIN=NO_XRAY)
        daemon.xray_config.parent.mkdir(parents=True)
        daemon.start()
        try:
            yield daemon
        finally:
            daemon.close()


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pm-"))  # short: a socket path fits in 108 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_the_manifest_names_every_file_with_its_source_and_outcome() -> None:
    rows = [line.split("\t") for line in (PUBLIC / "MANIFEST.tsv").read_text().splitlines()]
    assert rows[0] == ["file", "source repo", "path", "commit", "outcome"]
    assert [row[0] for row in rows[1:]] == sorted(EXPECTED) == sorted(
        p.name for p in PUBLIC.iterdir() if p.name != "MANIFEST.tsv"
    )
    for name, repo, _, commit, outcome in rows[1:]:
        expected = EXPECTED[name]
        verb = "refused" if expected.refused else "migrated" if expected.keys else "skipped"
        assert outcome.startswith(f"{verb}:"), name
        if expected.keys:
            assert outcome.startswith(f"migrated: {expected.keys} key"), name
        if not name.startswith("e"):
            assert "/" in repo and len(commit) == 40, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_public_config(corpus_daemon: Daemon, name: str) -> None:
    d, outcome = corpus_daemon, EXPECTED[name]
    original = (PUBLIC / name).read_bytes()
    d.xray_config.write_bytes(original)
    path = str(d.xray_config)
    assert d.api("GET", "/api/keys?limit=1")["total"] == 0

    if outcome.refused:  # the CLI's one line, for the dry run and the migration alike
        for dry in (("--dry-run",), ()):
            refused = d.cli("migrate", path, *dry)
            assert refused.returncode == 1 and refused.stdout == "", refused.stdout
            assert refused.stderr.count("\n") == 1 and outcome.refused in refused.stderr
        assert d.xray_config.read_bytes() == original
        assert d.api("GET", "/api/keys?limit=1")["total"] == 0
        return
    # The dry run and the migration as `portmeter migrate` sends them (the CLI's own waiting
    # and printing are tested in tests/test_migration_plan.py); a CLI process each would make
    # this file take minutes.
    body = {"config_path": path, "dry_run": True}
    plan = "\n".join(d.api("POST", "/api/system/xray/migrate", json=body)["plan"])
    assert sum(line.startswith("move ") for line in plan.splitlines()) == outcome.keys, plan
    for why in outcome.why:
        assert why in plan, (why, plan)
    assert d.xray_config.read_bytes() == original

    done = d.api("POST", "/api/system/xray/migrate", json={**body, "dry_run": False})
    created = {key["uuid"]: key for key in done["created"]}
    assert len(created) == outcome.keys
    validated = d.cli("xray", "validate").stdout.splitlines()
    foreign = [line for line in validated if line.startswith("foreign: ")]
    assert validated == (foreign or [f"in sync: {outcome.keys} inbounds as expected"])
    if not outcome.keys:
        assert d.xray_config.read_bytes() == original  # nothing to do: nothing written
        return
    assert len(foreign) == (5 if name.startswith("e01") else 0), validated
    check_migrated(d, as_xray_reads(original), created)

    d.api("POST", "/api/system/xray/migrate/rollback")
    assert d.xray_config.read_bytes() == original
    assert d.api("GET", "/api/keys?limit=1")["total"] == 0


def check_migrated(d: Daemon, source: dict[str, Any], created: dict[str, Any]) -> None:
    """Each key's inbound is its source inbound but for port, tag and the other clients, with
    the client entry Xray serves, as written; its link reads back into that inbound; all else is
    as it was, but routing rules that named a shared inbound."""
    config = json.loads(d.xray_config.read_text())
    by_tag = {i.get("tag"): i for i in config["inbounds"] if is_portmeter_inbound(i)}
    moves = moved_from(source, created)
    assert len(moves) == len(created)
    for shared, client, key in moves:
        inbound = by_tag[f"inbound-{key['uuid']}"]
        assert without_own_parts(inbound) == without_own_parts(shared)
        assert inbound["settings"]["clients"] == [client]
        assert inbound["port"] == key["port"] and PORTS[0] <= key["port"] <= PORTS[1]
        assert link_fields(key["link"]) == link_of(inbound, key["name"]), key["name"]
    emptied = [id(shared) for shared, _, _ in moves]
    kept = [i for i in source["inbounds"] if id(i) not in emptied]
    assert [i for i in config["inbounds"] if not is_portmeter_inbound(i)] == kept
    ports = {tag: inbound["port"] for tag, inbound in by_tag.items()}
    assert {k: v for k, v in config.items() if k != "inbounds"} == routed(source, moves, ports)


# --- served by v2ray: distinct listeners, each key's bytes on its own port -------------------

# The files whose REALITY inbounds are raw/TCP (v2ray's "tcp") and migrate: a sample of every
# shape (string ids, fallbacks, unix-socket dests, a range of ports held, routing rules, ids as
# written, a uuid twice, a panel's inbound).
SERVED = (
    "10-chika-reality-grpc-shared-port.jsonc",
    "28-lxhao61-reality-uds-multi.jsonc",
    "e01-port-range-and-list.jsonc",
    "e04-routing-inbound-tag.jsonc",
    "e07-ids-as-written.jsonc",
    "e08-duplicate-uuid.jsonc",
    "e09-3xui-reality-inbound.jsonc",
    "f11-chika-self-use-primary-filled.json",
    "f25-chika-vps1-multi-client-filled.json",
)
FIRST_SHARED_PORT = 31001  # the converted shared inbounds' own ports


def servable_source() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One config with the shared inbounds of SERVED as v2ray serves them, and e01's socks
    inbound on its range of ports (v2ray 4.34 takes a range, not a list)."""
    inbounds: list[dict[str, Any]] = []
    held = []
    for name in SERVED:
        source = as_xray_reads((PUBLIC / name).read_bytes())
        for inbound in source["inbounds"]:
            stream = inbound.get("streamSettings") or {}
            if str(stream.get("security")).lower() != "reality" or unix_listen(inbound):
                continue
            if inbound.get("tag") == "inbound-443":
                inbound["tag"] = "panel-443"  # 3x-ui's tag is shaped like a key's
            served = v2ray_inbound(inbound, FIRST_SHARED_PORT + len(inbounds))
            served.pop("listen", None)
            served["settings"].pop("fallbacks", None)  # dests on this host's other services
            inbounds.append(served)
        held += [i for i in source["inbounds"] if i.get("tag") == "socks-range"]
    config = {
        "log": {"loglevel": "warning"},
        "inbounds": [*held, *inbounds],
        "outbounds": [{"protocol": "freedom", "tag": "direct"}],
    }
    return config, held


@needs_v2ray
@needs_netns
def test_served_by_v2ray_every_listener_distinct_and_each_key_counted_alone(
    make_daemon: Any, net: Lab
) -> None:
    d = make_daemon(
        start=False, PORTMETER_XRAY_SECURITY="none", PORTMETER_XRAY_APPLY="none",
        PORTMETER_XRAY_BIN=str(V2RAY), PORTMETER_PUBLIC_HOST=SERVER_V4,
        PORTMETER_PORT_RANGE=f"{PORTS[0]}-{PORTS[1]}",
    )
    source, held = servable_source()
    d.xray_config.parent.mkdir(parents=True)
    d.xray_config.write_text(json.dumps(source, indent=2))
    d.start()
    done = d.cli("--json", "migrate", str(d.xray_config))  # each write passed `v2ray -test`
    assert done.returncode == 0, done.stderr
    keys = json.loads(done.stdout)["created"]
    # e08's uuid listed twice is one key; "chika" of 10 and f25 is one uuid: one key, for 10
    assert len(keys) == 16
    ports = sorted(k["port"] for k in keys)
    assert len(set(ports)) == len(ports) and not set(ports) & set(range(41001, 41004))
    proxy_dir = d.workdir / "proxies"
    proxy_dir.mkdir()
    routes = [ClientRoute.from_link(k["link"], socks_port=12001 + n) for n, k in enumerate(keys)]
    with (
        reference_counters(net.client, ports) as reference,
        http_server(net.server, os.urandom(PAYLOAD_SIZE // 16)) as http_port,
        proxy_process(net.server, d.xray_config, proxy_dir, "server") as server,
    ):
        for port in [*ports, 41001, 41002, 41003]:
            wait_listening(net.server, port, server)
        assert listeners(net.server, [*ports, 41001, 41002, 41003]) == {
            port: 1 for port in [*ports, 41001, 41002, 41003]
        }
        with proxy_process(net.client, client_config(routes), proxy_dir, "client") as client:
            for route in routes:
                wait_port(net.client, route.socks_port, proc=client)
            for n, route in enumerate(routes):  # a different amount for each key
                upload = os.urandom(500 * (n + 1))
                via = (net.client, route.socks_port, "127.0.0.1", http_port)
                answer = http_post_via_socks(*via, upload)
                assert answer == hashlib.sha256(upload).hexdigest().encode()
                assert len(http_get_via_socks(*via)) == PAYLOAD_SIZE // 16
        assert server.poll() is None, "the server proxy died during the test"

        def counted() -> Counts:
            exact = d.api("GET", "/api/traffic/ports/exact")["ports_traffic"]["ports_traffic"]
            each = [e["traffic"] for e in exact.values()]
            return {t["port"]: (t["rx_bytes"], t["tx_bytes"]) for t in each}

        wait_for(lambda: counted() == reference() == reference(), 20, "daemon = reference")
        totals = counted()
    received = [totals[k["port"]][0] for k in keys]
    assert all(rx > 500 for rx in received) and len(set(received)) == len(received)
    assert held and all(tx > PAYLOAD_SIZE // 16 for _, tx in totals.values())


def listeners(ns: str, ports: list[int]) -> dict[int, int]:
    """How many listening TCP sockets each port has in `ns`."""
    listed = subprocess.run(
        ["ip", "netns", "exec", ns, "ss", "-Hltn"], capture_output=True, text=True, check=True
    ).stdout
    found = dict.fromkeys(ports, 0)
    for line in listed.splitlines():
        port = int(line.split()[3].rpartition(":")[2])
        if port in found:
            found[port] += 1
    return found
